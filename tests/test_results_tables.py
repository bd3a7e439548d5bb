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
    assert "| all | 3 | 23.3 ± " in proc.stdout and "| paper (all) | | 79.3 |" in proc.stdout
    assert "25.0 / 30.0, **27.0**" in proc.stdout  # validation at the end of each stage, test rank-1
    assert "all − cls+high, rank-1, 3 paired run(s): +1.0, +0.0, +3.0; mean +1.3 ± 1.5 points" in proc.stdout
    assert "95% interval [-2.5, +5.1]" in proc.stdout


def test_bad_input(tmp_path, run_tool):
    proc = run_tool("results_tables.py", tmp_path / "none.json")
    assert proc.returncode == 2 and "none.json: no such file" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad.json").write_text("{")
    proc = run_tool("results_tables.py", tmp_path / "bad.json")
    assert proc.returncode == 2 and "not a readable JSON file" in proc.stderr
