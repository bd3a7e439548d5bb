#!/usr/bin/env python
"""Benchmark of the NCC operators against the plain-PyTorch reference.

For ``ncc_volume`` and ``ncc_max``, forward and forward+backward, at the pool1
shape of MSP-CNN (32 x 72 x 28 per image) for several numbers of pairs, the
C++/CUDA operator and the reference (mspcnn.ops.ncc_*_reference; for ncc_max the
reference's volume-then-max path) are timed in the same run, on the same device.
Prints a table of medians and speed-ups and writes everything to JSON.

It also measures the device's ceilings in the same run and reports the fraction of
each that the operator reaches (docs/ncc_layer.md explains the operation and byte
counts). On CUDA: device-to-device copy bandwidth and the float32 matrix-product
rate with TF32 off (the practical multiply-add peak); the operator's kernels are
timed alone with torch.profiler. On the CPU: copy bandwidth, and the larger of the
float32 matrix-product rate and a 3 x 3 convolution's (oneDNN), with the threads
configured; the operator's wall time.

Then the accuracy of float32 ``ncc_max`` against the same operator in float64, on
pool1-like inputs (ReLU of a normal draw, plus an offset of 0 and of 10: the
subtraction of large patch means is where float32 loses digits): the largest
error of the values, the argmax changes with the float64 gap between the two
candidates (a true near-tie has a gap near float32 rounding), and the largest
gradient error relative to the largest gradient, beside the plain-PyTorch
reference's own float32 errors; on CUDA also the tensor-core paths of ncc_max
(``tensor_cores='tf32'`` and ``'3xtf32'``, timed as ncc_max_tf32 and
ncc_max_3xtf32). Every timing row carries the 1-minute load average at its
start (the machine may be shared).

    python tools/bench_ncc.py                      # CPU, 1/8/32 pairs
    python tools/bench_ncc.py --device cuda        # GPU, 1/32/128 pairs, with the tensor-core paths
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
# ncc_max's variants: the default kernels, then the tensor-core paths (op name -> tensor_cores).
TC_OPS = {"ncc_max": None, "ncc_max_tf32": "tf32", "ncc_max_3xtf32": "3xtf32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time the kernels (default cpu)")
    p.add_argument("--pairs", type=int, nargs="+", help="numbers of pairs (default cpu: 1 8 32, cuda: 1 32 128)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions of the operator (median reported)")
    p.add_argument("--ref-repeat", type=int, default=2, help="timed repetitions of the reference")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="float32 (default) or float64")
    p.add_argument("--ops", nargs="+", choices=["ncc_max", "ncc_max_tf32", "ncc_max_3xtf32", "ncc_volume"],
                   help="the operators to time (default cpu: ncc_max ncc_volume; cuda: also ncc_max_tf32 and "
                   "ncc_max_3xtf32, ncc_max with tensor_cores='tf32' / '3xtf32', CUDA only)")
    p.add_argument("--no-reference", action="store_true", help="time the operator only")
    p.add_argument("--accuracy-pairs", type=int, default=2,
                   help="pairs of the float32-against-float64 accuracy check (0: skip it; default 2)")
    p.add_argument("--json", default=None, help="output file (default bench_ncc_<device>.json)")
    p.add_argument("--ncu", action="store_true",
                   help="CUDA only: also profile one call of each operator and mode under Nsight Compute (ncu): "
                   "each kernel's time, FP32/FP64 FLOP/s and DRAM bytes/s against the ceilings measured in the run")
    p.add_argument("--ncu-pairs", type=int, help="pairs of the ncu profiles (default: the largest of --pairs)")
    p.add_argument("--ncu-path", help="the ncu executable (default: ncu on the PATH, else the newest under "
                   "/opt/nvidia/nsight-compute or /usr/local/cuda*)")
    p.add_argument("--ncu-detail", action="store_true",
                   help="with --ncu: also the warp instructions issued (all, shared loads, shared atomics), the share "
                   "of cycles issuing and the stall reasons, per kernel (more counter passes: slower)")
    p.add_argument("--ncu-raw", help="folder for ncu's raw CSV output, one file per profile (default: none)")
    p.add_argument("--ncu-child", nargs=4, metavar=("OP", "MODE", "PAIRS", "DTYPE"), help=argparse.SUPPRESS)
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.ncu_child:
        return args
    if args.pairs is None:
        args.pairs = [1, 8, 32] if args.device == "cpu" else [1, 32, 128]
    if args.ops is None:
        args.ops = ["ncc_max", "ncc_volume"] if args.device == "cpu" else list(TC_OPS) + ["ncc_volume"]
    if args.device == "cpu" and any(TC_OPS.get(op) for op in args.ops):
        p.error("--ops ncc_max_tf32 / ncc_max_3xtf32 (tensor cores) run on CUDA only: use --device cuda")
    if args.dtype != "float32" and any(TC_OPS.get(op) for op in args.ops):
        p.error("--ops ncc_max_tf32 / ncc_max_3xtf32 (tensor cores) take float32 maps: drop --dtype float64")
    if min(args.pairs) < 1 or args.repeat < 1 or args.ref_repeat < 1:
        p.error("--pairs, --repeat and --ref-repeat must be positive")
    if args.accuracy_pairs < 0:
        p.error("--accuracy-pairs must be 0 or positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to PyTorch")
    if args.device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("mspcnn::ncc_max", "CUDA"):
        p.error("--device cuda: mspcnn was built without the CUDA kernels "
                "(reinstall with `pip install -e . --no-build-isolation` where nvcc is present)")
    if args.ncu_detail and not args.ncu:
        p.error("--ncu-detail adds counters to --ncu's profiles: give --ncu too")
    if args.ncu:
        if args.device != "cuda":
            p.error("--ncu profiles CUDA kernels: use it with --device cuda")
        args.ncu_path = find_ncu(args.ncu_path)
        if args.ncu_path is None:
            p.error("--ncu: no ncu executable found (not on the PATH, not under /opt/nvidia/nsight-compute or "
                    "/usr/local/cuda*); give it with --ncu-path")
        args.ncu_pairs = args.ncu_pairs or max(args.pairs)
        if args.ncu_pairs < 1:
            p.error("--ncu-pairs must be positive")
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
    if op == "ncc_volume":
        fn = {"ours": lambda x, y: ncc_volume(x, y, PATCH, ROWS),
              "reference": lambda x, y: ncc_volume_reference(x, y, PATCH, ROWS)}[impl]
    else:  # ncc_max and its tensor-core variants, all against the same reference
        fn = {"ours": lambda x, y: ncc_max(x, y, PATCH, ROWS, tensor_cores=TC_OPS[op])[0],
              "reference": lambda x, y: ncc_max_reference(x, y, PATCH, ROWS)[0]}[impl]
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
    the normalisation and, for ncc_max, 2 for the running maximum. The
    tensor-core variants are given ncc_max's count (the same result, however
    computed): their fraction of the float32 peak is a like-for-like speed.
    bytes: each input read once, each output written once."""
    elem = 4
    candidates = pairs * C * H * W * ROWS * W
    per_candidate = PATCH + (PATCH - 1) + 3 + (2 if op != "ncc_volume" else 0)
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


