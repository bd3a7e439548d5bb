"""Synthetic dataset, Market-1501 conversion and the 2:1 pair sampler."""
import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import session_members

from mspcnn.data.datasets import convert_market1501, parse_market_name, read_market1501
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.pairs import LoaderError, PairLoader, PairSampler
from mspcnn.data.synthetic import make_synthetic_market
from mspcnn.data.transformer import DataTransformer

# Real Market-1501 crops stay out of the repository: MSPCNN_REALDATA, else ../shared/realdata.
REALDATA = Path(os.environ.get("MSPCNN_REALDATA", Path(__file__).resolve().parents[2] / "shared"
                               / "realdata")) / "mini_market1501"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    summary = make_synthetic_market(raw, train_ids=12, test_ids=8, cameras=4, distractors=5,
                                    junk=3, seed=1, progress=False)
    return raw, summary


def test_synthetic_layout_is_market_and_seeded(synthetic, tmp_path):
    raw, summary = synthetic
    tree = read_market1501(raw)
    assert len(tree["bounding_box_train"]) == summary["train_images"]
    assert {pid for _, pid, _ in tree["bounding_box_train"]} == set(range(1, 13))
    gallery_ids = {pid for _, pid, _ in tree["bounding_box_test"]}
    assert {0, -1} <= gallery_ids and set(range(13, 21)) <= gallery_ids
    assert {pid for _, pid, _ in tree["query"]} == set(range(13, 21))
    again = tmp_path / "again"
    make_synthetic_market(again, train_ids=12, test_ids=8, cameras=4, distractors=5, junk=3, seed=1,
                          progress=False)
    a = sorted(os.listdir(raw / "query"))
    assert a == sorted(os.listdir(again / "query"))
    assert (raw / "query" / a[0]).read_bytes() == (again / "query" / a[0]).read_bytes()


def test_market_names():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c3s2_000100_01.jpg") == (-1, 3)
    assert parse_market_name("Thumbs.db") is None


def test_convert_market_layout(synthetic, tmp_path):
    raw, _ = synthetic
    out = tmp_path / "db"
    summary = convert_market1501(raw, out, val_ids=3, seed=0, progress=False)
    assert set(summary) == {"train", "val", "probe", "gallery"}
    meta = {s: json.loads((out / f"{s}.json").read_text()) for s in summary}
    train_ids = {r["id"] for r in meta["train"]["records"]}
    val_ids = {r["id"] for r in meta["val"]["records"]}
    assert len(val_ids) == 3 and not train_ids & val_ids and len(train_ids) == 9
    assert sorted({r["label"] for r in meta["train"]["records"]}) == list(range(9))
    assert -1 not in train_ids
    assert {0, -1} <= {r["id"] for r in meta["gallery"]["records"]}
    for split, m in meta.items():
        db = DatumDB(out / f"{split}.lmdb")
        assert [k.decode() for k in db.keys] == [r["key"] for r in m["records"]]
        image, label = db[0]
        assert image.shape == (3, 160, 64) and label == m["records"][0]["label"]


def test_a_conversion_at_another_size_replaces_the_one_read_before(synthetic, tmp_path):
    """--input-size: images stored at the input scaled as [1]'s (71 x 27 for 64 x 24), recorded in
    the metadata. A database converted again at the same path, in the same process (a notebook, a
    job that converts twice), is read anew, not from the environment of the one it replaced."""
    raw, _ = synthetic
    out = tmp_path / "db"
    convert_market1501(raw, out, val_ids=3, seed=0, progress=False)
    assert DatumDB(out / "gallery.lmdb")[0][0].shape == (3, 160, 64)
    assert "image_size" not in json.loads((out / "manifest.json").read_text())["options"]
    convert_market1501(raw, out, val_ids=3, seed=0, progress=False, image_size=(71, 27))
    assert DatumDB(out / "gallery.lmdb")[0][0].shape == (3, 71, 27)
    assert json.loads((out / "gallery.json").read_text())["image_size"] == [71, 27]
    assert json.loads((out / "manifest.json").read_text())["options"]["image_size"] == [71, 27]
    with pytest.raises(ValueError, match="image size"):
        convert_market1501(raw, tmp_path / "bad", val_ids=3, progress=False, image_size=(0, 27))


