#!/usr/bin/env python
"""Benchmark of a training iteration: mspcnn's MSP-CNN (stage 1 and stage 2) against a plain
PyTorch eager version of the same network, on a quiet machine and beside busy processes.

    python tools/bench_train.py [--batches paper main] [--busy 0 2] [--threads N] [--repeat 5]
                                [--device cpu|cuda] [--tf32] [--cuda-graphs] [--count-ops] [--json bench_train.json]

* mspcnn: mspcnn.model.MSPCNN as the training engine runs it (Caffe's BatchNorm, Scale, pooling and
  losses; the NCC loss with the C++ operator in stage 2), one iteration = iter_size forward/backward
  passes and Caffe's SGD update (mspcnn.solver.SGDSolver).
* plain: the same architecture written with torch.nn only (nn.Conv2d, nn.BatchNorm2d with its affine
  part, nn.ReLU, nn.MaxPool2d / nn.AvgPool2d with ceil_mode, nn.Linear, nn.Dropout), cross-entropy,
  a contrastive loss in tensor operations, torch.optim.SGD; in stage 2 the NCC loss with the
  plain-PyTorch reference operator (mspcnn.ops.ncc_max_reference), since plain PyTorch has none.
* batches: `paper` = [1]'s 50 pairs x iter_size 2; `main` = the main job's 4 pairs x iter_size 2.
* --busy N runs N CPU-bound processes (busy loops) beside the measurement, to see how the training
  slows down on a shared machine. Ratios in the same run are what carry over between machines; the
  load average is written beside each figure. With the default --threads auto the thread count is
  chosen again beside each level's busy processes (what a tool started on that machine does).
* variants: `mspcnn` rows are the training engine's CPU default: the contiguous (NCHW) layout and our
  CPU paths for BatchNorm + Scale + ReLU and pooling (mspcnn.caffe.kernels); --torch-ops adds
  `mspcnn-torch`, the same network with PyTorch's operations for those layers
  (`model.backbone.cpu_kernels = False`, what runs on a GPU); --channels-last adds `mspcnn-cl`, the
  engine's `channels_last=True` option (PyTorch's operations: our kernels need the contiguous layout).
* --device cuda times the iterations on a GPU (synchronised at the end of each; float32 as Caffe,
  TF32 tensor cores with --tf32; cuDNN autotuning on). There `mspcnn` runs BatchNorm + Scale (+ ReLU)
  through PyTorch's fused batch normalisation and `mspcnn-torch` (--torch-ops) through the separate
  layers, which is how the engine ran on GPUs before 2026-11-30. --cuda-graphs adds `mspcnn-graphs`:
  the passes replayed from CUDA graphs (mspcnn.cuda_graphs, the engine's `cuda_graphs=True`), timed
  after its two eager iterations and the capture.
* --count-ops adds each row's number of PyTorch operations in one iteration (a dispatch-mode count,
  the same on any device): on a GPU each is at least one kernel launch, and host time per operation
  can bound the iteration.
Medians of --repeat iterations after one warm-up iteration. Prints a table and writes JSON.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mspcnn.caffe import proto
from mspcnn.cli import run
from mspcnn.cuda_graphs import CapturedPasses
from mspcnn.model import MSPCNN, training_arithmetic
from mspcnn.ops import ncc_max_reference
from mspcnn.runtime import add_tf32_argument, configure_threads
from mspcnn.solver import SGDSolver

BATCHES = {"paper": (50, 2), "main": (4, 2)}


# ---------------------------------------------------------------------------- the plain network
def conv_bn(cin, cout, k, s, p):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InceptionA(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        self.b1 = conv_bn(cin, w, 1, 1, 0)
        self.b2 = nn.Sequential(conv_bn(cin, w, 1, 1, 0), conv_bn(w, w, 3, 1, 1))
        self.b3 = nn.Sequential(conv_bn(cin, w, 1, 1, 0), conv_bn(w, w, 3, 1, 1), conv_bn(w, w, 3, 1, 1))
        self.b4 = nn.Sequential(nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True), conv_bn(cin, w, 1, 1, 0))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin, w, pad=(0, 0)):
        super().__init__()
        self.b1 = nn.Sequential(conv_bn(cin, w, 1, 1, 0), conv_bn(w, w, 3, 2, 1))
        self.b2 = nn.Sequential(conv_bn(cin, w, 1, 1, 0), conv_bn(w, w, 3, 1, 1), conv_bn(w, w, 3, 2, 1))
        self.pool = nn.MaxPool2d(3, 2, pad, ceil_mode=True)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.pool(x)], 1)


class PlainBackbone(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.low = nn.Sequential(conv_bn(3, 32, 3, 1, 1), conv_bn(32, 32, 3, 1, 1), conv_bn(32, 32, 3, 1, 1),
                                 nn.MaxPool2d(2, 2, ceil_mode=True))
        self.high = nn.Sequential(InceptionA(32, 64), InceptionB(256, 64), InceptionA(384, 128),
                                  InceptionB(512, 128), InceptionA(768, 256), InceptionB(1024, 256, (0, 1)),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1536, 256), nn.BatchNorm1d(256))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, classes))

    def forward(self, x):
        pool1 = self.low(x)
        feat = self.high(pool1)
        return pool1, feat, self.head(feat)


def plain_losses(net, a, b, label, sim, use_low):
    pa, fa, logits = net(a)
    pb, fb, _ = net(b)
    d = (nn.functional.normalize(fa) - nn.functional.normalize(fb)).norm(dim=1)
    high = (sim * d ** 2 + (1 - sim) * (1 - d).clamp(min=0) ** 2).mean() / 2
    total = nn.functional.cross_entropy(logits, label.long()) + high
    if use_low:
        s, _ = ncc_max_reference(pa, pb)
        total = total + torch.where(sim.view(-1, 1, 1, 1) > 0, 1 - s, s.clamp(min=0)).mean()
    return total


# ---------------------------------------------------------------------------- measurement
def _busy():
    x = 0
    while True:
        x += 1


def build(kind, stage, pairs, iter_size, classes=100, device="cpu"):
    """One training iteration of `kind` (mspcnn, mspcnn-cl, mspcnn-torch or plain) on a fixed random batch,
    as a function of no arguments (on a GPU it returns after the device has finished)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [tuple(t.to(device) for t in (
        torch.randn(pairs, 3, 144, 56, generator=g), torch.randn(pairs, 3, 144, 56, generator=g),
        torch.randint(0, classes, (pairs,), generator=g).float(), (torch.rand(pairs, generator=g) < 1 / 3).float()))
        for _ in range(iter_size)]
    iteration = _build(kind, stage, iter_size, classes, data, device)
    if torch.device(device).type != "cuda":
        return iteration

    def synchronised():
        iteration()
        torch.cuda.synchronize(device)
    return synchronised


