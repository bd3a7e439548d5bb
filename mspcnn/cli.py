"""What every command-line tool does with a failure: one line ``error: ...`` on stderr naming the
file or value, exit status 2, never a bare traceback.

Tools end with ``sys.exit(run(main))``. Expected failures (files missing, unreadable or foreign,
bad values, a corrupt database, a missing optional package, a device that is not there) are
reported in one line with exit status 2; Ctrl-C exits with 130. Anything else is a bug: it is
reported in one line too, with exit status 1, and ``MSPCNN_DEBUG=1`` shows its traceback.
"""
import atexit
import math
import os
import sys
import traceback

__all__ = ["run", "EXPECTED", "format_duration", "claim_folder", "lock_file", "FolderInUse",
           "add_input_size_argument", "add_device_argument", "check_device", "check_numbers"]

try:  # lmdb is a dependency, but the guard must work even where it is broken
    import lmdb
    _LMDB = (lmdb.Error,)
except ImportError:  # pragma: no cover
    _LMDB = ()

EXPECTED = (OSError, ValueError, ImportError, MemoryError, RuntimeError, KeyError) + _LMDB


def _describe(exc):
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, KeyError):
        return f"missing entry {exc}"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if isinstance(exc, RuntimeError) and len(text) > 500 else text


def run(main, argv=None):
    """Call ``main(argv)`` and turn its failures into an exit status (see the module docstring)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except EXPECTED as exc:
        if os.environ.get("MSPCNN_DEBUG"):
            traceback.print_exc()
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("MSPCNN_DEBUG"):
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc} (a bug; run with MSPCNN_DEBUG=1 for the "
              "traceback and report it)", file=sys.stderr)
        return 1


class FolderInUse(RuntimeError):
    """Another process holds the output folder a tool was asked to write into."""


def lock_file(path, holder):
    """An exclusive lock (flock) on the file ``path``, created if needed. Returns (the open file,
    which holds the lock until it is closed or the process ends, however it ends, with ``holder``
    written into it; ``holder``), or (None, what the process holding it wrote). Being the operating
    system's, a lock never outlives its process: a leftover lock file blocks nothing."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        text = f.read().strip()
        f.close()
        return None, text
    f.seek(0)
    f.truncate()
    f.write(holder + "\n")
    f.flush()
    return f, holder


_CLAIMED = []  # the claimed folders' lock files, open for the life of the process


@atexit.register
def _release_claims():
    """Close the claimed folders' lock files at exit (the lock would go with the process anyway;
    closing them keeps Python from warning about unclosed files)."""
    while _CLAIMED:
        _CLAIMED.pop().close()


def claim_folder(folder, tool):
    """Make ``folder`` (created if needed) this process's own for the rest of its life, through an
    exclusive lock on ``folder/.lock``: two runs writing into one output folder would mix their
    files. Raises FolderInUse naming the holder (the tool and its process id) when another process
    has it."""
    os.makedirs(folder, exist_ok=True)
    lock, holder = lock_file(os.path.join(folder, ".lock"), f"{tool}, process {os.getpid()}")
    if lock is None:
        raise FolderInUse(f"{folder} is in use by another run ({holder or 'another process'}); wait for it "
                          "to end or give another output folder")
    _CLAIMED.append(lock)
    return lock


def format_duration(seconds):
    """'42s', '7m05s', '2h03m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def add_input_size_argument(parser, help=None, default=(144, 56)):
    """``--input-size HxW`` (default 144x56, [1]'s), parsed to (height, width) and checked against
    the topology (mspcnn.model.check_input_size): a bad value is argparse's error (exit 2).
    ``help``: the option's help text instead of the feature tools' one; ``default``: (height, width), or None."""
    import argparse

    from mspcnn.data.transformer import parse_size
    from mspcnn.model import check_input_size

    def size(text):
        try:
            return check_input_size(parse_size(text, "--input-size"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument("--input-size", type=size, default=None if default is None else tuple(default), metavar="HxW",
                        help=help or "the network's input, height x width (default 144x56, [1]'s; a "
                        ".caffemodel does not record it: give the size the weights were trained at, e.g. 64x24 "
                        "for those of run_pipeline.py --input-size 64x24); image files are resized to it "
                        "scaled by [1]'s 160/144 and 64/56 before the centre crop")


def check_device(text):
    """``text`` if it names a device this process can use: ``cpu``, ``cuda`` or ``cuda:N`` with N
    below the number of CUDA devices PyTorch sees; else ValueError saying why."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"{text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise ValueError(f"{text}: only cpu and cuda devices are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"{text}: no CUDA device is visible to PyTorch")
    if device.index is not None and device.index >= count:
        raise ValueError(f"{text}: PyTorch sees {count} CUDA device{'s' if count > 1 else ''} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return text


def add_device_argument(parser):
    """``--device`` (default: cuda when PyTorch sees a GPU, else cpu), checked by check_device while
    the arguments are parsed: a device that is not there is argparse's error (exit 2) before any work."""
    import argparse

    import torch

    def device(text):
        try:
            return check_device(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when PyTorch sees a GPU)")


def check_numbers(*checks):
    """Each check is (option, value, minimum): ValueError naming the first option whose value is not
    a finite number at least ``minimum`` (None: any finite number). Values of None (options not
    given) pass. Tools call it before any work, so that a NaN learning rate does not stop a run
    after its data are converted and its first stage trained."""
    for name, value, minimum in checks:
        if value is None:
            continue
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise ValueError(f"{name} must be a finite number" + (f" >= {minimum:g}" if minimum is not None else "")
                             + f", got {value}")
