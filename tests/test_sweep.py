"""tools/sweep_stage2.py on the tiny synthetic dataset: configurations one at a time from a
baseline, each an edited copy of the net, scored on the validation identities."""
import json
import re

import pytest

from conftest import one_iteration_stage1

from mspcnn.paths import PROTOTXT_DIR

pytestmark = pytest.mark.slow


def tiny_sweep(run_tool, db, weights, out, *sets):
    """sweep_stage2.py on the tiny dataset: one iteration of 2 pairs per configuration, on the CPU."""
    return run_tool("sweep_stage2.py", "--data", db, "--weights", weights, "--solver",
                    PROTOTXT_DIR / "solver_stage2.prototxt", "--iters", "1", "--batch-pairs", "2", "--device", "cpu",
                    *sets, "--out", out)


def test_sweep_one_at_a_time(tiny_market_db, tmp_path, run_tool):
    stage1 = one_iteration_stage1(tiny_market_db, tmp_path)
    out = tmp_path / "sweep"
    proc = tiny_sweep(run_tool, tiny_market_db, stage1.weights, out, "--set", "w_low=1,0", "--set", "pos_floor=-1,0.3")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads((out / "sweep.json").read_text())
    names = [r["name"] for r in result["runs"]]
    assert names == ["w_low1_pos_floor-1", "w_low0_pos_floor-1", "w_low1_pos_floor0.3"]
    assert all(0 <= r["val"]["rank1"] <= 1 and r["val"]["queries"] > 0 for r in result["runs"])
    assert result["best"] in names and "<- best" in proc.stdout
    net = (out / "w_low1_pos_floor0.3" / "net.prototxt").read_text()
    assert re.search(r'name: "loss_low".*?pos_floor: 0\.3', net, re.S)
    assert "Train net output #2: loss_low" not in (proc.stdout.split("w_low0_pos_floor-1")[1].split("== [3/3]")[0])

    # a second run with the same --out resumes: the finished configurations are reused, a new value
    # is trained, and a changed setting (--iters) trains everything again
    again = tiny_sweep(run_tool, tiny_market_db, stage1.weights, out,
                       "--set", "w_low=1,0,2", "--set", "pos_floor=-1,0.3")
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    assert again.stdout.count("reused from") == 3 and "== [3/4] w_low2_pos_floor-1\n" in again.stdout
    resumed = json.loads((out / "sweep.json").read_text())
    assert resumed["runs"][0] == result["runs"][0] and len(resumed["runs"]) == 4
    longer = run_tool("sweep_stage2.py", "--data", tiny_market_db, "--weights", stage1.weights,
                      "--solver", PROTOTXT_DIR / "solver_stage2.prototxt", "--iters", "2", "--batch-pairs", "2",
                      "--device", "cpu", "--set", "w_low=1,0", "--out", out)
    assert longer.returncode == 0 and "reused from" not in longer.stdout


def test_sweep_bad_input(tiny_market_db, tmp_path, run_tool):
    proc = run_tool("sweep_stage2.py", "--data", tiny_market_db, "--weights", tmp_path / "none.caffemodel",
                    "--set", "w_high=1")
    assert proc.returncode == 2 and "expected NAME=V1,V2" in proc.stderr
    proc = run_tool("sweep_stage2.py", "--data", tmp_path, "--weights", tmp_path / "x", "--set", "w_low=1")
    assert proc.returncode == 2 and "no val split" in proc.stderr
    proc = run_tool("sweep_stage2.py", "--data", tiny_market_db, "--weights", tmp_path / "x",
                    "--set", "balance_pairs=0,0.5")
    assert proc.returncode == 2 and "balance_pairs is 0 (off) or 1 (on)" in proc.stderr


def test_sweep_balance_pairs(tiny_market_db, tmp_path, run_tool):
    """--set balance_pairs=1 writes it into the configuration's net, which trains with it."""
    stage1 = one_iteration_stage1(tiny_market_db, tmp_path)
    out = tmp_path / "sweep"
    proc = tiny_sweep(run_tool, tiny_market_db, stage1.weights, out, "--set", "w_low=10", "--set", "balance_pairs=1")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ["w_low10_balance_pairs1"]
    net = (out / "w_low10_balance_pairs1" / "net.prototxt").read_text()
    assert re.search(r'name: "loss_low".*?loss_weight: 10.*?balance_pairs: true', net, re.S)
    assert "Train net output #2: loss_low" in proc.stdout and "(* 10 = " in proc.stdout


