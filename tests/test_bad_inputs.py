"""Every tool against a table of bad inputs and faults: one `error:` line naming the file or value,
exit status 2, no traceback, nothing half-written, earlier outputs intact. Also kill -9 during a
snapshot and during a conversion, and a full disk where a small file system can be mounted."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mspcnn.caffe import io as cio

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = str(ROOT / "prototxt_equiv" / "solver_stage1.prototxt")
pytestmark = pytest.mark.slow


def tool(name, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_market_db):
    """Files the bad inputs are made of: a trained snapshot, garbage, a folder, a regular file."""
    base = tmp_path_factory.mktemp("bad")
    run = tool("train.py", "--solver", STAGE1, "--data", tiny_market_db, "--batch-pairs", "2", "--workers", "1",
               "--max-iter", "1", "--test-interval", "0", "--snapshot-prefix", base / "snap", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    (base / "garbage.bin").write_bytes(os.urandom(3000))
    (base / "text.txt").write_text("hello\n")
    (base / "folder").mkdir()
    partial = cio.read_caffemodel(base / "snap_iter_1.caffemodel")
    del partial.layer[5:]
    cio.write_caffemodel(partial, base / "partial.caffemodel")
    bad_json = base / "badjson"
    shutil.copytree(tiny_market_db, bad_json)
    (bad_json / "train.json").write_text("{not json")
    (bad_json / "probe.json").write_text('{"records": 5}')
    return {"base": base, "db": tiny_market_db, "raw": Path(tiny_market_db).parent / "raw", "weights": base / "snap_iter_1.caffemodel",
            "state": base / "snap_iter_1.solverstate", "garbage": base / "garbage.bin", "text": base / "text.txt",
            "folder": base / "folder", "partial": base / "partial.caffemodel", "badjson": bad_json}


def cases():
    T = ["--solver", STAGE1, "--batch-pairs", "2", "--workers", "1", "--max-iter", "1", "--test-interval", "0",
         "--device", "cpu"]
    return [
        # train.py
        ("train.py", T + ["--data", "{folder}"], "train.lmdb not found"),
        ("train.py", T + ["--data", "{badjson}"], "train.json: not valid JSON"),
        ("train.py", ["--solver", "{garbage}", "--data", "{db}"], "garbage.bin"),
        ("train.py", T + ["--data", "{db}", "--weights", "{garbage}"], "garbage.bin"),
        ("train.py", T + ["--data", "{db}", "--weights", "{text}"], "text.txt"),
        ("train.py", T + ["--data", "{db}", "--weights", "{partial}"], "no layer"),
        ("train.py", T + ["--data", "{db}", "--snapshot", "{garbage}"], "garbage.bin"),
        ("train.py", T + ["--data", "{db}", "--snapshot-prefix", "{text}/snap"], "is not a folder"),
        ("train.py", T + ["--data", "{db}", "--base-lr", "inf"], "base_lr must be a finite number"),
        ("train.py", T + ["--data", "{db}", "--workers", "0"], "--workers must be >= 1"),
        ("train.py", T + ["--data", "{db}", "--batch-pairs", "100000"], "fewer than the batch"),
        ("train.py", T + ["--data", "{db}", "--display", "-1"], "display must be >= 0"),
        # convert_dataset.py
        ("convert_dataset.py", ["market1501", "{folder}", "{base}/out1"], "not a Market-1501 folder"),
        ("convert_dataset.py", ["market1501", "{base}/none", "{base}/out2"], "none"),
        ("convert_dataset.py", ["cuhk01", "{folder}", "{base}/out3"], "no CUHK01 images"),
        ("convert_dataset.py", ["cuhk03", "{folder}", "{base}/out4"], "cuhk-03.mat"),
        ("convert_dataset.py", ["market1501", "{raw}", "{text}"], "text.txt"),
        # evaluate.py
        ("evaluate.py", ["--weights", "{garbage}", "--data", "{db}"], "garbage.bin"),
        ("evaluate.py", ["--weights", "{base}/none.caffemodel", "--data", "{db}"], "none.caffemodel"),
        ("evaluate.py", ["--weights", "{partial}", "--data", "{db}"], "no layer"),
        ("evaluate.py", ["--weights", "{weights}", "--data", "{badjson}"], "probe.json"),
        ("evaluate.py", ["--weights", "{weights}", "--data", "{folder}"], "no probe.json"),
        ("evaluate.py", ["--weights", "{weights}", "--data", "{db}", "--repeats", "0"], "--repeats"),
        ("evaluate.py", ["--weights", "{weights}", "--data", "{db}", "--json", "{folder}"], "folder"),
        # build_index.py / query.py
        ("build_index.py", ["--weights", "{weights}", "--db", "{folder}", "--out", "{base}/i.index"], "no LMDB"),
        ("build_index.py", ["--weights", "{garbage}", "--db", "{db}/gallery.lmdb", "--out", "{base}/i.index"],
         "garbage.bin"),
        ("build_index.py", ["--weights", "{weights}", "--db", "{db}/gallery.lmdb", "--out", "{folder}"], "folder"),
        ("build_index.py", ["--weights", "{weights}", "--db", "{db}/gallery.lmdb", "--out", "{base}/i.index",
                            "--batch-size", "0"], "--batch-size"),
        ("query.py", ["--index", "{garbage}", "--weights", "{weights}", "{text}"], "not an index"),
        ("query.py", ["--index", "{base}/none.index", "--weights", "{weights}", "{text}"], "no such file"),
        # make_synthetic.py / run_pipeline.py / reproduce.py / sweep_stage2.py
        ("make_synthetic.py", ["{text}", "--train-ids", "2", "--test-ids", "2"], "text.txt"),
        ("make_synthetic.py", ["{base}/syn", "--train-ids", "0"], "--train-ids"),
        ("run_pipeline.py", ["--out", "{text}/run"], "text.txt"),
        ("reproduce.py", ["cuhk01-100", "{base}/none"], "none"),
        ("reproduce.py", ["market1501", "{folder}", "--recipe", "cpu"], "--recipe cpu: only for cuhk01"),
        ("reproduce.py", ["cuhk01-100", "{folder}", "--splits", "0"], "--splits must be at least 1"),
        ("reproduce.py", ["cuhk01-100", "{folder}", "--split-ids", "10"], "cuhk01-100 has splits 0 to 9, got 10"),
        ("reproduce.py", ["cuhk01-100", "{folder}", "--split-ids", "2", "2"], "--split-ids: repeated split"),
        ("reproduce.py", ["cuhk01-100", "{folder}", "--splits", "2", "--split-ids", "1"], "not allowed with"),
        ("reproduce.py", ["cuhk01-100", "{folder}", "--stage1-scale", "0"], "--stage1-scale must be positive"),
        ("reproduce.py", ["cuhk01-100", "{folder}", "--stage1-scale", "2", "--iters1", "5"],
         "--stage1-scale and --iters1 both set"),
        ("sweep_stage2.py", ["--data", "{db}", "--weights", "{garbage}", "--set", "w_low=1,0", "--iters", "1"],
         "garbage.bin"),
        # benchmarks and the demo
        ("demo_ncc.py", ["--pairs", "0"], "--pairs"),
        ("bench_ncc.py", ["--pairs", "0", "--json", "{base}/b.json"], "--pairs"),
        ("bench_ncc.py", ["--ncu", "--json", "{base}/b.json"], "--ncu profiles CUDA kernels"),
        ("bench_train.py", ["--repeat", "0", "--json", "{base}/b.json"], "--repeat"),
        ("bench_eval.py", ["--queries", "0"], "--queries"),
    ]


@pytest.mark.parametrize("name,args,message", cases(), ids=[f"{c[0]}-{i}" for i, c in enumerate(cases())])
def test_bad_input_is_one_error_line(world, name, args, message):
    args = [a.format(**world) for a in args]
    proc = tool(name, *args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error" in proc.stderr and message in proc.stderr, proc.stderr
    # nothing named like a finished output appeared
    assert not list(Path(world["base"]).glob("out*/*.json"))


def test_device_without_gpu(world):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for name, args in (("train.py", ["--solver", STAGE1, "--data", world["db"], "--device", "cuda"]),
                       ("evaluate.py", ["--weights", world["weights"], "--data", world["db"], "--device", "cuda"]),
                       ("query.py", ["--index", world["garbage"], "--weights", world["weights"], world["text"],
                                     "--device", "cuda"])):
        proc = tool(name, *args)
        assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr and "Traceback" not in proc.stderr


def test_kill_9_during_snapshots_leaves_only_complete_ones(world, tmp_path):
    """A training that snapshots every iteration is killed with SIGKILL at several moments: every
    .caffemodel / .solverstate with a final name is complete and the pair resumes; the temporary
    files of an interrupted write are removed at the next start."""
    prefix = tmp_path / "k"
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--solver", STAGE1, "--data", str(world["db"]),
           "--batch-pairs", "2", "--workers", "1", "--max-iter", "1000", "--test-interval", "0",
           "--snapshot-every", "1", "--snapshot-prefix", str(prefix), "--device", "cpu"]
    # The kills are timed from the first snapshot's log line, not from the start: how long the start
    # takes depends on the machine (over 6 s on a loaded CI runner), so fixed delays could kill
    # every run before its first snapshot.
    for delay in (0.0, 0.23, 1.37):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        for line in proc.stdout:  # the solver's log
            if "Snapshotting solver state" in line:
                break
        else:
            proc.wait()
            pytest.fail(f"the training ended (status {proc.returncode}) before its first snapshot")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    states = sorted(tmp_path.glob("k_iter_*.solverstate"), key=lambda p: int(p.stem.split("_")[-1]))
    assert states, "no snapshot was written before the kills"
    for state in states:
        cio.read_solverstate(state)
        cio.read_caffemodel(str(state).replace(".solverstate", ".caffemodel"))
    for leftover in tmp_path.glob("*.tmp"):  # an interrupted write of a killed process
        os.utime(leftover)
    resumed = subprocess.run(cmd[:cmd.index("--max-iter") + 1] + [str(int(states[-1].stem.split("_")[-1]) + 1)]
                             + cmd[cmd.index("--max-iter") + 2:] + ["--snapshot", str(states[-1])],
                             capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(tmp_path.glob("*.tmp"))


def test_two_trainings_with_one_prefix(world, tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--solver", STAGE1, "--data", str(world["db"]),
           "--batch-pairs", "2", "--workers", "1", "--max-iter", "1000", "--test-interval", "0",
           "--snapshot-prefix", str(tmp_path / "same"), "--device", "cpu"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    for line in first.stdout:
        if "Iteration 0" in line:
            break
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert second.returncode == 2 and "another training (pid" in second.stderr


def test_kill_9_during_conversion_keeps_the_previous_folder(world, tmp_path):
    """The converter builds aside and swaps at the end: killed midway, the previous conversion is
    intact and complete, and the next conversion removes the killed one's leftovers."""
    raw = tmp_path / "raw"
    assert tool("make_synthetic.py", raw, "--train-ids", "120", "--test-ids", "60").returncode == 0
    out = tmp_path / "db"
    assert tool("convert_dataset.py", "market1501", raw, out, "--val-ids", "5").returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    manifest = json.loads((out / "manifest.json").read_text())
    cmd = [sys.executable, str(ROOT / "tools" / "convert_dataset.py"), "market1501", str(raw), str(out),
           "--val-ids", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    for line in proc.stdout:
        if "writing val" in line:  # the train split is written, the others are not
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("db.partial-*"))  # the killed run's build, beside the folder
    assert {p.name: p.read_bytes() for p in out.glob("*.json")} == before  # untouched, all of it
    assert json.loads((out / "manifest.json").read_text())["run_id"] == manifest["run_id"]
    assert tool("convert_dataset.py", "market1501", raw, out, "--val-ids", "20").returncode == 0
    assert not list(tmp_path.glob("db.partial-*")) and not list(tmp_path.glob("db.old-*"))
    after = json.loads((out / "val.json").read_text())
    assert after["ids"] == 20 and json.loads((out / "manifest.json").read_text())["run_id"] != manifest["run_id"]


def test_full_disk(world, tmp_path):
    """Outputs written to a full file system: an error naming the problem, exit status 2, no file
    with a final name left half-written. Needs permission to mount a small tmpfs (skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        proc = tool("train.py", "--solver", STAGE1, "--data", world["db"], "--batch-pairs", "2", "--workers", "1",
                    "--max-iter", "1", "--test-interval", "0", "--snapshot-prefix", mnt / "s", "--device", "cpu")
        assert proc.returncode == 2 and "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
        assert not list(mnt.glob("s_iter_1.*")) and not list(mnt.glob("*.tmp"))
        proc = tool("convert_dataset.py", "market1501", ROOT / "tests" / "data" / "none", mnt / "db")
        assert proc.returncode == 2
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