def measure_ceilings(device):
    """The device's ceilings, measured in the same run as the operator, with the threads configured:
    ``copy_bandwidth_GBps`` (read + write; 2 GB on CUDA, 256 MB on the CPU) and
    ``fp32_matmul_TFMAps`` (a float32 matrix product, 8192^3 on CUDA with TF32 off, 2048^3 on the
    CPU); on CUDA also ``tf32_matmul_TFMAps`` (the same product with TF32 on); on the CPU also
    ``fp32_conv_TFMAps``, a 3 x 3 convolution (256 -> 256 channels, 18 x 7, 32
    images, channels-last: oneDNN's convolutions can beat the BLAS matrix product, as on the AMD
    development machine). ``fma_peak_TFMAps`` is the larger rate: the practical multiply-add peak."""
    cuda = device == "cuda"
    repeat = 10 if cuda else 5
    x = torch.empty((2 * 1024**3 if cuda else 256 * 1024**2) // 4, device=device)
    y = torch.empty_like(x)
    ms, _ = timed(lambda: y.copy_(x), device, repeat)
    out = {"copy_bandwidth_GBps": 2 * x.numel() * 4 / (ms / 1e3) / 1e9}
    del x, y
    n = 8192 if cuda else 2048
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    m = torch.randn(n, n, device=device)
    ms, _ = timed(lambda: m @ m, device, repeat)
    torch.backends.cuda.matmul.allow_tf32 = allow
    out["fp32_matmul_TFMAps"] = out["fma_peak_TFMAps"] = n**3 / (ms / 1e3) / 1e12
    if cuda:  # the same product on TF32 tensor cores: the ceiling of the tensor-core paths
        torch.backends.cuda.matmul.allow_tf32 = True
        ms, _ = timed(lambda: m @ m, device, repeat)
        torch.backends.cuda.matmul.allow_tf32 = allow
        out["tf32_matmul_TFMAps"] = n**3 / (ms / 1e3) / 1e12
    if not cuda:
        xc = torch.randn(32, 256, 18, 7).contiguous(memory_format=torch.channels_last)
        wc = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
        ms, _ = timed(lambda: torch.nn.functional.conv2d(xc, wc, padding=1), device, repeat)
        out["fp32_conv_TFMAps"] = 32 * 256 * 18 * 7 * 256 * 9 / (ms / 1e3) / 1e12
        out["fma_peak_TFMAps"] = max(out["fp32_matmul_TFMAps"], out["fp32_conv_TFMAps"])
    return out


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
            name = _short_kernel_name(evt.key)
            breakdown[name] = breakdown.get(name, 0.0) + us / 1e3 / repeat
    return total_us / 1e3 / repeat, breakdown


# ---------------------------------------------------------------------------- Nsight Compute
# Hardware counters of the operator's kernels: time, floating-point instructions by kind (thread-level,
# predicated on) and DRAM bytes. FLOPs count an FMA as 2. ncu replays each kernel once per pass of
# counters, so the figures are those of one call, not of a warm loop.
NCU_METRICS = {
    "time_s": "gpu__time_duration.sum",
    "ffma": "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum",
    "fadd": "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum",
    "fmul": "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum",
    "dfma": "smsp__sass_thread_inst_executed_op_dfma_pred_on.sum",
    "dadd": "smsp__sass_thread_inst_executed_op_dadd_pred_on.sum",
    "dmul": "smsp__sass_thread_inst_executed_op_dmul_pred_on.sum",
    "dram_read_B": "dram__bytes_read.sum",
    "dram_write_B": "dram__bytes_write.sum",
    "sm_throughput_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "registers": "launch__registers_per_thread",
}
# Tensor-core counters (the tensor-core paths of ncc_max), asked for only where `ncu --query-metrics`
# lists them for the GPU at hand: their names vary between architectures and ncu versions, and one
# unknown name fails the whole profile.
NCU_OPTIONAL_METRICS = {
    "tensor_ops": "sm__ops_path_tensor_src_tf32_dst_fp32.sum",
    "tensor_inst": "sm__inst_executed_pipe_tensor_op_hmma.sum",
    "tensor_pipe_pct": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
}
# With --ncu-detail: what a kernel's time is spent on, to check the instruction counts predicted in
# docs/perf_notes.md: warp instructions issued (all, shared-memory loads, shared-memory atomics,
# global reductions, which are atomics whose result is unused), the share of cycles a scheduler
# issued, and the stall reasons (warps stalled per issued instruction, by reason: long_scoreboard =
# global memory, short_scoreboard and mio_throttle = shared memory, ...); and the shared-memory bank
# conflicts of the loads and of the atomics. A float atomicAdd on shared memory is a compare-and-swap
# loop whose lanes fail and retry when another lane of the warp updates the same bank, so the shared
# atomics issued, over those the code makes, is its retry factor.
# Asked for where ncu lists them, as the optional ones; several more counter passes per kernel.
NCU_DETAIL_METRICS = {
    "warp_inst": "smsp__inst_executed.sum",
    "shared_ld_inst": "smsp__inst_executed_op_shared_ld.sum",
    "shared_atom_inst": "smsp__inst_executed_op_shared_atom.sum",
    "global_red_inst": "smsp__inst_executed_op_global_red.sum",
    "shared_ld_bank_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "shared_atom_bank_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_atom.sum",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    **{f"stall_{r}": f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in (
        "long_scoreboard", "short_scoreboard", "mio_throttle", "barrier", "math_pipe_throttle", "wait",
        "not_selected", "lg_throttle", "no_instruction", "branch_resolving", "dispatch_stall")},
}
_UNIT_SCALE = {
    # time to seconds, sizes to bytes; anything else (inst, %, register/thread, ...) as printed
    "nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3, "second": 1.0, "s": 1.0,
    "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
    "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024.0, "MiB": 1024.0 ** 2, "GiB": 1024.0 ** 3,
}


