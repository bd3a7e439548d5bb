"""Custom operators of mspcnn.

``ncc_volume`` and ``ncc_max`` are the wide-search NCC layer (docs/method.md
section 2, docs/ncc_layer.md), implemented in C++ (CPU) and CUDA and registered
as PyTorch custom operators ``torch.ops.mspcnn.*``. ``ncc_volume_reference`` and
``ncc_max_reference`` are plain-PyTorch implementations of the same functions,
used by the tests and as the baseline of tools/bench_ncc.py.
"""
from .ncc import ncc_max, ncc_volume
from .ncc_reference import ncc_max_reference, ncc_volume_reference

__all__ = ["ncc_volume", "ncc_max", "ncc_volume_reference", "ncc_max_reference"]
