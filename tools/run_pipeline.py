#!/usr/bin/env python
"""The whole MSP-CNN pipeline, briefly, on data the project generates:

1. generate a synthetic pedestrian dataset (tools/make_synthetic.py);
2. convert it to LMDBs (tools/convert_dataset.py market1501);
3. train stage 1 (softmax + contrastive) and stage 2 (+ the NCC loss) with
   mspcnn.engine.solve (what tools/train.py runs) and the solver files of
   prototxt_equiv/ and the net they name (iterations, rate and batch
   shortened for a CPU);
4. extract fc7_bn features of the probe and gallery, evaluate with the
   Market-1501 protocol (CMC rank-1/5/10/20, mAP) next to the chance level
   (the same protocol on random features, mean of 20 draws);
5. draw a ranking picture (queries and their top-10 gallery images, green
   border = same identity, red = not) and the CMC curve (cmc.png).

    python tools/run_pipeline.py [--out runs/pipeline] [--train-ids 150] [--test-ids 50]
                                 [--iters1 1000] [--iters2 100] [--batch-pairs 4] [--base-lr 0.01]
                                 [--iter-size 2] [--lr-policy step] [--stage2-lr 0.001]
                                 [--input-size 64x24] [--seed 0] [--device cpu|cuda]

About 5 minutes on 2 idle CPU cores with the defaults. The network is [1]'s, layer for layer, but
it sees 64 x 24 images by default, not [1]'s 144 x 56: a fifth of the pixels, so about 3 times the
iterations fit in the five minutes (--input-size 144x56 --iters1 375 --iters2 50 is the same budget
at [1]'s size).
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

from mspcnn.caffe.io import CaffeFormatError, atomic_write, write_prototxt
from mspcnn.cli import add_device_argument, add_input_size_argument, check_numbers, claim_folder, run
from mspcnn.runtime import add_threads_argument, configure_threads
from mspcnn.data.datasets import convert_market1501
from mspcnn.data.transformer import image_size_for
from mspcnn.data.synthetic import make_synthetic_market
from mspcnn.engine import TrainingError, solve
from mspcnn.evaluation import evaluate_features, folder_features
from mspcnn.metrics import euclidean_distances, market1501_official, market_ranking_stats
from mspcnn.model import feature_model
from mspcnn.paths import PROTOTXT_DIR
from mspcnn.plots import RIGHT, WRONG, draw_cmc, draw_ranking
from mspcnn.train_net import NetDefinitionError, edit_net, solver_net


def ranking_picture(path, probe, gallery, dist, n_queries=6, top=10, per_query=False):
    """Queries (left) and their top-`top` gallery images (junk and same-camera matches left out,
    as the protocol does), green = same identity, red = not; each image captioned (the query's
    identity and camera; each match's rank and distance). The queries are chosen by a stated rule:
    sorted by the rank of their first correct match, ``n_queries`` evenly spaced from the best to
    the worst (so the picture shows the spread, not a lucky or unlucky draw). ``per_query`` also
    writes one picture per query beside ``path``. `probe`, `gallery`: splits of
    mspcnn.evaluation.folder_features. Returns the paths written."""
    g_ids, g_cams = gallery["ids"], gallery["cameras"]
    stats = market_ranking_stats(dist, probe["ids"], probe["cameras"], g_ids, g_cams, max_rank=1)
    valid = np.flatnonzero(stats["valid"])
    order = valid[np.lexsort((valid, stats["first_hit"][valid]))]
    picks = order[np.unique(np.round(np.linspace(0, len(order) - 1, min(n_queries, len(order)))).astype(int))]
    rows = []
    for q in picks:
        q_id, q_cam = probe["ids"][q], probe["cameras"][q]
        ranked = [j for j in np.argsort(np.asarray(dist[q]), kind="stable")
                  if not (g_ids[j] == q_id and g_cams[j] == q_cam) and g_ids[j] != -1][:top]
        rows.append(((probe["db"][int(q)][0].transpose(1, 2, 0), f"id {q_id}|cam {q_cam}"),
                     [(gallery["db"][int(j)][0].transpose(1, 2, 0), RIGHT if g_ids[j] == q_id else WRONG,
                       f"#{k + 1}|d {dist[q][j]:.2f}") for k, j in enumerate(ranked)]))
    legend = [f"{len(rows)} queries of {len(valid)}, sorted by the rank of their first correct match and "
              "taken evenly from the best to the worst; d: Euclidean distance of L2-normalised features"]
    draw_ranking(path, rows, legend=legend, min_height=128)
    written = [path]
    if per_query:
        stem, ext = os.path.splitext(path)
        for k, row in enumerate(rows):
            one = f"{stem}_query{k + 1}{ext}"
            draw_ranking(one, [row], legend=[], min_height=128)
            written.append(one)
    return written


def chance_level(q_shape, g_shape, labels, seed, draws=20):
    """The Market-1501 protocol on random features, averaged over `draws` draws (one draw of a
    small test set is too noisy to be a baseline)."""
    rng = torch.Generator().manual_seed(seed)
    runs = [market1501_official(euclidean_distances(torch.randn(q_shape, generator=rng),
                                                    torch.randn(g_shape, generator=rng)), *labels)
            for _ in range(draws)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("rank1", "rank5", "rank10", "rank20", "mAP")}
    mean["cmc"] = [float(v) for v in np.mean([r["cmc"] for r in runs], axis=0)]
    mean["draws"] = draws
    return mean


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pipeline", help="output folder (default runs/pipeline)")
    p.add_argument("--train-ids", type=int, default=150, help="training identities of the generated dataset (default 150)")
    p.add_argument("--test-ids", type=int, default=50, help="test identities of the generated dataset (default 50)")
    p.add_argument("--iters1", type=int, default=1000, help="stage-1 iterations (default 1000: what fits the "
                   "5-minute budget on 2 idle cores at the default input size)")
    p.add_argument("--iters2", type=int, default=100, help="stage-2 iterations, with the NCC loss (default 100; 0: none)")
    p.add_argument("--batch-pairs", type=int, default=4,
               help="pairs per forward pass (default 4; iter_size 2 doubles it)")
    p.add_argument("--iter-size", type=int, default=2,
                   help="forward passes per update (default 2, as in [1]; 1 makes twice the updates in the same time)")
    p.add_argument("--lr-policy", choices=("step", "stepdecr"), default="step",
                   help="stage 1's rate: step = solver_stage1.prototxt's (constant over a short run); stepdecr = "
                   "[1]'s CUHK01 linear decay (gamma 0.04, min_lr 0.5%% of base_lr) in 25 steps over the run "
                   "(stepsize iters1/25), so the rate reaches its floor at the end (default step)")
    p.add_argument("--base-lr", type=float, default=0.01,
               help="base_lr of stage 1 (default 0.01; [1]'s 0.1 is for 100-pair batches)")
    p.add_argument("--stage2-lr", type=float,
                   help="base_lr of stage 2 (default: a tenth of --base-lr, the ratio of [1]'s solvers: 0.1 "
                   "from scratch, 0.01 to fine-tune)")
    add_input_size_argument(p, help="the network's input, height x width (default 64x24; [1]'s is 144x56); the "
                            "images are stored at it scaled by [1]'s 160/144 and 64/56 (71x27 for 64x24). The work "
                            "goes with the pixels: an iteration at 64x24 takes about a third of one at 144x56",
                            default=(64, 24))
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset, training and chance level (default 0)")
    add_device_argument(p)
    p.add_argument("--bn-maf", type=float, help="BatchNorm's moving_average_fraction (default: scaled with the "
                   "schedule, 1 - 1/(9%% of the forward passes); the net's own is 0.999 for [1]'s long runs)")
    p.add_argument("--per-query", action="store_true",
                   help="also write one ranking picture per query (ranking_query<k>.png)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if min(args.train_ids, args.test_ids, args.iters1, args.batch_pairs) < 2 or args.iters2 < 0 or args.iter_size < 1:
        p.error("--train-ids, --test-ids, --iters1 and --batch-pairs must be >= 2, --iters2 >= 0, --iter-size >= 1")
    try:
        check_numbers(("--base-lr", args.base_lr, 0), ("--stage2-lr", args.stage2_lr, 0))
    except ValueError as exc:
        p.error(str(exc))
    if args.bn_maf is not None and not 0 <= args.bn_maf < 1:
        p.error(f"--bn-maf must be in [0, 1), got {args.bn_maf}")
    input_size = args.input_size
    start = time.time()
    raw, db, runs = (os.path.join(args.out, d) for d in ("raw", "db", "snapshots"))
    try:
        os.makedirs(runs, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {args.out}: cannot create it ({exc.strerror})")
    claim_folder(args.out, "run_pipeline.py")  # a second run into the same folder stops here
    # The generated dataset is reused when a previous run made it with the same settings (the
    # command can be run again), regenerated when its settings differ; a folder the pipeline did
    # not make is never touched.
    settings = {"generator": "mspcnn.data.synthetic.make_synthetic_market", "train_ids": args.train_ids,
                "test_ids": args.test_ids, "seed": args.seed, "distractors": 20, "junk": 10}
    stamp = os.path.join(args.out, "raw.json")
    previous = None
    if os.path.isfile(stamp):
        try:
            with open(stamp) as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
    if os.path.exists(raw) and os.listdir(raw) and previous is None:
        p.error(f"{raw} exists and was not made by this pipeline (no {stamp}); choose another --out")
    if previous == settings and os.path.isdir(raw):
        print(f"[1/5] synthetic dataset: reusing {raw} (made earlier with the same settings)", flush=True)
    else:
        if os.path.exists(raw):
            shutil.rmtree(raw)
        print(f"[1/5] synthetic dataset: {args.train_ids} training and {args.test_ids} test identities", flush=True)
        print("      ", make_synthetic_market(raw, args.train_ids, args.test_ids, seed=args.seed,
                                              distractors=20, junk=10, progress=False), flush=True)
        atomic_write(stamp, json.dumps(settings, indent=1), mode="w")
    image_size = image_size_for(input_size)
    print(f"[2/5] converting to LMDB (images {image_size[0]} x {image_size[1]}, the net's input "
          f"{input_size[0]} x {input_size[1]})", flush=True)
    summary = convert_market1501(raw, db, val_ids=max(2, args.train_ids // 6), seed=args.seed, progress=False,
                                 image_size=image_size)
    print("      ", {k: f"{v[0]} images / {v[1]} ids" for k, v in summary.items()}, flush=True)

    # BatchNorm's moving average scaled with the schedule (see solver_cuhk01_cpu_stage1.prototxt):
    # [1] averages over about 9% of its forward passes; 0.999 over a short run would keep the
    # statistics of the first, very different weights.
    passes = args.iter_size * (args.iters1 + args.iters2)
    bn_maf = args.bn_maf if args.bn_maf is not None else round(1 - 1 / max(10.0, 0.09 * passes), 4)
    nets = {}
    for stage in ("stage1", "stage2"):
        nets[stage] = os.path.join(args.out, f"{stage}_net.prototxt")
        write_prototxt(edit_net(solver_net(PROTOTXT_DIR / f"solver_{stage}.prototxt"), bn_maf=bn_maf,
                                input_size=input_size), nets[stage])
    common = dict(device=args.device, batch_pairs=args.batch_pairs, workers=2)
    overrides = {"base_lr": args.base_lr, "display": 10, "iter_size": args.iter_size}
    stage1_rate = {}
    if args.lr_policy == "stepdecr":  # [1]'s gamma and min_lr / base_lr (solver_cuhk01_stage1.prototxt)
        stage1_rate = {"lr_policy": "stepdecr", "gamma": 0.04, "stepsize": max(1, args.iters1 // 25),
                       "min_lr": args.base_lr * 0.005}
    try:
        print(f"[3/5] stage 1: {args.iters1} iterations (softmax + contrastive)", flush=True)
        result = solve(PROTOTXT_DIR / "solver_stage1.prototxt", db, **common, net=nets["stage1"],
                       overrides=dict(overrides, **stage1_rate, max_iter=args.iters1, snapshot=args.iters1,
                                      snapshot_prefix=os.path.join(runs, "stage1"), test_interval=args.iters1,
                                      test_initialization=False))
        weights = result.weights
        stage1_val = result.test
        stage2_val = None
        if result.test:
            print(f"      stage-1 validation (held-out training identities, cross-camera rank-1): "
                  f"{100 * result.test['rank1']:.1f}%", flush=True)
        if args.iters2 and not result.stopped_by:  # a stop (Ctrl-C, SIGTERM) ends the job here
            print(f"[4/5] stage 2: {args.iters2} iterations (+ the NCC loss), from {weights}", flush=True)
            stage2_lr = args.stage2_lr if args.stage2_lr is not None else args.base_lr / 10
            result = solve(PROTOTXT_DIR / "solver_stage2.prototxt", db, **common, weights=weights, net=nets["stage2"],
                           overrides=dict(overrides, base_lr=stage2_lr, max_iter=args.iters2, snapshot=args.iters2,
                                          snapshot_prefix=os.path.join(runs, "stage2"),
                                          test_interval=args.iters2, test_initialization=False))
            weights = result.weights
            stage2_val = result.test
            if result.test:
                print(f"      stage-2 validation (the same held-out identities): {100 * result.test['rank1']:.1f}%",
                      flush=True)
    except (TrainingError, CaffeFormatError, NetDefinitionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.stopped_by:
        print(f"stopped by {result.stopped_by}; the last weights are {weights} (the job ends without its "
              "evaluation; run the same command again to start over)", file=sys.stderr)
        return 130

    print("[5/5] evaluation (Market-1501 protocol) on the test identities", flush=True)
    backbone = feature_model(weights, args.device, input_size=input_size)
    feats = folder_features(backbone, db, device=args.device)
    probe, gallery = feats["probe"], feats["gallery"]
    result, dist = evaluate_features(probe, gallery, "market1501")
    labels = (probe["ids"], probe["cameras"], gallery["ids"], gallery["cameras"])
    chance = chance_level(probe["features"].shape, gallery["features"].shape, labels, args.seed)
    picture = os.path.join(args.out, "ranking.png")
    pictures = ranking_picture(picture, probe, gallery, dist, per_query=args.per_query)
    draw_cmc({"MSP-CNN (this run)": result["cmc"], "chance": chance["cmc"]}, os.path.join(args.out, "cmc.png"),
             title="CMC, Market-1501 protocol, synthetic test identities")
    print(f"\ntest identities ({args.test_ids}), Market-1501 protocol:")
    print(f"{'':<22} {'rank-1':>7} {'rank-5':>7} {'rank-10':>8} {'rank-20':>8} {'mAP':>7}")
    for name, r in (("MSP-CNN (this run)", result), ("chance (random feats)", chance)):
        print(f"{name:<22} {100 * r['rank1']:>6.1f}% {100 * r['rank5']:>6.1f}% {100 * r['rank10']:>7.1f}% "
              f"{100 * r['rank20']:>7.1f}% {100 * r['mAP']:>6.1f}%")
    atomic_write(os.path.join(args.out, "results.json"), json.dumps(
        {"msp_cnn": result, "chance": chance, "weights": weights, "args": vars(args),
         "stage1_validation": stage1_val, "stage2_validation": stage2_val,
         "seconds": time.time() - start}, indent=2), mode="w")
    print(f"\n{result['queries']} queries, {time.time() - start:.0f} s. Results in {args.out}/: ranking.png "
          f"(the ranking picture{f', and {len(pictures) - 1} pictures of one query each' if len(pictures) > 1 else ''}), "
          f"cmc.png (CMC curves), results.json (every figure); weights: {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
