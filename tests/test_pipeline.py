"""The end-to-end pipeline (tools/run_pipeline.py), in miniature: generate,
convert, two training stages, evaluation, ranking picture."""
import json
import re

import pytest


@pytest.mark.slow
def test_pipeline_runs_end_to_end(tmp_path, run_tool):
    # The thread count is fixed: the default (auto) follows the machine's load, and oneDNN's
    # convolutions round differently with 1 and 2 threads, which moves a run this short.
    out = tmp_path / "run"
    proc = run_tool("run_pipeline.py", "--out", out, "--train-ids", "8", "--test-ids", "4", "--iters1", "2",
                    "--iters2", "1", "--batch-pairs", "2", "--device", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "MSP-CNN (this run)" in proc.stdout and "chance (random feats)" in proc.stdout
    assert "Train net output #2: loss_low" in proc.stdout  # stage 2 ran with the NCC loss
    result = json.loads((out / "results.json").read_text())
    assert result["msp_cnn"]["queries"] > 0 and 0 <= result["msp_cnn"]["mAP"] <= 1
    assert (out / "ranking.png").stat().st_size > 1000 and (out / "cmc.png").stat().st_size > 1000
    assert (out / "snapshots" / "stage2_iter_1.caffemodel").exists()
    assert f"Results in {out}/" in proc.stdout and "test identities (4), Market-1501 protocol" in proc.stdout
    assert "stage-1 validation (held-out training identities" in proc.stdout
    assert "stage-2 validation (the same held-out identities)" in proc.stdout
    assert result["stage2_validation"]["queries"] > 0
    # The same command again works, reusing the generated data; other settings regenerate it.
    again = run_tool("run_pipeline.py", "--out", out, "--train-ids", "8", "--test-ids", "4", "--iters1", "2",
                     "--iters2", "1", "--batch-pairs", "2", "--device", "cpu", "--threads", "1", "--per-query")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stdout and json.loads((out / "results.json").read_text())["msp_cnn"] == result["msp_cnn"]
    assert len(list(out.glob("ranking_query*.png"))) >= 2
    # The default input is 64 x 24: the images stored at it scaled as [1]'s, the nets' Input layers
    # at it; evaluate.py scores the weights as the job did when told the size they were trained at.
    assert "converting to LMDB (images 71 x 27, the net's input 64 x 24)" in proc.stdout
    from mspcnn.data.lmdb_io import DatumDB
    assert DatumDB(str(out / "db" / "gallery.lmdb"))[0][0].shape == (3, 71, 27)
    assert re.search(r"dim: 3\s+dim: 64\s+dim: 24\s", (out / "stage1_net.prototxt").read_text())
    assert result["args"]["input_size"] == [64, 24]
    ev = run_tool("evaluate.py", "--weights", result["weights"], "--data", out / "db", "--device", "cpu",
                  "--threads", "1", "--input-size", "64x24", "--json", out / "ev.json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((out / "ev.json").read_text())["result"]["rank1"] == pytest.approx(result["msp_cnn"]["rank1"])
    assert "warning" not in ev.stderr
    wrong = run_tool("evaluate.py", "--weights", result["weights"], "--data", out / "db", "--device", "cpu")
    assert wrong.returncode == 2 and "crop 144x56 is larger than the image 71x27" in wrong.stderr
    other = run_tool("run_pipeline.py", "--out", out, "--train-ids", "9", "--test-ids", "4", "--iters1", "2",
                     "--iters2", "0", "--batch-pairs", "2", "--device", "cpu", "--iter-size", "1",
                     "--lr-policy", "stepdecr", "--input-size", "144x56")
    assert other.returncode == 0 and "reusing" not in other.stdout, other.stderr[-3000:]
    assert "batch 2 pairs x iter_size 1" in other.stdout
    assert "converting to LMDB (images 160 x 64, the net's input 144 x 56)" in other.stdout
    assert DatumDB(str(out / "db" / "gallery.lmdb"))[0][0].shape == (3, 160, 64)
    assert re.search(r"dim: 3\s+dim: 144\s+dim: 56\s", (out / "stage1_net.prototxt").read_text())
    # Weights evaluated at a size the database was not made for: it runs, with a warning.
    ev = run_tool("evaluate.py", "--weights", result["weights"], "--data", out / "db", "--device", "cpu",
                  "--input-size", "64x24")
    assert ev.returncode == 0 and "are 160 x 64, but a net input of 64 x 24 expects images of 71 x 27" in ev.stderr


@pytest.mark.parametrize("value,message", [("72x28", "the nearest is 80 x 24"), ("64", "expected HEIGHTxWIDTH")])
def test_a_bad_input_size_is_a_clear_error(tmp_path, run_tool, value, message):
    proc = run_tool("run_pipeline.py", "--out", tmp_path / "run", "--input-size", value)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "raw").exists()


def test_unwritable_output_folders_are_clear_errors(tmp_path, run_tool):
    """A folder that cannot be created (below a regular file) stops the main job and the dataset
    generator with a message naming it, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for tool, args in (("run_pipeline.py", ["--out", str(blocker / "run")]),
                       ("make_synthetic.py", [str(blocker / "raw"), "--train-ids", "2", "--test-ids", "2"])):
        proc = run_tool(tool, *args)
        assert proc.returncode == 2, proc.stderr
        assert str(blocker) in proc.stderr and "Traceback" not in proc.stderr


def test_a_stop_in_stage_1_ends_the_job(tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGINT) or SIGTERM during stage 1: the engine snapshots and returns `stopped_by`; the
    job ends there with exit status 130 and says so, instead of going on to stage 2."""
    from types import SimpleNamespace

    from conftest import load_tool

    pipeline = load_tool("run_pipeline")
    calls = []

    def stopped_solve(solver, db, **kwargs):
        calls.append(str(solver))
        return SimpleNamespace(weights=str(tmp_path / "stage1.caffemodel"), test=None, stopped_by="SIGINT")

    monkeypatch.setattr(pipeline, "solve", stopped_solve)
    monkeypatch.setattr(pipeline, "configure_threads", lambda threads: "threads unchanged (test)")
    code = pipeline.main(["--out", str(tmp_path / "run"), "--train-ids", "4", "--test-ids", "2", "--iters1", "2",
                          "--iters2", "1", "--batch-pairs", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 130 and len(calls) == 1 and calls[0].endswith("solver_stage1.prototxt")
    assert "stopped by SIGINT" in err and "stage1.caffemodel" in err


@pytest.mark.parametrize("tool,args", [
    ("run_pipeline.py", ["--iters1", "2"]),
    ("reproduce.py", ["cuhk01-100", "RAW", "--iters1", "2"]),
])
def test_a_second_run_into_the_same_folder_stops(tmp_path, run_tool, tool, args):
    """Two runs writing into one output folder would mix their files: while one holds the folder,
    a second stops at once with exit status 2, naming the holder; once the holder is gone (its lock
    goes with the process, however it ends) the folder is free again."""
    from mspcnn.cli import _CLAIMED, FolderInUse, claim_folder

    out = tmp_path / "out"
    lock = claim_folder(str(out), "a test")
    try:
        argv = [a if a != "RAW" else str(tmp_path / "raw") for a in args] + ["--out", str(out)]
        proc = run_tool(tool, *argv)
        assert proc.returncode == 2, proc.stderr
        assert f"{out} is in use by another run (a test, process " in proc.stderr and "Traceback" not in proc.stderr
        with pytest.raises(FolderInUse, match="in use by another run"):
            claim_folder(str(out), "a second claim from another descriptor")
    finally:
        _CLAIMED.remove(lock)
        lock.close()
    again = claim_folder(str(out), "after")
    _CLAIMED.remove(again)
    again.close()
