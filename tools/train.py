#!/usr/bin/env python
"""Train MSP-CNN as `caffe train` would, with the two-stage recipe of METHOD.md section 4.

    python tools/train.py --solver prototxt_equiv/solver_stage1.prototxt --data DB_DIR
                          [--weights W.caffemodel] [--snapshot S.solverstate]
                          [--device cpu|cuda] [--max-iter N] [--base-lr R] [--batch-pairs 50] [--workers 2]
                          [--snapshot-prefix P] [--test-interval N] [--display N] [--snapshot-every N]

* DB_DIR is the output of tools/convert_dataset.py (train.lmdb/json, val.lmdb/json).
* The solver prototxt gives the optimisation (base_lr, lr_policy, momentum, weight_decay,
  iter_size, max_iter, display, average_loss, snapshot, snapshot_prefix, test_interval,
  random_seed); options on the command line override it. A train_state with stage "stage2"
  adds the NCC loss (stage 2). The network is mspcnn.model.MSPCNN, equivalent to
  prototxt_equiv/mspcnn_train_val.prototxt.
* Stage 1 trains from scratch; stage 2 starts from stage 1's weights (--weights).
* --snapshot resumes from a .solverstate (and the .caffemodel beside it): the same weights,
  bit for bit, as an uninterrupted run (on a GPU add --deterministic: its default kernels, cuDNN's
  and the NCC gradient's, add in a varying order).
* Logs follow Caffe's format (glog prefix; "Iteration N, loss = X", "Train net output #k: ...",
  "Iteration N, lr = Y", "Test net output #k: ..."), so existing log parsers work; a progress
  bar is drawn on stderr when it is a terminal.
* Ctrl-C (SIGINT) or SIGHUP: snapshot and stop, as the caffe tool does.
"""
import argparse
import json
import os
import signal
import sys
import time

import numpy as np
import torch

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.pairs import PairLoader, PairSampler
from mspcnn.data.transformer import DataTransformer
from mspcnn.evaluation import cross_camera_retrieval, extract_features
from mspcnn.model import CROP, MEAN_BGR, MSPCNN, caffe_float32, feature_transformer
from mspcnn.paths import TRAIN_VAL_PROTOTXT
from mspcnn.solver import SGDSolver


