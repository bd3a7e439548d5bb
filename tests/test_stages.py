"""mspcnn.stages: a training stage's manifest (reused when its inputs and weights match), its
resume record (written when stopped, read back by the next invocation) and the machine of each
part, without training: the training is a stand-in that returns what engine.solve would."""
import json
import os
from types import SimpleNamespace

import pytest

from mspcnn import stages


def test_a_finished_stage_is_reused_only_with_its_inputs_and_weights(tmp_path, capsys):
    """finished_stage: a manifest is reused when its inputs match and its weights are there with the
    SHA-256 it recorded; other inputs, changed or missing weights and an unreadable manifest mean
    training (None), and the manifest is left as it is."""
    weights = tmp_path / "stage2_iter_2.caffemodel"
    weights.write_bytes(b"weights")
    inputs = {"solver": "abc", "loss_weights": [1, 0, 1], "stage1_weights_sha256": "def"}
    path = tmp_path / "stage2.manifest.json"
    path.write_text(json.dumps({"inputs": inputs, "weights": str(weights),
                                "weights_sha256": stages.sha256(weights), "iterations": 2, "history": []}))
    found = stages.finished_stage(str(path), inputs, "split 1, cls+low", "stage2")
    assert found["iterations"] == 2 and "split 1, cls+low: stage2 reused from" in capsys.readouterr().out
    assert stages.finished_stage(str(path), dict(inputs, stage1_weights_sha256="xyz"), "w", "stage2") is None
    weights.write_bytes(b"changed")
    assert stages.finished_stage(str(path), inputs, "w", "stage2") is None
    weights.unlink()
    assert stages.finished_stage(str(path), inputs, "w", "stage2") is None
    text = path.read_text()
    assert json.loads(text)["inputs"] == inputs  # left as it was
    for bad in ("{not json", "[1, 2]", json.dumps({"inputs": inputs, "weights": 3})):
        path.write_text(bad)
        assert stages.finished_stage(str(path), inputs, "w", "stage2") is None
    assert stages.finished_stage(str(tmp_path / "none.json"), inputs, "w", "stage2") is None
    assert "reused" not in capsys.readouterr().out


def test_a_stopped_stage_records_the_machine_of_each_part(tmp_path, capsys):
    """stop_if_stopped writes the resume record with the machine of every part so far;
    resume_point gives them back (a record of a version that did not write them: one part of
    unknown machine); a record that is not an object, or of other inputs, is removed; a finished
    stage resumed from a part on another machine says so when it is reused."""
    state = tmp_path / "stage1_iter_7.solverstate"
    state.write_bytes(b"state")
    (tmp_path / "stage1_iter_7.caffemodel").write_bytes(b"weights")
    partial = str(tmp_path / "stage1.partial.json")
    inputs = {"solver": "abc"}
    amd = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "torch": "2.13.0", "threads": 2}
    xeon = dict(amd, cpu="Intel Xeon")
    result = SimpleNamespace(stopped_by="time limit", snapshots=[(7, str(state))], history=[[7, 0.5]],
                             iterations=7, weights=str(tmp_path / "stage1_iter_7.caffemodel"))
    with pytest.raises(stages.Stopped, match="the same command resumes it"):
        stages.stop_if_stopped(result, "split 1", "stage 1", partial, inputs, [[0, 0.1]],
                                  [{"machine": amd, "iterations": 7}])
    got, history, parts = stages.resume_point(partial, inputs, "split 1", "stage1")
    assert (got, history, parts) == (str(state), [[0, 0.1], [7, 0.5]], [{"machine": amd, "iterations": 7}])
    assert stages.other_machine_parts(parts, amd) == [] and stages.other_machine_parts(parts, xeon) == parts
    assert stages.parts_text(parts) == "AMD EPYC (AVX512), torch 2.13.0, 2 threads to iteration 7"
    record = json.loads(open(partial).read())
    del record["parts"]  # as written before the machines were recorded
    open(partial, "w").write(json.dumps(record))
    assert stages.resume_point(partial, inputs, "w", "stage1")[2] == [{"machine": None, "iterations": None}]
    assert stages.parts_text([{"machine": None, "iterations": None}]) == "a machine not recorded"
    for bad in ("[1, 2]", json.dumps(dict(record, inputs={"solver": "other"})),
                json.dumps(dict(record, solverstate=3))):
        open(partial, "w").write(bad)
        assert stages.resume_point(partial, inputs, "w", "stage1") == (None, [], [])
        assert not os.path.exists(partial)
    capsys.readouterr()
    manifest = tmp_path / "stage1.manifest.json"
    manifest.write_text(json.dumps({"inputs": inputs, "weights": result.weights, "machine": xeon,
                                    "weights_sha256": stages.sha256(result.weights),
                                    "earlier_parts": [{"machine": amd, "iterations": 7}]}))
    assert stages.finished_stage(str(manifest), inputs, "split 1", "stage1") is not None
    assert ("trained on Intel Xeon (AVX512), torch 2.13.0, 2 threads, resumed from a part trained on AMD EPYC "
            "(AVX512), torch 2.13.0, 2 threads to iteration 7)") in capsys.readouterr().out
    # the results JSON's "trained_on" of a run: each part's machine in order, None where unrecorded
    assert stages.trained_on(json.loads(manifest.read_text())) == [amd, xeon]
    assert stages.trained_on({"inputs": inputs}) == [None]


