"""tools/results_tables.py: the tables of docs/RESULTS.md from reproduce.py's JSON."""
import json


def record(rank1s):
    runs = {s: [{"rank1": r, "rank5": 0.5, "rank10": 0.7, "rank20": 0.9, "split": 0, "seed": seed}
                for seed, r in enumerate(vals)] for s, vals in rank1s.items()}
    ours = {s: {"n": len(v), "runs": v,
                "mean": {k: 100 * sum(r[k] for r in v) / len(v) for k in ("rank1", "rank5", "rank10", "rank20")},
                "std": {k: 0.0 for k in ("rank1", "rank5", "rank10", "rank20")}} for s, v in runs.items()}
    curves = {f"split 1, seed {seed}, {s}": [{"kind": "test", "stage": 1, "rank1": 0.25},
                                             {"kind": "test", "stage": 2, "rank1": 0.3}]
              for s in rank1s for seed in range(len(rank1s[s]))}
    return {"dataset": "cuhk01-100", "recipe": "cpu", "ours": ours, "chance": {"rank1": 1.0},
            "paper": {"rank1": 79.3}, "learning_curves": curves}


def test_tables_and_paired_effect(tmp_path, run_tool):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record({"cls+high": [0.20, 0.22, 0.24], "all": [0.21, 0.22, 0.27]})))
    proc = run_tool("results_tables.py", path)
    assert proc.returncode == 0, proc.stderr
    assert f"{path}: cuhk01-100, recipe cpu, in %" in proc.stdout  # nothing set away from the recipe
    assert "| all | 3 | 23.3 ± " in proc.stdout and "| paper (all) | | 79.3 |" in proc.stdout
    assert "25.0 / 30.0, **27.0**" in proc.stdout  # validation at the end of each stage, test rank-1
    assert "all − cls+high, rank-1, 3 paired run(s): +1.0, +0.0, +3.0; mean +1.3 ± 1.5 points" in proc.stdout
    assert "95% interval [-2.5, +5.1]" in proc.stdout


def test_high_level_loss_paired_across_files(tmp_path, run_tool):
    """cls+high − cls (the high-level loss's effect) from two files of one experiment, pooled; each
    file alone has no pair, and the NCC loss's pairs are absent (no cls+low, no all)."""
    high, cls = tmp_path / "high.json", tmp_path / "cls.json"
    high.write_text(json.dumps(record({"cls+high": [0.20, 0.22, 0.24]})))
    cls.write_text(json.dumps(record({"cls": [0.18, 0.23, 0.20]})))
    proc = run_tool("results_tables.py", high, cls)
    assert proc.returncode == 0, proc.stderr
    head, pooled = proc.stdout.split("Pooled:")
    assert "paired run(s)" not in head and "all − cls+high" not in pooled and "cls+low − cls" not in pooled
    assert "cls+high − cls, rank-1, 3 paired run(s): +2.0, -1.0, +4.0; mean +1.7 ± 2.5 points" in pooled
    assert "cls+high − cls, the other ranks: rank5 +0.0 ± 0.0" in pooled


