"""The real CUHK01 benchmark (../shared/realdata/cuhk01/campus, or $MSPCNN_REALDATA/cuhk01): the
converter on the folder as released, and a short training on the real images. Skipped where the
images are not present (they are research-use only and never part of the repository)."""
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAMPUS = Path(os.environ.get("MSPCNN_REALDATA", ROOT.parent / "shared" / "realdata")) / "cuhk01"
pytestmark = pytest.mark.skipif(not (CAMPUS / "campus").is_dir(), reason=f"{CAMPUS}/campus not present")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from mspcnn.data.datasets import convert_cuhk01

    out = tmp_path_factory.mktemp("cuhk01") / "db"
    summary = convert_cuhk01(CAMPUS, out, test_ids=100, split=0, val_ids=50, progress=False)
    return out, summary


def test_the_whole_benchmark_converts(converted):
    from mspcnn.data.datasets import read_cuhk01

    records = read_cuhk01(CAMPUS)
    assert len(records) == 3884 and len({pid for _, pid, _ in records}) == 971
    assert {cam for _, _, cam in records} == {1, 2}
    out, summary = converted
    assert summary == {"train": (3284, 821), "val": (200, 50), "probe": (200, 100), "gallery": (200, 100)}
    check_split(out, summary)
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["images"] == 3284


def check_split(out, summary):
    """The split's identities disjoint between training, validation and test, the probes of camera A
    and the gallery of camera B over the same test identities, training labels 0 .. n - 1."""
    splits = {s: json.loads((out / f"{s}.json").read_text())["records"] for s in summary}
    ids = {s: {r["id"] for r in rows} for s, rows in splits.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["probe"] and not ids["val"] & ids["probe"]
    assert ids["probe"] == ids["gallery"]
    assert {r["camera"] for r in splits["probe"]} == {1} and {r["camera"] for r in splits["gallery"]} == {2}
    assert sorted({r["label"] for r in splits["train"]}) == list(range(summary["train"][1]))
    return ids


def test_the_486_protocol_converts(tmp_path):
    """CUHK01-486 (the paper's second CUHK01 row): 486 test identities, 485 for training of which 50
    are held out for validation; two splits draw different test identities."""
    from mspcnn.data.datasets import convert_cuhk01

    tests = []
    for split in (0, 1):
        out = tmp_path / f"split{split}"
        summary = convert_cuhk01(CAMPUS, out, test_ids=486, split=split, val_ids=50, progress=False)
        assert summary == {"train": (1740, 435), "val": (200, 50), "probe": (972, 486), "gallery": (972, 486)}
        tests.append(check_split(out, summary)["probe"])
    assert tests[0] != tests[1]


@pytest.mark.slow
def test_short_training_on_real_images(converted, tmp_path, run_tool):
    """Stage 1 and stage 2 of the CPU recipe, a few iterations each, on the real images; the
    evaluation runs with the single-shot protocol."""
    out, _ = converted
    for stage, extra in (("stage1", []), ("stage2", ["--weights", str(tmp_path / "stage1_iter_3.caffemodel")])):
        proc = run_tool("train.py", "--solver", ROOT / "prototxt_equiv" / f"solver_cuhk01_cpu_{stage}.prototxt",
                        "--data", out, "--max-iter", "3", "--batch-pairs", "4", "--test-interval", "0",
                        "--snapshot-prefix", tmp_path / stage, "--device", "cpu", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "3284 training images of 821 identities" in proc.stdout
    proc = run_tool("evaluate.py", "--weights", tmp_path / "stage2_iter_3.caffemodel", "--data", out,
                    "--repeats", "5", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "single-shot" in proc.stdout and "200 queries" in proc.stdout