def find_ncu(path=None):
    """The ncu executable: `path`, else ncu on the PATH, else the newest under /opt/nvidia/nsight-compute
    or /usr/local/cuda*/ (None when there is none)."""
    import glob
    import shutil
    if path:
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    found = shutil.which("ncu")
    if found:
        return found
    cands = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu") + glob.glob("/usr/local/cuda*/bin/ncu")
                   + glob.glob("/usr/local/cuda*/nsight-compute*/ncu"))
    return cands[-1] if cands else None


def ncu_supported(ncu, metrics, timeout=120):
    """The entries of `metrics` (key -> name with its roll-up) whose base names `ncu --query-metrics`
    lists for this machine's GPU; {} when the query fails."""
    import re
    import subprocess
    try:
        proc = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    listed = set(re.findall(r"^\s*([a-z0-9]+__[A-Za-z0-9_]+)", proc.stdout, re.M))
    return {k: v for k, v in metrics.items() if v.split(".")[0] in listed}


def ncu_command(ncu, op, mode, pairs, dtype, metrics=None):
    """The command that profiles one call of `op` (`mode` fwd or fwd+bwd) at `pairs` pairs: ncu around a
    child run of this script that brackets the call with cudaProfilerStart/Stop. `metrics` (key -> name)
    defaults to NCU_METRICS."""
    return [ncu, "--csv", "--profile-from-start", "off", "--clock-control", "none",
            "--metrics", ",".join((metrics or NCU_METRICS).values()),
            sys.executable, os.path.abspath(__file__), "--ncu-child", op, mode, str(pairs), dtype]