def test_convert_rejects_a_non_market_folder(tmp_path):
    (tmp_path / "query").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a Market-1501 folder, missing "
                                                r"bounding_box_train, bounding_box_test/"):
        convert_market1501(tmp_path, tmp_path / "out", progress=False)


@pytest.mark.skipif(not REALDATA.is_dir(), reason="shared real Market-1501 crops not present")
def test_real_market_crops_convert(tmp_path):
    summary = convert_market1501(REALDATA, tmp_path / "db", val_ids=1, progress=False)
    assert summary["probe"][0] > 0 and summary["gallery"][0] > 0
    image, _ = DatumDB(tmp_path / "db" / "gallery.lmdb")[0]
    assert image.shape == (3, 160, 64) and image.std() > 10  # a real picture, not blank


def test_pair_sampler_two_negatives_per_positive():
    labels = np.repeat(np.arange(30), 4)
    cameras = np.tile([1, 2, 1, 3], 30)
    sampler = PairSampler(labels, cameras, seed=5)
    anchors, partners, sim = sampler.epoch(0)
    assert sorted(anchors.tolist()) == list(range(120))  # anchors cover the set
    assert sim.sum() == 40 and (sim == 0).sum() == 80
    same = labels[anchors] == labels[partners]
    assert np.array_equal(same, sim == 1)
    assert np.all(anchors[sim == 1] != partners[sim == 1])
    assert np.all(cameras[anchors[sim == 1]] != cameras[partners[sim == 1]])
    again = PairSampler(labels, cameras, seed=5).epoch(0)
    assert all(np.array_equal(x, y) for x, y in zip((anchors, partners, sim), again))
    assert not np.array_equal(sampler.epoch(1)[0], anchors)


def test_pair_loader_batches_are_reproducible(synthetic, tmp_path):
    raw, _ = synthetic
    out = tmp_path / "db"
    convert_market1501(raw, out, val_ids=2, progress=False)
    rows = json.loads((out / "train.json").read_text())["records"]
    labels = [r["label"] for r in rows]
    sampler = PairSampler(labels, [r["camera"] for r in rows], seed=0)
    transformer = DataTransformer((144, 56), [102, 102, 101], mirror=True, phase="TRAIN")
    loader = PairLoader(DatumDB(out / "train.lmdb"), labels, sampler, 8, transformer, workers=2)
    first = [b for _, b in loader.epoch(0)]
    second = [b for _, b in loader.epoch(0)]
    assert len(first) == len(labels) // 8
    for a, b in zip(first, second):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a data-parallel worker's share (odd batches, from batch 3): the same batches, made alone
    share = list(loader.epoch(0, start=3, select=lambda k: k % 2 == 1))
    assert [k for k, _ in share] == [k for k in range(3, len(first)) if k % 2 == 1]
    for k, b in share:
        assert all(torch.equal(b[key], first[k][key]) for key in b)
    batch = first[0]
    assert batch["data"].shape == (8, 3, 144, 56) and batch["data_p"].shape == (8, 3, 144, 56)
    assert batch["label"].dtype == torch.float32 and set(batch["sim"].tolist()) <= {0.0, 1.0}


@pytest.fixture(scope="module")
def train_db(synthetic, tmp_path_factory):
    raw, _ = synthetic
    out = tmp_path_factory.mktemp("pairs_db")
    convert_market1501(raw, out, val_ids=2, progress=False)
    rows = json.loads((out / "train.json").read_text())["records"]
    labels = [r["label"] for r in rows]
    return DatumDB(out / "train.lmdb"), labels, PairSampler(labels, [r["camera"] for r in rows], seed=4)


def _same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x[:-1] == y[:-1]  # positions
        assert all(torch.equal(x[-1][k], y[-1][k]) for k in x[-1])


