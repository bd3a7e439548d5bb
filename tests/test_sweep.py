"""tools/sweep_stage2.py on the tiny synthetic dataset: configurations one at a time from a
baseline, each an edited copy of the net, scored on the validation identities."""
import json
import re

import pytest

from mspcnn.engine import solve
from mspcnn.paths import PROTOTXT_DIR

pytestmark = pytest.mark.slow


def test_sweep_one_at_a_time(tiny_market_db, tmp_path, run_tool):
    stage1 = solve(PROTOTXT_DIR / "solver_stage1.prototxt", tiny_market_db, batch_pairs=2, workers=1,
                   overrides={"max_iter": 1, "test_interval": 0, "snapshot_prefix": str(tmp_path / "s1")},
                   log=lambda *a: None)
    out = tmp_path / "sweep"
    proc = run_tool("sweep_stage2.py", "--data", tiny_market_db, "--weights", stage1.weights,
                    "--solver", PROTOTXT_DIR / "solver_stage2.prototxt", "--iters", "1", "--batch-pairs", "2",
                    "--device", "cpu", "--set", "w_low=1,0", "--set", "pos_floor=-1,0.3", "--out", out)
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
    again = run_tool("sweep_stage2.py", "--data", tiny_market_db, "--weights", stage1.weights,
                     "--solver", PROTOTXT_DIR / "solver_stage2.prototxt", "--iters", "1", "--batch-pairs", "2",
                     "--device", "cpu", "--set", "w_low=1,0,2", "--set", "pos_floor=-1,0.3", "--out", out)
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


def test_a_stopped_configuration_is_not_recorded(tiny_market_db, tmp_path):
    """SIGTERM during a configuration: status 130, a message, and sweep.json without that
    configuration (a later run trains it again)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    stage1 = solve(PROTOTXT_DIR / "solver_stage1.prototxt", tiny_market_db, batch_pairs=2, workers=1,
                   overrides={"max_iter": 1, "test_interval": 0, "snapshot_prefix": str(tmp_path / "s1")},
                   log=lambda *a: None)
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
    stage1 = solve(PROTOTXT_DIR / "solver_stage1.prototxt", tiny_market_db, batch_pairs=2, workers=1,
                   input_size=(64, 24), log=lambda *a: None,
                   overrides={"max_iter": 1, "test_interval": 0, "snapshot_prefix": str(tmp_path / "s1")})
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
