#!/usr/bin/env python
"""Markdown tables from the results JSON of tools/reproduce.py (and optionally a sweep.json of
tools/sweep_stage2.py), as docs/RESULTS.md shows them.

    python tools/results_tables.py RESULTS.json [RESULTS2.json ...] [--sweep SWEEP.json] [--own-stage1]
                                   [--against BASELINE.json ...] [--curves] [--validation] [--digits N]
                                   [--reruns-once]

* Each file's heading: the dataset, the recipe and what its runs set away from the recipe
  (--stage1-scale, --iters1/2, rates, the NCC loss's parameters, TF32).
* Loss sets: mean +- sample standard deviation over the runs (splits x seeds) of rank-1/5/10/20
  (and mAP where measured), in %, beside the chance level and the paper's figure.
* Per run: the validation rank-1 at the end of stage 1 and of stage 2, and the test rank-1 of each
  loss set; the paired effect of the NCC loss (all - cls+high, cls+low - cls) per run and its mean,
  sample standard deviation, 95% t-interval and two-sided p-values (t-test; Wilcoxon signed-rank
  test, exact, which needs no normal differences but cannot go below 2/2^n with n pairs) for rank-1,
  then the other ranks' means and intervals;
  likewise the high-level loss's (cls+high - cls, all - cls+low: the same split, seed and order of
  training pairs, but not the same stage 1, since that loss trains in both stages).
  Over the runs with all four loss sets, the interaction of the two losses: (all - cls+high) -
  (cls+low - cls) per run, 0 where their effects add up.
  Where the runs record the machines that trained them ("trained_on"), a "Trained on:" line.
* Several JSON files: each file's tables and paired effect, then the runs of all files pooled (the
  loss sets' mean +- standard deviation and the paired effect over every run) when the files are
  runs of one experiment: the same dataset, recipe and training settings (input size, validation
  identities, the NCC loss's parameters, stage 2's rate, iterations, batch, TF32, gallery draws)
  and no run twice (a run: split, seed, stage-1 seed and loss set). Otherwise it says why it does
  not pool them.
* --reruns-once: a run in two files that record the same figures for it (a rerun that reproduced
  it, as the same command on the same kind of CPU can) counts once in the pooled runs, and the
  output names it; without it such files are not pooled, and a run with different figures in two
  files never is.
* --own-stage1: only the runs whose stage 1 was trained with their own seed (stage-1 seed = seed;
  runs written before --stage1-seed existed record none and always were), so that a loss set's spread
  and the paired effect include stage 1's seed-to-seed spread. Runs that share one stage 1 across
  stage-2 seeds (reproduce.py --stage1-seed) are left out, except the one whose seed is that stage
  1's.
* --against BASELINE.json ...: the same runs under other settings (e.g. the recipe's, against files of
  --stage1-scale 2): each group pooled as above, then the paired difference (files − baseline) run by
  run, matched by split, seed, stage-1 seed and loss set, with its mean, sample standard deviation
  and 95% t-interval (rank-1 with its p-values, then the other ranks), the settings that differ, and
  the runs without a partner. Both groups must be runs on the same test (dataset, gallery draws).
* --curves: each file's learning curves: validation rank-1 at each tenth of stage 1 (the nearest
  validation point), the mean of each stage's last three validation points (rank-1 and mAP) and
  stage 1's last logged training loss, so that runs of different lengths are compared at the same
  share.
* --digits N: decimals of the paired differences, their means, deviations and intervals (default 1;
  2 shows effects of a tenth of a point or less, such as the NCC loss's, which 1 rounds to +0.0).
* --validation: the same paired effects on validation identities, each run's figure the mean of
  stage 2's last three validation points (rank-1, and mAP where all three have it), per file and
  pooled: the end of training measured on held-out training identities, less noisy than one point.
* --sweep: the sweep's configurations with their validation figures (and, for a sweep scored with
  --score-last K, the mean of each configuration's last K validation points, which chose).
Reads only; prints to standard output.
"""
import argparse
import json
import math
import sys

from mspcnn.cli import run
from mspcnn.evaluation import (HIGH_PAIRS, NCC_PAIRS, figure_differences, interaction_pairs, loss_set_groups,
                               matched_pairs, p_values_text, paired_summary, run_summary)
