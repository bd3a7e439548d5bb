#!/usr/bin/env python
"""Benchmark of the Market-1501 evaluation at real scale: CMC and mAP for a
3368 x 15913 distance matrix (Market-1501's query x gallery), the vectorised
mspcnn.metrics against a straightforward per-query NumPy loop (the official
compute_AP.m logic), in the same run; checks that the results are identical.

    python tools/bench_eval.py [--queries 3368] [--gallery 15913] [--json bench_eval.json]
"""
import argparse
import json
import sys
import time

import numpy as np

from mspcnn.cli import run
from mspcnn.metrics import market1501_official, market1501_reference


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=3368, help="queries (default 3368, Market-1501's)")
    p.add_argument("--gallery", type=int, default=15913, help="gallery images (default 15913, Market-1501's)")
    p.add_argument("--ids", type=int, default=750, help="identities (default 750)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random distances and labels (default 0)")
    p.add_argument("--json", default="bench_eval.json", help="write the figures here (default bench_eval.json)")
    args = p.parse_args(argv)
    if min(args.queries, args.gallery, args.ids) < 1:
        p.error("--queries, --gallery and --ids must be positive")
    rng = np.random.default_rng(args.seed)
    # Market-like labels: identities 1..ids, distractors 0 and junk -1 in the gallery, 6 cameras.
    q_ids = rng.integers(1, args.ids + 1, args.queries)
    g_ids = np.concatenate([rng.integers(1, args.ids + 1, args.gallery * 4 // 5),
                            np.zeros(args.gallery // 10, int),
                            -np.ones(args.gallery - args.gallery * 4 // 5 - args.gallery // 10, int)])
    q_cams, g_cams = rng.integers(1, 7, args.queries), rng.integers(1, 7, args.gallery)
    # Distances that carry some signal, so the metrics are not trivial.
    dist = rng.random((args.queries, args.gallery), dtype=np.float32)
    dist[q_ids[:, None] == g_ids[None]] -= 0.3
    print(f"distance matrix {args.queries} x {args.gallery}", flush=True)

    t0 = time.perf_counter()
    ours = market1501_official(dist, q_ids, q_cams, g_ids, g_cams)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = market1501_reference(dist, q_ids, q_cams, g_ids, g_cams)
    t_base = time.perf_counter() - t0
    same = all(abs(ours[k] - base[k]) < 1e-9 for k in ("rank1", "rank5", "rank10", "rank20", "mAP")) \
        and ours["queries"] == base["queries"]
    print(f"\n{'implementation':<30} {'seconds':>8} {'rank-1':>8} {'mAP':>8}")
    print(f"{'per-query NumPy loop':<30} {t_base:>8.2f} {base['rank1']:>8.4f} {base['mAP']:>8.4f}")
    print(f"{'mspcnn.metrics (vectorised)':<30} {t_ours:>8.2f} {ours['rank1']:>8.4f} {ours['mAP']:>8.4f}")
    print(f"speed-up {t_base / t_ours:.1f}x; identical results: {same}")
    with open(args.json, "w") as f:
        json.dump({"seconds": {"ours": t_ours, "baseline": t_base}, "speedup": t_base / t_ours,
                   "identical": same, "ours": ours, "baseline": base,
                   "shape": [args.queries, args.gallery]}, f, indent=2)
    print(f"wrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(run(main))
