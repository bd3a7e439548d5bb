"""tools/train.py end to end on a tiny synthetic dataset (CPU): Caffe log lines,
snapshots, bit-exact resume, stage 2 from stage 1, Ctrl-C, bad input."""
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import session_members

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "tools" / "train.py")]
STAGE1 = str(ROOT / "prototxt_equiv" / "solver_stage1.prototxt")
STAGE2 = str(ROOT / "prototxt_equiv" / "solver_stage2.prototxt")

pytestmark = pytest.mark.slow


@pytest.fixture
def db(tiny_market_db):
    return tiny_market_db


def train(db, prefix, *extra, check=True):
    """tools/train.py on `db`. The thread count is fixed: `--threads auto` picks it from the machine's
    load at start, and runs compared byte for byte must sum in the same order."""
    cmd = TRAIN + ["--data", str(db), "--batch-pairs", "2", "--workers", "1", "--display", "1",
                   "--snapshot-prefix", str(prefix), "--device", "cpu", "--threads", "2"] + list(extra)
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
    assert re.search(r"^machine: .+ \(.+\), torch .+, 2 threads$", straight.stderr, re.M)  # what it ran on

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
    # the same random states and data position to continue from, stored as plain data
    for field in ("torch_rng_state", "numpy_rng_state", "data_epoch", "data_batch", "current_step"):
        assert getattr(states[0], field) == getattr(states[1], field), field
    assert len(states[0].torch_rng_state) > 0 and len(states[0].numpy_rng_state.key) == 624
    assert not states[0].HasField("rng_state")  # the old pickled field is never written

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


def _run_with_signals(db, tmp_path, signals, *extra, group=False, pids=None):
    """Start a long training; at the display line of iteration k send signals[k] (with `group`, to its
    whole process group, as a terminal's Ctrl-C does); returns the process's return code and output
    after the last signal (stdout, then stderr)."""
    cmd = TRAIN + ["--data", str(db), "--batch-pairs", "2", "--workers", "1", "--display", "1",
                   "--snapshot-prefix", str(tmp_path / "s"), "--solver", STAGE1, "--max-iter", "1000",
                   "--test-interval", "0", "--snapshot-every", "0", "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=group)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        for k, sig in signals.items():
            if f"Iteration {k}, lr" in line:
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        if f"Iteration {max(signals)}, lr" in line:
            break
    rest, err = proc.communicate(timeout=120)
    if pids is not None:
        pids.append(proc.pid)
    return proc.returncode, "".join(seen) + rest + err


def test_ctrl_c_snapshots_and_stops(db, tmp_path):
    code, out = _run_with_signals(db, tmp_path, {0: signal.SIGINT})
    assert code == 130
    assert re.search(r"SIGINT received: stopping after iteration \d+", out) and "Optimization stopped early." in out
    snaps = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(snaps) == 2 and snaps[0].endswith(".caffemodel") and snaps[1].endswith(".solverstate")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_worker_processes_train_the_same_weights_and_stop_on_ctrl_c(db, tmp_path):
    """--workers 3 (forked worker processes) trains the very weights of --workers 1 (a thread); a
    Ctrl-C sent to the whole process group, workers included, still snapshots and stops, and leaves
    no worker behind."""
    for name, workers in (("thread", "1"), ("procs", "3")):
        train(db, tmp_path / name, "--solver", STAGE1, "--max-iter", "3", "--snapshot-every", "3",
              "--test-interval", "0", "--workers", workers)
    assert (tmp_path / "procs_iter_3.caffemodel").read_bytes() == (tmp_path / "thread_iter_3.caffemodel").read_bytes()
    stop = tmp_path / "stop"
    stop.mkdir()
    pids = []
    code, out = _run_with_signals(db, stop, {1: signal.SIGINT}, "--workers", "3", group=True, pids=pids)
    assert code == 130 and "Optimization stopped early." in out and "Traceback" not in out, out
    assert len([p for p in stop.iterdir() if p.suffix == ".caffemodel"]) == 1
    assert not session_members(pids[0])  # the workers went with the pool's shutdown


def test_sighup_snapshots_and_goes_on(db, tmp_path):
    """Caffe's default -sighup_effect: a snapshot, and training continues (until SIGINT here); with
    --sighup-effect none the signal is ignored."""
    code, out = _run_with_signals(db, tmp_path, {0: signal.SIGHUP, 3: signal.SIGINT})
    assert code == 130 and "Iteration 2, lr" in out
    stems = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".caffemodel")
    assert len(stems) == 2, stems  # one for SIGHUP (at iteration 1 or 2), one for SIGINT
    for p in tmp_path.iterdir():
        p.unlink()
    code, out = _run_with_signals(db, tmp_path, {0: signal.SIGHUP, 2: signal.SIGINT}, "--sighup-effect", "none")
    assert code == 130 and len([p for p in tmp_path.iterdir() if p.suffix == ".caffemodel"]) == 1


