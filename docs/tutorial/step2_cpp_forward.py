"""Step 2: the forward pass as a C++ kernel, compiled on the fly, against the reference.

docs/tutorial/ncc_same_cpp.py holds the C++ source: plain loops over planes, rows and columns,
patch statistics in two passes, the sum of products. torch.utils.cpp_extension.load_inline compiles
it with the PyTorch headers (about a minute the first time, then cached) and returns a module whose
functions take and return tensors. Run: python docs/tutorial/step2_cpp_forward.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncc_same_cpp import load  # noqa: E402
from step1_reference import ncc_same_reference  # noqa: E402

if __name__ == "__main__":
    start = time.time()
    ext = load()
    print(f"compiled (or loaded from the cache) in {time.time() - start:.1f} s")
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        a = torch.rand(2, 4, 9, 7, generator=g).to(dtype)
        b = torch.rand(2, 4, 9, 7, generator=g).to(dtype)
        for patch in (3, 5):
            err = (ext.ncc_same_forward(a, b, patch, 0.01) - ncc_same_reference(a, b, patch, 0.01)).abs().max()
            print(f"{dtype}, patch {patch}: C++ vs reference, max difference {err:.2e}")
            assert err < tol
    print("OK step 2")