def log(where, message):
    """One line in glog's format, as Caffe writes them."""
    now = time.time()
    stamp = time.strftime("%m%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
    print(f"I{stamp} {os.getpid():>5} {where}] {message}", flush=True)


def progress(it, max_iter, loss):
    if sys.stderr.isatty():
        done = int(30 * it / max(max_iter, 1))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {it}/{max_iter} loss {loss:.4f}")
        sys.stderr.flush()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", required=True)
    p.add_argument("--data", required=True, help="a folder written by tools/convert_dataset.py")
    p.add_argument("--weights", help="initial weights (.caffemodel), e.g. stage 1's result")
    p.add_argument("--snapshot", help="resume from this .solverstate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--base-lr", type=float, help="overrides the solver's base_lr (e.g. for small batches)")
    p.add_argument("--loss-weights", type=float, nargs=3, default=(1.0, 1.0, 1.0),
                   metavar=("CLS", "HIGH", "LOW"),
                   help="weights of the classification, high-level and low-level losses (the "
                        "ablation of Table 5 sets some to 0)")
    p.add_argument("--batch-pairs", type=int, default=50, help="pairs per sub-iteration (Caffe's batch)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--snapshot-prefix")
    p.add_argument("--snapshot-every", type=int, help="overrides the solver's snapshot")
    p.add_argument("--test-interval", type=int, help="overrides the solver's test_interval")
    p.add_argument("--display", type=int, help="overrides the solver's display")
    p.add_argument("--seed", type=int, help="overrides the solver's random_seed (initialisation, pair "
                   "sampling, crops and mirroring, dropout)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (torch.use_deterministic_algorithms), so that runs and "
                   "resumes on a GPU are bit for bit reproducible; slower. CPU runs always are")
    args = p.parse_args(argv)
    for name in ("solver", "weights", "snapshot"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            p.error(f"--{name}: file not found: {path}")
    for f in ("train.lmdb", "train.json"):
        if not os.path.exists(os.path.join(args.data, f)):
            p.error(f"--data: {os.path.join(args.data, f)} not found (run tools/convert_dataset.py)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        sp = cio.read_prototxt(args.solver, proto.SolverParameter)
    except cio.CaffeFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for field, value in (("max_iter", args.max_iter), ("base_lr", args.base_lr),
                         ("snapshot_prefix", args.snapshot_prefix),
                         ("snapshot", args.snapshot_every), ("test_interval", args.test_interval),
                         ("display", args.display), ("random_seed", args.seed)):
        if value is not None:
            setattr(sp, field, value)
    stage2 = "stage2" in sp.train_state.stage
    seed = sp.random_seed if sp.random_seed >= 0 else 0
    torch.manual_seed(seed)
    np.random.seed(seed)

    rows = json.load(open(os.path.join(args.data, "train.json")))["records"]
    labels = [r["label"] for r in rows]
    num_classes = max(labels) + 1
    device = torch.device(args.device)
    if device.type == "cuda":
        caffe_float32()
    if args.deterministic:
        # cuBLAS is reproducible only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    w_cls, w_high, w_low = args.loss_weights
    model = MSPCNN(num_classes, use_low=stage2 and w_low > 0, w_cls=w_cls, w_high=w_high, w_low=w_low,
                   generator=torch.Generator().manual_seed(seed)).to(device)
    backbone = model.backbone
    if args.weights:
        backbone.load_caffemodel(args.weights)
    template = cio.read_prototxt(TRAIN_VAL_PROTOTXT)
    try:
        solver = SGDSolver(sp, backbone.param_groups(), backbone.layer_blobs, template)
    except ValueError as exc:
        print(f"error: {args.solver}: {exc}", file=sys.stderr)
        return 2
    position = {"epoch": 0, "batch": 0}
    if args.snapshot:
        try:
            extra = solver.restore(args.snapshot, load_weights=backbone.load_caffemodel)
        except cio.CaffeFormatError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        position = extra or position
        log("solver.cpp:330", f"Restoring previous solver status from {args.snapshot}")

    sampler = PairSampler(labels, [r["camera"] for r in rows], seed=seed)
    transformer = DataTransformer(CROP, MEAN_BGR, mirror=True, phase="TRAIN", seed=seed)
    loader = PairLoader(DatumDB(os.path.join(args.data, "train.lmdb")), labels, sampler,
                        args.batch_pairs, transformer, workers=args.workers)
    if loader.batches_per_epoch() < 1:
        print(f"error: {len(labels)} training images, fewer than --batch-pairs {args.batch_pairs}",
              file=sys.stderr)
        return 2
    val = None
    if os.path.exists(os.path.join(args.data, "val.lmdb")):
        val_rows = json.load(open(os.path.join(args.data, "val.json")))["records"]
        val = (DatumDB(os.path.join(args.data, "val.lmdb")), [r["id"] for r in val_rows],
               [r["camera"] for r in val_rows])

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_signal)

    def batches():
        while True:
            for k, batch in enumerate(loader.epoch(position["epoch"]), start=0):
                if k < position["batch"]:
                    continue
                position["batch"] = k + 1
                yield batch
            position["epoch"] += 1
            position["batch"] = 0

    stream = batches()

    def test():
        if val is None:
            return
        log("solver.cpp:330", f"Iteration {solver.iter}, Testing net (#0)")
        feats = extract_features(backbone, val[0], feature_transformer(),
                                 device=device)
        rank1, mean_ap, queries = cross_camera_retrieval(feats, val[1], val[2])
        backbone.train()
        log("solver.cpp:397", f"    Test net output #0: rank1 = {rank1:.4f}")
        log("solver.cpp:397", f"    Test net output #1: mAP = {mean_ap:.4f}")
        log("solver.cpp:397", f"    Test net output #2: queries = {queries}")

    def snapshot():
        weights, state = solver.snapshot(sp.snapshot_prefix or "runs/mspcnn", extra_state=dict(position))
        log("sgd_solver.cpp:273", f"Snapshotting to binary proto file {weights}")
        log("sgd_solver.cpp:290", f"Snapshotting solver state to binary proto file {state}")

    log("solver.cpp:48", f"Solving MSP-CNN ({'stage 2: cls + high + low' if stage2 else 'stage 1: cls + high'}), "
        f"{len(labels)} training images of {num_classes} identities, device {device}"
        + (", deterministic algorithms" if args.deterministic else ""))
    backbone.train()
    recent = []
    max_iter = sp.max_iter
    start_time = time.time()
    while solver.iter < max_iter:
        if sp.test_interval and solver.iter % sp.test_interval == 0 and (solver.iter > 0 or sp.test_initialization):
            test()
        terms = {}

        def forward_backward(k):
            batch = {key: t.to(device, non_blocking=True) for key, t in next(stream).items()}
            losses = model(batch["data"], batch["data_p"], batch["label"], batch["sim"])
            losses["total"].backward()
            for name, value in losses.items():
                terms[name] = terms.get(name, 0.0) + value.item() / max(1, sp.iter_size)
            return losses["total"].item()

        it = solver.iter
        rate = solver.rate()
        loss = solver.step(forward_backward)
        recent = (recent + [loss])[-max(1, sp.average_loss):]
        if sp.display and it % sp.display == 0:
            elapsed = time.time() - start_time
            log("solver.cpp:228", f"Iteration {it} ({(it + 1) / max(elapsed, 1e-9):.3g} iter/s), "
                f"loss = {np.mean(recent):.6g}")
            names = [("loss_cls", "cls", model.w_cls), ("loss_high", "high", model.w_high)]
            if model.use_low:
                names.append(("loss_low", "low", model.w_low))
            for k, (caffe_name, key, weight) in enumerate(names):
                log("solver.cpp:244", f"    Train net output #{k}: {caffe_name} = {terms[key]:.6g} "
                    f"(* {weight:g} = {weight * terms[key]:.6g} loss)")
            log("sgd_solver.cpp:106", f"Iteration {it}, lr = {float(rate):.6g}")
        progress(solver.iter, max_iter, loss)
        if sp.snapshot and solver.iter % sp.snapshot == 0:
            snapshot()
        if stop["signal"] is not None:
            if sys.stderr.isatty():
                sys.stderr.write("\n")
            log("solver.cpp:455", f"Signal {stop['signal']} received: snapshotting and stopping")
            if not (sp.snapshot and solver.iter % sp.snapshot == 0):
                snapshot()
            return 130
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if sp.snapshot_after_train and not (sp.snapshot and solver.iter % sp.snapshot == 0):
        snapshot()
    if sp.test_interval and solver.iter % sp.test_interval == 0:
        test()
    log("solver.cpp:470", "Optimization Done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