def test_bad_input(db, tmp_path):
    """Every bad input is an error naming the file or value, exit status 2, before any work."""
    proc = train(db, tmp_path / "x", "--solver", str(tmp_path / "none.prototxt"), check=False)
    assert proc.returncode == 2 and "solver: file not found" in proc.stderr
    bad = tmp_path / "bad.prototxt"
    bad.write_text('base_lr: 0.1\nlr_polcy: "step"\n')
    proc = train(db, tmp_path / "x", "--solver", str(bad), check=False)
    assert proc.returncode == 2 and "bad.prototxt, line 2" in proc.stderr and "lr_polcy" in proc.stderr
    proc = train(tmp_path, tmp_path / "x", "--solver", STAGE1, check=False)
    assert proc.returncode == 2 and "train.lmdb not found" in proc.stderr
    for option, value, message in (("--base-lr", "nan", "base_lr must be a finite number >= 0, got nan"),
                                   ("--base-lr", "-0.1", "base_lr must be a finite number >= 0, got -0.1"),
                                   ("--max-iter", "-5", "max_iter must be >= 0, got -5"),
                                   ("--batch-pairs", "0", "--batch-pairs must be >= 1"),
                                   ("--input-size", "72x28", "the nearest is 80 x 24"),
                                   ("--input-size", "176x72", "the training images are 160 x 64, smaller than")):
        proc = train(db, tmp_path / "x", "--solver", STAGE1, option, value, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = train(db, tmp_path / "x", "--solver", STAGE1, "--loss-weights", "1", "1", "0.5", check=False)
    assert proc.returncode == 2 and "'loss_low', which the TRAIN net does not have" in proc.stderr
    proc = train(db, tmp_path / "x", "--solver", STAGE1, "--cuda-graphs", check=False)  # on the CPU
    assert proc.returncode == 2 and "CUDA graphs need a GPU (device cuda), not cpu" in proc.stderr
    assert not list(tmp_path.glob("x_iter_*"))


def test_input_size_option(db, tmp_path):
    """--input-size trains the net at another size than its Input layer's (as --batch-pairs its
    batch); the log says the size."""
    proc = train(db, tmp_path / "s", "--solver", STAGE1, "--max-iter", "1", "--input-size", "64x24",
                 "--test-interval", "0")
    assert "input 64 x 24, device cpu" in proc.stdout + proc.stderr
    assert (tmp_path / "s_iter_1.caffemodel").exists()


def test_a_diverged_loss_is_reported_at_the_display(tiny_market_db, capsys):
    """The loss values are read from the device only at displays (mspcnn.engine.solve keeps them
    there in between, so that a GPU is not waited for at every pass); a loss that has become NaN is
    still reported, at the display that shows it, with the advice to lower base_lr."""
    from mspcnn.engine import solve
    from mspcnn.paths import PROTOTXT_DIR

    result = solve(PROTOTXT_DIR / "solver_stage1.prototxt", tiny_market_db, batch_pairs=2, workers=1,
                   device="cpu", progress=False,
                   overrides={"base_lr": 1e12, "max_iter": 4, "display": 2, "test_interval": 0, "snapshot": 0,
                              "snapshot_after_train": False, "iter_size": 1})
    out = capsys.readouterr().out
    assert "(diverged); lower base_lr" in out and not math.isfinite(result.loss)
    assert result.iterations == 4 and set(result.losses) >= {"total", "cls", "high"}
