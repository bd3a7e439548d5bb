"""Data-parallel training (torch.distributed, gloo on the CPU): 2 workers with batch B equal one
process with iter_size doubled on the same data, as Caffe's multi-GPU semantics say."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mspcnn.caffe import io as cio
from mspcnn.paths import TRAIN_VAL_PROTOTXT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_gloo_workers_equal_one_process_with_iter_size_doubled(tiny_market_db, tmp_path):
    # Dropout draws its masks from each process's random stream: off, so that only the sharding and
    # the gradient averaging are compared.
    net = tmp_path / "net.prototxt"
    net.write_text(TRAIN_VAL_PROTOTXT.read_text().replace("dropout_ratio: 0.5", "dropout_ratio: 0"))
    solver = tmp_path / "solver.prototxt"
    solver.write_text((ROOT / "prototxt_equiv" / "solver_stage1.prototxt").read_text()
                      .replace('net: "prototxt_equiv/mspcnn_train_val.prototxt"', f'net: "{net}"'))
    # A small rate: this 2-pair recipe at the solver's 0.1 turns float rounding (the all-reduce adds
    # in another order) into visible differences within a few iterations.
    common = ["--solver", str(solver), "--data", str(tiny_market_db), "--batch-pairs", "2", "--workers", "1",
              "--max-iter", "4", "--test-interval", "0", "--display", "1", "--device", "cpu", "--base-lr", "0.002",
              "--threads", "1"]
    # One thread in every process: runs with 1 and 2 threads reduce in other orders, and 4 iterations
    # of this net turn that into differences of 1e-3 in conv1 (the test was flaky while each process
    # chose its own count from how busy the machine was).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *common, "--iter-size", "2",
                          "--snapshot-prefix", str(tmp_path / "one")], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", str(ROOT / "tools" / "train.py"), *common, "--iter-size", "1",
                          "--snapshot-prefix", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "x 2 workers" in two.stdout and two.stdout.count("Optimization Done.") == 1  # one log: the root's
    assert not list(tmp_path.glob("two_iter_*.tmp")) and len(list(tmp_path.glob("two_iter_4.*"))) == 2
    a = {lp.name: [cio.blob_to_array(b) for b in lp.blobs] for lp in cio.read_caffemodel(tmp_path / "one_iter_4.caffemodel").layer}
    b = {lp.name: [cio.blob_to_array(b) for b in lp.blobs] for lp in cio.read_caffemodel(tmp_path / "two_iter_4.caffemodel").layer}
    learned = [n for n in a if not n.endswith("_bn") and not n.endswith("_bn_p")]  # BN statistics stay per worker
    assert len(learned) > 100
    for name in learned:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6, err_msg=name)
    # the losses of the log are the same (averaged over the workers)
    losses = [[line.split("loss = ")[1] for line in out.splitlines() if "), loss = " in line] for out in (one.stdout, two.stdout)]
    assert len(losses[0]) == 4 and [float(x) for x in losses[0]] == pytest.approx([float(x) for x in losses[1]], rel=1e-4)


def test_averaged_gradients_stay_in_their_tensors(monkeypatch):
    """The all-reduced mean is written into each parameter's gradient tensor, not a new one: CUDA
    graphs (mspcnn.cuda_graphs) replay their backward into those tensors, and a replaced .grad would
    leave the update reading the first iteration's gradients forever."""
    import torch
    import torch.distributed as dist

    from mspcnn.engine import _DataParallel

    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))  # two workers with the same gradients
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(2))]
    params[0].grad, params[1].grad = torch.randn(3, 2), torch.randn(4)  # the third has none
    before = [p.grad for p in params[:2]]
    values = [g.clone() for g in before]
    _DataParallel(0, 2).average_gradients(params)
    assert all(p.grad is g for p, g in zip(params, before))
    assert all(torch.equal(p.grad, v) for p, v in zip(params, values))
    assert torch.equal(params[2].grad, torch.zeros(2))
