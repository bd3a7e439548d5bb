"""tools/train.py end to end on a tiny synthetic dataset (CPU): Caffe log lines,
snapshots, bit-exact resume, stage 2 from stage 1, Ctrl-C, bad input."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "tools" / "train.py")]
STAGE1 = str(ROOT / "prototxt_equiv" / "solver_stage1.prototxt")
STAGE2 = str(ROOT / "prototxt_equiv" / "solver_stage2.prototxt")

pytestmark = pytest.mark.slow


@pytest.fixture
def db(tiny_market_db):
    return tiny_market_db


def train(db, prefix, *extra, check=True):
    cmd = TRAIN + ["--data", str(db), "--batch-pairs", "2", "--workers", "1", "--display", "1",
                   "--snapshot-prefix", str(prefix), "--device", "cpu"] + list(extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_logs_snapshots_and_bit_exact_resume(db, tmp_path):
    straight = train(db, tmp_path / "a", "--solver", STAGE1, "--max-iter", "4", "--snapshot-every", "2",
                     "--test-interval", "2")
    out = straight.stdout
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ solver\.cpp:\d+\] Iteration 3 \(.*\), loss = [\d.e+-]+$",
                     out, re.M)
    assert re.search(r"Train net output #0: loss_cls = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)", out)
    assert re.search(r"Train net output #1: loss_high = ", out) and "loss_low" not in out
    assert re.search(r"Iteration 3, lr = 0\.1$", out, re.M)
    assert re.search(r"Test net output #0: rank1 = [\d.]+", out) and "Optimization Done." in out
    assert (tmp_path / "a_iter_4.caffemodel").exists() and (tmp_path / "a_iter_2.solverstate").exists()

    train(db, tmp_path / "b", "--solver", STAGE1, "--max-iter", "2", "--snapshot-every", "2",
          "--test-interval", "2")
    resumed = train(db, tmp_path / "b", "--solver", STAGE1, "--max-iter", "4", "--snapshot-every", "2",
                    "--test-interval", "2", "--snapshot", str(tmp_path / "b_iter_2.solverstate"))
    assert "Restoring previous solver status" in resumed.stdout
    assert (tmp_path / "b_iter_4.caffemodel").read_bytes() == (tmp_path / "a_iter_4.caffemodel").read_bytes()
    from mspcnn.caffe import proto

    states = []
    for name in ("a", "b"):
        st = proto.SolverState()
        st.ParseFromString((tmp_path / f"{name}_iter_4.solverstate").read_bytes())
        states.append(st)
    assert states[0].iter == states[1].iter == 4
    assert [list(h.data) for h in states[0].history] == [list(h.data) for h in states[1].history]
    import pickle

    import numpy as np
    import torch

    rng = [pickle.loads(st.rng_state) for st in states]  # the same random states to continue from
    assert torch.equal(rng[0]["torch"], rng[1]["torch"]) and rng[0]["extra"] == rng[1]["extra"]
    assert np.array_equal(rng[0]["numpy"][1], rng[1]["numpy"][1])

    stage2 = train(db, tmp_path / "c", "--solver", STAGE2, "--max-iter", "2", "--snapshot-every", "2",
                   "--test-interval", "0", "--weights", str(tmp_path / "a_iter_4.caffemodel"))
    assert re.search(r"Train net output #2: loss_low = [\d.e+-]+", stage2.stdout)
    assert re.search(r"Iteration 1, lr = 0\.00707107$", stage2.stdout, re.M)  # poly: 0.01 (1 - 1/2)^0.5


def test_seed_option(db, tmp_path):
    """--seed replaces the solver's random_seed: the same seed gives the same weights byte for
    byte, another seed other weights (initialisation, pairs, crops, mirroring). --deterministic
    (for GPUs) leaves a CPU run's arithmetic unchanged."""
    for name, seed, extra in (("s5", "5", []), ("s5again", "5", ["--deterministic"]), ("s6", "6", [])):
        out = train(db, tmp_path / name, "--solver", STAGE1, "--max-iter", "1", "--snapshot-every", "1",
                    "--test-interval", "0", "--seed", seed, *extra).stdout
        assert ("deterministic algorithms" in out) == bool(extra)
    weights = {name: (tmp_path / f"{name}_iter_1.caffemodel").read_bytes() for name in ("s5", "s5again", "s6")}
    assert weights["s5"] == weights["s5again"] and weights["s5"] != weights["s6"]


def test_ctrl_c_snapshots_and_stops(db, tmp_path):
    cmd = TRAIN + ["--data", str(db), "--batch-pairs", "2", "--workers", "1", "--display", "1",
                   "--snapshot-prefix", str(tmp_path / "s"), "--solver", STAGE1, "--max-iter", "1000",
                   "--test-interval", "0", "--snapshot-every", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if "Iteration 0, lr" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130
    assert "Signal 2 received: snapshotting and stopping" in rest
    snaps = sorted(p.name for p in tmp_path.iterdir())
    assert len(snaps) == 2 and snaps[0].endswith(".caffemodel") and snaps[1].endswith(".solverstate")


def test_bad_input(db, tmp_path):
    proc = train(db, tmp_path / "x", "--solver", str(tmp_path / "none.prototxt"), check=False)
    assert proc.returncode == 2 and "--solver: file not found" in proc.stderr
    bad = tmp_path / "bad.prototxt"
    bad.write_text('base_lr: 0.1\nlr_polcy: "step"\n')
    proc = train(db, tmp_path / "x", "--solver", str(bad), check=False)
    assert proc.returncode == 2 and "bad.prototxt, line 2" in proc.stderr and "lr_polcy" in proc.stderr
    proc = train(tmp_path, tmp_path / "x", "--solver", STAGE1, check=False)
    assert proc.returncode == 2 and "train.lmdb not found" in proc.stderr
