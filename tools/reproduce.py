#!/usr/bin/env python
"""Reproduce a row of the paper: raw dataset -> LMDBs -> stage 1 -> stage 2 -> evaluation over
all splits, and a table beside the paper's numbers (docs/method.md, section 5).

    python tools/reproduce.py {cuhk03-labeled,cuhk03-detected,cuhk01-100,cuhk01-486,market1501}
                              RAW_DIR [--out runs/reproduce] [--splits N] [--ablation]
                              [--device cuda] [--iters1 N] [--iters2 N] [--batch-pairs 50]
                              [--base-lr R] [--repeats 100] [--val-ids N] [--seeds 0 1 2]

* Splits: CUHK03 the 20 official test sets, CUHK01 10 seeded random splits, Market-1501 its one
  split (--splits N takes the first N).
* Training: mspcnn.engine.solve (what tools/train.py runs) with
  prototxt_equiv/solver_<dataset>_stage{1,2}.prototxt (CUHK03: solver_stage{1,2}) and the net they
  name; --iters1/--iters2/--batch-pairs/--base-lr override them for short runs.
* Evaluation: CUHK03 and CUHK01 with the classic single-shot CMC (--repeats gallery draws,
  mspcnn.metrics.single_shot_cmc); Market-1501 with its official protocol
  (mspcnn.metrics.market1501_official). Features: L2-normalised fc7_bn, Euclidean distance.
* --ablation trains the four loss sets of the paper's Table 5 (cls; cls + high; cls + low; all
  three) instead of only the full model: each sets the loss weights of the net (a weight of 0
  turns a loss off). Every loss set runs both stages with the same solvers and iterations (stage
  2 of cls and cls+high simply continues without the NCC loss), so the loss set is the only
  difference. Stage 1 has no NCC loss, so cls + low and all start stage 2 from the
  stage-1 weights of cls and cls + high (same split and seed): their difference is the NCC loss's
  alone, and the ablation trains stage 1 twice instead of four times.
* --seeds S [S ...] repeats the training with each solver random_seed (initialisation, pair
  sampling, crops, mirroring); the table gives the mean and the spread (standard deviation) over
  all splits and seeds. The gallery draws of the single-shot CMC depend on the split only, so
  every seed and loss set is scored on the same draws.
Writes results.json and prints the table. The full recipes need a GPU and the datasets.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from mspcnn.caffe.io import CaffeFormatError, atomic_write
from mspcnn.data.datasets import convert_cuhk01, convert_cuhk03, convert_market1501
from mspcnn.engine import TrainingError, solve
from mspcnn.evaluation import evaluate_features, folder_features
from mspcnn.model import MSPCNNBackbone
from mspcnn.paths import PROTOTXT_DIR
from mspcnn.train_net import NetDefinitionError

# docs/method.md, section 5: rank-1 (%) of MSP-CNN (and mAP for Market-1501).
PAPER = {"cuhk03-labeled": {"rank1": 85.7}, "cuhk03-detected": {"rank1": 83.6},
         "cuhk01-100": {"rank1": 79.3}, "cuhk01-486": {"rank1": 63.7},
         "market1501": {"rank1": 81.9, "mAP": 63.6}}
SPLITS = {"cuhk03-labeled": 20, "cuhk03-detected": 20, "cuhk01-100": 10, "cuhk01-486": 10,
          "market1501": 1}
# Table 5's loss sets: (name, loss weights cls/high/low)
ABLATION = [("cls", (1, 0, 0)), ("cls+high", (1, 1, 0)), ("cls+low", (1, 0, 1)), ("all", (1, 1, 1))]


def convert(dataset, raw, out, split, val_ids=None):
    kw = {} if val_ids is None else {"val_ids": val_ids}
    if dataset.startswith("cuhk03"):
        return convert_cuhk03(raw, out, variant=dataset.split("-")[1], split=split, progress=False, **kw)
    if dataset.startswith("cuhk01"):
        return convert_cuhk01(raw, out, test_ids=int(dataset.split("-")[1]), split=split, progress=False,
                              **kw)
    return convert_market1501(raw, out, progress=False, **kw)


def solver_files(dataset):
    name = dataset.split("-")[0]
    if name == "cuhk03":
        return PROTOTXT_DIR / "solver_stage1.prototxt", PROTOTXT_DIR / "solver_stage2.prototxt"
    return (PROTOTXT_DIR / f"solver_{name}_stage1.prototxt", PROTOTXT_DIR / f"solver_{name}_stage2.prototxt")


def evaluate(dataset, db, weights, device, repeats, seed):
    backbone = MSPCNNBackbone().to(device).load_caffemodel(weights, strict=False)
    feats = folder_features(backbone, db, device=device)
    out, _ = evaluate_features(feats["probe"], feats["gallery"],
                               "market1501" if dataset == "market1501" else "single-shot", repeats, seed)
    out.pop("cmc")
    return out


def train_both_stages(args, db, run, loss_weights, seed, stage1, stage2, where, stage1_done):
    """Stage 1 from scratch, then stage 2 from its weights; returns the final weights (the
    .caffemodel the last stage wrote). Raises what mspcnn.engine.solve raises.

    ``stage1_done`` maps (weight of cls, weight of high) to the stage-1 weights already trained with
    them on this split and seed: stage 1 has no NCC loss and training is deterministic, so cls + low
    starts stage 2 from cls's stage 1 (and all from cls + high's), which is what Table 5 compares
    and saves a third of the ablation's time."""
    weights = None
    stage1_key = tuple(loss_weights[:2])
    for stage, solver, iters in (("stage1", stage1, args.iters1), ("stage2", stage2, args.iters2)):
        if iters == 0:
            continue
        if stage == "stage1" and stage1_key in stage1_done:
            weights = stage1_done[stage1_key]
            print(f"== {where}: stage1 is the one of the same cls/high weights: {weights}", flush=True)
            continue
        print(f"== {where}: {stage}", flush=True)
        overrides = {"snapshot_prefix": os.path.join(run, stage), "test_interval": 0, "base_lr": args.base_lr,
                     "random_seed": seed, "max_iter": iters, "snapshot": iters}
        w_cls, w_high, w_low = loss_weights
        result = solve(solver, db, weights=weights, device=args.device, overrides=overrides,
                       batch_pairs=args.batch_pairs, workers=args.workers,
                       loss_weights={"loss_cls": w_cls, "loss_high": w_high,
                                     "loss_low": w_low if stage == "stage2" else 0})
        weights = result.weights
        if stage == "stage1":
            stage1_done[stage1_key] = weights
    return weights