def test_interaction_where_all_four_loss_sets_ran(tmp_path, run_tool):
    """The 2 x 2 ablation's interaction, (all − cls+high) − (cls+low − cls) per run, only over the
    runs that have all four loss sets."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record({"cls": [0.20, 0.22, 0.24], "cls+low": [0.21, 0.22, 0.24],
                                       "cls+high": [0.25, 0.30, 0.28], "all": [0.27, 0.30, 0.29]})))
    proc = run_tool("results_tables.py", path)
    assert proc.returncode == 0, proc.stderr
    assert ("interaction, (all − cls+high) − (cls+low − cls), rank-1, 3 paired run(s): +1.0, +0.0, +1.0; "
            "mean +0.7 ± 0.6 points") in proc.stdout
    assert "interaction, (all − cls+high) − (cls+low − cls), the other ranks: rank5 +0.0 ± 0.0" in proc.stdout
    three = tmp_path / "three.json"  # no cls+low: the pairs that can be made, no interaction
    three.write_text(json.dumps(record({"cls": [0.20, 0.22, 0.24], "cls+high": [0.25, 0.30, 0.28],
                                        "all": [0.27, 0.30, 0.29]})))
    proc = run_tool("results_tables.py", three)
    assert proc.returncode == 0, proc.stderr
    assert "cls+high − cls, rank-1, 3 paired run(s)" in proc.stdout and "interaction, (" not in proc.stdout


def test_digits_shows_effects_smaller_than_a_tenth(tmp_path, run_tool):
    """--digits 2: paired differences of a few hundredths of a point, which one decimal rounds away."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record({"cls+high": [0.2, 0.22, 0.24], "all": [0.2003, 0.2199, 0.2405]})))
    proc = run_tool("results_tables.py", path)
    assert proc.returncode == 0, proc.stderr
    assert "all − cls+high, rank-1, 3 paired run(s): +0.0, -0.0, +0.1; mean +0.0 ± 0.0 points" in proc.stdout
    proc = run_tool("results_tables.py", path, "--digits", "2")
    assert proc.returncode == 0, proc.stderr
    assert "all − cls+high, rank-1, 3 paired run(s): +0.03, -0.01, +0.05; mean +0.02 ± 0.03 points" in proc.stdout
    assert "the other ranks: rank5 +0.00 ± 0.00" in proc.stdout
    other = tmp_path / "o.json"
    other.write_text(json.dumps(record({"all": [0.2, 0.22, 0.24]})))
    proc = run_tool("results_tables.py", path, "--against", other, "--digits", "2")
    assert proc.returncode == 0, proc.stderr
    assert "| all | 0 | 2 | 2 | 24.05 | 24.00 | +0.05 |" in proc.stdout
    for bad in ("-1", "5"):
        proc = run_tool("results_tables.py", path, "--digits", bad)
        assert proc.returncode == 2 and f"--digits must be 0 to 4, got {bad}" in proc.stderr and proc.stdout == ""