def parse_ncu_csv(text):
    """Per-kernel metrics from `ncu --csv` output (the `details` page: one row per kernel and metric).

    Lines before the CSV header (the profiled program's own output, ncu's ==PROF== lines) are skipped;
    columns are found by name ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"); values
    may carry thousands separators; times are converted to seconds and sizes to bytes. Returns a list of
    {"id", "kernel", <key of NCU_METRICS or NCU_OPTIONAL_METRICS>: value} in launch order."""
    import csv
    import io
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no CSV table in ncu's output (no line starting with \"ID\")")
    rows = [r for r in csv.reader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"'))))]
    header = rows[0]
    need = ["ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"]
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(f"ncu's CSV lacks the column(s) {missing}; header: {header}")
    col = {c: header.index(c) for c in need}
    names = {v: k for k, v in {**NCU_METRICS, **NCU_OPTIONAL_METRICS, **NCU_DETAIL_METRICS}.items()}
    kernels = {}
    for r in rows[1:]:
        if len(r) < len(header):
            continue
        kid = r[col["ID"]]
        k = kernels.setdefault(kid, {"id": int(kid), "kernel": r[col["Kernel Name"]]})
        name = r[col["Metric Name"]]
        if name not in names:
            continue
        raw = r[col["Metric Value"]].replace(",", "").strip()
        try:
            value = float(raw)
        except ValueError:
            continue  # "n/a" and the like: left out
        k[names[name]] = value * _UNIT_SCALE.get(r[col["Metric Unit"]].strip(), 1.0)
    return sorted(kernels.values(), key=lambda k: k["id"])


def ncu_summary(kernels, ceilings):
    """Totals of one profiled call: time, FP32 and FP64 FLOPs (FMA = 2), DRAM bytes, the achieved rates
    and their fractions of the measured ceilings (2 x the float32 matmul multiply-add rate; the copy
    bandwidth). Per kernel as well."""
    def flops(k, p):
        return 2 * k.get(p + "fma", 0.0) + k.get(p + "add", 0.0) + k.get(p + "mul", 0.0)

    peak_flops = 2 * ceilings["fp32_matmul_TFMAps"] * 1e12
    peak_bw = ceilings["copy_bandwidth_GBps"] * 1e9
    out = []
    for k in kernels:
        t = k.get("time_s", 0.0)
        nb = k.get("dram_read_B", 0.0) + k.get("dram_write_B", 0.0)
        e = {"kernel": _short_kernel_name(k["kernel"]), "time_ms": t * 1e3, "fp32_flop": flops(k, "f"),
             "fp64_flop": flops(k, "d"), "dram_bytes": nb}
        for key in ("sm_throughput_pct", "occupancy_pct", "registers", "tensor_ops", "tensor_inst", "tensor_pipe_pct",
                    *NCU_DETAIL_METRICS):
            if key in k:
                e[key] = k[key]
        if t > 0 and "tensor_ops" in k:
            # ncu's count of math operations in the tensor path (TF32 sources); whether a
            # multiply-add counts once or twice is ncu's convention: compare with the kernel's
            # 32 x 32 x 32 multiply-adds per (row, offset) of docs/perf_notes.md
            e["tensor_ops_per_s"] = k["tensor_ops"] / t
        if t > 0:
            e.update(fp32_flops=e["fp32_flop"] / t, fp64_flops=e["fp64_flop"] / t, dram_Bps=nb / t,
                     fraction_of_fp32_peak=e["fp32_flop"] / t / peak_flops, fraction_of_bandwidth=nb / t / peak_bw)
        out.append(e)
    total_t = sum(e["time_ms"] for e in out) / 1e3
    total = {k: sum(e[k] for e in out) for k in ("fp32_flop", "fp64_flop", "dram_bytes")}
    total["time_ms"] = total_t * 1e3
    if total_t > 0:
        total.update(fp32_flops=total["fp32_flop"] / total_t, dram_Bps=total["dram_bytes"] / total_t,
                     fraction_of_fp32_peak=total["fp32_flop"] / total_t / peak_flops,
                     fraction_of_bandwidth=total["dram_bytes"] / total_t / peak_bw)
    return {"total": total, "kernels": out}


def _short_kernel_name(name):
    name = name.replace("void ", "").replace("mspcnn::cuda::", "").replace("(anonymous namespace)::", "")
    return name.split("(")[0]


def ncu_child(op, mode, pairs, dtype):
    """Run inside ncu: one warm call, then one call between cudaProfilerStart and cudaProfilerStop."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(pairs, C, H, W, dtype=getattr(torch, dtype), device="cuda", generator=gen)
    b = torch.randn(pairs, C, H, W, dtype=getattr(torch, dtype), device="cuda", generator=gen)
    call = make_case(op, mode, "ours", a, b)
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def ncu_profile(ncu, op, mode, pairs, dtype, ceilings, raw_dir=None, timeout=300, metrics=None):
    """Profile one call under ncu; the summary, or {"error": why} (ncu missing counters, a timeout...).
    ncu's raw output is written to raw_dir when given."""
    import subprocess
    cmd = ncu_command(ncu, op, mode, pairs, dtype, metrics)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ncu did not finish in {timeout} s", "command": cmd}
    if raw_dir:
        os.makedirs(raw_dir, exist_ok=True)
        with open(os.path.join(raw_dir, f"ncu_{op}_{mode.replace('+', '_')}_{pairs}.csv"), "w") as f:
            f.write(proc.stdout)
            f.write(proc.stderr)
    try:
        kernels = parse_ncu_csv(proc.stdout)
    except ValueError as e:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"{e}; ncu exit status {proc.returncode}; last lines: {' | '.join(tail)}", "command": cmd}
    if not kernels:
        return {"error": "ncu profiled no kernel", "command": cmd}
    return ncu_summary(kernels, ceilings)