from mspcnn.runtime import machine_text

KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP")
# reproduce.py's options that change what a run computes: files pool only when they agree on these
# (the device and the validation interval do not change the recipe; TF32 changes the arithmetic).
SETTINGS = ("input_size", "val_ids", "w_low", "pos_floor", "neg_ceiling", "balance_pairs", "lr2", "bn_maf",
            "iters1", "stage1_scale", "iters2", "batch_pairs", "base_lr", "tf32", "repeats")


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None


def load_results(path):
    """A results JSON of reproduce.py, checked for what the tables read (ValueError naming the file
    and the entry otherwise)."""
    record = load(path)
    if not isinstance(record, dict) or not isinstance(record.get("ours"), dict):
        raise ValueError(f"{path}: not a results JSON of tools/reproduce.py (no \"ours\" object)")
    for loss_set, entry in record["ours"].items():
        where = f"{path}: \"ours\" / {loss_set!r}"
        if not isinstance(entry, dict) or not all(k in entry for k in ("n", "mean", "std", "runs")):
            raise ValueError(f"{where}: needs \"n\", \"mean\", \"std\" and \"runs\"")
        for r in entry["runs"]:
            if not isinstance(r, dict) or not all(k in r for k in ("split", "seed", "rank1")):
                raise ValueError(f"{where}: a run without \"split\", \"seed\" or \"rank1\": {r!r}")
    return record


def summary(runs):
    """run_summary over the figures every run has (mAP only where all measured it)."""
    return run_summary(runs, [k for k in KEYS if all(k in r for r in runs)])


def stage1_seed(run):
    """The seed a run's stage 1 was trained with. Files written before it was recorded trained stage 1
    with the run's own seed, so a run without it reads as its own seed's (and an older and a newer
    record of one run are the same run)."""
    return run.get("stage1_seed", run["seed"])


def own_stage1(record):
    """The record with only the runs whose stage 1 was trained with their own seed, and each loss
    set's mean and spread recomputed over them (a loss set left with no run is dropped)."""
    ours = {}
    for loss_set, entry in record["ours"].items():
        runs = [r for r in entry["runs"] if stage1_seed(r) == r["seed"]]
        if runs:
            ours[loss_set] = summary(runs)
    return {**record, "ours": ours}


def keep_own_stage1(records, name):
    """own_stage1 of each (path, record), the records left with no run dropped: (kept, the dropped
    paths); a ValueError naming ``name`` when none is left."""
    records = [(path, own_stage1(record)) for path, record in records]
    kept = [(path, record) for path, record in records if record["ours"]]
    if not kept:
        raise ValueError(f"--own-stage1: none of {name} has a run whose stage 1 was trained with its own seed")
    return kept, [path for path, record in records if not record["ours"]]


def fmt(mean, sd=None):
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"


