#!/usr/bin/env python
"""Reproduce a row of the paper: raw dataset -> LMDBs -> stage 1 -> stage 2 -> evaluation over
all splits, and a table beside the paper's numbers and the chance level (docs/method.md, section 5).

    python tools/reproduce.py {cuhk03-labeled,cuhk03-detected,cuhk01-100,cuhk01-486,market1501}
                              RAW_DIR [--out runs/reproduce] [--name results] [--recipe paper|cpu|cpu64]
                              [--splits N | --split-ids I ...] [--seeds 0 1 2] [--ablation | --loss-sets NAME ...]
                              [--w-low W] [--pos-floor F] [--neg-ceiling C] [--lr2 R]
                              [--device cuda] [--iters1 N | --stage1-scale K] [--iters2 N] [--batch-pairs N]
                              [--base-lr R] [--test-interval N] [--repeats 100] [--val-ids N] [--workers N]
                              [--tf32] [--cuda-graphs] [--time-limit SECONDS] [--convert-only] [--input-size 144x56]

* Splits: CUHK03 the 20 official test sets, CUHK01 10 seeded random splits, Market-1501 its one
  split. --splits N takes the first N; --split-ids I [I ...] takes these, counted from 0 as the
  folders splitNN are (e.g. `--split-ids 3 4` on one machine and `5 6` on another, their JSON files
  then pooled by tools/results_tables.py). Identities held out from the training identities
  (--val-ids, `val`) serve every choice made during training; test identities never do.
* Recipes: `paper` trains with [1]'s solver settings (prototxt_equiv/solver_<dataset>_stage{1,2}
  .prototxt; CUHK03: solver_stage{1,2}) and the net's batch of 50 pairs; `cpu` (CUHK01 only) is the
  shortened recipe of solver_cuhk01_cpu_stage{1,2}.prototxt, about 33 minutes a run on 2 idle cores
  with AVX-512 (3.5-4 times as long on 2 AVX2 cores), whose files state every shortening and why;
  `cpu64` (CUHK01 only) is that recipe at a 64 x 24 input (not the paper's) with five times the
  iterations, which take about the same time (solver_cuhk01_cpu64_stage{1,2}.prototxt).
  --iters1/--iters2/--batch-pairs/--base-lr override any of them for shorter runs; --stage1-scale K
  trains stage 1 K times as long with its schedule stretched alike (max_iter and stepsize times K; a
  study of the schedule's length, runs tagged _s1xK). Training is mspcnn.engine.solve (what
  tools/train.py runs) with the net the solvers name.
* Loss sets (the paper's Table 5): cls; cls+high; cls+low; all. Default: all (the full model);
  --ablation runs the four; --loss-sets chooses (e.g. `--loss-sets cls+high all`, the paired
  comparison of the NCC loss). Each sets the loss weights of the net (0 turns a loss off). Every
  loss set runs both stages with the same solvers and iterations (stage 2 of cls and cls+high
  continues without the NCC loss). Stage 1 has no NCC loss, so cls+low and all start stage 2 from
  the stage-1 weights of cls and cls+high (same split and seed): their difference is the NCC loss's
  alone.
* Stage 2's NCC loss: --w-low (its loss weight), --pos-floor, --neg-ceiling, --lr2 (stage 2's
  base_lr) edit a copy of the net / the solver; the edited net is written into the run's folder
  (the net that trained) and the runs are named with a tag of the values. --bn-maf sets every
  BatchNorm's moving_average_fraction in both stages' nets the same way (the cpu recipe's 0.986
  scales [1]'s averaging window with its shorter schedule).
* Stage 1 is trained once per split, seed and cls/high weights, stage 2 once per run: a later
  invocation with the same --out reuses a finished stage when its manifest
  (stage{1,2}.manifest.json: solver, net, options, data and weights, by SHA-256; the solver and
  net by what they say, so an edit of their comments keeps it; for stage 2 also the stage-1
  weights it started from) matches, and says so ("stage2 reused from ..."); the run is then
  evaluated again from those weights. So a multi-split command stopped part way and run again
  trains only what is unfinished. A stage stopped early (SIGINT, SIGTERM, --time-limit) leaves a
  snapshot and stage{1,2}.partial.json: the same command resumes it from there when its inputs
  match (the bookkeeping: mspcnn.stages). To train a finished run again (e.g. to check that it
  reproduces), give another --out.
* --input-size HxW: the network's input (default [1]'s 144 x 56, the paper's setting; the cpu64
  recipe's 64 x 24). Another size
  (a study of resolution, e.g. 64x24 as the main job) converts the images at it scaled by 160/144
  and 64/56, trains and evaluates at it, and names it in the table and the JSON.
* --tf32: TF32 tensor cores for training on a GPU (never the default; features stay float32).
* --cuda-graphs: each training pass replayed from CUDA graphs on a GPU (the same arithmetic, less
  host time; not the default yet).
  --convert-only: convert the splits and stop.
* Evaluation: CUHK03 and CUHK01 with the classic single-shot CMC (--repeats gallery draws,
  mspcnn.metrics.single_shot_cmc), Market-1501 with its official protocol. Features: L2-normalised
  fc7_bn, Euclidean distance. Chance: a random ranking (single-shot: rank-k = k / gallery
  identities; Market-1501: random features, 20 draws).
* --test-interval N validates every N iterations (cross-camera rank-1 on the `val` identities) and
  --seeds S [S ...] repeats the training per seed (with --stage1-seed S1, stage 1 is trained once
  with seed S1 and the seeds vary stage 2 only: the paired comparison of loss sets at a fraction of
  the cost, with a spread that leaves out stage 1's); OUT/<name>.json keeps every run (rewritten
  after each one), its learning curves, and the mean and sample standard deviation over splits and
  seeds; OUT/<name>_curves.png plots training loss and validation rank-1 against the iteration.
* Paired comparison: when cls+low and cls (or all and cls+high) both ran, the table is followed by
  their difference per split and seed (the NCC loss's effect: both start stage 2 from the same
  weights), its mean, sample standard deviation and 95% t-interval (and for rank-1 the two-sided
  p-values of the t-test and of the exact Wilcoxon signed-rank test); also in the JSON ("paired",
  with "t_p" and "signed_rank_p" for every figure).
  Likewise cls+high − cls and all − cls+low, the high-level loss's effect (same split, seed and
  order of training pairs; that loss trains in both stages, so stage 1 differs too; JSON
  "paired_high"). Where all four loss sets ran (--ablation), their interaction, (all − cls+high) −
  (cls+low − cls) per split and seed, 0 where the two losses' effects add up (JSON "interaction").
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from mspcnn import stages
from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.caffe.io import CaffeFormatError, atomic_write
from mspcnn.cli import add_device_argument, add_input_size_argument, check_numbers, claim_folder, run
from mspcnn.runtime import (add_cuda_graphs_argument, add_tf32_argument, add_threads_argument,
                            add_workers_argument, configure_threads, machine_record, machine_text)
from mspcnn.data.datasets import convert_cuhk01, convert_cuhk03, convert_market1501
from mspcnn.data.transformer import CROP, image_size_for
from mspcnn.engine import TrainingError, solve
from mspcnn.evaluation import (HIGH_PAIRS, NCC_PAIRS, evaluate_features, folder_features, interaction_pairs,
                               loss_set_groups, matched_pairs, p_values_text, paired_summary, run_summary)
from mspcnn.metrics import euclidean_distances, market1501_official
from mspcnn.model import feature_model
from mspcnn.paths import PROTOTXT_DIR
from mspcnn.plots import draw_curves
from mspcnn.stages import Stopped, message_sha256, sha256
from mspcnn.train_net import NetDefinitionError, edit_net, resolve_net_path, solver_net

# docs/method.md, section 5: rank-1 (%) of MSP-CNN (and mAP for Market-1501).
PAPER = {"cuhk03-labeled": {"rank1": 85.7}, "cuhk03-detected": {"rank1": 83.6},
         "cuhk01-100": {"rank1": 79.3}, "cuhk01-486": {"rank1": 63.7},
         "market1501": {"rank1": 81.9, "mAP": 63.6}}
SPLITS = {"cuhk03-labeled": 20, "cuhk03-detected": 20, "cuhk01-100": 10, "cuhk01-486": 10,
          "market1501": 1}
# Table 5's loss sets: (name, loss weights cls/high/low)
ABLATION = [("cls", (1, 0, 0)), ("cls+high", (1, 1, 0)), ("cls+low", (1, 0, 1)), ("all", (1, 1, 1))]
# Recipes: the solver files and the batch (pairs per forward pass; None: the net's).
# cpu: 16 pairs (see solver_cuhk01_cpu_stage1.prototxt) and BatchNorm's moving-average window
# scaled with the schedule: [1] averages over about 1/(1 - 0.999) = 1000 of its 11,000 forward
# passes (9%); 9% of this recipe's 800 is 73 passes, moving_average_fraction 1 - 1/73 = 0.986.
# cpu64: the cpu recipe at a 64 x 24 input with five times the iterations (see
# solver_cuhk01_cpu64_stage1.prototxt); 9% of 4000 passes is 360: 1 - 1/360 = 0.9972.
# input_size: the recipe's default for --input-size (else [1]'s 144 x 56).
RECIPES = {"paper": {"batch": None, "bn_maf": None},
           "cpu": {"batch": 16, "bn_maf": 0.986, "datasets": ("cuhk01",)},
           "cpu64": {"batch": 16, "bn_maf": 0.9972, "datasets": ("cuhk01",), "input_size": (64, 24)}}
STAGE2_OPTIONS = (("w_low", "wlow"), ("pos_floor", "pf"), ("neg_ceiling", "nc"), ("balance_pairs", "bal"),
                  ("lr2", "lr"))


def convert(dataset, raw, out, split, val_ids=None, input_size=CROP):
    kw = {} if val_ids is None else {"val_ids": val_ids}
    kw["image_size"] = image_size_for(input_size)
    if dataset.startswith("cuhk03"):
        return convert_cuhk03(raw, out, variant=dataset.split("-")[1], split=split, progress=False, **kw)
    if dataset.startswith("cuhk01"):
        return convert_cuhk01(raw, out, test_ids=int(dataset.split("-")[1]), split=split, progress=False,
                              **kw)
    return convert_market1501(raw, out, progress=False, **kw)


def converted_options(db):
    """The options and the splits' sizes a converted folder's manifest records (None when there is
    no readable manifest): what tells one conversion of a split from another."""
    try:
        with open(os.path.join(db, "manifest.json")) as f:
            manifest = json.load(f)
        return {**manifest.get("options", {}),
                **{f"{k} images": v.get("images") for k, v in manifest.get("splits", {}).items()}}
    except (OSError, ValueError, AttributeError):
        return None


def solver_files(dataset, recipe="paper"):
    name = dataset.split("-")[0]
    if recipe != "paper":
        return (PROTOTXT_DIR / f"solver_{name}_{recipe}_stage1.prototxt",
                PROTOTXT_DIR / f"solver_{name}_{recipe}_stage2.prototxt")
    if name == "cuhk03":
        return PROTOTXT_DIR / "solver_stage1.prototxt", PROTOTXT_DIR / "solver_stage2.prototxt"
    return (PROTOTXT_DIR / f"solver_{name}_stage1.prototxt", PROTOTXT_DIR / f"solver_{name}_stage2.prototxt")


def evaluate(dataset, db, weights, device, repeats, seed, input_size=CROP):
    backbone = feature_model(weights, device, input_size=input_size)
    feats = folder_features(backbone, db, device=device, progress=False)
    out, _ = evaluate_features(feats["probe"], feats["gallery"],
                               "market1501" if dataset == "market1501" else "single-shot", repeats, seed)
    out.pop("cmc")
    return out, feats


def chance_level(dataset, feats, seed):
    """The metrics of a random ranking: single-shot rank-k = k / gallery identities (exact);
    Market-1501: the official protocol on random features, mean of 20 draws."""
    keys = ("rank1", "rank5", "rank10", "rank20")
    if dataset != "market1501":
        n = len(set(feats["gallery"]["ids"]))
        return {k: min(1.0, int(k[4:]) / n) for k in keys}
    gen = torch.Generator().manual_seed(seed)
    q, g = feats["probe"], feats["gallery"]
    runs = [market1501_official(euclidean_distances(torch.randn(q["features"].shape, generator=gen),
                                                    torch.randn(g["features"].shape, generator=gen)),
                                q["ids"], q["cameras"], g["ids"], g["cameras"]) for _ in range(20)]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys + ("mAP",)}


def run_tag(args, uses_low):
    """The suffix naming a run's stage-2 settings: '_lr0.005' for --lr2, and for a loss set with the
    NCC loss '_wlow2_pf0.3_nc0.8_bal1' for --w-low/--pos-floor/--neg-ceiling/--balance-pairs; '' for the
    defaults."""
    return "".join(f"_{short}{getattr(args, key):g}" for key, short in STAGE2_OPTIONS
                   if getattr(args, key) is not None and (uses_low or key == "lr2"))


def prepare_net(solver_path, folder, filename, bn_maf=None, ncc=None):
    """The net the solver names with edits applied (mspcnn.train_net.edit_net), written to
    FOLDER/FILENAME (the net that trains; None when there is nothing to edit: the solver's own net
    trains)."""
    ncc = {k: v for k, v in (ncc or {}).items() if v is not None}
    if bn_maf is None and not ncc:
        return None
    net = edit_net(solver_net(solver_path), bn_maf=bn_maf, ncc=ncc)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    cio.write_prototxt(net, path)
    return path


def stage_inputs(args, solver, net, db, overrides, loss_weights, **extra):
    """What a stage's result depends on: the solver and the net that trains (``net``, or the one the
    solver names) by what they say (:func:`message_sha256`: comments aside), the training records
    by SHA-256, the loss weights, the solver overrides (the snapshot prefix aside), the batch, the
    device and the arithmetic; plus ``extra``. Stage 1's manifest and the records to resume either
    stage from."""
    sp = cio.read_prototxt(solver, proto.SolverParameter)
    if tuple(args.input_size) != CROP:  # (recorded only when not [1]'s, so earlier records stay valid)
        extra = dict(extra, input_size=list(args.input_size))
    net = cio.read_prototxt(net or resolve_net_path(sp.net, str(solver)), proto.NetParameter)
    return {**extra, "solver": message_sha256(sp), "net": message_sha256(net),
            "data": sha256(os.path.join(db, "train.json")), "loss_weights": list(loss_weights),
            "overrides": {k: v for k, v in overrides.items() if k != "snapshot_prefix"},
            "batch_pairs": args.batch_pairs, "device": args.device, "tf32": args.tf32}


def stretched_schedule(solver, scale):
    """Solver overrides that train SCALE times as long with the same shape of learning-rate schedule:
    max_iter (and the final snapshot) and, for the step policies, stepsize, each times SCALE
    (rounded, at least 1). The rest (base_lr, min_lr, gamma, the BatchNorm window) stays."""
    sp = cio.read_prototxt(solver, proto.SolverParameter)
    iters = max(1, round(sp.max_iter * scale))
    out = {"max_iter": iters, "snapshot": iters}
    if sp.HasField("stepsize"):
        out["stepsize"] = max(1, round(sp.stepsize * scale))
    return out


def scale_tag(args):
    """The suffix naming a stretched stage 1 (--stage1-scale K): '_s1xK', or '' without one."""
    return "" if args.stage1_scale is None else f"_s1x{args.stage1_scale:g}"


def described(args):
    """'cuhk01-486, recipe cpu64' and what the run changes of it: ', input 64 x 24' when not [1]'s
    crop, ', stage 1 x K' with --stage1-scale (the results table's and the curves' titles)."""
    size = "" if tuple(args.input_size) == CROP else f", input {args.input_size[0]} x {args.input_size[1]}"
    size += "" if args.stage1_scale is None else f", stage 1 x {args.stage1_scale:g}"
    return f"{args.dataset}, recipe {args.recipe}{size}"


def trained_stage(args, solver, db, folder, stage, inputs, where, loss_weights, weights=None, **kw):
    """One stage trained with mspcnn.engine.solve (from ``weights``, or from a stopped run's
    solverstate), or reused, or resumed: :func:`mspcnn.stages.trained_stage` in FOLDER. Returns
    (weights, validation history, iterations, the machines that trained it)."""
    def train(state):
        return solve(solver, db, weights=None if state else weights, snapshot=state, device=args.device,
                     batch_pairs=args.batch_pairs, input_size=args.input_size, workers=args.workers, tf32=args.tf32,
                     stop_at=args.stop_at, cuda_graphs=args.cuda_graphs, loss_weights=loss_weights, **kw)
    return stages.trained_stage(folder, stage, inputs, where, train, machine_record(args.device))


def train_stage1(args, db, folder, loss_weights, seed, solver, where):
    """Stage 1 from scratch into FOLDER, or the stage 1 already there when its manifest matches
    (:func:`trained_stage`). Returns (weights, history, iterations)."""
    overrides = {"snapshot_prefix": os.path.join(folder, "stage1"), "base_lr": args.base_lr,
                 "random_seed": seed, "max_iter": args.iters1, "snapshot": args.iters1,
                 "test_interval": args.test_interval}
    if args.stage1_scale is not None:  # (the key only when set: earlier manifests stay valid)
        overrides.update(stretched_schedule(solver, args.stage1_scale))
    net = prepare_net(solver, folder, "stage1_net.prototxt", bn_maf=args.bn_maf)
    manifest = stage_inputs(args, solver, net, db, overrides, loss_weights[:2])
    w_cls, w_high, _ = loss_weights
    return trained_stage(args, solver, db, folder, "stage1", manifest, where,
                         {"loss_cls": w_cls, "loss_high": w_high, "loss_low": 0}, overrides=overrides, net=net)


def train_both_stages(args, db, split_dir, name, loss_weights, seed, stage1, stage2, where, tag):
    """Stage 1 (or its reuse), then stage 2 from its weights; returns (final weights, history, the
    machines that trained each stage: {"stage1": [...], "stage2": [...]}, :func:`trained_on`), the
    history's iterations counted from the start of stage 1. Raises what mspcnn.engine.solve raises."""
    # A stretched stage 1 has its own folder: a stage 1 of the recipe's length beside it stays.
    key = ("cls" if loss_weights[1] == 0 else "cls+high") + scale_tag(args)
    if args.stage1_seed is not None:  # one stage 1 for every seed; only stage 2's seed varies
        folder = os.path.join(os.path.dirname(split_dir), f"seed{args.stage1_seed}", f"stage1_{key}")
        seed1 = args.stage1_seed
    else:
        folder, seed1 = os.path.join(split_dir, f"stage1_{key}"), seed
    weights, history, offset, machines1 = train_stage1(args, db, folder, loss_weights, seed1, stage1, where)
    history = [dict(h, stage=1) for h in history]
    if args.iters2 == 0:
        return weights, history, {"stage1": machines1}
    run = os.path.join(split_dir, name + tag)
    ncc = {k: getattr(args, k) for k, _ in STAGE2_OPTIONS if k != "lr2"} if loss_weights[2] else None
    net = prepare_net(stage2, run, "stage2_net.prototxt", bn_maf=args.bn_maf, ncc=ncc)
    overrides = {"snapshot_prefix": os.path.join(run, "stage2"), "test_interval": args.test_interval,
                 "base_lr": args.lr2 if args.lr2 is not None else args.base_lr, "random_seed": seed,
                 "max_iter": args.iters2, "snapshot": args.iters2}
    w_cls, w_high, w_low = loss_weights
    weights_low = {"loss_low": w_low} if args.w_low is None or w_low == 0 else {}
    inputs = stage_inputs(args, stage2, net, db, overrides, loss_weights, stage1_weights_sha256=sha256(weights))
    final, history2, _, machines2 = trained_stage(args, stage2, db, run, "stage2", inputs, where,
                                                  {"loss_cls": w_cls, "loss_high": w_high, **weights_low},
                                                  weights=weights, overrides=overrides, net=net)
    history += [dict(h, stage=2, iteration=h["iteration"] + offset) for h in history2]
    return final, history, {"stage1": machines1, "stage2": machines2}


