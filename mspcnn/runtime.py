"""How many CPU threads mspcnn's computations use.

PyTorch runs each convolution, matrix product and the NCC kernels on a team of threads (OpenMP) that
meet at a barrier after every operation. On a machine whose cores are busy with other processes,
one descheduled thread stalls the whole team at every barrier, hundreds of times per iteration: a
2-thread training beside two busy processes ran 4x slower, against 1.2x for single-threaded code.
So the default is chosen at start from how busy the cores are: as many threads as cores the other
processes leave free (at least one), measured over a fraction of a second, shared among the
data-parallel workers of this machine (``LOCAL_WORLD_SIZE``, set by ``torch.distributed.run``).
``OMP_NUM_THREADS`` in the environment, PyTorch's own setting, is taken as given instead of that
measurement (``torch.distributed.run`` sets it to 1 for each of several workers unless it is already
set). ``--threads N`` on every tool that computes overrides both.

How the threads wait matters as much. OpenMP's threads spin at the barrier by default; on a busy
machine the spinners take the cores other processes need. ``OMP_WAIT_POLICY=PASSIVE`` (set in the
environment before starting the tool) makes them sleep instead, which helps under contention and
costs on an idle machine (measured, 2 threads, one main-job iteration: idle 0.75-0.78 s spinning
against 1.13-1.15 s passive; beside a 2-thread training and a 1-thread job, 7.5 s spinning against
2.9 s passive; docs/perf_notes.md). The default stays OpenMP's; the log line says which is in force.

What else a training's arithmetic depends on: the processor's instruction set decides which kernels
PyTorch's convolutions run, and so how their sums round. The same command with the same inputs
trains the same weights bit for bit on the same kind of processor and PyTorch build, and different
weights on another (on real images, split 0 of CUHK01-100 at stage-1 rate 0.025 gave test rank-1
66.3% trained on an AMD EPYC with AVX-512, 63.5% on an Intel Xeon with AVX-512); a rerun there is a
new draw, as another seed would be. :func:`machine_record` names the machine, for results
files and stage manifests.
"""
import os
import platform
import time

import torch

__all__ = ["configure_threads", "free_cores", "add_threads_argument", "machine_record", "machine_text"]


def cpu_model():
    """The processor's model name (Linux: /proc/cpuinfo's first "model name"), else what
    ``platform`` knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_record(device="cpu"):
    """What a training's arithmetic depends on besides its inputs, as a JSON-able dict: the
    processor's model name, the instruction set PyTorch's CPU kernels use (``cpu_capability``,
    e.g. AVX512 or AVX2), PyTorch's version and intra-op threads, and on CUDA the GPU's name and
    CUDA's version. Two runs of the same inputs agree bit for bit only where these agree (the
    module's docstring)."""
    record = {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        try:
            gpu = torch.cuda.get_device_name(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):  # a device the tool refuses later, with its message
            gpu = "unknown"
        record.update(gpu=gpu, cuda=torch.version.cuda)
    return record


def machine_text(record):
    """One line for the log from a :func:`machine_record` (a record written by an older version may
    lack keys: they read as "?")."""
    text = (f"{record.get('cpu', '?')} ({record.get('cpu_capability', '?')}), torch {record.get('torch', '?')}, "
            f"{record.get('threads', '?')} threads")
    return text + (f", {record['gpu']} (CUDA {record.get('cuda', '?')})" if record.get("gpu") else "")


def _cpu_times():
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields), idle


def free_cores(window=0.3):
    """Cores not taken by other processes now: the CPU count times the share of idle time over a
    short ``window`` (from /proc/stat), rounded, at least 1. The 1-minute load average lags: a tool
    started just after another one ended would still count that one. Falls back to the load
    average where /proc/stat is missing. Returns (free, cpus, busy cores measured)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        total0, idle0 = _cpu_times()
        time.sleep(window)
        total1, idle1 = _cpu_times()
        share_busy = 1.0 - (idle1 - idle0) / max(total1 - total0, 1e-9)
        busy = share_busy * (os.cpu_count() or cpus)
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cpus, cpus - int(round(busy)))), cpus, busy


def _local_workers():
    """The data-parallel workers started on this machine (``LOCAL_WORLD_SIZE``; 1 without one)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _positive_int(value, message):
    """``int(value)`` when that is at least 1; else ValueError(message)."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(message)
    return n


def configure_threads(threads=None):
    """Set PyTorch's intra-op threads: an int, or None / "auto". Auto: ``OMP_NUM_THREADS`` when the
    environment sets it (the same count in every process that inherits it, so that runs meant to be
    compared use the same reductions), else the cores :func:`free_cores` finds free divided among
    the ``LOCAL_WORLD_SIZE`` workers. Returns a one-line description for the log."""
    if threads in (None, "auto"):
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env:
            n = _positive_int(env, f"OMP_NUM_THREADS must be a positive integer, got {env!r}")
            why = "OMP_NUM_THREADS"
        else:
            free, cpus, busy = free_cores()
            workers = _local_workers()
            n = max(1, free // workers)
            why = f"auto: {cpus} cores, {busy:.1f} busy with other processes" + (
                f", shared by {workers} workers" if workers > 1 else "")
    else:
        n = _positive_int(threads, f"threads must be a positive integer or 'auto', got {threads!r}")
        why = "given"
    torch.set_num_threads(n)
    return f"{n} threads ({why}); OpenMP waits: {wait_policy()}"


def wait_policy():
    """How OpenMP's threads wait at barriers in this process, for the log."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f"{policy.lower()} (OMP_WAIT_POLICY)" if policy else "OpenMP's default (spin, then sleep)"


def add_tf32_argument(parser):
    """The ``--tf32`` option of the tools that train (mspcnn.model.training_arithmetic)."""
    parser.add_argument("--tf32", action="store_true",
                        help="on a GPU, train with TF32 tensor cores (convolutions and matrix products: inputs "
                             "rounded to a 10-bit mantissa, float32 sums; several times faster). Never the "
                             "default: Caffe computes in float32. Features for evaluation stay float32")


def add_cuda_graphs_argument(parser):
    """The ``--cuda-graphs`` option of the tools that train (mspcnn.cuda_graphs)."""
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on a GPU, replay each training pass from CUDA graphs captured after two eager "
                             "iterations: the same arithmetic without the host's cost per kernel launch. Not the "
                             "default yet; a capture that fails is logged and training goes on without graphs")


def add_workers_argument(parser):
    """The ``--workers`` option of the tools that train (checked >= 1 by :func:`mspcnn.engine.solve`)."""
    parser.add_argument("--workers", type=int, default=2,
                        help="workers decoding batches ahead: threads up to 2, forked processes beyond (threads "
                             "share the interpreter lock and stop scaling at about 2; default 2)")


def add_threads_argument(parser):
    """The ``--threads`` option every computing tool has."""
    parser.add_argument("--threads", default="auto",
                        help="CPU threads for the computations: a number, or auto (default: OMP_NUM_THREADS "
                             "when set, else the cores the other processes leave free, measured over 0.3 s "
                             "at start, shared among the data-parallel workers, at least 1; see "
                             "mspcnn/runtime.py)")