def summary_table(record, name, ours=None):
    """The loss sets' table; ``ours`` (default: the record's own) as reproduce.py writes it."""
    ours = ours if ours is not None else record.get("ours") or {}
    if not ours:
        raise ValueError(f"{name}: no finished runs (\"ours\" is empty)")
    keys = [k for k in KEYS if all(k in entry["mean"] for entry in ours.values())]
    lines = ["| loss set | runs | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for loss_set, entry in ours.items():
        n = entry["n"]
        lines.append(f"| {loss_set} | {n} | " + " | ".join(
            fmt(entry["mean"][k], entry["std"][k] if n > 1 else None) for k in keys) + " |")
    chance = record.get("chance") or {}
    lines.append("| chance | | " + " | ".join(fmt(chance[k]) if k in chance else "" for k in keys) + " |")
    paper = record.get("paper") or {}
    lines.append("| paper (all) | | " + " | ".join(fmt(paper[k]) if k in paper else "" for k in keys) + " |")
    return lines


def last_val(history, stage):
    tests = [h for h in history if h.get("kind") == "test" and h.get("stage") == stage]
    return 100 * tests[-1]["rank1"] if tests else None


def machines_line(record):
    """"Trained on: ..." from the runs' "trained_on" (written by reproduce.py since 2026-12-07:
    the machine of each part of each stage): each machine with the number of runs it trained a
    stage or a part of, and the runs trained on more than one; None where no run records it. A
    training is bit-for-bit repeatable only on the same kind of machine (README, reproduce.py)."""
    counts, mixed, unrecorded = {}, 0, 0
    for entry in record["ours"].values():
        for run_ in entry["runs"]:
            stages = run_.get("trained_on")
            if not isinstance(stages, dict):
                unrecorded += 1
                continue
            texts = dict.fromkeys(machine_text(m) if isinstance(m, dict) else "a machine not recorded"
                                  for parts in stages.values() if isinstance(parts, list) for m in parts)
            for text in texts:
                counts[text] = counts.get(text, 0) + 1
            mixed += len(texts) > 1
    if not counts:
        return None
    items = [f"{text} ({n} run{'s' if n != 1 else ''})" for text, n in counts.items()]
    if unrecorded:
        items.append(f"{unrecorded} run(s) without a record")
    return "Trained on: " + "; ".join(items) + (f"; {mixed} run(s) on more than one machine" if mixed else "")


def run_curves(record, runs):
    """{(split, seed, loss set): learning curve} for the runs ``runs`` ({(split, seed): {loss set:
    run}}) whose curve the record holds."""
    found = {}
    for label, history in (record.get("learning_curves") or {}).items():
        # reproduce.py's label: "split N[, seed S], LOSS_SET[_TAG]" (N counted from 1); its parts are
        # compared whole, so that "split 1" is not taken for "split 10"
        parts = label.split(", ")
        for (split, seed), sets in runs.items():
            for loss_set in sets:
                if parts[0] == f"split {split + 1}" and (seed is None or f"seed {seed}" in parts[1:-1]) \
                        and parts[-1].split("_")[0] == loss_set:
                    found[(split, seed, loss_set)] = history
    return found


def per_run_rows(record):
    """{(split, seed): {loss set: run row}} and the validation rank-1 at the end of each stage."""
    runs = loss_set_groups(((loss_set, r) for loss_set, entry in record["ours"].items() for r in entry["runs"]),
                           lambda r: (r["split"], r["seed"]))
    val = {key: (last_val(history, 1), last_val(history, 2)) for key, history in run_curves(record, runs).items()}
    return runs, val


def validation_runs(record):
    """{(split, seed, stage-1 seed, loss set): run}, each run's validation figure where its learning
    curve has stage-2 validation points: "rank1" (and "mAP" where the last three all have one) the
    mean of stage 2's last three validation points, as a fraction like the test's figures, so that
    the paired effects read them as they read the test's. Runs without a curve or without stage-2
    points are left out."""
    runs, _ = per_run_rows(record)
    out = {}
    for (split, seed, loss_set), history in run_curves(record, runs).items():
        points = validation_points(history, 2)
        rank1, m_ap = mean_last3(points, "rank1"), mean_last3(points, "mAP")
        if rank1 is None:
            continue
        run = {"split": split, "seed": seed, "rank1": rank1 / 100}
        if m_ap is not None:
            run["mAP"] = m_ap / 100
        out[(split, seed, stage1_seed(runs[(split, seed)][loss_set]), loss_set)] = run
    return out


def validation_lines(runs, digits=1):
    """The paired effects (:func:`paired_lines`) on validation of ``runs`` (:func:`validation_runs`,
    of one file or several pooled), each line marked "validation"."""
    groups = {}
    for key, run in runs.items():
        groups.setdefault(key[:3], {})[key[3]] = run
    return paired_lines(list(groups.values()), digits, prefix="validation, ")


def effect_lines(label, pairs, digits=1):
    """The paired effect of ``pairs`` [(run, partner)]: each rank-1 difference (run − partner), their
    mean, sample standard deviation, 95% t-interval and two-sided p-values (t-test, exact Wilcoxon
    signed-rank test), then the other ranks' (two pairs or more); figures in points to ``digits``
    decimals."""
    n = digits
    d = [100 * (a["rank1"] - b["rank1"]) for a, b in pairs]
    text = f"{label}, rank-1, {len(d)} paired run(s): " + ", ".join(f"{x:+.{n}f}" for x in d)
    e = paired_summary(d)
    if e["std"] is not None:
        text += (f"; mean {e['mean']:+.{n}f} ± {e['std']:.{n}f} points, 95% interval "
                 f"[{e['ci95'][0]:+.{n}f}, {e['ci95'][1]:+.{n}f}]; {p_values_text(e)}")
    lines, others = [text], []
    for k in KEYS[1:]:
        if len(pairs) < 2 or not all(k in a and k in b for a, b in pairs):
            continue
        e = paired_summary([100 * (a[k] - b[k]) for a, b in pairs])
        others.append(f"{k} {e['mean']:+.{n}f} ± {e['std']:.{n}f} [{e['ci95'][0]:+.{n}f}, {e['ci95'][1]:+.{n}f}]")
    if others:
        what = "the other ranks" if any(o.startswith("rank") for o in others) else "mAP"
        lines.append(f"{label}, {what}: " + ", ".join(others))
    return lines


def paired_lines(all_runs, digits=1, prefix=""):
    """The paired effect of the NCC loss, then of the high-level loss, over ``all_runs`` [{loss set:
    run}] (the runs of one split, seed and stage-1 seed each), where both loss sets of a pair ran;
    then, over the runs with all four loss sets, the two losses' interaction; each label after
    ``prefix``."""
    lines = []
    for with_it, without in NCC_PAIRS + HIGH_PAIRS:
        pairs = matched_pairs(all_runs, with_it, without)
        if pairs:
            lines += effect_lines(f"{prefix}{with_it} − {without}", pairs, digits)
    # Where all four loss sets ran: does one loss change what the other does? (0 when the effects add up.)
    pairs = interaction_pairs(all_runs, KEYS)
    if pairs:
        (low, plain), (both, high) = NCC_PAIRS  # ("cls+low", "cls"), ("all", "cls+high")
        lines += effect_lines(f"{prefix}interaction, ({both} − {high}) − ({low} − {plain})", pairs, digits)
    return lines


def load_sweep(path):
    """A sweep.json of sweep_stage2.py, checked for what the table reads."""
    sweep = load(path)
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list) or not all(
            isinstance(r, dict) and all(k in r for k in ("name", "val", "loss", "seconds"))
            and isinstance(r["val"], dict) and all(k in r["val"] for k in ("rank1", "mAP")) for r in sweep["runs"]):
        raise ValueError(f"{path}: not a sweep.json of tools/sweep_stage2.py (\"runs\", each with \"name\", "
                         "\"val\" (rank1, mAP), \"loss\" and \"seconds\")")
    return sweep


