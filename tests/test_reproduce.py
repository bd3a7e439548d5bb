"""tools/reproduce.py end to end on a fabricated CUHK01 (two seeded splits,
single-shot CMC) with minimal training."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_cuhk01_two_splits(tmp_path):
    campus = tmp_path / "raw" / "campus"
    campus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for pid in range(1, 131):  # 130 ids: 100 test + 30 train
        base = rng.integers(0, 256, 3)
        for k in range(1, 5):
            img = np.clip(base + rng.normal(0, 10, (160, 60, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(campus / f"{pid:04d}{k:03d}.png"), img)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "cuhk01-100",
                           str(tmp_path / "raw"), "--out", str(out), "--splits", "2", "--iters1", "2",
                           "--iters2", "1", "--batch-pairs", "2", "--device", "cpu", "--val-ids", "2",
                           "--repeats", "5"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "cuhk01-100, 2 split(s)" in proc.stdout and "paper: all" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["paper"] == {"rank1": 79.3} and result["splits"] == 2
    ours = result["ours"]["all"]
    assert len(ours["runs"]) == 2 and 0 <= ours["mean"]["rank1"] <= 100
    assert ours["mean"]["rank20"] >= ours["mean"]["rank1"]