def write_results(args, split_ids, seeds, results, chance, histories):
    """Mean and spread (in %) of every loss set over its finished runs; writes OUT/<name>.json
    atomically and returns the summary."""
    keys = ["rank1", "rank5", "rank10", "rank20"] + (["mAP"] if args.dataset == "market1501" else [])
    summary = {name: run_summary(rows, keys) for name, rows in results.items() if rows}
    record = {"dataset": args.dataset, "recipe": args.recipe, "splits": len(split_ids), "split_ids": split_ids,
              "seeds": seeds,
              "paper": PAPER[args.dataset], "ours": summary, "paired": paired_differences(summary, keys),
              "paired_high": paired_differences(summary, keys, HIGH_PAIRS),
              "interaction": interaction_differences(summary, keys),
              "chance": {k: 100 * v for k, v in chance.items()} if chance else None,
              "learning_curves": histories, "args": vars(args),
              # where this command ran (its tests, and any stage it trained rather than reused; each
              # run's "trained_on" names the machines that trained its stages): runtime.machine_record
              "machine": machine_record(args.device)}
    atomic_write(os.path.join(args.out, f"{args.name}.json"), json.dumps(record, indent=1), mode="w")
    return summary


def run_groups(summary):
    """The runs of a summary ({loss set: {"runs": [...]}}) grouped by split and seed
    (:func:`mspcnn.evaluation.loss_set_groups`): [{loss set: run}], in the order they trained."""
    return list(loss_set_groups(((name, r) for name, entry in summary.items() for r in entry["runs"]),
                                lambda r: (r["split"], r["seed"])).values())