def settings(record):
    """What a file's runs were trained and measured with, for the pooling check."""
    args = record.get("args") or {}
    out = {"dataset": record.get("dataset"), "recipe": record.get("recipe")}
    out.update({k: args.get(k) for k in SETTINGS})
    out["tf32"] = bool(out["tf32"])  # absent in files written before the option existed: off
    return out


# The settings a run sets away from its recipe when given (None: the recipe's), named in the headings.
OVERRIDES = {"stage1_scale": "stage 1 x {:g}", "iters1": "stage 1 {} iterations", "iters2": "stage 2 {} iterations",
             "base_lr": "base lr {:g}", "lr2": "stage 2 lr {:g}", "w_low": "w_low {:g}", "pos_floor": "pos_floor {:g}",
             "neg_ceiling": "neg_ceiling {:g}", "balance_pairs": "balance_pairs {}"}


def heading(record):
    """'cuhk01-486, recipe cpu64' and the settings its runs set away from the recipe, e.g. ', stage 1 x 2'."""
    args = record.get("args") or {}
    # A value that is not a number (a hand-edited file) is shown as it is, not refused: the heading only reports.
    given = [(fmt if isinstance(args[k], (int, float)) else fmt.replace("{:g}", "{}")).format(args[k])
             for k, fmt in OVERRIDES.items() if args.get(k) is not None]
    given += ["TF32"] if args.get("tf32") else []
    return ", ".join([f"{record.get('dataset')}, recipe {record.get('recipe')}"] + given)


