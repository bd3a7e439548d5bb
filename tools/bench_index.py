#!/usr/bin/env python
"""Benchmark of gallery search at scale: brute force against FAISS (exact and approximate), with
peak memory, time and recall, on generated features.

    python tools/bench_index.py [--gallery 1000000] [--queries 3000] [--dim 256] [--k 10]
                                [--methods brute flat hnsw ivf] [--json bench_index.json]

The features: L2-normalised 256-d vectors around --identities centres (several images per
identity, like re-identification features; random Gaussian vectors would be the worst case of
approximate search). Each method runs in its own process, so its peak memory (ru_maxrss) is its
own: brute force = mspcnn.index.brute_force_search (blocks of 64 queries, exact, ties in gallery
order) with the evaluation of the whole gallery never held as a queries x gallery matrix; flat =
FAISS's exhaustive index (exact); hnsw / ivf = approximate indexes. Recall@k: the share of brute
force's k nearest neighbours an approximate method returns. Needs the optional package faiss-cpu
for the FAISS methods. Prints a table with the load average and writes JSON.
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

import queue as queue_module

import numpy as np

from mspcnn.cli import run
from mspcnn.runtime import add_threads_argument, configure_threads


def features(n, dim, identities, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim)).astype(np.float32)
    x = centres[rng.integers(0, identities, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _worker(method, args, queue):
    try:
        _measure(method, args, queue)
    except BaseException as exc:  # report it instead of leaving the parent waiting
        queue.put({"method": method, "error": f"{type(exc).__name__}: {exc}"})


def _measure(method, args, queue):
    from mspcnn.index import brute_force_search, build_search, search

    configure_threads(args.threads_n)
    if method != "brute":
        import faiss
        faiss.omp_set_num_threads(args.threads_n)

    gallery = features(args.gallery, args.dim, args.identities, 0)
    queries = features(args.queries, args.dim, args.identities, 1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    if method == "brute":
        build = 0.0
        t = time.time()
        _, pos = brute_force_search(queries, gallery, args.k)
    else:
        engine = build_search(gallery, method)
        build = time.time() - start
        t = time.time()
        _, pos = search({"features": None, "faiss": engine}, queries, args.k,
                        effort={"hnsw": args.ef, "ivf": args.nprobe}.get(method))
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"method": method, "build_s": build, "search_s": seconds, "positions": pos.tolist(),
               "peak_rss_mb": peak / 1024, "data_rss_mb": base / 1024})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", type=int, default=1_000_000, help="gallery images (default 1,000,000)")
    p.add_argument("--queries", type=int, default=3000, help="queries (default 3000)")
    p.add_argument("--dim", type=int, default=256, help="feature dimension (default 256, fc7)")
    p.add_argument("--identities", type=int, default=100_000, help="identities of the generated features")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--methods", nargs="+", default=["brute", "flat", "hnsw", "ivf"],
                   choices=["brute", "flat", "hnsw", "ivf"], help="what to time (default all)")
    p.add_argument("--ef", type=int, default=128, help="HNSW efSearch (default 128)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF nprobe (default 32)")
    p.add_argument("--json", default="bench_index.json", help="write the figures here")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if min(args.gallery, args.queries, args.dim, args.k, args.identities) < 1:
        p.error("--gallery, --queries, --dim, --k and --identities must be positive")
    if any(m != "brute" for m in args.methods):
        try:
            import faiss  # noqa: F401
        except ImportError:
            p.error("the FAISS methods need the optional package faiss-cpu (or give --methods brute)")
    print(f"cpu: {configure_threads(args.threads)}", flush=True)
    import torch
    args.threads_n = torch.get_num_threads()  # every method runs with the same number of threads
    ctx = mp.get_context("spawn")
    rows = {}
    load = os.getloadavg()
    for method in args.methods:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(method, args, queue))
        proc.start()
        while True:  # a worker killed (out of memory, a signal) never answers: do not wait forever
            try:
                rows[method] = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"{method}: the measuring process ended without a result (exit "
                                       f"status {proc.exitcode}; killed for memory?)") from None
        proc.join()
        if "error" in rows[method]:
            raise RuntimeError(f"{method}: {rows[method]['error']}")
        print(f"  {method}: done ({rows[method]['build_s'] + rows[method]['search_s']:.1f} s)", flush=True)
    reference = rows.get("brute") or rows.get("flat")
    print(f"\ngallery {args.gallery} x {args.dim}, {args.queries} queries, k {args.k}; load average "
          f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print(f"{'method':<8}{'build s':>10}{'search s':>10}{'search x':>10}{'peak MB':>10}{'recall@k':>10}"
          f"   (search x: brute force's search time / this one's)")
    brute_s = rows["brute"]["search_s"] if "brute" in rows else None
    out = {"args": vars(args), "threads": args.threads_n, "load_average_start": load, "load_average_end": os.getloadavg(), "methods": {}}
    for method, r in rows.items():
        recall = None
        if reference is not None:
            recall = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(r["positions"],
                                                                                   reference["positions"])]))
        ratio = brute_s / r["search_s"] if brute_s and r["search_s"] > 0 else None
        print(f"{method:<8}{r['build_s']:>10.1f}{r['search_s']:>10.1f}"
              f"{'' if ratio is None else f'{ratio:.2f}':>10}{r['peak_rss_mb']:>10.0f}"
              f"{'' if recall is None else f'{recall:.4f}':>10}")
        out["methods"][method] = {k: v for k, v in r.items() if k != "positions"}
        out["methods"][method]["recall_at_k"] = recall
        out["methods"][method]["search_speedup_vs_brute"] = ratio
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