def difference_entry(rows, keys):
    """The JSON entry of paired ``rows`` [(run, partner)]: {"n", "runs" (split, seed and each
    figure's difference run − partner, in percentage points), and per figure its
    :func:`paired_summary`}."""
    entry = {"n": len(rows), "runs": [{"split": a["split"], "seed": a["seed"],
                                       **{k: 100 * (a[k] - b[k]) for k in keys}} for a, b in rows]}
    for k in keys:
        entry[k] = paired_summary([run[k] for run in entry["runs"]])
    return entry


def paired_differences(summary, keys, pairs=NCC_PAIRS):
    """For each loss set of ``pairs`` (with a loss, without it; the NCC loss's by default, or
    HIGH_PAIRS) whose partner also ran: the difference (with - without, in percentage points) per
    split and seed, its mean, sample standard deviation and 95% confidence interval (Student's t
    over the pairs; none with fewer than 2 pairs)."""
    out, groups = {}, run_groups(summary)
    for with_it, without in pairs:
        rows = matched_pairs(groups, with_it, without)
        if rows:
            out[f"{with_it} - {without}"] = difference_entry(rows, keys)
    return out


def interaction_differences(summary, keys):
    """The two losses' interaction where all four loss sets ran: per split and seed, (all −
    cls+high) − (cls+low − cls), the NCC loss's effect with the high-level loss less its effect
    without (equally, the high-level loss's with the NCC loss less without), in percentage points;
    then as :func:`paired_differences` its mean, spread, interval and p-values. {} where no split
    and seed has all four."""
    (low, plain), (both, high) = NCC_PAIRS
    rows = interaction_pairs(run_groups(summary), keys)
    return {f"({both} - {high}) - ({low} - {plain})": difference_entry(rows, keys)} if rows else {}