def test_bad_input(tmp_path, run_tool):
    proc = run_tool("results_tables.py", tmp_path / "none.json")
    assert proc.returncode == 2 and "none.json: no such file" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad.json").write_text("{")
    proc = run_tool("results_tables.py", tmp_path / "bad.json")
    assert proc.returncode == 2 and "not a readable JSON file" in proc.stderr
    (tmp_path / "list.json").write_text("[1, 2]")  # JSON, but not reproduce.py's
    proc = run_tool("results_tables.py", tmp_path / "list.json")
    assert proc.returncode == 2 and "list.json: not a results JSON of tools/reproduce.py" in proc.stderr
    (tmp_path / "cut.json").write_text('{"ours": {"all": {"n": 1}}}')
    proc = run_tool("results_tables.py", tmp_path / "cut.json")
    assert proc.returncode == 2 and "cut.json: \"ours\" / 'all': needs" in proc.stderr
    good = tmp_path / "r.json"
    good.write_text(json.dumps(record({"all": [0.2]})))
    proc = run_tool("results_tables.py", good, "--sweep", tmp_path / "cut.json")  # not a sweep: nothing printed
    assert proc.returncode == 2 and "cut.json: not a sweep.json" in proc.stderr and proc.stdout == ""


def test_files_of_one_experiment_are_pooled_and_others_are_not(tmp_path, run_tool):
    first = record({"cls+high": [0.20, 0.22, 0.24], "all": [0.21, 0.22, 0.27]})
    second = record({"cls+high": [0.30, 0.32], "all": [0.29, 0.33]})
    for runs in second["ours"].values():  # seeds 3 and 4
        for r in runs["runs"]:
            r["seed"] += 3
    for r in (first, second):
        r["args"] = {"input_size": [64, 24], "val_ids": 50, "pos_floor": 0.3}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    proc = run_tool("results_tables.py", a, b)
    assert proc.returncode == 0, proc.stderr
    # each file's own paired effect, then all five runs together
    assert "all − cls+high, rank-1, 3 paired run(s): +1.0, +0.0, +3.0;" in proc.stdout
    assert "all − cls+high, rank-1, 2 paired run(s): -1.0, +1.0;" in proc.stdout
    # the headings name what the runs set away from the recipe
    assert f"{a}: cuhk01-100, recipe cpu, pos_floor 0.3, in %" in proc.stdout
    pooled = proc.stdout.split("Pooled: the runs of the 2 files together (cuhk01-100, recipe cpu, pos_floor 0.3)")[1]
    assert "| cls+high | 5 | 25.6 ± 5.2 |" in pooled and "| all | 5 | 26.4 ± 5.0 |" in pooled
    assert "all − cls+high, rank-1, 5 paired run(s): +1.0, +0.0, +3.0, -1.0, +1.0; mean +0.8 ± 1.5 points" in pooled
    assert "the other ranks: rank5 +0.0 ± 0.0" in pooled

    b.write_text(json.dumps(first))  # the same runs twice: counted once would be wrong, twice worse
    proc = run_tool("results_tables.py", a, b)
    assert proc.returncode == 0 and "Pooled" not in proc.stdout
    assert "Not pooled: the run split 0, seed 0, stage-1 seed 0, cls+high is in both" in proc.stdout
    newer = json.loads(json.dumps(first))  # the same runs again, written after the stage-1 seed was recorded
    for entry in newer["ours"].values():
        for r in entry["runs"]:
            r["stage1_seed"] = r["seed"]  # what the older file leaves unsaid: one run, not two
    b.write_text(json.dumps(newer))
    proc = run_tool("results_tables.py", a, b)
    assert proc.returncode == 0 and "Pooled" not in proc.stdout
    assert "Not pooled: the run split 0, seed 0, stage-1 seed 0, cls+high is in both" in proc.stdout

    second["args"]["pos_floor"] = -1.0  # another setting of the NCC loss: another experiment
    second["recipe"] = "cpu64"
    b.write_text(json.dumps(second))
    proc = run_tool("results_tables.py", a, b)
    assert proc.returncode == 0 and "Pooled" not in proc.stdout
    assert "Not pooled: different settings: recipe 'cpu' in" in proc.stdout and "pos_floor 0.3 in" in proc.stdout


def test_reruns_once_counts_a_reproduced_run_once(tmp_path, run_tool):
    """A rerun of seed 1 (the same figures, as a deterministic CPU rerun gives) beside the first
    file: refused by default, counted once with --reruns-once; different figures are always refused."""
    first = record({"cls": [0.20, 0.22], "cls+high": [0.25, 0.30]})
    rerun = record({"cls": [0.22], "cls+low": [0.23]})
    for runs in rerun["ours"].values():  # seed 1 of the first file, rerun with cls+low beside it
        for r in runs["runs"]:
            r["seed"], r["stage1_seed"], r["weights"] = 1, 1, "elsewhere/stage2.caffemodel"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(rerun))
    proc = run_tool("results_tables.py", a, b)
    assert proc.returncode == 0 and "Pooled" not in proc.stdout
    assert f"Not pooled: the run split 0, seed 1, stage-1 seed 1, cls is in both {a} and {b}, with the same " \
           "figures (a rerun that reproduced it? --reruns-once counts such a run once)." in proc.stdout
    proc = run_tool("results_tables.py", a, b, "--reruns-once")
    assert proc.returncode == 0, proc.stderr
    pooled = proc.stdout.split("Pooled: the runs of the 2 files together")[1]
    assert f"Counted once (--reruns-once; the same figures in both files): the run split 0, seed 1, " \
           f"stage-1 seed 1, cls ({a}, {b})" in pooled
    assert "| cls | 2 | 21.0 ± 1.4 |" in pooled  # two runs, not three
    assert "cls+low − cls, rank-1, 1 paired run(s): +1.0" in pooled
    assert "cls+high − cls, rank-1, 2 paired run(s): +5.0, +8.0" in pooled

    rerun["ours"]["cls"]["runs"][0]["rank5"] = 0.51  # not the same run after all
    b.write_text(json.dumps(rerun))
    proc = run_tool("results_tables.py", a, b, "--reruns-once")
    assert proc.returncode == 0 and "Pooled" not in proc.stdout
    assert f"Not pooled: the run split 0, seed 1, stage-1 seed 1, cls is in both {a} and {b}, with different " \
           "figures (rank5 0.5 against 0.51)." in proc.stdout


