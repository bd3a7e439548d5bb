"""What every command-line tool does with a failure: one line ``error: ...`` on stderr naming the
file or value, exit status 2, never a bare traceback.

Tools end with ``sys.exit(run(main))``. Expected failures (files missing, unreadable or foreign,
bad values, a corrupt database, a missing optional package, a device that is not there) are
reported in one line with exit status 2; Ctrl-C exits with 130. Anything else is a bug: it is
reported in one line too, with exit status 1, and ``MSPCNN_DEBUG=1`` shows its traceback.
"""
import os
import sys
import traceback

__all__ = ["run", "EXPECTED", "format_duration"]

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


def format_duration(seconds):
    """'42s', '7m05s', '2h03m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
