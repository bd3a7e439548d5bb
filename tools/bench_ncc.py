#!/usr/bin/env python
"""Benchmark of the NCC operators against the plain-PyTorch reference.

For ``ncc_volume`` and ``ncc_max``, forward and forward+backward, at the pool1
shape of MSP-CNN (32 x 72 x 28 per image) for several numbers of pairs, the
C++/CUDA operator and the reference (mspcnn.ops.ncc_*_reference; for ncc_max the
reference's volume-then-max path) are timed in the same run, on the same device.
Prints a table of medians and speed-ups and writes everything to JSON.

On CUDA it also measures the device's ceilings in the same run (device-to-device
copy bandwidth; float32 matrix-product rate with TF32 off, the practical
multiply-add peak), times the operator's kernels alone with torch.profiler, and
reports the fraction of each ceiling they reach (docs/ncc_layer.md explains the
operation and byte counts).

Then the accuracy of float32 ``ncc_max`` against the same operator in float64, on
pool1-like inputs (ReLU of a normal draw, plus an offset of 0 and of 10: the
subtraction of large patch means is where float32 loses digits): the largest
error of the values, the argmax changes with the float64 gap between the two
candidates (a true near-tie has a gap near float32 rounding), and the largest
gradient error relative to the largest gradient, beside the plain-PyTorch
reference's own float32 errors. Every timing row carries the 1-minute load
average at its start (the machine may be shared).

    python tools/bench_ncc.py                      # CPU, 1/8/32 pairs
    python tools/bench_ncc.py --device cuda        # GPU, 1/32/128 pairs
    python tools/bench_ncc.py --pairs 4 --repeat 3 --json out.json
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from mspcnn.cli import run
from mspcnn.defaults import NCC_EPS
from mspcnn.ops import ncc_max, ncc_max_reference, ncc_volume, ncc_volume_reference
from mspcnn.runtime import add_threads_argument, configure_threads

C, H, W = 32, 72, 28
PATCH, ROWS = 5, 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time the kernels (default cpu)")
    p.add_argument("--pairs", type=int, nargs="+", help="numbers of pairs (default cpu: 1 8 32, cuda: 1 32 128)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions of the operator (median reported)")
    p.add_argument("--ref-repeat", type=int, default=2, help="timed repetitions of the reference")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="float32 (default) or float64")
    p.add_argument("--ops", nargs="+", default=["ncc_max", "ncc_volume"], choices=["ncc_max", "ncc_volume"],
               help="the operators to time (default both)")
    p.add_argument("--no-reference", action="store_true", help="time the operator only")
    p.add_argument("--accuracy-pairs", type=int, default=2,
                   help="pairs of the float32-against-float64 accuracy check (0: skip it; default 2)")
    p.add_argument("--json", default=None, help="output file (default bench_ncc_<device>.json)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.pairs is None:
        args.pairs = [1, 8, 32] if args.device == "cpu" else [1, 32, 128]
    if min(args.pairs) < 1 or args.repeat < 1 or args.ref_repeat < 1:
        p.error("--pairs, --repeat and --ref-repeat must be positive")
    if args.accuracy_pairs < 0:
        p.error("--accuracy-pairs must be 0 or positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to PyTorch")
    if args.device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("mspcnn::ncc_max", "CUDA"):
        p.error("--device cuda: mspcnn was built without the CUDA kernels "
                "(reinstall with `pip install -e . --no-build-isolation` where nvcc is present)")
    args.json = args.json or f"bench_ncc_{args.device}.json"
    return args


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat, warmup=1):
    """Median wall time in ms of fn() (device synchronised), after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def make_case(op, mode, impl, a, b):
    fn = {
        ("ncc_volume", "ours"): lambda x, y: ncc_volume(x, y, PATCH, ROWS),
        ("ncc_volume", "reference"): lambda x, y: ncc_volume_reference(x, y, PATCH, ROWS),
        ("ncc_max", "ours"): lambda x, y: ncc_max(x, y, PATCH, ROWS)[0],
        ("ncc_max", "reference"): lambda x, y: ncc_max_reference(x, y, PATCH, ROWS)[0],
    }[(op, impl)]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(a, b)
    else:
        x = a.detach().clone().requires_grad_(True)
        y = b.detach().clone().requires_grad_(True)

        def run():
            out = fn(x, y)
            out.backward(torch.ones_like(out))
            x.grad = y.grad = None
    return run


def work_counts(op, mode, pairs):
    """Operations and minimum bytes of one call (docs/ncc_layer.md, 'Cost').

    ops: multiply-adds (and adds) the decomposed algorithm executes per
    candidate: P for the horizontal sums, P - 1 for the vertical sums, 3 for
    the normalisation and, for ncc_max, 2 for the running maximum.
    bytes: each input read once, each output written once."""
    elem = 4
    candidates = pairs * C * H * W * ROWS * W
    per_candidate = PATCH + (PATCH - 1) + 3 + (2 if op == "ncc_max" else 0)
    ops = candidates * per_candidate
    in_bytes = 2 * pairs * C * H * W * elem
    out_bytes = candidates * elem if op == "ncc_volume" else pairs * C * H * W * (elem + 8)
    bytes_ = in_bytes + out_bytes
    if mode == "fwd+bwd":
        # backward of the volume repeats the forward's work; of the max it is
        # 2 n multiply-adds per output. Bytes: gradient in, two gradients out.
        ops += candidates * per_candidate if op == "ncc_volume" else pairs * C * H * W * 4 * PATCH * PATCH
        bytes_ += out_bytes + in_bytes
    return ops, bytes_