def _build(kind, stage, iter_size, classes, data, device):
    if kind in ("mspcnn", "mspcnn-cl", "mspcnn-torch", "mspcnn-graphs"):
        model = MSPCNN(classes, use_low=stage == 2).train().to(device)
        model.backbone.cpu_kernels = kind == "mspcnn"
        if kind == "mspcnn-cl":  # channels-last weights and images (oneDNN's preferred layout)
            model = model.to(memory_format=torch.channels_last)
            data = [(a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last),
                     label, sim) for a, b, label, sim in data]
        sp = proto.SolverParameter(base_lr=0.001, lr_policy="fixed", momentum=0.9, weight_decay=0.0005,
                                   iter_size=iter_size, max_iter=1000)
        solver = SGDSolver(sp, model.param_groups())

        def eager(batch):
            losses = model(batch["data"], batch["data_p"], batch["label"], batch["sim"])
            losses["total"].backward()
            return losses

        batches = [dict(zip(("data", "data_p", "label", "sim"), d)) for d in data]
        graphs = CapturedPasses(model, iter_size, solver.iter) if kind == "mspcnn-graphs" else None

        def iteration():
            def fb(k):  # as mspcnn.engine.solve: the loss stays on the device (no wait for a GPU)
                it = solver.iter
                losses = graphs.losses(k, it, batches[k], eager) if graphs is not None else eager(batches[k])
                return losses["total"].detach().double()
            if graphs is not None:
                graphs.step(solver, fb)
                if graphs.failed:
                    raise RuntimeError(f"mspcnn-graphs: {graphs.failed}")
            else:
                solver.step(fb)
    else:
        model = PlainBackbone(classes).train().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.0005)

        def iteration():
            opt.zero_grad()
            for k in range(iter_size):
                (plain_losses(model, *data[k], stage == 2) / iter_size).backward()
            opt.step()
    return iteration