def test_own_stage1_keeps_the_runs_with_their_own_stage_1(tmp_path, run_tool):
    # seeds 0 and 1 of one stage 1 (seed 0), as reproduce.py --stage1-seed 0 --seeds 0 1 writes them
    shared = record({"cls+high": [0.20, 0.22], "all": [0.21, 0.25]})
    for entry in shared["ours"].values():
        for r in entry["runs"]:
            r["stage1_seed"] = 0
    later = record({"cls+high": [0.9, 0.30], "all": [0.9, 0.32]})  # seed 1 with its own stage 1
    for entry in later["ours"].values():
        entry["runs"] = entry["runs"][1:]
        entry["runs"][0]["stage1_seed"] = 1
    only_shared = record({"all": [0.5, 0.5]})
    for r in only_shared["ours"]["all"]["runs"]:
        r["seed"] += 2
        r["stage1_seed"] = 0
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    for path, rec in ((a, shared), (b, later), (c, only_shared)):
        path.write_text(json.dumps(rec))
    proc = run_tool("results_tables.py", a, b, c, "--own-stage1")
    assert proc.returncode == 0, proc.stderr
    assert "c.json: left out, no run has a stage 1 trained with its own seed" in proc.stdout
    first = proc.stdout.split("a.json:")[1].split("b.json:")[0]
    assert "| all | 1 | 21.0 |" in first  # seed 1 of stage 1 seed 0 is not counted, and the mean is redone
    pooled = proc.stdout.split("Pooled: the runs of the 2 files together")[1]
    assert "| cls+high | 2 | 25.0 ± 7.1 |" in pooled
    assert "all − cls+high, rank-1, 2 paired run(s): +1.0, +2.0;" in pooled
    # without the option every run counts, and the file of shared stage 1s pools too
    proc = run_tool("results_tables.py", a, b, c)
    assert proc.returncode == 0 and "Pooled: the runs of the 3 files together" in proc.stdout
    proc = run_tool("results_tables.py", c, "--own-stage1")
    assert proc.returncode == 2 and "none of the files has a run" in proc.stderr and "Traceback" not in proc.stderr


