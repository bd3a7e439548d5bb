#!/usr/bin/env python
"""A short demonstration of the wide-search NCC operator alone (about 10 seconds on 2 cores; the
README's main job, tools/run_pipeline.py, trains the whole network).

1. Builds a pair of feature maps at the MSP-CNN pool1 shape (32 x 72 x 28)
   where the second is the first moved by a known displacement per channel,
   plus noise, and shows that ncc_max recovers each displacement.
2. Checks the operator's gradient numerically on a small float64 case.
3. Times ncc_max forward+backward against the plain-PyTorch reference.

    python tools/demo_ncc.py [--pairs 4] [--noise 0.05] [--seed 0]
"""
import argparse
import sys
import time

import torch

from mspcnn.cli import run
from mspcnn.ops import ncc_max, ncc_max_reference


def smooth_maps(n, c, h, w, generator):
    """Random maps with spatial structure (a blurred noise field, non-negative
    like ReLU features)."""
    x = torch.randn(n, c, h + 4, w + 4, generator=generator, dtype=torch.float64)
    k = torch.ones(c, 1, 3, 3, dtype=torch.float64) / 9
    return torch.nn.functional.conv2d(x, k, groups=c)[:, :, 1:-1, 1:-1].relu()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="pairs of pool1-shaped maps (default 4)")
    p.add_argument("--noise", type=float, default=0.05, help="std of the noise added to the moved map")
    p.add_argument("--seed", type=int, default=0, help="seed of the maps, displacements and noise (default 0)")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.noise < 0:
        p.error("--pairs must be >= 1 and --noise >= 0")
    g = torch.Generator().manual_seed(args.seed)
    N, C, H, W = args.pairs, 32, 72, 28

    print(f"[1/3] recovering known displacements, {N} pairs of {C}x{H}x{W} maps, noise {args.noise}")
    a = smooth_maps(N, C, H, W, g)
    dy = torch.randint(-2, 3, (C,), generator=g)  # within the 5 search rows
    dx = torch.randint(-6, 7, (C,), generator=g)
    b = torch.zeros_like(a)
    for c in range(C):
        b[:, c] = torch.roll(a[:, c], shifts=(int(dy[c]), int(dx[c])), dims=(1, 2))
    b += args.noise * torch.randn(b.shape, generator=g, dtype=b.dtype)
    values, index = ncc_max(a.float(), b.float())
    k, col = index // W, index % W
    found_dy = k - 2
    found_dx = col - torch.arange(W).view(1, 1, 1, W)
    inner = (slice(None), slice(None), slice(8, H - 8), slice(8, W - 8))  # away from the wrap-around
    ok_y = (found_dy[inner] == dy.view(1, C, 1, 1)).float().mean().item()
    ok_x = (found_dx[inner] == dx.view(1, C, 1, 1)).float().mean().item()
    print(f"      best-match NCC: mean {values[inner].mean():.3f}; row offset recovered at "
          f"{100 * ok_y:.1f}% of interior positions, column offset at {100 * ok_x:.1f}%")

    print("[2/3] numerical gradient check (float64, 1 x 2 x 6 x 7, patch 3, search rows 3)")
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(1, 2, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda s, t: ncc_max(s, t, 3, 3)[0], (x, y))
    print(f"      gradcheck passed: {ok}")

    print(f"[3/3] ncc_max forward+backward, {N} pairs, C++ operator vs plain-PyTorch reference")
    times = {}
    for name, fn in (("operator", ncc_max), ("reference", ncc_max_reference)):
        s = a.float().requires_grad_(True)
        t = b.float().requires_grad_(True)
        start = time.perf_counter()
        fn(s, t)[0].sum().backward()
        times[name] = time.perf_counter() - start
        print(f"      {name:<9} {1e3 * times[name]:9.1f} ms")
    print(f"      speed-up {times['reference'] / times['operator']:.1f}x "
          "(tools/bench_ncc.py gives the full benchmark)")
    return 0 if ok and ok_y > 0.9 and ok_x > 0.9 else 1


if __name__ == "__main__":
    sys.exit(run(main))
