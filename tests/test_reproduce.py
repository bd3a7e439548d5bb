"""tools/reproduce.py end to end on a fabricated CUHK01 (two seeded splits,
single-shot CMC) with minimal training."""
import json

import cv2
import numpy as np
import pytest


def fabricate_cuhk01(root):
    campus = root / "campus"
    campus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for pid in range(1, 131):  # 130 ids: 100 test + 30 train
        base = rng.integers(0, 256, 3)
        for k in range(1, 5):
            img = np.clip(base + rng.normal(0, 10, (160, 60, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(campus / f"{pid:04d}{k:03d}.png"), img)


@pytest.mark.slow
def test_reproduce_cuhk01_two_splits(tmp_path, run_tool):
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "2", "--iters1", "2",
                    "--iters2", "1", "--batch-pairs", "2", "--device", "cpu", "--val-ids", "2", "--repeats", "5")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "cuhk01-100, 2 split(s)" in proc.stdout and "paper: all" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["paper"] == {"rank1": 79.3} and result["splits"] == 2
    ours = result["ours"]["all"]
    assert len(ours["runs"]) == 2 and 0 <= ours["mean"]["rank1"] <= 100
    assert ours["mean"]["rank20"] >= ours["mean"]["rank1"]


@pytest.mark.slow
def test_ablation_over_seeds(tmp_path, run_tool):
    """--ablation --seeds: four loss sets x two seeds, stage 1 trained once per (cls, high) weights and
    seed and shared with the loss set that adds the NCC loss."""
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "1", "--ablation",
                    "--seeds", "3", "4", "--iters1", "1", "--iters2", "2", "--batch-pairs", "2", "--device", "cpu",
                    "--val-ids", "2", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "1 split(s) x 2 seed(s)" in proc.stdout and "sample standard deviation" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [3, 4] and list(result["ours"]) == ["cls", "cls+high", "cls+low", "all"]
    for entry in result["ours"].values():
        assert sorted(run["seed"] for run in entry["runs"]) == [3, 4]
    for seed in (3, 4):
        runs = out / "split00" / f"seed{seed}"
        assert (runs / "cls" / "stage1_iter_1.caffemodel").exists()
        assert not list((runs / "cls+low").glob("stage1_*")) and not list((runs / "all").glob("stage1_*"))
        # the NCC loss is the only difference between cls and cls + low: their weights differ
        assert (runs / "cls" / "stage2_iter_2.caffemodel").read_bytes() != \
            (runs / "cls+low" / "stage2_iter_2.caffemodel").read_bytes()
    assert proc.stdout.count("stage1 is the one of the same cls/high weights") == 4
    seeds3 = (out / "split00" / "seed3" / "cls" / "stage1_iter_1.caffemodel").read_bytes()
    assert seeds3 != (out / "split00" / "seed4" / "cls" / "stage1_iter_1.caffemodel").read_bytes()