def test_heading_names_the_stretched_stage1(tmp_path, run_tool):
    """A run of reproduce.py --stage1-scale 2 (and TF32) says so in its heading: files at another scale
    are another experiment (not pooled), and the table must not read as the recipe's."""
    r = record({"all": [0.44]})
    r["args"] = {"stage1_scale": 2.0, "tf32": True, "iters1": None}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(r))
    proc = run_tool("results_tables.py", path)
    assert proc.returncode == 0, proc.stderr
    assert f"{path}: cuhk01-100, recipe cpu, stage 1 x 2, TF32, in %" in proc.stdout
    r["args"]["stage1_scale"] = "2x"  # not a number (edited by hand): shown as it is, never a traceback
    path.write_text(json.dumps(r))
    proc = run_tool("results_tables.py", path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{path}: cuhk01-100, recipe cpu, stage 1 x 2x, TF32, in %" in proc.stdout


def test_against_pairs_the_same_runs_under_other_settings(tmp_path, run_tool):
    """--against: the paired difference of a setting (here stage 1 x 2) over the runs both groups have,
    matched by split, seed, stage-1 seed and loss set; runs without a partner are named, not paired."""
    longer = record({"all": [0.44, 0.43, 0.45]})
    longer["args"] = {"stage1_scale": 2.0}
    recipe = record({"all": [0.39, 0.37], "cls+high": [0.38]})
    for entry in recipe["ours"].values():
        for r in entry["runs"]:
            r["stage1_seed"] = r["seed"]  # recorded in newer files, absent in older ones: both pair
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(longer))
    b.write_text(json.dumps(recipe))
    proc = run_tool("results_tables.py", a, "--against", b)
    assert proc.returncode == 0, proc.stderr
    section = proc.stdout.split("Against: (cuhk01-100, recipe cpu, stage 1 x 2) − (cuhk01-100, recipe cpu)")[1]
    assert "settings that differ: stage1_scale 2.0 against the recipe's" in section
    assert "| all | 0 | 0 | 0 | 44.0 | 39.0 | +5.0 |" in section and "| all | 0 | 1 | 1 | 43.0 | 37.0 | +6.0 |" in section
    assert "all, files − against, rank-1, 2 paired run(s): +5.0, +6.0; mean +5.5 ± 0.7 points, " \
           "95% interval [-0.9, +11.9]" in section
    assert "all, files − against, the other ranks: rank5 +0.0 ± 0.0" in section
    assert "Without a partner, left out: all split 0 seed 2 stage-1 seed 2 (the files); " \
           "cls+high split 0 seed 0 stage-1 seed 0 (--against)" in section

    other = record({"all": [0.5]})
    other["dataset"] = "cuhk01-486"  # another test set: nothing to pair, and nothing printed
    b.write_text(json.dumps(other))
    proc = run_tool("results_tables.py", a, "--against", b)
    assert proc.returncode == 2 and "the test differs (dataset 'cuhk01-100' against 'cuhk01-486')" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    apart = record({"all": [0.5]})
    apart["ours"]["all"]["runs"][0]["seed"] = 7
    b.write_text(json.dumps(apart))
    proc = run_tool("results_tables.py", a, "--against", b)
    assert proc.returncode == 2 and "no run of the files has a partner" in proc.stderr
    c = tmp_path / "c.json"
    c.write_text(json.dumps(recipe))
    b.write_text(json.dumps(recipe))  # the same runs twice in the baseline
    proc = run_tool("results_tables.py", a, "--against", b, c)
    assert proc.returncode == 2 and "the --against files are not one experiment: the run split 0, seed 0" in proc.stderr
    older = record({"all": [0.39]})  # seed 0 without its stage-1 seed recorded, beside the newer record of it
    c.write_text(json.dumps(older))
    b.write_text(json.dumps(recipe))
    proc = run_tool("results_tables.py", a, "--against", b, c)
    assert proc.returncode == 2 and "the --against files are not one experiment: the run split 0, seed 0, " \
        "stage-1 seed 0, all is in both" in proc.stderr


def test_against_measures_how_a_setting_changes_a_loss_effect(tmp_path, run_tool):
    """--against with cls and cls+high on both sides: (cls+high − cls) under the files' settings less
    the same under the baseline's, run by run; no such line for a pair one side lacks."""
    slower = record({"cls": [0.30, 0.28], "cls+high": [0.33, 0.35]})
    slower["args"] = {"base_lr": 0.025}
    recipe = record({"cls": [0.24, 0.20], "cls+high": [0.30, 0.34], "all": [0.31, 0.33]})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(slower))
    b.write_text(json.dumps(recipe))
    proc = run_tool("results_tables.py", a, "--against", b)
    assert proc.returncode == 0, proc.stderr
    # seed 0: (33 − 30) − (30 − 24) = −3; seed 1: (35 − 28) − (34 − 20) = −7
    assert "(cls+high − cls), files − against, rank-1, 2 paired run(s): -3.0, -7.0; mean -5.0 ± 2.8 points" \
        in proc.stdout
    assert "(cls+high − cls), files − against, the other ranks: rank5 +0.0 ± 0.0" in proc.stdout
    assert "(all − cls+high), files" not in proc.stdout  # the files have no all run
    b.write_text(json.dumps(record({"cls+high": [0.30, 0.34]})))  # the baseline has no cls
    proc = run_tool("results_tables.py", a, "--against", b)
    assert proc.returncode == 0, proc.stderr
    assert "cls+high, files − against, rank-1, 2 paired run(s): +3.0, +1.0" in proc.stdout
    assert "(cls+high − cls)" not in proc.stdout


