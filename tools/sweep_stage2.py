#!/usr/bin/env python
"""Sweep stage 2's free parameters (the NCC loss's weight and thresholds, the stage-2 learning rate)
from one set of stage-1 weights, scored on the validation identities only.

    python tools/sweep_stage2.py --data DB_DIR --weights STAGE1.caffemodel
                                 [--solver prototxt_equiv/solver_cuhk01_cpu_stage2.prototxt]
                                 --set w_low=1,0,0.5,2 --set pos_floor=-1,0.3 [--set neg_ceiling=1,0.6]
                                 [--set balance_pairs=0,1]
                                 [--set lr=0.0016,0.005] [--mode one-at-a-time|grid] [--iters N]
                                 [--batch-pairs 16] [--seed 0] [--device cpu] [--out runs/sweep]
                                 [--val-every N --score-last K]  # score the mean of the last K points
                                 [--input-size 64x24 --bn-maf 0.9972]   # the cpu64 recipe's stage 2

Each configuration edits a copy of the net the solver names (NCCLoss loss_weight, pos_floor,
neg_ceiling, balance_pairs; written to OUT/<config>/net.prototxt) and the solver's base_lr, trains
stage 2 from --weights with mspcnn.engine.solve, and scores the result on DB_DIR's `val` split
(identities held out from training; cross-camera rank-1 and mAP of L2-normalised fc7_bn features).
The test identities are never read. The first value of each --set is the baseline: `one-at-a-time`
(default) varies one parameter at a time from it, `grid` tries every combination. w_low=0 is stage
2 without the NCC loss (the same iterations and rate), the reference the NCC loss has to beat.

By default each configuration is validated once, at its end. Validation on a few hundred queries
swings by several points between neighbouring checkpoints, so one point can choose by chance: with
--val-every N it also validates every N iterations, and with --score-last K a configuration's
score is the mean rank-1 (and mAP, the tie-break) of its last K validation points. Validation does
not change training (the weights are the same with and without --val-every).

Writes OUT/sweep.json (every configuration, its validation figures and learning curve) after each
run, and prints a table with the best configuration by its score (validation rank-1, then mAP).
Run again with the same --out, it resumes: a configuration already in OUT/sweep.json is reused (and
says so) when the data, weights, solver, seed, iterations, batch, input size, BatchNorm setting and
validation interval recorded with it match and its weights and net file are there unchanged; any
other is trained again. One seed per configuration: differences of a few points are within the
noise of 200 validation queries and of the training seed; the table says how many queries the
figures rest on.
"""
import argparse
import itertools
import json
import os
import sys
import time

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.caffe.io import CaffeFormatError, atomic_write
from mspcnn.cli import add_device_argument, add_input_size_argument, check_numbers, run
from mspcnn.runtime import add_threads_argument, add_workers_argument, configure_threads
from mspcnn.engine import TrainingError, solve
from mspcnn.paths import PROTOTXT_DIR
from mspcnn.train_net import NetDefinitionError, edit_net, resolve_net_path

PARAMS = ("w_low", "pos_floor", "neg_ceiling", "balance_pairs", "lr")


def parse_set(text):
    name, sep, values = text.partition("=")
    if not sep or name not in PARAMS:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected NAME=V1,V2,... with NAME one of {', '.join(PARAMS)}")
    try:
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--set {text!r}: values must be numbers") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"--set {text!r}: no values")
    if name == "balance_pairs" and any(v not in (0, 1) for v in vals):
        raise argparse.ArgumentTypeError(f"--set {text!r}: balance_pairs is 0 (off) or 1 (on)")
    try:  # a loss weight and a learning rate are >= 0; the thresholds any finite number
        check_numbers(*((f"--set {name}", v, 0 if name in ("w_low", "lr") else None) for v in vals))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, vals


def configurations(sets, mode):
    """The configurations to run: dicts {param: value}, the baseline first."""
    base = {name: vals[0] for name, vals in sets.items()}
    if mode == "grid":
        names = list(sets)
        return [dict(zip(names, combo)) for combo in itertools.product(*(sets[n] for n in names))]
    out = [base]
    for name, vals in sets.items():
        out += [dict(base, **{name: v}) for v in vals[1:]]
    return out


