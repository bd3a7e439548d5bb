#!/usr/bin/env python
"""Benchmark of the data path: images per second from storage to transformed
pair batches (2 images per pair, 144 x 56 crops, mirror, mean subtraction).

* ours: the LMDB of raw Datums (tools/convert_dataset.py) read by
  mspcnn.data.pairs.PairLoader (threads or worker processes writing into shared
  memory, vectorised DataTransformer);
* baseline: the JPEG files decoded by a standard torch DataLoader (worker
  processes, per-image OpenCV decode + resize + crop + mirror + mean).

Both run in the same process on the same synthetic dataset (generated in a
temporary folder unless --raw/--db are given), with the same number of
workers. Prints a table and writes JSON.

With several worker counts (--workers 1 2 4 8 16) it measures how our loader
scales with cores: images per second at each count, per worker, and the
efficiency against the first count (the baseline is then timed at the largest
count only). --kind threads processes measures both kinds of worker at every
count (threads share the interpreter lock; processes do not).

    python tools/bench_data.py [--pairs-per-batch 50] [--batches 40] [--workers 2 [4 ...]]
                               [--kind threads|processes|auto ...]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mspcnn.cli import run
from mspcnn.runtime import add_threads_argument, configure_threads
from mspcnn.data.datasets import convert_market1501
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.pairs import PairLoader, PairSampler
from mspcnn.data.synthetic import make_synthetic_market
from mspcnn.data.transformer import DataTransformer

MEAN = np.array([102, 102, 101], np.float32).reshape(3, 1, 1)


class JpegPairs(Dataset):
    """The baseline: pairs read from the JPEG files, one image at a time."""

    def __init__(self, paths, anchors, partners, seed):
        self.paths, self.anchors, self.partners, self.seed = paths, anchors, partners, seed

    def __len__(self):
        return len(self.anchors)

    def _one(self, path, rng):
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        img = cv2.resize(img, (64, 160), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        r, c = rng.integers(0, 17), rng.integers(0, 9)
        out = img[:, r:r + 144, c:c + 56].astype(np.float32) - MEAN
        return out[..., ::-1].copy() if rng.random() < 0.5 else out

    def __getitem__(self, i):
        rng = np.random.default_rng(self.seed + i)
        return (torch.from_numpy(self._one(self.paths[self.anchors[i]], rng)),
                torch.from_numpy(self._one(self.paths[self.partners[i]], rng)))


def timed_batches(iterator, batches, warmup=1):
    """(images per second, CPU microseconds of this process per image) over `batches` batches, after
    `warmup` batches. A loader that decodes batches ahead should be given its prefetch depth as
    `warmup`: the clock then starts once the queue it filled before the first batch is spent, so
    that it times production, not the backlog. The CPU time is what the loader costs the process
    that trains (with worker processes, only their batches' copying and bookkeeping)."""
    it = iter(iterator)
    for _ in range(warmup):
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(batches):
        batch = next(it)
        images += 2 * len(batch["data"] if isinstance(batch, dict) else batch[0])
    return images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", help="a Market-1501-layout folder (default: generate a synthetic one)")
    p.add_argument("--db", help="its converted databases (default: convert --raw)")
    p.add_argument("--pairs-per-batch", type=int, default=50, help="pairs per batch (default 50, [1]'s batch)")
    p.add_argument("--batches", type=int, default=40, help="batches timed (default 40)")
    p.add_argument("--workers", type=int, nargs="+", default=[2],
                   help="decoding threads of our loader and worker processes of the baseline (default 2); several "
                   "counts measure our loader's scaling (the baseline runs at the largest)")
    p.add_argument("--kind", nargs="+", choices=("auto", "threads", "processes"), default=["auto"],
                   help="our loader's workers: threads, processes, or auto (threads up to 2, processes beyond; "
                   "the default); several kinds are each measured at every count")
    p.add_argument("--json", default="bench_data.json", help="write the figures here (default bench_data.json)")
    p.add_argument("--pin-memory", action="store_true",
                   help="make the batches in page-locked memory, as training on a GPU does (needs a GPU)")
    p.add_argument("--no-baseline", action="store_true",
                   help="time our loader only (e.g. on a --db of real images without their raw folder)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if args.batches < 1 or args.pairs_per_batch < 1 or min(args.workers) < 1:
        p.error("--batches, --pairs-per-batch and --workers must be positive")
    if args.pin_memory and not torch.cuda.is_available():
        p.error("--pin-memory needs a GPU visible to PyTorch (page-locked memory is CUDA's)")
    tmp = tempfile.TemporaryDirectory()
    raw = args.raw or os.path.join(tmp.name, "raw")
    if not args.raw and not (args.db and args.no_baseline):
        print("generating a synthetic dataset ...", flush=True)
        make_synthetic_market(raw, train_ids=400, test_ids=2, distractors=0, junk=0, progress=False)
    db_dir = args.db or os.path.join(tmp.name, "db")
    if not args.db:
        print("converting it to LMDB ...", flush=True)
        convert_market1501(raw, db_dir, val_ids=0, progress=False)
    rows = json.load(open(os.path.join(db_dir, "train.json")))["records"]
    labels = [r["label"] for r in rows]
    sampler = PairSampler(labels, [r["camera"] for r in rows], seed=0)
    warmup = PairLoader.default_prefetch(max(args.workers))  # the loader's backlog at the most workers
    needed = (args.batches + warmup) * args.pairs_per_batch
    if needed > len(labels):
        p.error(f"{args.batches} batches of {args.pairs_per_batch} pairs after {warmup} warm-up batches need "
                f"{needed} training images, the dataset has {len(labels)}")
    print(f"{len(labels)} training images; {args.batches} batches of {args.pairs_per_batch} pairs, "
          f"workers {' '.join(map(str, args.workers))}", flush=True)

    transformer = DataTransformer((144, 56), [102, 102, 101], mirror=True, phase="TRAIN")
    db = DatumDB(os.path.join(db_dir, "train.lmdb"))
    scaling = []
    for kind in dict.fromkeys(args.kind):
        for workers in args.workers:
            with PairLoader(db, labels, sampler, args.pairs_per_batch, transformer, workers=workers,
                            pin_memory=args.pin_memory, kind=kind) as loader:
                load = os.getloadavg()[0]
                # The first batch also starts worker processes: the warm-up covers it.
                rate, cpu = timed_batches((b for _, b in loader.epoch(0)), args.batches, warmup=loader.prefetch)
            scaling.append({"kind": kind, "ran_as": loader.kind, "workers": workers, "images_per_s": rate,
                            "per_worker": rate / workers, "main_cpu_us_per_image": cpu, "load_average": load})
    workers_max = max(args.workers)
    ours = max(r["images_per_s"] for r in scaling if r["workers"] == workers_max)

    baseline = None
    if not args.no_baseline:
        anchors, partners, _ = sampler.epoch(0)
        paths = [os.path.join(raw, r["path"]) for r in rows]
        baseline_ds = JpegPairs(paths, anchors, partners, seed=0)
        baseline_loader = DataLoader(baseline_ds, batch_size=args.pairs_per_batch, num_workers=workers_max,
                                     shuffle=False, persistent_workers=False)
        # DataLoader keeps prefetch_factor (2) batches per worker ahead: the same warm-up as ours.
        baseline = timed_batches(baseline_loader, args.batches, warmup=max(1, 2 * workers_max))[0]

    print(f"\n{'path':<38} {'images/s':>10}")
    print("-" * 49)
    if baseline:
        print(f"{'baseline: JPEG files + DataLoader':<38} {baseline:>10.0f}")
    print(f"{'ours: LMDB + PairLoader':<38} {ours:>10.0f}   ({ours / workers_max:.0f} per worker, "
          f"load {os.getloadavg()[0]:.2f})")
    if baseline:
        print(f"speed-up {ours / baseline:.1f}x (at {workers_max} workers)")
    if len(scaling) > 1:
        print(f"\nscaling of our loader ({os.cpu_count()} CPUs; efficiency = per-worker rate / the per-worker rate "
              f"of the same kind at {args.workers[0]} workers)")
        print("main CPU = CPU time of this process (the one that would train) per image, in microseconds")
        print(f"{'kind':>9} {'workers':>7} {'images/s':>10} {'per worker':>11} {'efficiency':>10} {'main CPU':>9} "
              f"{'load':>6}")
        for r in scaling:
            first = next(q for q in scaling if q["kind"] == r["kind"])
            r["efficiency"] = r["per_worker"] / first["per_worker"]
            print(f"{r['ran_as']:>9} {r['workers']:>7} {r['images_per_s']:>10.0f} {r['per_worker']:>11.0f} "
                  f"{r['efficiency']:>10.2f} {r['main_cpu_us_per_image']:>9.1f} {r['load_average']:>6.2f}")
    result = {"images_per_s": {"ours": ours, "baseline": baseline}, "speedup": ours / baseline if baseline else None,
              "load_average": os.getloadavg(), "scaling": scaling,
              "pairs_per_batch": args.pairs_per_batch, "batches": args.batches,
              "workers": workers_max, "train_images": len(labels), "torch": torch.__version__,
              "cpus": os.cpu_count()}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
