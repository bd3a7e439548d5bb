"""Loads the compiled extension ``mspcnn._C``, whose import registers the C++ (and CUDA) kernels of
the ``torch.ops.mspcnn`` operators, with an error that says how to build it when it is missing.
Imported by the modules that call those operators (mspcnn.ops.ncc, mspcnn.caffe.kernels)."""
import torch  # noqa: F401  the extension links against libtorch, which must be loaded first

try:
    from mspcnn import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "mspcnn._C, the compiled extension, could not be loaded. Build it with "
        "`pip install -e . --no-build-isolation` in the repository root "
        f"(after `pip install torch`). Cause: {exc}"
    ) from exc
