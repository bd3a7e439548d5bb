"""The training engine: the counterpart of Caffe's ``Solver::Solve`` for MSP-CNN.

:func:`solve` reads a solver, builds the network the solver names (:mod:`mspcnn.train_net`: loss
weights, loss parameters, dropout, BatchNorm settings, fillers and multipliers come from that
net), and runs Caffe's loop:

* seeding: the solver's ``random_seed`` (>= 0; else 0) seeds torch and numpy (initialisation,
  dropout), the pair sampler and the crops and mirrors of the data transformer;
* the data layer: pairs from a folder written by tools/convert_dataset.py (``train.lmdb`` and
  ``train.json``; 2 negative pairs per positive pair, :mod:`mspcnn.data.pairs`), batches of
  ``batch_pairs`` (default: the batch of the net's Input layer);
* each iteration: ``iter_size`` forward/backward passes, then Caffe's SGD update
  (:class:`mspcnn.solver.SGDSolver`);
* ``test_interval``: the validation score (cross-camera rank-1 and mAP on ``val.lmdb`` when the
  folder has one), before the first iteration when ``test_initialization``;
* ``display`` and ``average_loss``: log lines in Caffe's format (glog prefix; "Iteration N (...),
  loss = X", "Train net output #k: ...", "Iteration N, lr = Y", "Test net output #k: ..."), with
  iterations done / total, an ETA, and the share of time spent waiting for the data layer;
* ``snapshot`` and ``snapshot_after_train``: .caffemodel + .solverstate pairs; a resume from a
  .solverstate continues bit for bit;
* signals, as the caffe tool handles them (``-sigint_effect``, ``-sighup_effect``): "stop"
  (stop after the current iteration; the snapshot after training is written), "snapshot"
  (snapshot and go on) or "none". Defaults: SIGINT and SIGTERM stop, SIGHUP snapshots;
* data-parallel training when started by torchrun (WORLD_SIZE > 1): Caffe's multi-GPU semantics
  (see :class:`_DataParallel`).

It returns a :class:`SolveResult`: the snapshots written, the final loss and validation figures.
Errors in the inputs raise :class:`TrainingError` (or CaffeFormatError / NetDefinitionError /
FileNotFoundError), each naming the file or value, before any work starts.
"""
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.cli import format_duration, lock_file
from mspcnn.cuda_graphs import CapturedPasses
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.pairs import PairLoader, PairSampler
from mspcnn.data.transformer import feature_transformer, size_mismatch, train_transformer
from mspcnn.evaluation import extract_features
from mspcnn.metrics import cross_camera_retrieval
from mspcnn.model import check_input_size, training_arithmetic
from mspcnn.solver import SGDSolver, check_solver
from mspcnn.train_net import read_train_net

__all__ = ["solve", "SolveResult", "TrainingError", "TrainingData", "open_training_data", "SIGNAL_EFFECTS", "glog",
           "format_duration"]

SIGNAL_EFFECTS = ("stop", "snapshot", "none")
LOSS_NAMES = (("loss_cls", "cls"), ("loss_high", "high"), ("loss_low", "low"))


class TrainingError(ValueError):
    """Training cannot start with these inputs (the message names the file or value)."""


@dataclass
class SolveResult:
    """What :func:`solve` did.

    iterations: the solver's iteration count at the end; snapshots: [(caffemodel, solverstate)]
    in the order written; weights: the last .caffemodel written (None if none was); stopped_by:
    the name of the signal that stopped training early, or None; loss: the last smoothed loss
    (``average_loss`` iterations); losses: the last iteration's loss terms (unweighted);
    test: the last validation {"iteration", "rank1", "mAP", "queries"} or None; history: every
    displayed {"iteration", "loss", "lr", "seconds", "data_wait"} and validation; seconds: wall time;
    data_wait: the share of the training loop's time spent waiting for batches (near 0 when the
    data layer keeps up with the device); cuda_graphs: with ``cuda_graphs=True``, "replayed",
    "not reached" (training ended before the capture) or "failed: <error>"."""
    iterations: int = 0
    snapshots: list = field(default_factory=list)
    weights: str = None
    stopped_by: str = None
    loss: float = None
    losses: dict = field(default_factory=dict)
    test: dict = None
    history: list = field(default_factory=list)
    seconds: float = 0.0
    data_wait: float = 0.0
    net: str = None
    cuda_graphs: str = None