def test_a_stage_stopped_then_resumed_then_reused(tmp_path, capsys):
    """trained_stage with a stand-in for engine.solve: a stop leaves a resume record and no
    manifest; the next call with the same inputs hands the snapshot to the training, keeps the
    history of both parts, names both machines and writes the manifest; the call after that trains
    nothing; other inputs train from scratch."""
    amd = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "torch": "2.13.0", "threads": 2}
    xeon = dict(amd, cpu="Intel Xeon")
    calls = []

    def stopping(state):
        calls.append(state)
        snap = tmp_path / "stage1_iter_5"
        snap.with_suffix(".solverstate").write_bytes(b"state")
        snap.with_suffix(".caffemodel").write_bytes(b"weights at 5")
        return SimpleNamespace(stopped_by="SIGTERM", snapshots=[(5, str(snap) + ".solverstate")],
                               history=[{"iteration": 5, "score": 0.2}], iterations=5,
                               weights=str(snap) + ".caffemodel", seconds=1.0)

    def finishing(state):
        calls.append(state)
        final = tmp_path / "stage1_iter_9.caffemodel"
        final.write_bytes(b"weights at 9")
        return SimpleNamespace(stopped_by=None, snapshots=[(9, str(final))], weights=str(final),
                               history=[{"iteration": 9, "score": 0.4}], iterations=9, seconds=2.0)

    inputs = {"solver": "abc", "random_seed": 0}
    with pytest.raises(stages.Stopped, match="SIGTERM after iteration 5.*resumes it"):
        stages.trained_stage(str(tmp_path), "stage1", inputs, "split 1", stopping, amd)
    assert calls == [None] and not (tmp_path / "stage1.manifest.json").exists()
    assert json.loads((tmp_path / "stage1.partial.json").read_text())["parts"] == [{"machine": amd,
                                                                                    "iterations": 5}]
    capsys.readouterr()
    weights, history, iterations, machines = stages.trained_stage(str(tmp_path), "stage1", inputs, "split 1",
                                                                  finishing, xeon)
    out = capsys.readouterr().out
    assert calls[-1] == str(tmp_path / "stage1_iter_5.solverstate") and "stage1 resumed from" in out
    assert "note: the earlier part trained on AMD EPYC" in out and "this part on Intel Xeon" in out
    assert (weights, iterations, machines) == (str(tmp_path / "stage1_iter_9.caffemodel"), 9, [amd, xeon])
    assert [h["iteration"] for h in history] == [5, 9]
    assert not (tmp_path / "stage1.partial.json").exists()
    manifest = json.loads((tmp_path / "stage1.manifest.json").read_text())
    assert manifest["machine"] == xeon and manifest["earlier_parts"] == [{"machine": amd, "iterations": 5}]
    assert manifest["weights_sha256"] == stages.sha256(weights) and manifest["resumed_from"] == calls[-1]
    assert stages.trained_stage(str(tmp_path), "stage1", inputs, "split 1", finishing, xeon) == \
        (weights, history, 9, [amd, xeon])
    assert len(calls) == 2 and "stage1 reused from" in capsys.readouterr().out
    stages.trained_stage(str(tmp_path), "stage1", dict(inputs, random_seed=1), "split 1", finishing, xeon)
    assert calls[-1] is None and len(calls) == 3
    assert "note:" not in capsys.readouterr().out
