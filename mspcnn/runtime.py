"""How many CPU threads mspcnn's computations use.

PyTorch runs each convolution, matrix product and the NCC kernels on a team of threads (OpenMP) that
meet at a barrier after every operation. On a machine whose cores are busy with other processes,
one descheduled thread stalls the whole team at every barrier, hundreds of times per iteration: a
2-thread training beside two busy processes ran 4x slower, against 1.2x for single-threaded code.
So the default is chosen at start from the load: as many threads as cores the other processes
leave free (at least one). ``--threads N`` on every tool that computes overrides it.
"""
import os

import torch

__all__ = ["configure_threads", "free_cores", "add_threads_argument"]


def free_cores():
    """Cores not taken by other processes at this moment: CPU count minus the 1-minute load average
    (rounded), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, cpus - int(round(load))), cpus, load


def configure_threads(threads=None):
    """Set PyTorch's intra-op threads: an int, or None / "auto" for :func:`free_cores`. Returns a
    one-line description for the log."""
    if threads in (None, "auto"):
        n, cpus, load = free_cores()
        why = f"auto: {cpus} cores, load average {load:.2f}"
    else:
        try:
            n = int(threads)
        except (TypeError, ValueError):
            raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}") from None
        if n < 1:
            raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
        why = "given"
    torch.set_num_threads(n)
    return f"{n} threads ({why})"


def add_threads_argument(parser):
    """The ``--threads`` option every computing tool has."""
    parser.add_argument("--threads", default="auto",
                        help="CPU threads for the computations: a number, or auto (default: the cores the other "
                             "processes leave free at start, at least 1; see mspcnn/runtime.py)")
