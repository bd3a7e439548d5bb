#!/usr/bin/env python
"""Markdown tables from the results JSON of tools/reproduce.py (and optionally a sweep.json of
tools/sweep_stage2.py), as docs/RESULTS.md shows them.

    python tools/results_tables.py RESULTS.json [RESULTS2.json ...] [--sweep SWEEP.json]

* Loss sets: mean +- sample standard deviation over the runs (splits x seeds) of rank-1/5/10/20
  (and mAP where measured), in %, beside the chance level and the paper's figure.
* Per run: the validation rank-1 at the end of stage 1 and of stage 2, and the test rank-1 of each
  loss set; the paired effect of the NCC loss (all - cls+high, cls+low - cls) per run and its mean,
  sample standard deviation and 95% t-interval.
* Several JSON files: their runs are listed one after another (each file's own summary is kept
  separate; nothing is averaged across files).
* --sweep: the sweep's configurations with their validation figures.
Reads only; prints to standard output.
"""
import argparse
import json
import sys

from mspcnn.cli import run
from mspcnn.evaluation import NCC_PAIRS, paired_summary

KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP")


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None


def fmt(mean, sd=None):
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"


def summary_table(record, name):
    ours = record.get("ours") or {}
    if not ours:
        raise ValueError(f"{name}: no finished runs (\"ours\" is empty)")
    keys = [k for k in KEYS if k in next(iter(ours.values()))["mean"]]
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


def per_run_rows(record):
    """{(split, seed): {loss set: run row}} and the validation rank-1 at the end of each stage."""
    runs, val = {}, {}
    curves = record.get("learning_curves") or {}
    for loss_set, entry in record["ours"].items():
        for r in entry["runs"]:
            runs.setdefault((r["split"], r["seed"]), {})[loss_set] = r
    for label, history in curves.items():
        for (split, seed), sets in runs.items():
            for loss_set in sets:
                if label.startswith(f"split {split + 1}") and (seed is None or f"seed {seed}," in label) \
                        and label.split(", ")[-1].split("_")[0] == loss_set:
                    val[(split, seed, loss_set)] = (last_val(history, 1), last_val(history, 2))
    return runs, val


def paired_lines(all_runs):
    lines = []
    for with_low, without in NCC_PAIRS:
        d = [100 * (sets[with_low]["rank1"] - sets[without]["rank1"]) for sets in all_runs
             if with_low in sets and without in sets]
        if not d:
            continue
        text = f"{with_low} − {without}, rank-1, {len(d)} paired run(s): " + ", ".join(f"{x:+.1f}" for x in d)
        e = paired_summary(d)
        if e["std"] is not None:
            text += (f"; mean {e['mean']:+.1f} ± {e['std']:.1f} points, 95% interval "
                     f"[{e['ci95'][0]:+.1f}, {e['ci95'][1]:+.1f}]")
        lines.append(text)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files of tools/reproduce.py")
    p.add_argument("--sweep", help="a sweep.json of tools/sweep_stage2.py")
    args = p.parse_args(argv)
    records = [(path, load(path)) for path in args.results]
    all_runs = []
    for path, record in records:
        print(f"{path}: {record.get('dataset')}, recipe {record.get('recipe')}, in %\n")
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
            all_runs.append(row)
        print()
    for line in paired_lines(all_runs):
        print(line)
    if args.sweep:
        sweep = load(args.sweep)
        print(f"\n{args.sweep}: validation identities only, one seed ({sweep.get('seed')})\n")
        print("| configuration | val rank-1 | val mAP | final training loss | seconds |")
        print("|---|---:|---:|---:|---:|")
        for r in sweep["runs"]:
            mark = " (chosen)" if r["name"] == sweep.get("best") else ""
            print(f"| {r['name']}{mark} | {100 * r['val']['rank1']:.1f} | {100 * r['val']['mAP']:.1f} | "
                  f"{r['loss']:.3f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