def median_seconds(fn, repeat):
    """Median wall time of `repeat` calls of fn() (the caller warms it up first)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


class _OpCount(TorchDispatchMode):
    """Counts the PyTorch operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(kind, stage, pairs, iter_size, repeat, classes=100, device="cpu", count_ops=False):
    """(median seconds of an iteration, operations in one iteration or None)."""
    iteration = build(kind, stage, pairs, iter_size, classes, device)
    for _ in range(3 if kind == "mspcnn-graphs" else 1):  # warm-up (graphs: 2 eager iterations, the capture)
        iteration()
    ops = None
    if count_ops:
        counter = _OpCount()
        with counter:
            iteration()
        ops = counter.count
    return median_seconds(iteration, repeat), ops


# ---------------------------------------------------------------------------- roofline of the convolutions
class _ConvCalls(TorchDispatchMode):
    """Records the distinct convolutions a computation runs (input shape, batch included; weight shape;
    bias or not; stride, padding, dilation, groups) and how often."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, w, bias, stride, padding, dilation, transposed, _, groups = args
            if not transposed:
                key = (tuple(x.shape), tuple(w.shape), bias is not None, tuple(stride), tuple(padding),
                       tuple(dilation), groups)
                self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def _conv_rate(key, batch, channels_last, repeat):
    """Forward + backward (input and weight gradients) of one convolution at `batch` images: (GFLOP/s, GFLOP)."""
    shape, wshape, has_bias, stride, padding, dilation, groups = key
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn((batch,) + shape[1:]).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(wshape).contiguous(memory_format=fmt).requires_grad_()
    bias = torch.randn(wshape[0], requires_grad=True) if has_bias else None

    def once():
        y = torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups)
        y.backward(torch.ones_like(y))

    with FlopCounterMode(display=False) as fc:
        once()
    once()
    return fc.get_total_flops() / median_seconds(once, repeat) / 1e9, fc.get_total_flops() / 1e9


def roofline(stage, pairs, iter_size, repeat, ceiling_batch=32):
    """Where mspcnn's training iteration stands against this machine's convolution rate.

    * the iteration's floating-point work, counted by torch.utils.flop_counter (convolutions forward and
      backward, matrix products), and its time unprofiled (median of `repeat`);
    * the time spent in convolution operators (torch.profiler, aten operators whose name holds "conv",
      self time, over `repeat` iterations), hence the rate the network's convolutions reach;
    * the ceiling: the fastest forward + backward rate measured here for any of the network's own
      convolution shapes, at its batch and at `ceiling_batch` images, contiguous and channels-last.
    The bound: the iteration's time if its convolutions ran at the ceiling and everything else took
    the time it takes now."""
    iteration = build("mspcnn", stage, pairs, iter_size)
    iteration()  # warm-up
    with FlopCounterMode(display=False) as fc, _ConvCalls() as calls:
        iteration()
    counts = {str(op).split(".")[1]: n / 1e9 for op, n in fc.get_flop_counts()["Global"].items()}
    conv_gflop = sum(v for k, v in counts.items() if k.startswith("convolution"))
    sec = median_seconds(iteration, repeat)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeat):
            iteration()
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if e.key.startswith("aten::") and "conv" in e.key)
    conv_sec = conv_us / 1e6 / repeat
    shapes = []
    for key, n in calls.calls.items():
        best = max((_conv_rate(key, b, cl, 3)[0], b, cl) for b in sorted({key[0][0], ceiling_batch})
                   for cl in (False, True))
        shapes.append({"input": list(key[0]), "weight": list(key[1]), "stride": list(key[3]),
                       "calls_per_iteration": n, "best_gflops": best[0], "best_batch": best[1],
                       "best_channels_last": best[2]})
    top = max(shapes, key=lambda s: s["best_gflops"])
    ceiling = top["best_gflops"]
    bound = conv_gflop / ceiling + max(sec - conv_sec, 0.0)
    return {"stage": stage, "pairs": pairs, "iter_size": iter_size, "seconds": sec, "gflop": counts,
            "conv_gflop": conv_gflop, "conv_seconds_profiled": conv_sec, "conv_gflops": conv_gflop / conv_sec,
            "conv_share": conv_sec / sec, "ceiling_gflops": ceiling, "ceiling_shape": top,
            "fraction_of_ceiling": conv_gflop / conv_sec / ceiling, "bound_seconds": bound,
            "max_speedup": sec / bound, "shapes": shapes, "load": os.getloadavg()[0]}


def print_roofline(r):
    print(f"  stage {r['stage']}, {r['pairs']} pairs x iter_size {r['iter_size']}: {r['seconds']:.3f} s/iteration "
          f"(load {r['load']:.2f}); work {r['conv_gflop']:.1f} GFLOP in convolutions "
          f"(forward {r['gflop'].get('convolution', 0):.1f}, backward {r['gflop'].get('convolution_backward', 0):.1f}), "
          f"{sum(r['gflop'].values()) - r['conv_gflop']:.3f} GFLOP elsewhere")
    t = r["ceiling_shape"]
    print(f"    convolutions: {r['conv_seconds_profiled']:.3f} s ({100 * r['conv_share']:.0f}% of the iteration), "
          f"{r['conv_gflops']:.0f} GFLOP/s = {100 * r['fraction_of_ceiling']:.0f}% of the ceiling "
          f"{r['ceiling_gflops']:.0f} GFLOP/s (input {t['input'][1:]}, weight {t['weight']}, batch {t['best_batch']}, "
          f"{'channels-last' if t['best_channels_last'] else 'contiguous'})")
    print(f"    at the ceiling the iteration would take {r['bound_seconds']:.3f} s: at most "
          f"{r['max_speedup']:.2f}x faster without fewer operations or lower precision")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", nargs="+", default=["paper", "main"], choices=sorted(BATCHES),
                   help="paper: 50 pairs x iter_size 2; main: 4 pairs x iter_size 2 (default both)")
    p.add_argument("--busy", type=int, nargs="+", default=[0], help="busy processes beside (default 0)")
    p.add_argument("--threads", help="intra-op threads: a number, or auto (default: mspcnn's default, chosen again at each "
                   "--busy level beside the busy processes, as a tool started on such a machine would)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="stages (default both)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch version")
    p.add_argument("--channels-last", action="store_true",
                   help="also time mspcnn with channels-last weights and images (row 'mspcnn-cl')")
    p.add_argument("--torch-ops", action="store_true",
                   help="also time mspcnn with PyTorch's operations for BatchNorm, Scale, ReLU and pooling "
                   "instead of our CPU paths (row 'mspcnn-torch')")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time mspcnn with each pass replayed from CUDA graphs (row 'mspcnn-graphs'; "
                   "--device cuda)")
    p.add_argument("--repeat", type=int, default=5, help="timed iterations per figure (default 5)")
    p.add_argument("--roofline", action="store_true",
                   help="instead of the comparison: count the iteration's floating-point work, time its "
                   "convolutions, and compare their rate with the fastest this machine reaches on the "
                   "network's own convolution shapes (at most how much faster the iteration can get)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    add_tf32_argument(p)
    p.add_argument("--count-ops", action="store_true",
                   help="also count the PyTorch operations of one iteration of each row")
    p.add_argument("--json", default="bench_train.json", help="write the figures here")
    args = p.parse_args(argv)
    if args.repeat < 1 or min(args.busy) < 0:
        p.error("--repeat must be >= 1 and --busy >= 0")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible to PyTorch")
        if args.roofline:
            p.error("--roofline measures this machine's CPU; it takes no --device cuda")
        training_arithmetic(args.tf32)
    elif args.tf32:
        p.error("--tf32 is for --device cuda")
    if args.cuda_graphs and args.device != "cuda":
        p.error("--cuda-graphs is for --device cuda")
    auto = args.threads in (None, "auto")
    threads = None if auto else configure_threads(args.threads)  # auto: chosen at each busy level below
    if args.roofline:
        if auto:
            threads = configure_threads(None)
        print(f"roofline, cpu: {threads}", flush=True)
        out = []
        for batch in args.batches:
            for stage in args.stages:
                out.append(roofline(stage, *BATCHES[batch], args.repeat))
                out[-1]["batch"] = batch
                print_roofline(out[-1])
        with open(args.json, "w") as f:
            json.dump({"roofline": out, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "cpus": os.cpu_count()}, f, indent=1)
        print(f"wrote {args.json}")
        return 0
    rows = []
    for busy in args.busy:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_busy, daemon=True) for _ in range(busy)]
        for proc in procs:
            proc.start()
        time.sleep(1.0 if busy else 0)
        if auto:
            # As a user who starts a tool on a machine that is already this busy: the default is
            # chosen now, beside the busy processes, not once for the whole benchmark.
            threads = configure_threads(None)
            print(f"busy {busy}: cpu: {threads}", flush=True)
        try:
            for batch in args.batches:
                pairs, iter_size = BATCHES[batch]
                for stage in args.stages:
                    kinds = ("mspcnn",) + (("mspcnn-torch",) if args.torch_ops else ()) + \
                        (("mspcnn-cl",) if args.channels_last else ()) + \
                        (("mspcnn-graphs",) if args.cuda_graphs else ()) + \
                        (() if args.no_plain else ("plain",))
                    for kind in kinds:
                        load = os.getloadavg()[0]
                        error = None
                        try:
                            sec, ops = measure(kind, stage, pairs, iter_size, args.repeat, device=args.device,
                                               count_ops=args.count_ops)
                        except RuntimeError as exc:
                            if kind != "mspcnn-graphs":
                                raise
                            sec, ops, error = float("nan"), None, str(exc)  # a failed capture: the row says why
                            print(f"  {kind}: {error}", flush=True)
                        rows.append({"busy": busy, "batch": batch, "stage": stage, "kind": kind, "seconds": sec,
                                     "load": load, "threads": torch.get_num_threads(), "device": args.device,
                                     "tf32": args.tf32, "operations": ops, "error": error})
                        print(f"  busy {busy}, {batch}, stage {stage}, {kind}: {sec:.3f} s/iteration "
                              + (f"{ops} operations " if ops is not None else "") + f"(load {load:.2f})", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
    print(f"\ndevice {args.device}" + (" (TF32)" if args.tf32 else "") + f"; threads: "
          f"{'chosen at each busy level (auto)' if auto else threads}; seconds per iteration (median of "
          f"{args.repeat}); ratio = plain / mspcnn, slowdown = busy / quiet"
          + ("; kernels gain = mspcnn-torch / mspcnn" if args.torch_ops else "")
          + ("; cl gain = mspcnn / mspcnn-cl" if args.channels_last else "")
          + ("; graphs gain = mspcnn / mspcnn-graphs" if args.cuda_graphs else ""))
    print(f"{'busy':>5} {'batch':>6} {'stage':>6} {'threads':>7} {'mspcnn s':>9} {'plain s':>9} {'ratio':>7} "
          f"{'slowdown':>9} {'load':>6}" + (f" {'torch s':>7} {'kernels gain':>12}" if args.torch_ops else "")
          + (f" {'cl s':>7} {'cl gain':>7}" if args.channels_last else "")
          + (f" {'graphs s':>8} {'graphs gain':>11}" if args.cuda_graphs else "")
          + (f" {'ops':>6} {'plain ops':>9}" if args.count_ops else ""))
    index = {(r["busy"], r["batch"], r["stage"], r["kind"]): r for r in rows}
    for r in rows:
        if r["kind"] != "mspcnn":
            continue
        plain = index.get((r["busy"], r["batch"], r["stage"], "plain"))
        quiet = index.get((0, r["batch"], r["stage"], "mspcnn"))
        ratio = f"{plain['seconds'] / r['seconds']:.2f}x" if plain else "-"
        slow = f"{r['seconds'] / quiet['seconds']:.2f}x" if quiet else "-"
        cl = index.get((r["busy"], r["batch"], r["stage"], "mspcnn-cl"))
        cl_cols = f" {cl['seconds']:>7.3f} {r['seconds'] / cl['seconds']:>6.2f}x" if cl else ""
        tops = index.get((r["busy"], r["batch"], r["stage"], "mspcnn-torch"))
        tops_cols = f" {tops['seconds']:>7.3f} {tops['seconds'] / r['seconds']:>11.2f}x" if tops else ""
        graphs = index.get((r["busy"], r["batch"], r["stage"], "mspcnn-graphs"))
        graphs_cols = f" {graphs['seconds']:>8.3f} {r['seconds'] / graphs['seconds']:>10.2f}x" if graphs else ""
        ops_cols = (f" {r['operations']:>6} {plain['operations'] if plain else '-':>9}" if args.count_ops else "")
        print(f"{r['busy']:>5} {r['batch']:>6} {r['stage']:>6} {r['threads']:>7} {r['seconds']:>9.3f} "
              f"{plain['seconds'] if plain else float('nan'):>9.3f} {ratio:>7} {slow:>9} {r['load']:>6.2f}{tops_cols}"
              f"{cl_cols}{graphs_cols}{ops_cols}")
    with open(args.json, "w") as f:
        json.dump({"threads": "auto, chosen at each busy level" if auto else threads, "rows": rows,
                   "torch": torch.__version__, "cpus": os.cpu_count(), "device": args.device,
                   "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