def write_results(args, n_splits, seeds, results):
    """Mean and spread (in %) of every loss set over its finished runs; writes OUT/results.json
    atomically and returns the summary."""
    keys = ["rank1", "rank5", "rank10", "rank20"] + (["mAP"] if args.dataset == "market1501" else [])
    summary = {}
    for name, rows in results.items():
        if rows:
            ddof = 1 if len(rows) > 1 else 0
            summary[name] = {"mean": {k: 100 * float(np.mean([r[k] for r in rows])) for k in keys},
                             "std": {k: 100 * float(np.std([r[k] for r in rows], ddof=ddof)) for k in keys},
                             "runs": rows}
    record = {"dataset": args.dataset, "splits": n_splits, "seeds": seeds, "paper": PAPER[args.dataset],
              "ours": summary, "args": vars(args)}
    atomic_write(os.path.join(args.out, "results.json"), json.dumps(record, indent=2), mode="w")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(PAPER))
    p.add_argument("raw_dir")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--splits", type=int)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters1", type=int)
    p.add_argument("--iters2", type=int)
    p.add_argument("--batch-pairs", type=int, help="pairs per forward pass (default: the net's, 50)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding batches ahead")
    p.add_argument("--base-lr", type=float)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the gallery draws (plus the split number)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: each solver's random_seed)")
    p.add_argument("--val-ids", type=int, help="identities held out for validation (converter default)")
    args = p.parse_args(argv)
    n_splits = min(args.splits or SPLITS[args.dataset], SPLITS[args.dataset])
    configs = ABLATION if args.ablation else ABLATION[-1:]
    stage1, stage2 = solver_files(args.dataset)
    if args.iters1 == 0:
        p.error("--iters1: stage 1 needs at least one iteration")
    seeds = args.seeds or [None]
    if len(set(seeds)) != len(seeds):
        p.error("--seeds: repeated seed")
    results = {name: [] for name, _ in configs}
    start = time.time()
    for split in range(n_splits):
        db = os.path.join(args.out, f"split{split:02d}", "db")
        print(f"== split {split + 1}/{n_splits}: converting", flush=True)
        try:
            convert(args.dataset, args.raw_dir, db, split, args.val_ids)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for seed in seeds:
            stage1_done = {}
            for name, weights3 in configs:
                where = f"split {split + 1}" + ("" if seed is None else f", seed {seed}") + f", {name}"
                run = os.path.join(args.out, f"split{split:02d}", *([] if seed is None else [f"seed{seed}"]), name)
                try:
                    weights = train_both_stages(args, db, run, weights3, seed, stage1, stage2, where, stage1_done)
                except (TrainingError, CaffeFormatError, NetDefinitionError, FileNotFoundError) as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                row = evaluate(args.dataset, db, weights, args.device, args.repeats, args.seed + split)
                results[name].append(dict(row, split=split, seed=seed))
                write_results(args, n_splits, seeds, results)  # after every run: a crash loses nothing
                print(f"   {where}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()), flush=True)

    summary = write_results(args, n_splits, seeds, results)
    paper, keys = PAPER[args.dataset], list(next(iter(summary.values()))["mean"])
    runs = n_splits * len(seeds)
    print(f"\n{args.dataset}, {n_splits} split(s) x {len(seeds)} seed(s), {time.time() - start:.0f} s"
          + ("; mean +- sample standard deviation over the runs" if runs > 1 else ""))
    print(f"{'':<16}" + "".join(f"{k:>16}" for k in keys))
    for name, entry in summary.items():
        mean, std = entry["mean"], entry["std"]
        print(f"{'ours: ' + name:<16}" + "".join(f"{mean[k]:>9.1f} +- {std[k]:>3.1f}" for k in keys))
    print(f"{'paper: all':<16}" + "".join(f"{paper[k]:>15.1f}%" if k in paper else f"{'-':>16}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