def glog(where, message, stream=None):
    """One line in glog's format, as Caffe writes them (``I1129 22:54:47.123456  4242 where] m``)."""
    now = time.time()
    stamp = time.strftime("%m%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
    print(f"I{stamp} {os.getpid():>5} {where}] {message}", file=stream or sys.stdout, flush=True)


def _read_records(data, split):
    path = os.path.join(data, f"{split}.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{path}: not valid JSON ({exc})") from None
    rows = meta.get("records") if isinstance(meta, dict) else None
    if not isinstance(rows, list) or not rows:
        raise TrainingError(f"{path}: no records (not written by tools/convert_dataset.py?)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), int) for k in ("label", "camera", "id")):
            raise TrainingError(f"{path}: record {i} lacks an integer label, camera or id")
    return rows


class TrainingData(NamedTuple):
    """A converted folder's training split, opened and checked by :func:`open_training_data`."""

    rows: list  # train.json's records: dicts with integer label, camera and id
    labels: list  # rows' labels, 0 .. classes - 1
    db: DatumDB  # train.lmdb, one record per row, in the same order
    image_size: tuple  # (height, width) of the stored images


def open_training_data(data, train_net, batch_pairs=1):
    """Open the training split of a folder written by tools/convert_dataset.py and check it fits the net.

    Checks, each a :class:`TrainingError` naming the file: train.lmdb and train.json exist; train.json
    holds records with integer label, camera and id; no label is negative; the two hold the same
    number of records, at least ``batch_pairs``; the stored images are at least the net's input
    (``train_net.input_size``; they are cropped to it, never enlarged). Used by :func:`solve` and by
    the tools that read training pairs outside it (tools/probe_losses.py), so that every reader
    refuses the same folders with the same messages.

    Returns a :class:`TrainingData`.
    """
    missing = [os.path.join(data, f) for f in ("train.lmdb", "train.json") if not os.path.exists(os.path.join(data, f))]
    if missing:
        raise TrainingError(f"data: {', '.join(path + ' not found' for path in missing)} (run tools/convert_dataset.py)")
    rows = _read_records(data, "train")
    labels = [r["label"] for r in rows]
    if min(labels) < 0:
        raise TrainingError(f"{os.path.join(data, 'train.json')}: negative label {min(labels)}")
    db = DatumDB(os.path.join(data, "train.lmdb"))
    if len(db) != len(rows):
        raise TrainingError(f"{data}: train.lmdb has {len(db)} records, train.json {len(rows)}")
    if len(rows) < batch_pairs:
        raise TrainingError(f"{data}: {len(rows)} training images, fewer than the batch of {batch_pairs} pairs")
    stored, wanted = tuple(np.shape(db[0][0])[1:]), train_net.input_size
    if len(stored) != 2 or stored[0] < wanted[0] or stored[1] < wanted[1]:
        raise TrainingError(f"{data}: the training images are {' x '.join(map(str, stored))}, smaller than the "
                            f"net's input {wanted[0]} x {wanted[1]} (the Input layer of {train_net.source}); "
                            "convert the images at a larger size or give the net a smaller input")
    return TrainingData(rows, labels, db, stored)


def _install_signals(effects, requests):
    """Install handlers that record the requested action ("none": the signal is caught and
    ignored, as Caffe does); returns a function restoring the old handlers. Only the main thread
    can handle signals: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {}
    for name, effect in effects.items():
        signum = getattr(signal, name, None)
        if signum is None:
            continue

        def handler(num, frame, effect=effect, name=name):
            requests.append((effect, name))

        old[signum] = signal.signal(signum, handler)
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def solve(solver, data, *, weights=None, snapshot=None, device="cpu", overrides=None, batch_pairs=None,
          input_size=None, loss_weights=None, net=None, workers=2, deterministic=False, tf32=False, channels_last=False, cpu_kernels=True,
          sigint_effect="stop",
          sighup_effect="snapshot", sigterm_effect="stop", log=glog, progress=None, stop_at=None,
          cuda_graphs=False):
    """Train as ``caffe train --solver SOLVER [--weights W | --snapshot S]`` would.

    Args:
        solver: path of a solver prototxt, or a SolverParameter.
        data: a folder written by tools/convert_dataset.py.
        weights: initial weights (.caffemodel), e.g. stage 1's for stage 2.
        snapshot: a .solverstate to resume from (its .caffemodel beside it).
        device: "cpu", "cuda" or "cuda:N".
        overrides: {SolverParameter field: value} replacing the solver's (e.g. max_iter, base_lr,
            snapshot_prefix, snapshot, test_interval, display, random_seed).
        batch_pairs: pairs per forward pass (default: the batch of the net's Input layer).
        input_size: (height, width) of the images (default: the net's Input layer's; see
            mspcnn.model.check_input_size).
        loss_weights: {"loss_cls" | "loss_high" | "loss_low": weight} replacing the net's.
        net: a NetParameter (or path) to train instead of the one the solver names.
        workers: workers decoding batches ahead (threads up to 2, forked processes beyond:
            threads share the interpreter lock and stop scaling at about 2).
        deterministic: deterministic GPU kernels (bit-exact GPU runs and resumes; slower). Without
            it, cuDNN times its algorithms on the first batch of each shape and keeps the fastest
            (``torch.backends.cudnn.benchmark``): float32 all the same, rounded in another order.
        tf32: on a GPU, let convolutions and matrix products use TF32 tensor cores (inputs rounded
            to a 10-bit mantissa, float32 sums), several times faster on Ampere and later. Never the
            default: Caffe's arithmetic is float32, which is what the GPU runs without it.
        channels_last: run the network in the channels-last layout (oneDNN's own), with PyTorch's
            operations for BatchNorm, Scale, ReLU and pooling. Off by default: on a 2-core CPU it
            was 2-6% faster per iteration than those operations in the contiguous layout, and our
            CPU kernels below are faster still (docs/perf_notes.md).
        cpu_kernels: on the CPU, run each BatchNorm + Scale (+ ReLU) of the training phase as one
            C++ operator and pooling through PyTorch's channels-last kernels with our MAX backward
            (mspcnn.caffe.kernels: the same functions, BatchNorm's sums in double). False: PyTorch's
            separate operations (what a GPU runs).
        sigint_effect, sighup_effect, sigterm_effect: "stop", "snapshot" or "none".
        log: ``log(where, message)`` for the Caffe-format lines (default: glog lines on stdout).
        progress: draw a progress bar on stderr (default: when stderr is a terminal).
        stop_at: a time (``time.time()``) after which training stops at the end of the iteration,
            as a stop signal would (snapshot written, ``stopped_by`` "time limit"): a run that must
            fit a fixed window, resumed later from that snapshot.
        cuda_graphs: on a GPU, replay each training pass from CUDA graphs captured after two eager
            iterations (mspcnn.cuda_graphs): the same arithmetic, without the host's per-kernel cost.
            Off by default; a capture that fails is logged and training goes on without graphs.

    Returns a :class:`SolveResult`."""
    start_time = time.time()
    solver_path = None
    if isinstance(solver, (str, os.PathLike)):
        solver_path = os.fspath(solver)
        if not os.path.isfile(solver_path):
            raise TrainingError(f"solver: file not found: {solver_path}")
        solver = cio.read_prototxt(solver_path, proto.SolverParameter)
    sp = proto.SolverParameter()
    sp.CopyFrom(solver)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in proto.SolverParameter.DESCRIPTOR.fields_by_name:
            raise TrainingError(f"unknown solver field {key!r}")
        setattr(sp, key, value)
    where_solver = solver_path or "solver"
    try:
        check_solver(sp)
    except ValueError as exc:
        raise TrainingError(f"{where_solver}: {exc}") from None
    for name, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect),
                         ("sigterm_effect", sigterm_effect)):
        if effect not in SIGNAL_EFFECTS:
            raise TrainingError(f"{name} must be one of {', '.join(SIGNAL_EFFECTS)}, got {effect!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device}: no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"device {device}: only cpu and cuda are supported")
    for what, path in (("weights", weights), ("snapshot", snapshot)):
        if path is not None and not os.path.isfile(path):
            raise TrainingError(f"{what}: file not found: {path}")
    train_net = read_train_net(sp, solver_path, net=net)
    if loss_weights:
        train_net.set_loss_weights(loss_weights)
    batch_pairs = train_net.batch_pairs if batch_pairs is None else batch_pairs
    if input_size is not None:
        try:
            train_net.input_size = check_input_size(input_size)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
    if isinstance(batch_pairs, bool) or not isinstance(batch_pairs, int) or batch_pairs < 1:
        raise TrainingError(f"batch_pairs must be an integer >= 1, got {batch_pairs!r}")
    if cuda_graphs and device.type != "cuda":
        raise TrainingError(f"cuda_graphs: CUDA graphs need a GPU (device cuda), not {device}")
    if not isinstance(workers, int) or workers < 1:
        raise TrainingError(f"workers must be an integer >= 1, got {workers!r}")
    rows, labels, db, stored = open_training_data(data, train_net, batch_pairs)
    num_classes = max(labels) + 1
    wanted = train_net.input_size
    val = None
    if os.path.exists(os.path.join(data, "val.lmdb")):
        val_rows = _read_records(data, "val")
        val = (DatumDB(os.path.join(data, "val.lmdb")), [r["id"] for r in val_rows],
               [r["camera"] for r in val_rows])
    prefix = sp.snapshot_prefix or "runs/mspcnn"
    group = _DataParallel.from_environment(device)
    device = group.device
    if group.rank != 0:
        log = _quiet  # one log, one set of snapshots: the root worker's, as Caffe's root solver
    size_note = size_mismatch(stored, wanted, f"the training images of {data}")
    if size_note:
        log("data_transformer.cpp:168", f"warning: {size_note}")
    lock = _lock_prefix(prefix) if group.rank == 0 else None
    try:
        return _solve(sp, data, train_net, rows, labels, num_classes, db, val, batch_pairs, prefix, weights, snapshot,
                      device, workers, deterministic, sigint_effect, sighup_effect, sigterm_effect, log, progress,
                      start_time, group, channels_last, cpu_kernels, tf32, stop_at, cuda_graphs)
    finally:
        if lock is not None:
            lock.close()  # releases the lock
        group.close()


def _quiet(where, message):
    pass


class _DataParallel:
    """Data-parallel training over torch.distributed (``torchrun --nproc_per_node N``), as Caffe's
    multi-GPU training: every worker runs ``iter_size`` forward/backward passes on its own batches,
    the accumulated gradients are summed over the workers and divided by their number, and every
    worker applies the same update (so the effective batch is N x iter_size x batch, the rate and
    the iteration count are the solver's). The data: the batches of the one-process sequence, an
    iteration's N x iter_size batches shared out in blocks of iter_size, each worker reading only
    its own. The root (rank 0) logs, validates and writes the snapshots; BatchNorm statistics stay
    per worker and the root's are saved (Caffe keeps them per GPU as well). One process: nothing
    of this happens."""

    def __init__(self, rank=0, world=1, device=None, owned=False):
        self.rank, self.world, self.device, self.owned = rank, world, device, owned

    @classmethod
    def from_environment(cls, device):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device)
        import torch.distributed as dist

        if not dist.is_available():
            raise TrainingError("WORLD_SIZE > 1 but this PyTorch has no torch.distributed")
        owned = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owned = True
        rank = dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return cls(rank, dist.get_world_size(), device, owned)

    def broadcast_parameters(self, model):
        if self.world > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for p in model.parameters():
                    dist.broadcast(p.data, 0)

    def average_gradients(self, params):
        """Sum the workers' gradients and divide by their number (one flat all-reduce), in the
        gradient tensors themselves."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            mean = flat[offset:offset + n].view_as(p)
            if p.grad is None:
                p.grad = mean.clone()
            else:  # in place: CUDA graphs replay their backward into these very tensors
                p.grad.copy_(mean)
            offset += n

    def mean(self, values):
        """The mean of a few floats over the workers (losses, for the log)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def any(self, flags):
        """Each flag set on any worker (signals: every worker stops at the same iteration)."""
        if self.world == 1:
            return flags
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def mine(self, base, iter_size, per_epoch):
        """The predicate of epoch e's batch indices this worker makes (None: all of them)."""
        if self.world == 1:
            return lambda e: None
        return lambda e: (lambda k: ((e * per_epoch + k - base) // iter_size) % self.world == self.rank)

    def close(self):
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _lock_prefix(prefix):
    """Check that snapshots can be written at ``prefix`` and take ``.<name>.lock`` beside them (an exclusive
    flock held for the whole training, released when the process ends however it ends): two
    trainings with one prefix would interleave their snapshots. Removes the temporary files of
    snapshots interrupted by a kill."""
    try:
        folder = cio.writable_folder(os.path.dirname(os.path.abspath(prefix)), f"snapshot prefix {prefix}")
    except OSError as exc:
        raise TrainingError(str(exc)) from None
    if os.path.isdir(prefix + "_iter_0.caffemodel"):
        raise TrainingError(f"snapshot prefix {prefix}: {prefix}_iter_0.caffemodel is a folder")
    lock_path = os.path.join(folder, f".{os.path.basename(prefix)}.lock")  # hidden beside the snapshots
    try:
        lock, holder = lock_file(lock_path, f"pid {os.getpid()}")
    except OSError as exc:
        raise TrainingError(f"snapshot prefix {prefix}: cannot create {lock_path} ({exc.strerror})") from None
    if lock is None:
        raise TrainingError(f"snapshot prefix {prefix}: another training ({holder or 'another process'}) is "
                            "writing snapshots with this prefix; choose another --snapshot-prefix")
    cio.remove_stale_temporaries(folder, os.path.basename(prefix) + "_iter_")
    return lock


def _solve(sp, data, train_net, rows, labels, num_classes, db, val, batch_pairs, prefix, weights, snapshot,
           device, workers, deterministic, sigint_effect, sighup_effect, sigterm_effect, log, progress,
           start_time, group, channels_last, cpu_kernels, tf32, stop_at, cuda_graphs):
    """The training itself (see :func:`solve`), with the inputs checked and the prefix locked."""

    seed = sp.random_seed if sp.random_seed >= 0 else 0
    torch.manual_seed(seed)
    np.random.seed(seed)
    if device.type == "cuda":
        training_arithmetic(tf32, autotune=not deterministic)
    if deterministic:
        # cuBLAS is reproducible only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    model = train_net.build(num_classes, generator=torch.Generator().manual_seed(seed))
    model.use_low = "loss_low" in train_net.layers and model.w_low != 0  # weight 0: no need to compute it
    model.to(device)
    model.backbone.cpu_kernels = cpu_kernels
    if channels_last:
        # Weights, images and (so) every activation and gradient in NHWC; the values are the same,
        # the memory order is the one oneDNN's convolutions use without reordering.
        model.to(memory_format=torch.channels_last)
    log("solver.cpp:87", f"Creating training net from {train_net.source}"
        + (f" (stages {', '.join(train_net.stages)})" if train_net.stages else ""))
    for note in train_net.notes:
        log("upgrade_proto.cpp:67", note)
    if train_net.num_output != num_classes:
        log("net.cpp:84", f"fc8: num_output {train_net.num_output} in the net, {num_classes} training "
            f"identities in {data}: fc8 has {num_classes} outputs")
    if weights:
        missing = model.load_caffemodel(weights)
        log("net.cpp:761", f"Copying weights from {weights}"
            + (f" ({len(missing)} second-branch BatchNorm layers not in the file keep their initial "
               "statistics)" if missing else ""))
    solver_ = SGDSolver(sp, model.param_groups(), model.layer_blobs, model.describe(batch_pairs))
    position = {"epoch": 0, "batch": 0}
    result = SolveResult(net=train_net.source)
    if snapshot:
        restored = solver_.restore(snapshot, load_weights=model.load_caffemodel)
        if restored is not None:
            position["epoch"], position["batch"] = restored
        log("solver.cpp:330", f"Restoring previous solver status from {snapshot}")

    group.broadcast_parameters(model)
    sampler = PairSampler(labels, [r["camera"] for r in rows], seed=seed)
    loader = PairLoader(db, labels, sampler, batch_pairs, train_transformer(seed, train_net.input_size), workers=workers,
                        pin_memory=device.type == "cuda")
    # The data position counts the batches of the one-process sequence: after an iteration every
    # worker has consumed iter_size x workers of them, its own share made, the others skipped.
    per_epoch = loader.batches_per_epoch()
    step = max(1, sp.iter_size) * group.world
    base = position["epoch"] * per_epoch + position["batch"]
    select = group.mine(base, max(1, sp.iter_size), per_epoch)

    def batches():
        e, start = divmod(base, per_epoch)
        for _, _, batch in loader.stream(e, start=start, select=select):
            yield batch

    def set_position():
        position["epoch"], position["batch"] = divmod(base + (solver_.iter - first_iter) * step, per_epoch)

    stream = batches()
    backbone = model.backbone
    draw = sys.stderr.isatty() if progress is None else progress
    terms_display = [(caffe, key, getattr(model, f"w_{key}")) for caffe, key in LOSS_NAMES
                     if key in ("cls", "high") and caffe in train_net.layers or key == "low" and model.use_low]

    def test():
        if val is None or group.rank != 0:
            return
        log("solver.cpp:330", f"Iteration {solver_.iter}, Testing net (#0)")
        try:
            feats = extract_features(backbone, val[0], feature_transformer(backbone.input_size), device=device)
        except ValueError as exc:
            # e.g. before any training step: BatchNorm statistics are still 0 (Caffe then divides by
            # sqrt(eps) in every layer, and the outputs overflow); nothing to score.
            backbone.train()
            if solver_.iter == 0 and not weights and not snapshot:
                exc = ("before the first iteration the BatchNorm layers hold no statistics yet; Caffe "
                       "then divides by sqrt(eps) in every layer and the features overflow; the "
                       "first score comes at the next test")
            log("solver.cpp:397", f"    Test net: no score ({exc})")
            result.history.append({"kind": "test", "iteration": solver_.iter, "rank1": float("nan"),
                                   "mAP": float("nan"), "queries": 0})
            return
        rank1, mean_ap, queries = cross_camera_retrieval(feats, val[1], val[2])
        backbone.train()
        log("solver.cpp:397", f"    Test net output #0: rank1 = {rank1:.4f}")
        log("solver.cpp:397", f"    Test net output #1: mAP = {mean_ap:.4f}")
        log("solver.cpp:397", f"    Test net output #2: queries = {queries}")
        result.test = {"iteration": solver_.iter, "rank1": rank1, "mAP": mean_ap, "queries": queries}
        result.history.append(dict(result.test, kind="test"))

    def take_snapshot():
        if group.rank != 0:
            return
        set_position()
        paths = solver_.snapshot(prefix, data_position=(position["epoch"], position["batch"]))
        log("sgd_solver.cpp:273", f"Snapshotting to binary proto file {paths[0]}")
        log("sgd_solver.cpp:290", f"Snapshotting solver state to binary proto file {paths[1]}")
        result.snapshots.append(paths)
        result.weights = paths[0]

    requests = []
    restore_signals = _install_signals({"SIGINT": sigint_effect, "SIGHUP": sighup_effect,
                                        "SIGTERM": sigterm_effect}, requests)
    # The net's loss terms; one at weight 0 (e.g. loss_high in a cls run) is logged but not trained.
    terms = " + ".join(key if weight else f"{key} (weight 0)" for _, key, weight in terms_display)
    log("solver.cpp:48", f"Solving MSP-CNN ({'stage 2: ' if model.use_low else ''}{terms}), "
        f"{len(labels)} training images of {num_classes} identities, "
        f"batch {batch_pairs} pairs x iter_size {max(1, sp.iter_size)}"
        + (f" x {group.world} workers" if group.world > 1 else "")
        + f", input {backbone.input_size[0]} x {backbone.input_size[1]}, device {device}"
        + (", deterministic algorithms" if deterministic else "") + (", channels-last" if channels_last else "")
        + (", TF32 tensor cores" if tf32 and device.type == "cuda" else "")
        + (", own CPU kernels for BatchNorm and pooling" if cpu_kernels and device.type == "cpu" and not channels_last
           else ""))
    model.train()
    recent = []

    def settle(it, check=True):
        """Bring the loss values to the host: result.loss (the mean of the last average_loss
        iterations) and result.losses (iteration `it`'s terms); with `check`, say so if the loss
        diverged."""
        result.loss = float(np.mean([float(x) for x in recent]))
        result.losses = {k: float(v) for k, v in terms.items()}
        if check and not math.isfinite(float(recent[-1])):
            log("solver.cpp:228", f"Iteration {it}: the loss is {float(recent[-1])} (diverged); lower base_lr")

    def prepare(images):
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images

    def eager(host):
        """One training pass on a host batch: copied to the device, forward, backward; the losses."""
        batch = {key: t.to(device, non_blocking=True) for key, t in host.items()}
        losses = model(prepare(batch["data"]), prepare(batch["data_p"]), batch["label"], batch["sim"])
        losses["total"].backward()
        return losses

    def reduce():
        group.average_gradients([e["param"] for e in solver_.entries])

    graphs = None
    if cuda_graphs:
        graphs = CapturedPasses(model, sp.iter_size, solver_.iter, prepare=prepare)
        log("solver.cpp:48", f"CUDA graphs: the passes are captured at iteration {graphs.capture_at} and "
            "replayed from then on")

    waited = [0.0]  # seconds spent waiting for the data layer (a starved GPU shows here)
    max_iter = sp.max_iter
    first_iter, loop_start = solver_.iter, time.time()
    try:
        while solver_.iter < max_iter:
            if sp.test_interval and solver_.iter % sp.test_interval == 0 and (
                    solver_.iter > 0 or sp.test_initialization):
                test()
            terms = {}

            def forward_backward(k):
                wait = time.time()
                host = next(stream)
                waited[0] += time.time() - wait
                losses = graphs.losses(k, solver_.iter, host, eager, log) if graphs is not None else eager(host)
                # The loss values stay on the device (in double, the arithmetic of Python floats)
                # until a display needs them: a .item() here would make the host wait for the GPU
                # at every pass, instead of queueing the next one while the GPU works.
                for name, value in losses.items():
                    terms[name] = terms.get(name, 0.0) + value.detach().double() / max(1, sp.iter_size)
                return losses["total"].detach().double()

            it = solver_.iter
            rate = solver_.rate()
            loss = (graphs.step(solver_, forward_backward, reduce) if graphs is not None
                    else solver_.step(forward_backward, reduce))
            if group.world > 1:
                names = sorted(terms)
                averaged = group.mean([float(loss)] + [float(terms[k]) for k in names])
                loss, terms = averaged[0], dict(zip(names, averaged[1:]))
            recent = (recent + [loss])[-max(1, sp.average_loss):]
            result.iterations = solver_.iter
            if sp.display and it % sp.display == 0:
                settle(it)
                elapsed = time.time() - loop_start
                done = solver_.iter - first_iter
                eta = elapsed / max(done, 1) * (max_iter - solver_.iter)
                data_share = waited[0] / max(elapsed, 1e-9)
                log("solver.cpp:228", f"Iteration {it} ({done / max(elapsed, 1e-9):.3g} iter/s; "
                    f"{solver_.iter}/{max_iter}, ETA {format_duration(eta)}; data wait {100 * data_share:.0f}%), "
                    f"loss = {result.loss:.6g}")
                for k, (caffe_name, key, weight) in enumerate(terms_display):
                    value = result.losses[key]
                    log("solver.cpp:244", f"    Train net output #{k}: {caffe_name} = {value:.6g} "
                        f"(* {weight:g} = {weight * value:.6g} loss)")
                log("sgd_solver.cpp:106", f"Iteration {it}, lr = {float(rate):.6g}")
                result.history.append({"kind": "train", "iteration": it, "loss": result.loss,
                                       "lr": float(rate), "seconds": time.time() - start_time,
                                       "data_wait": data_share})
            if draw:  # the loss of the last display (reading this iteration's would wait for the GPU)
                bar = int(30 * solver_.iter / max(max_iter, 1))
                shown = f"{result.loss:.4f}" if result.loss is not None else "-"
                sys.stderr.write(f"\r[{'#' * bar}{'.' * (30 - bar)}] {solver_.iter}/{max_iter} loss {shown}")
                sys.stderr.flush()
            if stop_at is not None and time.time() >= stop_at and not any(e == "stop" for e, _ in requests):
                requests.append(("stop", "time limit"))
            actions = [effect for effect, _ in requests]
            if group.world > 1:
                want_snapshot, want_stop = group.any(["snapshot" in actions, "stop" in actions])
                actions = (["snapshot"] if want_snapshot else []) + (["stop"] if want_stop else [])
                if want_stop and not any(effect == "stop" for effect, _ in requests):
                    requests.append(("stop", "a signal to another worker"))
            if sp.snapshot and solver_.iter % sp.snapshot == 0 or "snapshot" in actions:
                take_snapshot()
            if "stop" in actions:
                result.stopped_by = next(name for effect, name in requests if effect == "stop")
                break
            requests.clear()
    finally:
        restore_signals()
        stream.close()
        loader.close()
        if draw:
            sys.stderr.write("\n")
    if graphs is not None:
        result.cuda_graphs = "failed: " + graphs.failed if graphs.failed else (
            "replayed" if graphs.captured else "not reached")
    if recent:  # the final values; the divergence check unless the last iteration was displayed
        last = solver_.iter - 1
        settle(last, check=not (sp.display and last % sp.display == 0))
    if result.stopped_by:
        log("solver.cpp:455", f"{result.stopped_by} {'reached' if result.stopped_by == 'time limit' else 'received'}: "
            f"stopping after iteration {solver_.iter}")
    if sp.snapshot_after_train and not (sp.snapshot and solver_.iter % sp.snapshot == 0) \
            and not (result.snapshots and result.snapshots[-1][0].endswith(f"_iter_{solver_.iter}.caffemodel")):
        take_snapshot()
    if result.stopped_by:
        log("solver.cpp:470", "Optimization stopped early.")
    else:
        if sp.test_interval and solver_.iter % sp.test_interval == 0:
            test()
        log("solver.cpp:470", "Optimization Done.")
    result.iterations = solver_.iter
    result.seconds = time.time() - start_time
    result.data_wait = waited[0] / max(time.time() - loop_start, 1e-9)
    return result