def print_ncu(op, mode, pairs, res):
    if "error" in res:
        print(f"  {op} {mode} {pairs}: ncu failed: {res['error']}")
        return
    t = res["total"]
    print(f"  {op} {mode} {pairs} pairs: {t['time_ms']:.3f} ms under ncu, FP32 {t.get('fp32_flops', 0) / 1e12:.2f} "
          f"TFLOP/s ({100 * t.get('fraction_of_fp32_peak', 0):.1f}% of 2 x the matmul FMA rate), DRAM "
          f"{t.get('dram_Bps', 0) / 1e9:.0f} GB/s ({100 * t.get('fraction_of_bandwidth', 0):.1f}% of the copy bandwidth)")
    for e in res["kernels"]:
        extra = "".join(f", {lab} {e[key]:.0f}{unit}" for key, lab, unit in
                        (("sm_throughput_pct", "SM", "%"), ("occupancy_pct", "occupancy", "%"),
                         ("registers", "registers", ""), ("tensor_pipe_pct", "tensor pipe", "%")) if key in e)
        if "tensor_ops" in e:
            extra += f", tensor ops {e['tensor_ops'] / 1e9:.1f} G ({e.get('tensor_ops_per_s', 0) / 1e12:.1f} T/s)"
        if "warp_inst" in e:
            extra += (f", {e['warp_inst'] / 1e9:.3f} G warp instructions (shared loads "
                      f"{e.get('shared_ld_inst', 0) / 1e9:.3f} G, shared atomics {e.get('shared_atom_inst', 0) / 1e9:.3f} G"
                      + (f", global reductions {e['global_red_inst'] / 1e9:.3f} G" if "global_red_inst" in e else "")
                      + ")")
        conflicts = [f"{lab} {e[key] / 1e6:.1f} M" for key, lab in (("shared_ld_bank_conflicts", "loads"),
                                                                    ("shared_atom_bank_conflicts", "atomics"))
                     if key in e]
        if conflicts:
            extra += ", shared bank conflicts: " + ", ".join(conflicts)
        if "issue_active_pct" in e:
            extra += f", issuing {e['issue_active_pct']:.0f}% of cycles"
        stalls = sorted(((e[k], k[6:]) for k in NCU_DETAIL_METRICS if k.startswith("stall_") and k in e), reverse=True)
        if stalls:
            extra += ", stalls per issue: " + " ".join(f"{name} {v:.2f}" for v, name in stalls[:4])
        print(f"    {e['kernel']:<40} {e['time_ms']:8.3f} ms  FP32 {e.get('fp32_flops', 0) / 1e12:6.2f} TFLOP/s "
              f"({100 * e.get('fraction_of_fp32_peak', 0):5.1f}%)  FP64 {e['fp64_flop'] / 1e9:7.3f} GFLOP  "
              f"DRAM {e.get('dram_Bps', 0) / 1e9:6.0f} GB/s ({100 * e.get('fraction_of_bandwidth', 0):4.1f}%){extra}")


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
        # the tensor-core paths (CUDA): the value returned against float64's maximum and against
        # float64 at the returned index, the argmax changes and the largest gap
        if device == "cuda":
            vol = op.ncc_volume(a64, b64, PATCH, ROWS, NCC_EPS).view(pairs, C, ROWS * W, H, W)
            for name in ("tf32", "3xtf32"):
                tv, ti = ncc_max(a32, b32, PATCH, ROWS, tensor_cores=name)
                at_index = vol.gather(2, ti.unsqueeze(2)).squeeze(2)
                changed = ti != i64
                tgaps = (v64 - at_index)[changed]
                row[name] = {"value_max_abs_error": (tv.double() - v64).abs().max().item(),
                             "value_at_index_max_abs_error": (tv.double() - at_index).abs().max().item(),
                             "argmax_changes": int(changed.sum()),
                             "argmax_change_max_gap": tgaps.abs().max().item() if tgaps.numel() else 0.0}
            del vol
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
        for name in ("tf32", "3xtf32"):
            if name in r:
                t = r[name]
                print(f"{'':>6} {name:<10} {t['value_max_abs_error']:>10.2e} {t['argmax_changes']:>7} / "
                      f"{r['outputs']:<6} {t['argmax_change_max_gap']:>9.1e}   (value at its own index: "
                      f"{t['value_at_index_max_abs_error']:.2e}; the gradient is ours at that index)")