def test_curves_at_each_tenth_of_stage_1(tmp_path, run_tool):
    rec = record({"all": [0.3]})
    stage1 = [{"kind": "test", "stage": 1, "iteration": 0, "rank1": float("nan")}]
    stage1 += [{"kind": "test", "stage": 1, "iteration": it, "rank1": it / 2000, "mAP": it / 1000}
               for it in range(100, 1001, 100)]
    stage1 += [{"kind": "train", "stage": 1, "iteration": it, "loss": 2 - it / 1000} for it in (0, 500, 980)]
    stage2 = [{"kind": "test", "stage": 2, "iteration": it, "rank1": r, "mAP": m}
              for it, r, m in ((50, 0.4, 0.5), (100, 0.6, float("nan")), (150, 0.8, 0.7))]
    coarse = [{"kind": "test", "stage": 1, "iteration": it, "rank1": 0.1} for it in range(100, 801, 100)]
    rec["learning_curves"] = {"split 1, seed 0, all": stage1 + stage2, "split 1, seed 1, all": coarse}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    proc = run_tool("results_tables.py", path, "--curves")
    assert proc.returncode == 0, proc.stderr
    # rank-1 = iteration / 2000 at every tenth; the last three of stage 1 (800-1000) average 45%,
    # of stage 2 60%; mAP = iteration / 1000: 90% over stage 1's last three; stage 2 has a NaN mAP
    # among its last three, so none; stage 1's last logged loss 2 - 0.98
    assert ("| split 1, seed 0, all | 100 ... 1,000 | 5.0 | 10.0 | 15.0 | 20.0 | 25.0 | 30.0 | 35.0 | 40.0 | "
            "45.0 | 50.0 | 45.0 | 60.0 | 90.0 | – | 1.02 |") in proc.stdout
    # validation every 100 of 800 iterations: 160 (0.2) is as far from 200 as half a tenth, so no point
    # is shown there (nor at 0.3, 0.7, 0.8) rather than one point twice; no stage 2, no training loss
    assert ("| split 1, seed 1, all | 100 ... 800 | 10.0 | – | – | 10.0 | 10.0 | 10.0 | – | – | 10.0 | 10.0 | "
            "10.0 | – | – | – | – |") \
        in proc.stdout
    assert 'curve "split 1" is split 0 of the tables above' in proc.stdout
    assert "| curve |" not in run_tool("results_tables.py", path).stdout  # only when asked
    rec["learning_curves"]["split 1, seed 1, all"] = [{"kind": "test", "stage": 1, "rank1": 0.1}]  # no iteration
    path.write_text(json.dumps(rec))
    proc = run_tool("results_tables.py", path, "--curves")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "learning curve 'split 1, seed 1, all': each point needs" in proc.stderr
    del rec["learning_curves"]
    path.write_text(json.dumps(rec))
    proc = run_tool("results_tables.py", path, "--curves")
    assert proc.returncode == 2 and "r.json: --curves: the file has no \"learning_curves\"" in proc.stderr