def cuda_ceilings():
    """Measured device-to-device copy bandwidth (bytes/s, read + write) and
    float32 matrix-product rate (multiply-adds/s, TF32 off)."""
    x = torch.empty(2 * 1024**3 // 4, device="cuda")
    y = torch.empty_like(x)
    ms, _ = timed(lambda: y.copy_(x), "cuda", 10)
    bandwidth = 2 * x.numel() * 4 / (ms / 1e3)
    del x, y
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    m = torch.randn(8192, 8192, device="cuda")
    ms, _ = timed(lambda: m @ m, "cuda", 10)
    torch.backends.cuda.matmul.allow_tf32 = allow
    fma_rate = 8192**3 / (ms / 1e3)
    return bandwidth, fma_rate


def kernel_time_ms(run, repeat=10):
    """Mean CUDA time per call of the mspcnn kernels, from torch.profiler:
    the total and a breakdown by kernel."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(repeat):
            run()
        torch.cuda.synchronize()
    total_us = 0.0
    breakdown = {}
    for evt in prof.key_averages():
        # CUDA kernel events of our kernels (namespace mspcnn::cuda), not the
        # CPU-side operator events, which would count the same time again.
        if evt.device_type == torch.autograd.DeviceType.CUDA and "mspcnn" in evt.key:
            us = getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0)
            total_us += us
            name = evt.key.replace("void ", "").replace("mspcnn::cuda::", "")
            name = name.replace("(anonymous namespace)::", "").split("(")[0]
            breakdown[name] = breakdown.get(name, 0.0) + us / 1e3 / repeat
    return total_us / 1e3 / repeat, breakdown


def _rel_max(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def accuracy(device, pairs, offsets=(0.0, 10.0), seed=0):
    """Errors of float32 ncc_max (ours and the reference) against our float64 ncc_max, one dict per
    input offset (see the module docstring)."""
    op = torch.ops.mspcnn
    gen = torch.Generator().manual_seed(seed)
    out = []
    for offset in offsets:
        a = torch.randn(pairs, C, H, W, generator=gen).relu() + offset
        b = torch.randn(pairs, C, H, W, generator=gen).relu() + offset
        g = torch.randn(pairs, C, H, W, generator=gen)
        a32, b32, g32 = a.to(device), b.to(device), g.to(device)
        a64, b64, g64 = a32.double(), b32.double(), g32.double()
        v32, i32 = op.ncc_max(a32, b32, PATCH, ROWS, NCC_EPS)
        v64, i64 = op.ncc_max(a64, b64, PATCH, ROWS, NCC_EPS)
        vol = op.ncc_volume(a64, b64, PATCH, ROWS, NCC_EPS).view(pairs, C, ROWS * W, H, W)
        changed = i32 != i64
        gaps = (vol.gather(2, i64.unsqueeze(2)) - vol.gather(2, i32.unsqueeze(2))).squeeze(2)[changed]
        del vol
        # gradients at the float32 choice, so that both sides differentiate the same candidates
        ga32, gb32 = op.ncc_max_backward(g32, a32, b32, i32, PATCH, ROWS, NCC_EPS)
        ga64, gb64 = op.ncc_max_backward(g64, a64, b64, i32, PATCH, ROWS, NCC_EPS)
        row = {"offset": offset, "pairs": pairs, "outputs": v32.numel(),
               "value_max_abs_error": (v32.double() - v64).abs().max().item(),
               "argmax_changes": int(changed.sum()),
               "argmax_change_max_gap": gaps.abs().max().item() if gaps.numel() else 0.0,
               "grad_a_rel_error": _rel_max(ga32, ga64), "grad_b_rel_error": _rel_max(gb32, gb64)}
        # the plain-PyTorch reference in float32, against float64 at its own choice
        x, y = a32.clone().requires_grad_(True), b32.clone().requires_grad_(True)
        rv, ri = ncc_max_reference(x, y, PATCH, ROWS)
        rv.backward(g32)
        ra64, rb64 = op.ncc_max_backward(g64, a64, b64, ri, PATCH, ROWS, NCC_EPS)
        row.update(reference_value_max_abs_error=(rv.detach().double() - v64).abs().max().item(),
                   reference_argmax_changes=int((ri != i64).sum()),
                   reference_grad_a_rel_error=_rel_max(x.grad, ra64),
                   reference_grad_b_rel_error=_rel_max(y.grad, rb64))
        out.append(row)
    return out


def print_accuracy(rows):
    print("\nncc_max float32 against float64 (errors of the gradients relative to the largest gradient):")
    cols = (f"{'offset':>6} {'impl':<10} {'value err':>10} {'argmax changes':>15} {'max gap':>9} "
            f"{'grad_a err':>11} {'grad_b err':>11}")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        print(f"{r['offset']:>6g} {'ours':<10} {r['value_max_abs_error']:>10.2e} "
              f"{r['argmax_changes']:>7} / {r['outputs']:<6} {r['argmax_change_max_gap']:>9.1e} "
              f"{r['grad_a_rel_error']:>11.2e} {r['grad_b_rel_error']:>11.2e}")
        print(f"{'':>6} {'reference':<10} {r['reference_value_max_abs_error']:>10.2e} "
              f"{r['reference_argmax_changes']:>7} / {r['outputs']:<6} {'':>9} "
              f"{r['reference_grad_a_rel_error']:>11.2e} {r['reference_grad_b_rel_error']:>11.2e}")


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = args.device
    threads_line = configure_threads(args.threads)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "shape_per_pair": [C, H, W],
        "patch": PATCH,
        "search_rows": ROWS,
        "dtype": args.dtype,
    }
    ceilings = None
    if device == "cuda":
        bw, rate = cuda_ceilings()
        ceilings = {"copy_bandwidth_GBps": bw / 1e9, "fp32_matmul_TFMAps": rate / 1e12}
        info["ceilings"] = ceilings
        print(f"device: {info['device']}; measured copy bandwidth {bw / 1e9:.0f} GB/s, "
              f"fp32 matmul {rate / 1e12:.1f} T multiply-adds/s", flush=True)
    else:
        print(f"device: CPU ({info['cpu_capability']}), {threads_line}", flush=True)

    rows = []
    for pairs in args.pairs:
        a = torch.randn(pairs, C, H, W, dtype=dtype, device=device)
        b = torch.randn(pairs, C, H, W, dtype=dtype, device=device)
        for op in args.ops:
            for mode in ("fwd", "fwd+bwd"):
                row = {"op": op, "mode": mode, "pairs": pairs, "load_average": os.getloadavg()[0]}
                ours, ours_all = timed(make_case(op, mode, "ours", a, b), device, args.repeat)
                row.update(ours_ms=ours, ours_all_ms=ours_all)
                if not args.no_reference:
                    try:
                        ref, ref_all = timed(make_case(op, mode, "reference", a, b), device, args.ref_repeat)
                        row.update(reference_ms=ref, reference_all_ms=ref_all, speedup=ref / ours)
                    except torch.OutOfMemoryError:
                        row.update(reference_ms=None, speedup=None, note="reference out of memory")
                        torch.cuda.empty_cache()
                if device == "cuda":
                    kt, kernels = kernel_time_ms(make_case(op, mode, "ours", a, b))
                    ops, nbytes = work_counts(op, mode, pairs)
                    row.update(kernel_ms=kt, kernels_ms=kernels, ops=ops, bytes=nbytes)
                    if kt > 0:
                        row["fraction_of_fma_peak"] = ops / (kt / 1e3) / (ceilings["fp32_matmul_TFMAps"] * 1e12)
                        row["fraction_of_bandwidth"] = nbytes / (kt / 1e3) / (ceilings["copy_bandwidth_GBps"] * 1e9)
                rows.append(row)
                print_row(row, device, header=len(rows) == 1)
        del a, b
        if device == "cuda":
            torch.cuda.empty_cache()

    if device == "cuda":
        print("\nkernel breakdown (ms per call):")
        for row in rows:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row.get("kernels_ms", {}).items(), key=lambda t: -t[1]))
            print(f"  {row['op']} {row['mode']} {row['pairs']}: {parts}")
    acc = []
    if args.accuracy_pairs and args.dtype == "float32":
        acc = accuracy(device, args.accuracy_pairs)
        print_accuracy(acc)
    with open(args.json, "w") as f:
        json.dump({"info": info, "results": rows, "accuracy": acc}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


def print_row(row, device, header=False):
    cols = f"{'op':<11} {'mode':<8} {'pairs':>5} {'ours ms':>10} {'reference ms':>13} {'speed-up':>9} {'load':>5}"
    if device == "cuda":
        cols += f" {'kernel ms':>10} {'%FMA peak':>9} {'%bandwidth':>10}"
    if header:
        print(cols)
        print("-" * len(cols))
    ref = row.get("reference_ms")
    ref_text = f"{ref:.3f}" if ref else "-"
    speedup = f"{row['speedup']:.1f}x" if row.get("speedup") else "-"
    line = (f"{row['op']:<11} {row['mode']:<8} {row['pairs']:>5} {row['ours_ms']:>10.3f} "
            f"{ref_text:>13} {speedup:>9} {row['load_average']:>5.2f}")
    if device == "cuda":
        line += (f" {row.get('kernel_ms', 0):>10.3f} {100 * row.get('fraction_of_fma_peak', 0):>8.1f}%"
                 f" {100 * row.get('fraction_of_bandwidth', 0):>9.1f}%")
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(run(main))