def test_a_stopped_configuration_is_not_recorded(tiny_market_db, tmp_path):
    """SIGTERM during a configuration: status 130, a message, and sweep.json without that
    configuration (a later run trains it again)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    stage1 = one_iteration_stage1(tiny_market_db, tmp_path)
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "tools" / "sweep_stage2.py"), "--data", str(tiny_market_db), "--weights",
           stage1.weights, "--solver", str(PROTOTXT_DIR / "solver_stage2.prototxt"), "--iters", "100000",
           "--batch-pairs", "2", "--device", "cpu", "--set", "w_low=1,0", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # signalled once the first configuration's solver is solving (its handlers set)
        if "Solving MSP-CNN" in line:
            break
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "w_low1: stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert not (out / "sweep.json").exists()


def test_sweep_at_another_input_size(tiny_market_db, tmp_path, run_tool):
    """--input-size trains and scores every configuration at that input (the cpu64 recipe's 64 x 24),
    records it with the configuration, and a sweep without it does not reuse that configuration."""
    stage1 = one_iteration_stage1(tiny_market_db, tmp_path, input_size=(64, 24))
    out = tmp_path / "sweep"
    common = ["--data", tiny_market_db, "--weights", stage1.weights, "--solver",
              PROTOTXT_DIR / "solver_stage2.prototxt", "--iters", "1", "--batch-pairs", "2", "--device", "cpu",
              "--set", "w_low=1", "--out", out]
    proc = run_tool("sweep_stage2.py", *common, "--input-size", "64x24")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "input 64 x 24" in proc.stdout + proc.stderr
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert run["settings"]["input_size"] == [64, 24] and 0 <= run["val"]["rank1"] <= 1
    again = run_tool("sweep_stage2.py", *common, "--input-size", "64x24")
    assert again.returncode == 0 and "reused from" in again.stdout
    default = run_tool("sweep_stage2.py", *common)  # [1]'s 144 x 56: another setting, trained again
    assert "reused from" not in default.stdout and "== [1/1] w_low1\n" in default.stdout, default.stdout[-2000:]
    assert default.returncode == 0, default.stderr[-3000:]
    bad = run_tool("sweep_stage2.py", *common, "--input-size", "10x10")
    assert bad.returncode == 2 and "--input-size" in bad.stderr and "Traceback" not in bad.stderr


def test_sweep_scored_on_the_last_validation_points(tiny_market_db, tmp_path, run_tool):
    """--val-every N --score-last K: each configuration's score is the mean of its last K validation
    points, the best is chosen by it, validation leaves the weights unchanged, and results_tables
    shows the score; a K without that many points is refused before anything trains."""
    import hashlib

    stage1 = one_iteration_stage1(tiny_market_db, tmp_path)
    common = ["--data", tiny_market_db, "--weights", stage1.weights, "--solver",
              PROTOTXT_DIR / "solver_stage2.prototxt", "--iters", "3", "--batch-pairs", "2", "--device", "cpu",
              "--set", "w_low=1,0"]
    proc = run_tool("sweep_stage2.py", *common, "--val-every", "1", "--score-last", "2", "--out", tmp_path / "k2")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    sweep = json.loads((tmp_path / "k2" / "sweep.json").read_text())
    assert sweep["score_last"] == 2
    for r in sweep["runs"]:
        points = [h for h in r["history"] if h["kind"] == "test"]
        assert [p["iteration"] for p in points] == [1, 2, 3] and r["settings"]["val_every"] == 1
        assert r["score"]["iterations"] == [2, 3] and r["val"] == {k: points[-1][k] for k in r["val"]}
        assert r["score"]["rank1"] == pytest.approx((points[1]["rank1"] + points[2]["rank1"]) / 2)
        assert r["score"]["mAP"] == pytest.approx((points[1]["mAP"] + points[2]["mAP"]) / 2)
    best = max(sweep["runs"], key=lambda r: (r["score"]["rank1"], r["score"]["mAP"]))
    assert sweep["best"] == best["name"] and "score: the mean of the last 2 validation points" in proc.stdout

    # validating at every iteration trains the same weights as validating only at the end
    plain = run_tool("sweep_stage2.py", *common, "--out", tmp_path / "k1")
    assert plain.returncode == 0, plain.stderr[-3000:]
    once = json.loads((tmp_path / "k1" / "sweep.json").read_text())
    digest = [[hashlib.sha256(open(r["weights"], "rb").read()).hexdigest() for r in s["runs"]] for s in (sweep, once)]
    assert digest[0] == digest[1]
    assert [r["score"]["iterations"] for r in once["runs"]] == [[3], [3]] and "score rank-1" not in plain.stdout

    table = run_tool("results_tables.py", tmp_path / "k2" / "reproduce_none.json", "--sweep",
                     tmp_path / "k2" / "sweep.json")
    assert table.returncode == 2  # no reproduce results file: refused, nothing printed
    from conftest import ROOT
    table = run_tool("results_tables.py", ROOT / "docs" / "results" / "cuhk01_cpu64_seed0.json", "--sweep",
                     tmp_path / "k2" / "sweep.json")
    assert table.returncode == 0, table.stderr[-2000:]
    assert "mean of the last 2 validation points, iterations 2-3" in table.stdout
    assert f"| {best['name']} (chosen) | " in table.stdout
    row = next(line for line in table.stdout.splitlines() if line.startswith(f"| {best['name']} (chosen)"))
    assert f"| {100 * best['score']['rank1']:.1f} | {100 * best['score']['mAP']:.1f} |" in row

    for bad, says in ((["--score-last", "2"], "needs that many validation points"),
                      (["--val-every", "2"], "must divide"),
                      (["--val-every", "3", "--score-last", "2"], "needs that many validation points"),
                      (["--score-last", "0"], "at least 1")):
        proc = run_tool("sweep_stage2.py", *common, *bad, "--out", tmp_path / "bad")
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "bad" / "sweep.json").exists()
