"""tools/export.py: the deploy net as ONNX (ONNX Runtime's features equal mspcnn's) and as Caffe files
(run by the prototxt interpreter with Caffe's semantics, equal to mspcnn's). ONNX needs the optional
packages onnx and onnxruntime; the test skips without them."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "caffe_golden" / "lmdb" / "images"
REAL = Path(os.environ.get("MSPCNN_REALDATA", ROOT.parent / "shared" / "realdata")) / "mini_market1501"

pytestmark = pytest.mark.slow


@pytest.fixture
def weights(unit_bn_backbone, tmp_path):
    path = tmp_path / "w.caffemodel"
    unit_bn_backbone.save_caffemodel(path)
    return path


@pytest.mark.parametrize("images", [IMAGES, REAL], ids=["golden", "real"])
def test_onnx_export_matches(weights, tmp_path, run_tool, images):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if not images.is_dir():
        pytest.skip(f"{images} not present")
    proc = run_tool("export.py", "--weights", weights, "--format", "onnx", "--out", tmp_path / "m.onnx",
                    "--check", images)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "largest relative difference" in proc.stdout and (tmp_path / "m.onnx").stat().st_size > 1_000_000


@pytest.mark.parametrize("size", [None, "64x24"])
def test_caffe_export_matches(weights, tmp_path, run_tool, size):
    proc = run_tool("export.py", "--weights", weights, "--format", "caffe", "--out", tmp_path / "caffe",
                    "--check", IMAGES, *(["--input-size", size] if size else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    prototxt = (tmp_path / "caffe" / "mspcnn_deploy.prototxt").read_text()
    assert re.search(r"dim: 3\s+dim: %s\s+dim: %s\s" % tuple((size or "144x56").split("x")), prototxt)
    assert "49 outputs compared" in proc.stdout


def test_export_bad_input(tmp_path, run_tool, weights):
    proc = run_tool("export.py", "--weights", tmp_path / "none.caffemodel", "--format", "caffe", "--out", tmp_path)
    assert proc.returncode == 2 and "none.caffemodel" in proc.stderr
    proc = run_tool("export.py", "--weights", weights, "--format", "onnx", "--out", tmp_path)
    assert proc.returncode == 2 and "is a folder" in proc.stderr
