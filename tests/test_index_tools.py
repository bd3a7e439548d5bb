"""tools/build_index.py and tools/query.py on the golden 8-image database."""
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LMDB = ROOT / "tests" / "data" / "caffe_golden" / "lmdb"


def test_index_and_query(tmp_path, unit_bn_backbone, run_tool):
    weights = tmp_path / "w.caffemodel"
    unit_bn_backbone.save_caffemodel(weights)
    index = tmp_path / "g.index"
    out = run_tool("build_index.py", "--weights", weights, "--db", LMDB / "lmdb_raw",
              "--out", index, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "gallery: 8/8" in out.stderr  # progress (not a terminal: a line per tenth)
    assert torch.load(index, weights_only=True)["features"].shape == (8, 256)
    image = LMDB / "images" / "cam2" / "0031_c2s2_001046_00.jpg"  # record 5 of the database
    out = run_tool("query.py", image, "--index", index, "--weights", weights, "--top", "3",
              "--out", tmp_path / "r.png")
    assert out.returncode == 0, out.stderr
    first = [line for line in out.stdout.splitlines() if line.strip().startswith("1.")][0]
    assert "00000005_cam2/0031_c2s2_001046_00.jpg" in first and "distance 0.0" in first
    assert (tmp_path / "r.png").stat().st_size > 500
    bad = run_tool("query.py", tmp_path / "missing.jpg", "--index", index, "--weights", weights)
    assert bad.returncode == 2 and "cannot read image" in bad.stderr
    assert "note: the index was built with" not in out.stderr  # same weights as the index

    other = tmp_path / "other.caffemodel"
    other.write_bytes(weights.read_bytes())
    noted = run_tool("query.py", image, "--index", index, "--weights", other, "--out", tmp_path / "n.png")
    assert noted.returncode == 0 and "note: the index was built with" in noted.stderr
    garbage = tmp_path / "garbage.index"
    garbage.write_bytes(b"not an index")
    for path, message in ((tmp_path / "none.index", "no such file"), (garbage, "not an index written by")):
        bad = run_tool("query.py", image, "--index", path, "--weights", weights)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
    torch.save({"features": torch.zeros(3, 256), "keys": ["a"], "db": str(LMDB / "lmdb_raw")}, garbage)
    bad = run_tool("query.py", image, "--index", garbage, "--weights", weights)
    assert bad.returncode == 2 and "do not match 1 keys" in bad.stderr
    bad = run_tool("query.py", image, "--index", index, "--weights", weights, "--top", "0")
    assert bad.returncode == 2 and "--top must be at least 1" in bad.stderr


def test_index_and_query_at_a_smaller_input(tmp_path, unit_bn_backbone, run_tool):
    """Weights trained at another input size (run_pipeline.py --input-size 64x24): the index records
    the size, the query resizes its images to it, and a query at another size is refused."""
    weights = tmp_path / "w.caffemodel"
    unit_bn_backbone.save_caffemodel(weights)
    index = tmp_path / "small.index"
    out = run_tool("build_index.py", "--weights", weights, "--db", LMDB / "lmdb_raw", "--out", index,
                   "--device", "cpu", "--input-size", "64x24")
    assert out.returncode == 0, out.stderr
    assert "warning: the images of" in out.stderr and "expects images of 71 x 27" in out.stderr  # golden: 160 x 64
    assert torch.load(index, weights_only=True)["input_size"] == [64, 24]
    image = LMDB / "images" / "cam2" / "0031_c2s2_001046_00.jpg"
    out = run_tool("query.py", image, "--index", index, "--weights", weights, "--top", "3", "--out",
                   tmp_path / "r.png", "--input-size", "64x24")
    assert out.returncode == 0, out.stderr
    bad = run_tool("query.py", image, "--index", index, "--weights", weights, "--out", tmp_path / "b.png")
    assert bad.returncode == 2 and "computed at an input of 64 x 24" in bad.stderr and "--input-size 64x24" in bad.stderr
    bad = run_tool("build_index.py", "--weights", weights, "--db", LMDB / "lmdb_raw", "--out", index,
                   "--input-size", "64x25")
    assert bad.returncode == 2 and "the nearest is 64 x 24" in bad.stderr and "Traceback" not in bad.stderr