def main(argv=None):
    args = parse_args(argv)
    if args.ncu_child:
        op, mode, pairs, dtype = args.ncu_child
        return ncu_child(op, mode, int(pairs), dtype)
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
        # the kernel knobs in force (MSPCNN_NCC_MAX_FWD=tiled, MSPCNN_NCC_CUDA_SHIFT=0, ...), so that a
        # table says which kernels it timed
        "knobs": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MSPCNN_")},
    }
    if info["knobs"]:
        print("kernel knobs: " + " ".join(f"{k}={v}" for k, v in info["knobs"].items()), flush=True)
    if device == "cpu":
        print(f"device: CPU ({info['cpu_capability']}), {threads_line}", flush=True)
    ceilings = info["ceilings"] = measure_ceilings(device)
    if device == "cuda":
        print(f"device: {info['device']}; measured copy bandwidth {ceilings['copy_bandwidth_GBps']:.0f} GB/s, "
              f"fp32 matmul {ceilings['fp32_matmul_TFMAps']:.1f} T multiply-adds/s (TF32 tensor cores "
              f"{ceilings['tf32_matmul_TFMAps']:.1f})", flush=True)
    else:
        print(f"measured copy bandwidth {ceilings['copy_bandwidth_GBps']:.1f} GB/s, fp32 matmul "
              f"{ceilings['fp32_matmul_TFMAps'] * 1e3:.0f} G multiply-adds/s, fp32 3x3 convolution "
              f"{ceilings['fp32_conv_TFMAps'] * 1e3:.0f} G multiply-adds/s (load {os.getloadavg()[0]:.2f})", flush=True)

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
                ops, nbytes = work_counts(op, mode, pairs)
                row.update(ops=ops, bytes=nbytes)
                # CUDA: the kernels' own time (torch.profiler); CPU: the operator's wall time
                kt = ours
                if device == "cuda":
                    kt, kernels = kernel_time_ms(make_case(op, mode, "ours", a, b))
                    row.update(kernel_ms=kt, kernels_ms=kernels)
                if kt > 0:
                    row["fraction_of_fma_peak"] = ops / (kt / 1e3) / (ceilings["fma_peak_TFMAps"] * 1e12)
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
    profiles = []
    if args.ncu:
        print(f"\nNsight Compute ({args.ncu_path}), one call each, {args.ncu_pairs} pairs:", flush=True)
        optional = {**NCU_OPTIONAL_METRICS, **(NCU_DETAIL_METRICS if args.ncu_detail else {})}
        metrics = {**NCU_METRICS, **ncu_supported(args.ncu_path, optional)}
        print(f"  counters: {len(metrics)}; optional counters listed by ncu --query-metrics: "
              f"{', '.join(k for k in optional if k in metrics) or 'none'}")
        for op in args.ops:
            for mode in ("fwd", "fwd+bwd"):
                res = ncu_profile(args.ncu_path, op, mode, args.ncu_pairs, args.dtype, ceilings, args.ncu_raw,
                                  metrics=metrics)
                profiles.append({"op": op, "mode": mode, "pairs": args.ncu_pairs, **res})
                print_ncu(op, mode, args.ncu_pairs, res)
    acc = []
    if args.accuracy_pairs and args.dtype == "float32":
        acc = accuracy(device, args.accuracy_pairs)
        print_accuracy(acc)
    with open(args.json, "w") as f:
        json.dump({"info": info, "results": rows, "accuracy": acc, "ncu": profiles}, f, indent=2)
    print(f"wrote {args.json}")
    failed = [p for p in profiles if "error" in p]
    if failed:
        print(f"error: {len(failed)} of {len(profiles)} ncu profiles failed (see above and the JSON)", file=sys.stderr)
        return 1
    return 0


def print_row(row, device, header=False):
    cols = f"{'op':<11} {'mode':<8} {'pairs':>5} {'ours ms':>10} {'reference ms':>13} {'speed-up':>9} {'load':>5}"
    if device == "cuda":
        cols += f" {'kernel ms':>10}"
    cols += f" {'%FMA peak':>9} {'%bandwidth':>10}"
    if header:
        print(cols)
        print("-" * len(cols))
    ref = row.get("reference_ms")
    ref_text = f"{ref:.3f}" if ref else "-"
    speedup = f"{row['speedup']:.1f}x" if row.get("speedup") else "-"
    line = (f"{row['op']:<11} {row['mode']:<8} {row['pairs']:>5} {row['ours_ms']:>10.3f} "
            f"{ref_text:>13} {speedup:>9} {row['load_average']:>5.2f}")
    if device == "cuda":
        line += f" {row.get('kernel_ms', 0):>10.3f}"
    line += (f" {100 * row.get('fraction_of_fma_peak', 0):>8.1f}%"
             f" {100 * row.get('fraction_of_bandwidth', 0):>9.1f}%")
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(run(main))