@pytest.mark.parametrize("workers", [1, 3])
def test_pair_loader_processes_make_the_threads_batches(train_db, workers):
    """Worker processes (shared-memory slots, reused in turn) give the very batches of threads, in the same
    order, for a whole epoch, a data-parallel share, and a stream that runs into the next epochs."""
    db, labels, sampler = train_db
    transformer = DataTransformer((144, 56), [102, 102, 101], mirror=True, phase="TRAIN")
    threads = PairLoader(db, labels, sampler, 8, transformer, workers=2, kind="threads")
    with PairLoader(db, labels, sampler, 8, transformer, workers=workers, kind="processes", prefetch=2) as procs:
        assert procs.kind == "processes"
        _same_batches(list(threads.epoch(1)), list(procs.epoch(1)))
        odd = lambda k: k % 2 == 1  # noqa: E731
        _same_batches(list(threads.epoch(0, start=3, select=odd)), list(procs.epoch(0, start=3, select=odd)))
        per_epoch = threads.batches_per_epoch()
        expected = [(0, k, b) for k, b in threads.epoch(0, start=per_epoch - 2)]
        expected += [(e, k, b) for e in (1, 2) for k, b in threads.epoch(e)]
        stream = procs.stream(0, start=per_epoch - 2)
        _same_batches(expected, [next(stream) for _ in expected])
        # two generators at once would share the slots: refused, until the first is closed
        with pytest.raises(RuntimeError, match="one epoch or stream at a time"):
            next(procs.epoch(0))
        stream.close()
        assert next(procs.epoch(0))[0] == 0
        folder = os.path.dirname(procs._procs[1].filename)
        assert os.path.isdir(folder)
    assert not os.path.exists(folder)  # the shared memory is gone with the loader
    # the default: threads up to 2 workers, processes beyond
    assert PairLoader(db, labels, sampler, 8, transformer, workers=2).kind == "threads"
    assert PairLoader(db, labels, sampler, 8, transformer, workers=3).kind == "processes"


class _FailingDB:
    """A database whose record `bad` cannot be read: it raises, or (with `die`) the process exits."""

    def __init__(self, db, bad, die=False):
        self.db, self.bad, self.die = db, bad, die

    def __len__(self):
        return len(self.db)

    def __getitem__(self, i):
        return self.db[i]

    def read_list(self, indices):
        if self.bad in list(indices):
            if self.die:
                os._exit(3)
            raise ValueError(f"record {self.bad} is corrupt")
        return self.db.read_list(indices)


@pytest.mark.parametrize("die", [False, True])
def test_pair_loader_process_failures_are_reported(train_db, die):
    """A record that cannot be read reaches the caller with its message; a worker that dies is a
    LoaderError that says so, not a hang; both leave no shared memory behind."""
    db, labels, sampler = train_db
    anchors, _, _ = sampler.epoch(0)
    transformer = DataTransformer((144, 56), [102, 102, 101], mirror=True, phase="TRAIN")
    loader = PairLoader(_FailingDB(db, int(anchors[20]), die), labels, sampler, 8, transformer, workers=3,
                        kind="processes")
    got = []
    with pytest.raises(LoaderError if die else ValueError, match="died" if die else f"record {anchors[20]}"):
        for k, _ in loader.epoch(0):
            got.append(k)
    # the error comes with the bad record's batch (2); a death breaks the whole pool, in-flight batches too
    assert got == [0, 1] if not die else got in ([], [0], [0, 1])
    folder = os.path.dirname(loader._procs[1].filename)
    loader.close()
    assert not os.path.exists(folder)


CTRL_C_SCRIPT = """
import json, signal, sys, time
# Python turns SIGINT into KeyboardInterrupt only when it starts with SIGINT's default action; a
# process started in the background by a shell without job control (as a CI job may be) inherits
# SIGINT ignored, and would sleep on. The test is of a program in a terminal: give it that handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.pairs import PairLoader, PairSampler
from mspcnn.data.transformer import DataTransformer
db = sys.argv[1]
rows = json.load(open(db + "/train.json"))["records"]
labels = [r["label"] for r in rows]
loader = PairLoader(DatumDB(db + "/train.lmdb"), labels, PairSampler(labels, seed=0), 4,
                    DataTransformer((144, 56), [102, 102, 101], phase="TRAIN"), workers=3, kind="processes")
batches = loader.epoch(0)
next(batches)
try:  # the signal may come as soon as "ready" is printed, even before the sleep begins (a
    # signal handled just before a blocking call does not interrupt it): short sleeps
    print("ready", loader._procs[1].filename, flush=True)
    for _ in range(600):
        time.sleep(0.1)
except KeyboardInterrupt:
    batches.close()
    loader.close()
    print("closed", flush=True)
"""