def previous_runs(path, settings):
    """The configurations of an earlier sweep.json that were run with these settings, by name."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
        return {r["name"]: r for r in old["runs"] if r.get("settings") == settings}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"warning: {path}: unreadable ({exc}); every configuration is trained again", file=sys.stderr)
        return {}


def score(row, last):
    """A run's score: the mean rank-1 and mAP of the last ``last`` scored validation points of its
    history (the final one is ``row["val"]``), with the iterations they came from."""
    points = [h for h in row["history"] if h["kind"] == "test" and h["queries"]][-last:]
    if len(points) < last:
        raise ValueError(f"{row['name']}: {len(points)} validation point(s), fewer than --score-last {last}")
    return {"rank1": sum(p["rank1"] for p in points) / len(points),
            "mAP": sum(p["mAP"] for p in points) / len(points),
            "iterations": [p["iteration"] for p in points]}


def write_sweep(args, sets, rows):
    """OUT/sweep.json with the rows so far, each with its score (the mean of its last
    ``args.score_last`` validation points); returns the best row (score's rank-1, then its mAP)."""
    for r in rows:
        r["score"] = score(r, args.score_last)
    best = max(rows, key=lambda r: (r["score"]["rank1"], r["score"]["mAP"]))
    atomic_write(os.path.join(args.out, "sweep.json"), json.dumps(
        {"data": args.data, "weights": args.weights, "solver": args.solver, "mode": args.mode,
         "seed": args.seed, "sets": sets, "score_last": args.score_last, "runs": rows, "best": best["name"]},
        indent=1), mode="w")
    return best


def tag(config):
    return "_".join(f"{k}{v:g}" for k, v in config.items()) or "baseline"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder written by tools/convert_dataset.py (with val)")
    p.add_argument("--weights", required=True, help="stage-1 weights every configuration starts from")
    p.add_argument("--solver", default=str(PROTOTXT_DIR / "solver_cuhk01_cpu_stage2.prototxt"),
                   help="the stage-2 solver (default: the CUHK01 CPU recipe's)")
    p.add_argument("--set", dest="sets", action="append", type=parse_set, required=True,
                   help="PARAM=V1,V2,... (w_low, pos_floor, neg_ceiling, balance_pairs 0 or 1, lr); the first value "
                   "is the baseline")
    p.add_argument("--mode", choices=("one-at-a-time", "grid"), default="one-at-a-time",
               help="one-at-a-time (default) or grid")
    p.add_argument("--iters", type=int, help="stage-2 iterations (default: the solver's max_iter)")
    p.add_argument("--batch-pairs", type=int, default=16, help="pairs per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every configuration")
    add_device_argument(p)
    add_workers_argument(p)
    p.add_argument("--bn-maf", type=float, help="every BatchNorm's moving_average_fraction (default: the "
                   "net's; 0.986 for the CPU recipe, as tools/reproduce.py --recipe cpu)")
    add_input_size_argument(p, default=None, help="the network's input, height x width (default: the net's "
                            "Input layer's, [1]'s 144x56); the size the data were converted for and the stage-1 "
                            "weights trained at, e.g. 64x24 for tools/reproduce.py --recipe cpu64")
    p.add_argument("--val-every", type=int, metavar="N", help="also validate every N iterations (default: only at the end); "
                   "the points --score-last averages")
    p.add_argument("--score-last", type=int, default=1, metavar="K", help="score a configuration by the mean of its last K "
                   "validation points (default 1: the final one); needs --val-every with K points")
    p.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    print(f"cpu: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    sets = dict(args.sets)
    if len(sets) != len(args.sets):
        p.error("--set: a parameter is given twice")
    if args.iters is not None and args.iters < 1 or args.batch_pairs < 1:
        p.error("--iters and --batch-pairs must be at least 1")
    if args.val_every is not None and args.val_every < 1 or args.score_last < 1:
        p.error("--val-every and --score-last must be at least 1")
    if args.bn_maf is not None and not 0 <= args.bn_maf < 1:
        p.error(f"--bn-maf must be in [0, 1), got {args.bn_maf}")
    if not os.path.isfile(os.path.join(args.data, "val.json")):
        p.error(f"--data {args.data}: no val split (convert with --val-ids > 0); the sweep scores on it")
    try:
        sp = cio.read_prototxt(args.solver, proto.SolverParameter)
        base_net = cio.read_net(resolve_net_path(sp.net, args.solver))
    except (CaffeFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not any(lp.type == "NCCLoss" for lp in base_net.layer):
        print(f"error: {sp.net}: the net has no NCCLoss layer to sweep", file=sys.stderr)
        return 2
    configs = configurations(sets, args.mode)
    iters = args.iters or sp.max_iter
    if args.val_every is not None and iters % args.val_every:
        p.error(f"--val-every {args.val_every} must divide the {iters} iterations (so the last point is the end)")
    if args.score_last > 1 and (args.val_every is None or iters // args.val_every < args.score_last):
        p.error(f"--score-last {args.score_last} needs that many validation points: --val-every N with "
                f"N <= {iters // args.score_last} ({iters} iterations)")
    settings = {"data": args.data, "weights": args.weights, "solver": args.solver, "seed": args.seed,
                "iters": iters, "batch_pairs": args.batch_pairs, "bn_maf": args.bn_maf}
    if args.input_size is not None:  # (recorded only when given, so earlier sweeps stay reusable)
        settings["input_size"] = list(args.input_size)
    if args.val_every is not None:  # (the same; a run with the points can be rescored with another K)
        settings["val_every"] = args.val_every
    done = previous_runs(os.path.join(args.out, "sweep.json"), settings)
    rows, start = [], time.time()
    for k, config in enumerate(configs):
        name = tag(config)
        folder = os.path.join(args.out, name)
        net = proto.NetParameter()
        net.CopyFrom(base_net)
        edit_net(net, bn_maf=args.bn_maf, ncc={key: config.get(key) for key in PARAMS if key != "lr"})
        os.makedirs(folder, exist_ok=True)
        net_path = os.path.join(folder, "net.prototxt")
        old = done.get(name)
        if old is not None and old["config"] == config and os.path.isfile(old["weights"]) \
                and os.path.isfile(net_path) and cio.read_net(net_path) == net:
            print(f"== [{k + 1}/{len(configs)}] {name}: reused from {args.out}/sweep.json "
                  f"(final val rank-1 {100 * old['val']['rank1']:.1f}%)", flush=True)
            rows.append(old)
            best = write_sweep(args, sets, rows)
            continue
        cio.write_prototxt(net, net_path)
        print(f"== [{k + 1}/{len(configs)}] {name}", flush=True)
        try:
            result = solve(sp, args.data, weights=args.weights, device=args.device, net=net_path,
                           batch_pairs=args.batch_pairs, workers=args.workers, input_size=args.input_size,
                           overrides={"max_iter": iters, "base_lr": config.get("lr"), "random_seed": args.seed,
                                      "snapshot": iters, "snapshot_prefix": os.path.join(folder, "stage2"),
                                      "test_interval": args.val_every or iters,
                                      "test_initialization": False})
        except (TrainingError, CaffeFormatError, NetDefinitionError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if result.stopped_by:  # unfinished: not a result, not recorded (a later run trains it again)
            print(f"{name}: stopped by {result.stopped_by} after iteration {result.iterations}; the finished "
                  f"configurations are in {os.path.join(args.out, 'sweep.json')}", file=sys.stderr)
            return 130
        rows.append({"config": config, "name": name, "val": result.test, "loss": result.loss,
                     "weights": result.weights, "seconds": result.seconds, "history": result.history,
                     "settings": settings})
        best = write_sweep(args, sets, rows)
    print(f"\nstage-2 sweep, {len(rows)} configurations, {time.time() - start:.0f} s; validation identities "
          f"only ({rows[0]['val']['queries']} queries), one training seed")
    width = max(len("configuration"), *(len(r["name"]) for r in rows)) + 2
    scored = args.score_last > 1
    head = f"{'configuration':<{width}}{'val rank-1':>12}{'val mAP':>10}"
    if scored:
        its = rows[0]["score"]["iterations"]
        print(f"score: the mean of the last {args.score_last} validation points (iterations {its[0]}-{its[-1]})")
        head += f"{'score rank-1':>14}{'score mAP':>11}"
    print(head + f"{'final loss':>12}")
    for r in rows:
        line = f"{r['name']:<{width}}{100 * r['val']['rank1']:>11.1f}%{100 * r['val']['mAP']:>9.1f}%"
        if scored:
            line += f"{100 * r['score']['rank1']:>13.1f}%{100 * r['score']['mAP']:>10.1f}%"
        print(line + f"{r['loss']:>12.4f}" + ("  <- best" if r is best else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