def test_validation_of_split_0_is_not_split_9s(tmp_path, run_tool):
    """Curves are named "split 1" ... "split 10" (counted from 1): split 0's row reads "split 1",
    never "split 10", whichever comes last in the file."""
    rec = record({"all": [0.2]})
    rec["ours"]["all"]["runs"].append({"rank1": 0.3, "rank5": 0.5, "rank10": 0.7, "rank20": 0.9,
                                       "split": 9, "seed": 0})
    rec["ours"]["all"]["n"] = 2
    rec["learning_curves"]["split 10, seed 0, all"] = [{"kind": "test", "stage": 1, "rank1": 0.4},
                                                       {"kind": "test", "stage": 2, "rank1": 0.45}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    proc = run_tool("results_tables.py", path)
    assert proc.returncode == 0, proc.stderr
    assert "| 0 | 0 | 25.0 / 30.0, **20.0** |" in proc.stdout
    assert "| 9 | 0 | 40.0 / 45.0, **30.0** |" in proc.stdout


def test_validation_pairs_the_mean_of_stage_2s_last_three_points(tmp_path, run_tool):
    """--validation: each run's figure is the mean of its stage 2's last three validation points
    (rank-1, and mAP where all three have one), paired as the test's figures are, per file and
    pooled; a run without stage-2 points has no partner on validation."""
    def curve(r1s, maps):
        return ([{"kind": "test", "stage": 1, "iteration": 100, "rank1": 0.9, "mAP": 0.9}]  # stage 1: not read
                + [{"kind": "test", "stage": 2, "iteration": 100 * i, "rank1": r, "mAP": m}
                   for i, (r, m) in enumerate(zip(r1s, maps), 1)])

    rec = record({"cls": [0.20, 0.22], "cls+low": [0.21, 0.22]})
    rec["learning_curves"] = {
        # seed 0: cls+low's last three rank-1 average 0.5 above cls's (60.0 against 59.5), mAP 1.0
        "split 1, seed 0, cls": curve([0.1, 0.595, 0.59, 0.60], [0.1, 0.40, 0.40, 0.40]),
        "split 1, seed 0, cls+low": curve([0.9, 0.595, 0.60, 0.605], [0.9, 0.41, 0.41, 0.41]),
        # seed 1: 1.5 below; the first point is not among the last three
        "split 1, seed 1, cls": curve([0.0, 0.50, 0.50, 0.50], [0.0, 0.30, 0.30, float("nan")]),
        "split 1, seed 1, cls+low": curve([1.0, 0.485, 0.485, 0.485], [1.0, 0.30, 0.30, 0.30])}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    proc = run_tool("results_tables.py", path, "--validation", "--digits", "2")
    assert proc.returncode == 0, proc.stderr
    assert "validation, cls+low − cls, rank-1, 2 paired run(s): +0.50, -1.50; mean -0.50 ± 1.41 points" \
        in proc.stdout
    assert "validation, cls+low − cls, mAP" not in proc.stdout  # seed 1's cls has a NaN mAP among its last three
    assert "cls+low − cls, rank-1, 2 paired run(s): +1.00, +0.00" in proc.stdout  # the test's, unchanged
    assert "validation," not in run_tool("results_tables.py", path).stdout  # only when asked
    # a second file with another split: pooled over both; a run without stage-2 points has no pair
    rec2 = json.loads(json.dumps(rec))
    for entry in rec2["ours"].values():
        for r in entry["runs"]:
            r["split"] = 1
    rec2["learning_curves"] = {k.replace("split 1", "split 2"): v for k, v in rec["learning_curves"].items()}
    rec2["learning_curves"]["split 2, seed 1, cls"] = [{"kind": "test", "stage": 1, "iteration": 100, "rank1": 0.5}]
    path2 = tmp_path / "r2.json"
    path2.write_text(json.dumps(rec2))
    proc = run_tool("results_tables.py", path, path2, "--validation", "--digits", "2")
    assert proc.returncode == 0, proc.stderr
    pooled = proc.stdout.split("Pooled:")[1]
    assert "validation, cls+low − cls, rank-1, 3 paired run(s): +0.50, -1.50, +0.50" in pooled
    assert f"{path2}: " in proc.stdout and "validation, cls+low − cls, rank-1, 1 paired run(s): +0.50" in proc.stdout


def test_machines_that_trained_the_runs_are_named(tmp_path, run_tool):
    """A file whose runs record "trained_on" (reproduce.py since 2026-12-07) gets a line naming
    each machine with its runs, the runs without a record and those trained on two machines; a
    file without any such record gets no line."""
    xeon = {"cpu": "Intel Xeon", "cpu_capability": "AVX512", "torch": "2.13.0", "threads": 2}
    amd = dict(xeon, cpu="AMD EPYC")
    rec = record({"cls": [0.20, 0.22, 0.24], "cls+low": [0.21, 0.22, 0.27]})
    cls_runs, low_runs = rec["ours"]["cls"]["runs"], rec["ours"]["cls+low"]["runs"]
    for run in cls_runs[:2] + low_runs[:2]:
        run["trained_on"] = {"stage1": [xeon], "stage2": [xeon]}
    low_runs[2]["trained_on"] = {"stage1": [amd, xeon], "stage2": [None]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    proc = run_tool("results_tables.py", path)
    assert proc.returncode == 0, proc.stderr
    assert ("Trained on: Intel Xeon (AVX512), torch 2.13.0, 2 threads (5 runs); AMD EPYC (AVX512), torch 2.13.0, "
            "2 threads (1 run); a machine not recorded (1 run); 1 run(s) without a record; 1 run(s) on more than "
            "one machine") in proc.stdout
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(record({"cls": [0.20]})))
    assert "Trained on" not in run_tool("results_tables.py", plain).stdout
