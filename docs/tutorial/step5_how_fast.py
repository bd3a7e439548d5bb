"""Step 5: how fast is it, and how far from what the machine can do?

A speed figure means little alone. This step measures the way mspcnn's benchmarks do
(tools/bench_ncc.py, tools/bench_train.py):

1. against a baseline in the same run: the operator of step 4 and the plain-PyTorch reference of
   step 1, forward + backward on the same pool1-sized maps, medians after a warm-up call, with the
   load average beside them (a shared machine changes every figure; ratios carry over better);
2. against the hardware's limit: count the work (multiply-adds per output, from the code), measure
   the machine's multiply-add rate in the same run (a float32 matrix product, on as many threads as
   the operator uses: one), and divide.

Run: python docs/tutorial/step5_how_fast.py   (a few seconds)
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step1_reference import ncc_same_reference  # noqa: E402
from step4_custom_op import ncc_same  # noqa: E402

N, C, H, W, P, EPS = 2, 32, 72, 28, 5, 0.01


def median_ms(fn, repeat=5):
    fn()  # warm-up: first-call costs (allocation, caches) are not the steady state
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def forward_backward(op, a, b):
    def run():
        x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        op(x, y, P, EPS).sum().backward()
    return run


def multiply_adds_per_output(n):
    """From ncc_same_cpp.py. Forward: two patch_stats calls (a sum and a sum of squares, n each)
    and the covariance (n): 5n. Backward: the same 5n again (it recomputes them), then 2 gradients
    of n pixels with about 2 multiply-adds each: 9n. Divisions, branches and index arithmetic are
    not counted, which flatters the operator."""
    return 5 * n + 9 * n


if __name__ == "__main__":
    torch.set_num_threads(1)  # the tutorial's C++ loops use one thread: compare like with like
    g = torch.Generator().manual_seed(0)
    a = torch.rand(N, C, H, W, generator=g, dtype=torch.float64)
    b = torch.rand(N, C, H, W, generator=g, dtype=torch.float64)
    # the same numbers first: a fast wrong operator is worth nothing
    torch.testing.assert_close(ncc_same(a, b, P, EPS), ncc_same_reference(a, b, P, EPS), atol=1e-12, rtol=0)

    load = os.getloadavg()[0]
    ours = median_ms(forward_backward(ncc_same, a, b))
    ref = median_ms(forward_backward(ncc_same_reference, a, b))
    m = torch.randn(1024, 1024, dtype=torch.float64)
    peak = 1024 ** 3 / (median_ms(lambda: m @ m) / 1e3)  # float64 multiply-adds per second, 1 thread
    work = N * C * H * W * multiply_adds_per_output(P * P)
    rate = work / (ours / 1e3)
    print(f"{N} x {C} x {H} x {W}, patch {P}, float64, 1 thread, load {load:.2f}")
    print(f"  step 4 operator, forward + backward: {ours:8.1f} ms")
    print(f"  plain-PyTorch reference (step 1):    {ref:8.1f} ms   ({ref / ours:.1f}x the operator's time)")
    print(f"  work: {work / 1e9:.3f} G multiply-adds; the operator runs {rate / 1e9:.2f} G/s")
    print(f"  this core's float64 matrix product: {peak / 1e9:.1f} G multiply-adds/s; "
          f"the operator reaches {100 * rate / peak:.1f}% of it")
    print("Reading: plain loops with a bounds check per pixel do not vectorise, and every output "
          "recomputes its patch statistics. mspcnn's kernels remove both (box sums computed once per "
          "shift, SIMD lanes along the output row, threads over planes): see the '%FMA peak' column of "
          "`python tools/bench_ncc.py` for how far they get, and docs/ncc_layer.md section 7.")
    print("OK step 5")
