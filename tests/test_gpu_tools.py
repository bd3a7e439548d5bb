"""The training command and the feature extraction on a GPU (marked `cuda`, skipped without one):
the CUDA run must agree with the CPU run of the same command. `tools/gpu_check.sh` runs them."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mspcnn.caffe import io as cio
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.transformer import DataTransformer
from mspcnn.evaluation import extract_features
from mspcnn.model import caffe_float32

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = str(ROOT / "prototxt_equiv" / "solver_stage1.prototxt")
STAGE2 = str(ROOT / "prototxt_equiv" / "solver_stage2.prototxt")
LMDB = ROOT / "tests" / "data" / "caffe_golden" / "lmdb" / "lmdb_raw"

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def train(db, prefix, device, *extra):
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--data", str(db), "--batch-pairs", "2",
           "--workers", "1", "--display", "1", "--snapshot-prefix", str(prefix), "--device", device] + list(extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc.stdout


def first_loss(log):
    return float(re.search(r"Iteration 0 \(.*\), loss = ([\d.e+-]+)", log).group(1))


def test_train_both_stages_on_cuda_agrees_with_cpu(tiny_market_db, tmp_path):
    db = tiny_market_db
    logs, weights = {}, {}
    for device in ("cpu", "cuda"):
        s1 = train(db, tmp_path / f"{device}1", device, "--solver", STAGE1, "--max-iter", "2",
                   "--snapshot-every", "2", "--test-interval", "2")
        assert f"device {device}" in s1 and "Test net output #0: rank1" in s1
        s2 = train(db, tmp_path / f"{device}2", device, "--solver", STAGE2, "--max-iter", "2",
                   "--snapshot-every", "2", "--test-interval", "0",
                   "--weights", str(tmp_path / f"{device}1_iter_2.caffemodel"))
        assert "Train net output #2: loss_low" in s2
        logs[device] = (s1, s2)
        model = cio.read_caffemodel(tmp_path / f"{device}2_iter_2.caffemodel")
        weights[device] = {layer.name: [cio.blob_to_array(b) for b in layer.blobs] for layer in model.layer}
    # same initialisation and batches: the first losses agree to float32 rounding of the convolutions
    for k in range(2):
        assert first_loss(logs["cuda"][k]) == pytest.approx(first_loss(logs["cpu"][k]), rel=1e-3)
    assert weights["cpu"].keys() == weights["cuda"].keys()
    for name in weights["cpu"]:
        for a, b in zip(weights["cpu"][name], weights["cuda"][name]):
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            assert torch.allclose(a, b, rtol=1e-2, atol=1e-3 * max(1.0, float(a.abs().max()))), name


def test_feature_extraction_on_cuda_agrees_with_cpu(unit_bn_backbone):
    model = unit_bn_backbone
    tf = DataTransformer((144, 56), (102, 102, 101), phase="TEST")
    db = DatumDB(LMDB)
    caffe_float32()  # as the tools do: no TF32
    cpu = extract_features(model, db, tf, batch_size=3, device="cpu")
    gpu = extract_features(model.to("cuda"), db, tf, batch_size=3, device="cuda")
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape == (len(db), 256)
    assert torch.allclose(gpu, cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))