def differing_figures(a, b):
    """The figures (each rank, mAP, the gallery draws...; the weights' path aside) in which two
    records of one run (split, seed, stage-1 seed, loss set) differ, as "key A against B"; none
    where a rerun reproduced it."""
    keys = sorted((set(a) | set(b)) - {"weights", "stage1_seed"})
    return [f"{k} {a.get(k)!r} against {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def pool(records, reruns_once=False):
    """The runs of several files as one "ours" ({loss set: n, mean, std, runs}, in % as reproduce.py
    writes it), their rows by run and the runs counted once; or a ValueError saying why they are not
    one experiment. A run in two files is refused, unless ``reruns_once`` and the two agree in every
    figure (none in :func:`differing_figures`: a rerun that reproduced it, as the same command on the
    same kind of CPU can): then it counts once, and the third value names it and the files."""
    (first, s0), *rest = [(path, settings(r)) for path, r in records]
    for path, s in rest:
        differ = [f"{k} {s0[k]!r} in {first}, {s[k]!r} in {path}" for k in s0 if s[k] != s0[k]]
        if differ:
            raise ValueError("different settings: " + "; ".join(differ))
    seen, ours, rows, once = {}, {}, {}, []
    for path, record in records:
        for loss_set, entry in record["ours"].items():
            for r in entry["runs"]:
                key = (r["split"], r["seed"], stage1_seed(r), loss_set)
                if key in seen:
                    first_path, first_run = seen[key]
                    what = f"the run split {key[0]}, seed {key[1]}, stage-1 seed {key[2]}, {loss_set}"
                    differ = differing_figures(first_run, r)
                    if differ:
                        raise ValueError(f"{what} is in both {first_path} and {path}, with different figures "
                                         f"({', '.join(differ)})")
                    if not reruns_once:
                        raise ValueError(f"{what} is in both {first_path} and {path}, with the same figures "
                                         "(a rerun that reproduced it? --reruns-once counts such a run once)")
                    once.append(f"{what} ({first_path}, {path})")
                    continue
                seen[key] = (path, r)
                ours.setdefault(loss_set, []).append(r)
                rows.setdefault(key[:3], {})[loss_set] = r
    ours = {loss_set: summary(runs) for loss_set, runs in ours.items()}
    return ours, rows, once


def loss_effect(runs, run, with_it, without):
    """A loss's effect on one run (split, seed, stage-1 seed) of ``runs`` {(*run, loss set): figures}:
    the figures of ``with_it`` less those of ``without`` (:func:`figure_differences` over KEYS)."""
    return figure_differences(runs[(*run, with_it)], runs[(*run, without)], KEYS)


def against_lines(group, baseline, digits=1, reruns_once=False):
    """The paired effect of what differs between two groups of files (each [(path, record)], each one
    experiment): group − baseline, run by run, matched by split, seed, stage-1 seed (``stage1_seed``,
    as pool keys it) and loss set, e.g. --stage1-scale 2 against the recipe over the
    same seeds. Raises ValueError when a group is not one experiment, the datasets or gallery draws
    differ, or no run has a partner. Then, where both loss sets of a pair (cls+high and cls, say) ran
    on both sides, how the setting changes that loss's paired effect: (cls+high − cls) in the
    files less (cls+high − cls) in the baseline, run by run. Figures in points to ``digits``
    decimals; ``reruns_once`` as for :func:`pool`."""
    sides = []
    for name, records in (("the files", group), ("the --against files", baseline)):
        try:
            sides.append(pool(records, reruns_once)[1])
        except ValueError as exc:
            raise ValueError(f"--against: {name} are not one experiment: {exc}") from None
    s_group, s_base = settings(group[0][1]), settings(baseline[0][1])
    for k in ("dataset", "repeats"):
        if s_group[k] != s_base[k]:
            raise ValueError(f"--against: the test differs ({k} {s_group[k]!r} against {s_base[k]!r}): "
                             "runs on another test cannot be paired")
    mine, theirs = ({(*run, loss_set): r for run, sets in rows.items() for loss_set, r in sets.items()}
                    for rows in sides)
    common = sorted(set(mine) & set(theirs), key=lambda k: (k[3], k[0], k[1], k[2]))
    if not common:
        raise ValueError("--against: no run of the files has a partner in the --against files (runs are paired "
                         "by split, seed, stage-1 seed and loss set)")
    def shown(value):
        return "the recipe's" if value is None else repr(value)
    differ = [f"{k} {shown(s_group[k])} against {shown(s_base[k])}" for k in s_group if s_group[k] != s_base[k]]
    lines = [f"Against: ({heading(group[0][1])}) − ({heading(baseline[0][1])}), paired by split, seed, stage-1 seed "
             f"and loss set; settings that differ: {'; '.join(differ) or 'none'}", "",
             "| loss set | split | seed | stage-1 seed | rank-1 | against | difference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key in common:
        a, b = 100 * mine[key]["rank1"], 100 * theirs[key]["rank1"]
        lines.append(f"| {key[3]} | {key[0]} | {key[1]} | {key[2]} | {a:.{digits}f} | {b:.{digits}f} | "
                     f"{a - b:+.{digits}f} |")
    lines.append("")
    for loss_set in dict.fromkeys(k[3] for k in common):
        lines += effect_lines(f"{loss_set}, files − against",
                              [(mine[k], theirs[k]) for k in common if k[3] == loss_set], digits)
    # Does the setting change what a loss does? A loss's paired effect (say cls+high − cls) under
    # the files' settings less its effect under the baseline's, over the runs where both loss sets
    # ran on both sides.
    common_set = set(common)
    for with_it, without in NCC_PAIRS + HIGH_PAIRS:
        runs = [k[:3] for k in common if k[3] == with_it and (*k[:3], without) in common_set]
        if runs:
            lines += effect_lines(f"({with_it} − {without}), files − against",
                                  [(loss_effect(mine, r, with_it, without), loss_effect(theirs, r, with_it, without))
                                   for r in runs], digits)
    alone = [f"{k[3]} split {k[0]} seed {k[1]} stage-1 seed {k[2]} ({side})"
             for side, own, other in (("the files", mine, theirs), ("--against", theirs, mine))
             for k in sorted(own, key=str) if k not in other]
    if alone:
        lines.append("Without a partner, left out: " + "; ".join(alone))
    return lines


TENTHS = [i / 10 for i in range(1, 11)]
VALIDATION_NOTE = ("On validation identities (--validation): each run's figure is the mean of stage 2's last "
                   "three validation points, rank-1 and mAP (held-out training identities, not the test).")


def validation_points(history, stage):
    """The validation points of ``stage`` in a learning curve that have a rank-1 (NaN counts as
    none: a score before any statistics); points that are not such records are passed over."""
    return [h for h in history if isinstance(h, dict) and h.get("kind") == "test" and h.get("stage") == stage
            and isinstance(h.get("rank1"), (int, float)) and not math.isnan(h["rank1"])]


def mean_last3(points, key):
    """The mean of points' last three values of key, in %; None without points or where one of
    the three lacks a number there (NaN counts as none: a score before any statistics)."""
    last = [h.get(key) for h in points[-3:]]
    if not last or not all(isinstance(v, (int, float)) and not math.isnan(v) for v in last):
        return None
    return 100 * sum(last) / len(last)


def curve_rows(path, record):
    """Per learning curve of the file: (label, validation rank-1 in % at each tenth of stage 1 as
    [(iteration, value) or None], the mean of each stage's last three validation points' rank-1 and
    their mAP in % (None: no point; for mAP also where one of the three has none), stage 1's last
    logged training loss (None: none)). The point for a tenth is the validation point nearest to
    that share of stage 1's length; None where none lies closer than half a tenth to it (a
    validation interval too coarse for the table). ValueError naming the file and the curve for a
    curve that lacks what this reads."""
    curves = record.get("learning_curves")
    if not isinstance(curves, dict) or not curves:
        raise ValueError(f"{path}: --curves: the file has no \"learning_curves\"")
    number = (int, float)
    rows = []
    for label, history in curves.items():
        if not isinstance(history, list) or not all(
                isinstance(h, dict) and h.get("kind") in ("test", "train") and h.get("stage") in (1, 2)
                and isinstance(h.get("iteration"), number)
                and isinstance(h.get("rank1" if h["kind"] == "test" else "loss"), number) for h in history):
            raise ValueError(f"{path}: learning curve {label!r}: each point needs \"kind\" (test or train), "
                             "\"stage\" (1 or 2), \"iteration\", and \"rank1\" (test) or \"loss\" (train)")
        val = {stage: validation_points(history, stage) for stage in (1, 2)}
        length = max((h["iteration"] for h in history if h["stage"] == 1), default=0)
        at = []
        for share in TENTHS:
            near = min(val[1], key=lambda h: abs(h["iteration"] - share * length), default=None)
            ok = near is not None and abs(near["iteration"] - share * length) < length / 20
            at.append((near["iteration"], 100 * near["rank1"]) if ok else None)
        last3 = [mean_last3(val[s], "rank1") for s in (1, 2)]
        last3_map = [mean_last3(val[s], "mAP") for s in (1, 2)]
        train1 = [h for h in history if h["kind"] == "train" and h["stage"] == 1]
        rows.append((label, at, last3, last3_map, train1[-1]["loss"] if train1 else None))
    return rows


def curve_lines(path, record):
    """The --curves table of one file (curve_rows as Markdown)."""
    def cell(v, digits=1):
        return "–" if v is None else f"{v:.{digits}f}"
    lines = ["Validation rank-1 (%) at each tenth of stage 1 (the nearest validation point; – where none lies "
             "closer than half a tenth), the mean of each stage's last three validation points (rank-1, then mAP: all "
             "images of the held-out identities as queries, so mAP moves in smaller steps than rank-1), and stage 1's "
             "last logged training loss (the solver's average_loss mean). Curves are named as reproduce.py's log names "
             "them, splits counted from 1: curve \"split 1\" is split 0 of the tables above.", "",
             "| curve | iterations | " + " | ".join(f"{t:.1f}" for t in TENTHS)
             + " | last 3, stage 1 | last 3, stage 2 | mAP last 3, stage 1 | mAP last 3, stage 2"
             " | final stage-1 loss |",
             "|---|---|" + "---:|" * (len(TENTHS) + 5)]
    for label, at, last3, last3_map, loss in curve_rows(path, record):
        its = [p[0] for p in at if p is not None]
        span = f"{its[0]:,} ... {its[-1]:,}" if its else "–"
        lines.append(f"| {label} | {span} | " + " | ".join(cell(p and p[1]) for p in at)
                     + f" | {cell(last3[0])} | {cell(last3[1])} | {cell(last3_map[0])} | {cell(last3_map[1])}"
                     f" | {cell(loss, 2)} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files of tools/reproduce.py")
    p.add_argument("--sweep", help="a sweep.json of tools/sweep_stage2.py")
    p.add_argument("--own-stage1", action="store_true",
                   help="only the runs whose stage 1 was trained with their own seed (stage-1 seed = seed)")
    p.add_argument("--against", nargs="+", metavar="BASELINE.json",
                   help="results JSON files of the same runs under other settings: the paired difference, run by run")
    p.add_argument("--curves", action="store_true",
                   help="each file's learning curves: validation rank-1 at each tenth of stage 1, the mean of each "
                        "stage's last three validation points (rank-1 and mAP), stage 1's final training loss")
    p.add_argument("--validation", action="store_true",
                   help="the paired effects on validation identities too: the mean of stage 2's last three "
                        "validation points (rank-1 and mAP) of each run, per file and pooled")
    p.add_argument("--reruns-once", action="store_true",
                   help="pool files that share a run when both record the same figures for it (a rerun that "
                        "reproduced it), counting it once; without it such files are not pooled")
    p.add_argument("--digits", type=int, default=1,
                   help="decimals of the paired differences (default 1; 0 to 4; 2 for effects of a tenth of a point)")
    args = p.parse_args(argv)
    if not 0 <= args.digits <= 4:
        p.error(f"--digits must be 0 to 4, got {args.digits}")
    records = [(path, load_results(path)) for path in args.results]
    baseline = [(path, load_results(path)) for path in args.against or []]
    sweep = load_sweep(args.sweep) if args.sweep else None  # all checked before anything is printed
    left_out = []
    if args.own_stage1:
        records, left_out = keep_own_stage1(records, "the files")
        if baseline:
            baseline, _ = keep_own_stage1(baseline, "the --against files")
    # checked before anything is printed
    against = against_lines(records, baseline, args.digits, args.reruns_once) if baseline else None
    curves = {path: curve_lines(path, record) for path, record in records} if args.curves else {}
    for path in left_out:
        print(f"{path}: left out, no run has a stage 1 trained with its own seed "
              "(its runs share the stage 1 of another seed: --stage1-seed)\n")
    # each file's runs on validation (--validation), printed per file and pooled below
    val_runs = {path: validation_runs(record) for path, record in records} if args.validation else {}
    for path, record in records:
        print(f"{path}: {heading(record)}, in %\n")
        print("\n".join(summary_table(record, path)) + "\n")
        runs, val = per_run_rows(record)
        sets = list(record["ours"])
        print("| split | seed | " + " | ".join(f"{s}: val end of stage 1 / 2, test rank-1" for s in sets) + " |")
        print("|---:|---:|" + "---|" * len(sets))
        for (split, seed), row in runs.items():
            cells = []
            for s in sets:
                if s not in row:
                    cells.append("")
                    continue
                v1, v2 = val.get((split, seed, s), (None, None))
                cells.append(" / ".join("–" if v is None else f"{v:.1f}" for v in (v1, v2))
                             + f", **{100 * row[s]['rank1']:.1f}**")
            print(f"| {split} | {seed} | " + " | ".join(cells) + " |")
        print()
        machines = machines_line(record)
        if machines:
            print(machines + "\n")
        for line in paired_lines(list(runs.values()), args.digits):
            print(line)
        print()
        if args.validation:
            print(VALIDATION_NOTE + "\n")
            print("\n".join(validation_lines(val_runs[path], args.digits) or ["(no pair on validation)"]))
            print()
        if path in curves:
            print("\n".join(curves[path]) + "\n")
    if len(records) > 1:
        try:
            ours, rows, once = pool(records, args.reruns_once)
        except ValueError as exc:
            print(f"Not pooled: {exc}.")
        else:
            print(f"Pooled: the runs of the {len(records)} files together ({heading(records[0][1])}), in %\n")
            if once:
                print("Counted once (--reruns-once; the same figures in both files): " + "; ".join(once) + "\n")
            print("\n".join(summary_table(records[0][1], "pooled", ours)) + "\n")
            for line in paired_lines(list(rows.values()), args.digits):
                print(line)
            if args.validation:
                pooled = {}
                for path, _ in records:  # a run counted once (--reruns-once) is the first file's
                    for key, run in val_runs[path].items():
                        pooled.setdefault(key, run)
                print("\n" + VALIDATION_NOTE + "\n")
                print("\n".join(validation_lines(pooled, args.digits) or ["(no pair on validation)"]))
    if against:
        print()
        print("\n".join(against))
    if sweep:
        print(f"\n{args.sweep}: validation identities only, one seed ({sweep.get('seed')})\n")
        last = sweep.get("score_last", 1)
        scored = last > 1 and all(isinstance(r.get("score"), dict) for r in sweep["runs"])
        if scored:  # chosen by the mean of the last points: show it beside the final point
            its = sweep["runs"][0]["score"].get("iterations") or ["?"]
            print(f"(chosen by the mean of the last {last} validation points, iterations {its[0]}-{its[-1]})\n")
        extra = " mean of last points: rank-1 | mAP |" if scored else ""
        print("| configuration | val rank-1 | val mAP |" + extra + " final training loss | seconds |")
        print("|---|---:|---:|" + ("---:|---:|" if scored else "") + "---:|---:|")
        for r in sweep["runs"]:
            mark = " (chosen)" if r["name"] == sweep.get("best") else ""
            cells = f" {100 * r['score']['rank1']:.1f} | {100 * r['score']['mAP']:.1f} |" if scored else ""
            print(f"| {r['name']}{mark} | {100 * r['val']['rank1']:.1f} | {100 * r['val']['mAP']:.1f} |{cells} "
                  f"{r['loss']:.3f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