def draw(args, histories):
    loss, score = {}, {}
    for label, history in histories.items():
        train = [h for h in history if h.get("kind") == "train"]
        tests = [h for h in history if h.get("kind") == "test"]
        if train:
            loss[label] = ([h["iteration"] for h in train], [h["loss"] for h in train])
        if tests:
            score[label] = ([h["iteration"] for h in tests], [h["rank1"] for h in tests])
    if loss or score:
        draw_curves(os.path.join(args.out, f"{args.name}_curves.png"), loss, score,
                    title=f"{described(args)}: stage 1 then stage 2")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(PAPER), help="the row of the paper's table")
    p.add_argument("raw_dir", help="the dataset as released (see docs/evaluation.md)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--name", default="results", help="name of the results JSON and curves (default results)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="paper: [1]'s solver settings (default); cpu: the shortened CUHK01 recipe; cpu64: "
                   "the cpu recipe at a 64x24 input with five times the iterations, in about the same time")
    splits = p.add_mutually_exclusive_group()
    splits.add_argument("--splits", type=int, help="the first N splits (default: all of the dataset's)")
    splits.add_argument("--split-ids", type=int, nargs="+", metavar="I",
                        help="these splits, counted from 0 as the folders splitNN are (e.g. 1 2: the second and "
                             "third), so that splits can run apart and be pooled by tools/results_tables.py")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ablation", action="store_true", help="the four loss sets of Table 5")
    group.add_argument("--loss-sets", nargs="+", choices=[n for n, _ in ABLATION], help="these loss sets")
    p.add_argument("--w-low", type=float, help="stage 2: the NCC loss weight (default: the net's)")
    p.add_argument("--pos-floor", type=float, help="stage 2: NCCLoss pos_floor (default: the net's)")
    p.add_argument("--neg-ceiling", type=float, help="stage 2: NCCLoss neg_ceiling (default: the net's)")
    p.add_argument("--balance-pairs", action="store_const", const=1, help="stage 2: NCCLoss balance_pairs: "
                   "positive and negative pairs weigh the same in the NCC loss (default: the net's, off)")
    p.add_argument("--lr2", type=float, help="stage 2: base_lr (default: the solver's, or --base-lr)")
    p.add_argument("--bn-maf", type=float, help="every BatchNorm's moving_average_fraction, both stages "
                   "(default: the net's 0.999; the cpu recipe's 0.986, cpu64's 0.9972)")
    add_device_argument(p)
    add_tf32_argument(p)
    add_cuda_graphs_argument(p)
    p.add_argument("--convert-only", action="store_true",
                   help="convert the splits (as the full command would) and stop: e.g. to benchmark the data "
                        "loader on them first")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop training when this many seconds have passed since the start (at the end of an "
                        "iteration, with a snapshot), as SIGTERM would; the same command resumes it")
    p.add_argument("--iters1", type=int, help="stage 1 iterations (default: the solver's max_iter)")
    p.add_argument("--iters2", type=int, help="stage 2 iterations (default: the solver's; 0: none)")
    p.add_argument("--stage1-scale", type=float, metavar="K",
                   help="train stage 1 K times as long with the same schedule: its max_iter and stepsize times K "
                        "(base and floor rates, BatchNorm's window and stage 2 unchanged); runs tagged _s1xK. "
                        "A study of the schedule's length; not with --iters1")
    p.add_argument("--batch-pairs", type=int, help="pairs per forward pass (default: the recipe's)")
    add_workers_argument(p)
    p.add_argument("--base-lr", type=float, help="base_lr of both stages (default: the solvers')")
    p.add_argument("--test-interval", type=int, default=0,
                   help="validate every N iterations, for the learning curve (default 0: never)")
    p.add_argument("--repeats", type=int, default=100, help="gallery draws of the single-shot CMC")
    p.add_argument("--seed", type=int, default=0, help="seed of the gallery draws (plus the split number)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: each solver's random_seed)")
    p.add_argument("--stage1-seed", type=int,
                   help="train stage 1 once with this seed and start every --seeds run's stage 2 from it "
                        "(the seeds then vary stage 2 only; default: each seed trains its own stage 1)")
    p.add_argument("--val-ids", type=int, help="identities held out for validation (converter default)")
    add_input_size_argument(p, help="the network's input, height x width (default 144x56, [1]'s and the "
                            "paper's; the cpu64 recipe's 64x24); another size converts the images at it scaled by "
                            "160/144 and 64/56 and trains and evaluates the net at it (not the paper's setting: "
                            "for studies)", default=None)
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.time_limit is not None and not args.time_limit > 0:  # NaN too
        p.error(f"--time-limit must be positive, got {args.time_limit}")
    args.stop_at = None if args.time_limit is None else time.time() + args.time_limit
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    print(f"machine: {machine_text(machine_record(args.device))}", file=sys.stderr, flush=True)
    recipe = RECIPES[args.recipe]
    if "datasets" in recipe and args.dataset.split("-")[0] not in recipe["datasets"]:
        p.error(f"--recipe {args.recipe}: only for {', '.join(recipe['datasets'])}")
    if args.batch_pairs is None:
        args.batch_pairs = recipe["batch"]
    if args.input_size is None:
        args.input_size = recipe.get("input_size", CROP)
    if args.bn_maf is None:
        args.bn_maf = recipe["bn_maf"]
    if args.bn_maf is not None and not 0 <= args.bn_maf < 1:
        p.error(f"--bn-maf must be in [0, 1), got {args.bn_maf}")
    try:  # stage 2's settings too: they are used only after stage 1 has trained
        check_numbers(("--base-lr", args.base_lr, 0), ("--lr2", args.lr2, 0), ("--w-low", args.w_low, 0),
                      ("--pos-floor", args.pos_floor, None), ("--neg-ceiling", args.neg_ceiling, None))
    except ValueError as exc:
        p.error(str(exc))
    if args.split_ids is not None:
        bad = [i for i in args.split_ids if not 0 <= i < SPLITS[args.dataset]]
        if bad:
            p.error(f"--split-ids: {args.dataset} has splits 0 to {SPLITS[args.dataset] - 1}, got {bad[0]}")
        if len(set(args.split_ids)) != len(args.split_ids):
            p.error("--split-ids: repeated split")
        split_ids = list(args.split_ids)
    else:
        split_ids = list(range(min(args.splits or SPLITS[args.dataset], SPLITS[args.dataset])))
    n_splits = len(split_ids)
    if args.ablation:
        configs = ABLATION
    elif args.loss_sets:
        configs = [c for c in ABLATION if c[0] in args.loss_sets]
    else:
        configs = ABLATION[-1:]
    stage1, stage2 = solver_files(args.dataset, args.recipe)
    for name, value in (("--iters1", args.iters1), ("--splits", args.splits), ("--repeats", args.repeats),
                        ("--batch-pairs", args.batch_pairs), ("--workers", args.workers)):
        if value is not None and value < 1:
            p.error(f"{name} must be at least 1, got {value}")
    if args.stage1_scale is not None:
        if not args.stage1_scale > 0:  # NaN too
            p.error(f"--stage1-scale must be positive, got {args.stage1_scale}")
        if args.iters1 is not None:
            p.error("--stage1-scale and --iters1 both set stage 1's length: give one")
    if args.iters2 is not None and args.iters2 < 0 or args.test_interval < 0:
        p.error("--iters2 and --test-interval must be >= 0")
    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        p.error(f"--cuda-graphs needs a GPU (--device cuda), not --device {args.device}")
    seeds = args.seeds or [None]
    if len(set(seeds)) != len(seeds):
        p.error("--seeds: repeated seed")
    if args.stage1_seed is not None and not args.seeds:
        p.error("--stage1-seed needs --seeds (the stage-2 seeds)")
    claim_folder(args.out, "reproduce.py")  # a second run into the same folder stops here
    results = {name: [] for name, _ in configs}
    histories, chance = {}, None
    start = time.time()
    for count, split in enumerate(split_ids, 1):
        db = os.path.join(args.out, f"split{split:02d}", "db")
        print(f"== split {split + 1}/{n_splits}: converting" if args.split_ids is None else
              f"== split {split + 1} (--split-ids {split}; {count}/{n_splits}): converting", flush=True)
        before = converted_options(db)
        try:
            convert(args.dataset, args.raw_dir, db, split, args.val_ids, args.input_size)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        after = converted_options(db)
        if before is not None and before != after:
            changed = ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
                                if before.get(k) != after.get(k))
            print(f"   note: {db} held this split converted with other options ({changed}): the stages "
                  "trained on those records are not reused (their manifests name the records)", flush=True)
        if args.convert_only:
            continue
        for seed in seeds:
            split_dir = os.path.join(args.out, f"split{split:02d}", *([] if seed is None else [f"seed{seed}"]))
            for name, weights3 in configs:
                tag = run_tag(args, uses_low=bool(weights3[2])) + scale_tag(args)
                if args.stage1_seed is not None:
                    tag += f"_stage1seed{args.stage1_seed}"
                where = f"split {split + 1}" + ("" if seed is None else f", seed {seed}") + f", {name}{tag}"
                try:
                    weights, history, machines = train_both_stages(args, db, split_dir, name, weights3, seed,
                                                                   stage1, stage2, where, tag)
                except (TrainingError, CaffeFormatError, NetDefinitionError, FileNotFoundError) as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                except Stopped as exc:
                    print(f"{exc}; the finished runs are in {os.path.join(args.out, args.name + '.json')}",
                          file=sys.stderr)
                    return 130
                row, feats = evaluate(args.dataset, db, weights, args.device, args.repeats, args.seed + split,
                                      args.input_size)
                if chance is None:
                    chance = chance_level(args.dataset, feats, args.seed)
                results[name].append(dict(row, split=split, seed=seed, weights=weights,
                                          stage1_seed=seed if args.stage1_seed is None else args.stage1_seed,
                                          trained_on=machines))
                histories[where] = history
                write_results(args, split_ids, seeds, results, chance, histories)  # a crash loses nothing
                draw(args, histories)
                print(f"   {where}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()), flush=True)

    if args.convert_only:
        print(f"converted {n_splits} split(s) into {args.out}", flush=True)
        return 0
    summary = write_results(args, split_ids, seeds, results, chance, histories)
    paper, keys = PAPER[args.dataset], list(next(iter(summary.values()))["mean"])
    runs = n_splits * len(seeds)
    print(f"\n{described(args)}, {n_splits} split(s) x {len(seeds)} seed(s), "
          f"{time.time() - start:.0f} s; in %" + ("; mean +- sample standard deviation over the runs"
                                                  if runs > 1 else ""))
    print(f"{'':<22}" + "".join(f"{k:>16}" for k in keys))
    for name, entry in summary.items():
        mean, std = entry["mean"], entry["std"]
        cells = [f"{mean[k]:>9.1f} +- {std[k]:>3.1f}" if runs > 1 else f"{mean[k]:>16.1f}" for k in keys]
        print(f"{'ours: ' + name + run_tag(args, name in ('cls+low', 'all')):<22}" + "".join(cells))
    print(f"{'chance':<22}" + "".join(f"{100 * chance[k]:>16.1f}" if k in chance else f"{'-':>16}" for k in keys))
    print(f"{'paper: all':<22}" + "".join(f"{paper[k]:>16.1f}" if k in paper else f"{'-':>16}" for k in keys))
    for paired, what in ((paired_differences(summary, keys), "the NCC loss, paired (same stage-1 weights)"),
                         (paired_differences(summary, keys, HIGH_PAIRS),
                          "the high-level loss, paired (same split, seed and order of pairs; stage 1 differs)"),
                         (interaction_differences(summary, keys),
                          "the two losses' interaction (0 where their effects add up)")):
        if not paired:
            continue
        spread = any(entry["n"] > 1 for entry in paired.values())
        print(f"\n{what}, in percentage points: mean"
              + (" +- sample standard deviation [95% interval]" if spread else ""))
        for name, entry in paired.items():
            cells = []
            for k in keys:
                e = entry[k]
                cells.append(f"{k} {e['mean']:+.1f}" + ("" if e["std"] is None else
                             f" +- {e['std']:.1f} [{e['ci95'][0]:+.1f}, {e['ci95'][1]:+.1f}]"))
            e = entry[keys[0]]
            tests = "" if e["std"] is None else f" ({keys[0]}: {p_values_text(e)})"
            print(f"{name} ({entry['n']} pair(s)): " + "; ".join(cells) + tests)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