def _start_loader_script(train_db):
    """CTRL_C_SCRIPT in its own session on the test database, once its first batch is made: (the
    process, the path of its shared slots)."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, os.path.dirname(train_db[0].path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ready, slots = proc.stdout.readline().split()
    assert ready == "ready"
    return proc, slots


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_reaches_the_parent_not_the_worker_processes(train_db, tmp_path):
    """A terminal's Ctrl-C goes to the whole process group: the workers ignore it (no traceback from each),
    the parent's KeyboardInterrupt closes the loader, and no worker is left."""
    import signal
    import subprocess
    proc, _ = _start_loader_script(train_db)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # leave no process behind, and say what the script wrote
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the loader script did not stop within 60 s of SIGINT; it wrote {out!r}, {err[-3000:]!r}")
    assert proc.returncode == 0 and out == "closed\n" and "Traceback" not in err, err
    assert not session_members(proc.pid)


def _thread_masks():
    """{thread id: its blocked-signal mask} of this process's threads, from /proc."""
    masks = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            line = next(x for x in (task / "status").read_text().splitlines() if x.startswith("SigBlk:"))
            masks[task.name] = int(line.split()[1], 16)
    return masks


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_loader_threads_leave_signals_to_the_main_thread(train_db, kind):
    """The kernel gives a signal sent to the process to any thread that does not block it; a Ctrl-C taken by
    a loader thread would not wake a main thread blocked in a wait or a sleep (Python runs handlers only
    there). Every thread the loader starts (its pool, the process pool's manager and queue threads)
    blocks SIGINT, SIGTERM and SIGHUP; the main thread's mask is as it was."""
    import signal
    db, labels, sampler = train_db
    before = _thread_masks()
    loader = PairLoader(db, labels, sampler, 4, DataTransformer((144, 56), [102, 102, 101], phase="TRAIN"),
                        workers=3, kind=kind)
    batches = loader.epoch(0)
    try:
        next(batches)
        after = _thread_masks()
    finally:
        batches.close()
        loader.close()
    started = {t: m for t, m in after.items() if t not in before}
    assert started
    wanted = sum(1 << (s - 1) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    assert all(m & wanted == wanted for m in started.values()), {t: hex(m) for t, m in started.items()}
    assert after[str(os.getpid())] == before[str(os.getpid())]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_of_a_killed_loader_exit_and_remove_its_shared_memory(train_db):
    """kill -9 of the loader's process (no finalizer runs): its workers notice within a second or two,
    remove the shared slots and exit."""
    import signal
    import time
    proc, slots = _start_loader_script(train_db)
    assert os.path.exists(slots)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    for _ in range(100):
        if not session_members(proc.pid) and not os.path.exists(os.path.dirname(slots)):
            break
        time.sleep(0.1)
    assert not session_members(proc.pid) and not os.path.exists(os.path.dirname(slots))


def test_transformer_writes_into_a_given_array():
    images = np.random.default_rng(0).integers(0, 255, (4, 3, 20, 10), dtype=np.uint8)
    a = DataTransformer((16, 8), [1, 2, 3], mirror=True, phase="TRAIN", seed=2)
    b = DataTransformer((16, 8), [1, 2, 3], mirror=True, phase="TRAIN", seed=2)
    out = np.full((4, 3, 16, 8), np.nan, np.float32)
    assert a(images, out=out) is out
    assert np.array_equal(out, b(images))
    with pytest.raises(ValueError, match=r"out is float32 \[4, 3, 16, 7\]"):
        a(images, out=np.empty((4, 3, 16, 7), np.float32))
