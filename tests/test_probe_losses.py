"""tools/probe_losses.py: the loss terms, the pool1 NCC of positive and negative pairs, each term's
gradient by layer group and the weights' movement, on the tiny synthetic dataset."""
import json
import math

import numpy as np
import pytest

from conftest import load_tool, one_iteration_stage1

from mspcnn.engine import solve
from mspcnn.paths import PROTOTXT_DIR


def test_roc_auc_counts_pairs_and_ties():
    tool = load_tool("probe_losses")
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 50).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert tool.roc_auc(pos, neg) == pytest.approx(brute, abs=1e-12)
    assert tool.roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and tool.roc_auc([0.0], [1.0]) == 0.0
    assert math.isnan(tool.roc_auc([], [1.0]))


def test_signal_norm_takes_the_noise_out():
    import torch

    tool = load_tool("probe_losses")
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    # the same gradient every batch: no noise, the signal is the mean
    assert tool.signal_norm(g, [5.0] * 4) == pytest.approx(5.0)
    # g and -g: a mean of zero and nothing but noise
    assert tool.signal_norm(g * 0, [5.0, 5.0]) == 0.0
    # many draws around mu: the estimate comes near |mu| where the averaged norm stays above it
    rng = np.random.default_rng(1)
    mu = np.array([1.0, 0.0, 0.0])
    draws = mu + rng.normal(0, 3.0, (400, 3))
    mean = torch.tensor(draws.mean(0))
    est = tool.signal_norm(mean, list(np.linalg.norm(draws, axis=1)))
    assert abs(est - 1.0) < 0.3 and abs(float(mean.norm()) - 1.0) > abs(est - 1.0)
    assert tool.signal_norm(g, [5.0]) is None


@pytest.fixture(scope="module")
def two_checkpoints(tiny_market_db, tmp_path_factory):
    """Stage-1 weights after one iteration, and stage-2 weights one iteration (with the NCC loss) later."""
    tmp = tmp_path_factory.mktemp("probe")
    s1 = one_iteration_stage1(tiny_market_db, tmp)
    s2 = solve(PROTOTXT_DIR / "solver_stage2.prototxt", tiny_market_db, weights=s1.weights, batch_pairs=2,
               workers=1, log=lambda *a: None,
               overrides={"max_iter": 1, "test_interval": 0, "snapshot_prefix": str(tmp / "s2"), "base_lr": 0.05})
    return tmp, s1.weights, s2.weights


@pytest.mark.slow
def test_probe_two_checkpoints(tiny_market_db, two_checkpoints, run_tool):
    tmp, w1, w2 = two_checkpoints
    out = tmp / "probe.json"
    proc = run_tool("probe_losses.py", "--data", tiny_market_db, "--weights", w1, w1, w2,
                    "--solver", PROTOTXT_DIR / "solver_stage2.prototxt", "--batches", "2", "--batch-pairs", "6",
                    "--threads", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads(out.read_text())
    first, again, later = result["results"]
    # the same weights on the same pairs (and dropout masks): the same figures, and no movement
    assert first["losses"] == again["losses"] and first["gradients"] == again["gradients"]
    assert again["moved"] == {"below_pool1": 0.0, "above_pool1": 0.0, "fc8": 0.0}
    # one stage-2 step moved every group
    assert all(v > 0 for v in later["moved"].values())
    assert all(later["moved"][g] == pytest.approx(later["moved_previous"][g], rel=1e-6) for g in later["moved"])
    for r in result["results"]:
        low = r["losses"]
        assert low["low_pos"]["mean"] + low["low_neg"]["mean"] == pytest.approx(low["low"]["mean"], rel=1e-5)
        g = r["gradients"]
        # what each loss reaches: the NCC loss only the layers below pool1, the contrastive loss not fc8
        assert g["below_pool1"]["low"]["batch_norm"] > 0 and g["below_pool1"]["cls"]["batch_norm"] > 0
        assert g["above_pool1"]["low"]["batch_norm"] == 0 and g["fc8"]["low"]["batch_norm"] == 0
        assert g["fc8"]["high"]["batch_norm"] == 0 and g["above_pool1"]["high"]["batch_norm"] > 0
        # an average of vectors is no longer than the average of their lengths
        for group in g.values():
            for term in ("cls", "high", "low", "low_pos", "low_neg"):
                assert group[term]["mean_norm"] <= group[term]["batch_norm"] * (1 + 1e-9)
                assert 0 <= group[term]["signal_norm"] <= group[term]["mean_norm"] * (1 + 1e-9)
        assert -1 <= g["below_pool1"]["cos_low_other"] <= 1 and -1 <= g["below_pool1"]["cos_low_pos_neg"] <= 1
        c = r["ncc"]
        assert -1 <= c["s_neg"] <= 1 and -1 <= c["s_pos"] <= 1 and 0 <= c["auc"] <= 1
        assert c["pairs_pos"] + c["pairs_neg"] == 12
    names = {n for n in result["settings"]["loss_weights"]}
    assert names == {"cls", "high", "low"}
    assert "AUC of a pair's mean" in proc.stdout and "weights moved" in proc.stdout


@pytest.mark.slow
def test_probe_bad_input(tiny_market_db, two_checkpoints, run_tool, tmp_path):
    _, w1, _ = two_checkpoints
    proc = run_tool("probe_losses.py", "--data", tiny_market_db, "--weights", tmp_path / "none.caffemodel")
    assert proc.returncode == 2 and "none.caffemodel" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tool("probe_losses.py", "--data", tiny_market_db, "--weights", w1,
                    "--solver", PROTOTXT_DIR / "solver_stage1.prototxt")
    assert proc.returncode == 2 and "no NCCLoss layer" in proc.stderr
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\x00not a caffemodel")
    proc = run_tool("probe_losses.py", "--data", tiny_market_db, "--weights", junk,
                    "--solver", PROTOTXT_DIR / "solver_stage2.prototxt")
    assert proc.returncode == 2 and "junk.caffemodel" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tool("probe_losses.py", "--data", tmp_path, "--weights", w1,
                    "--solver", PROTOTXT_DIR / "solver_stage2.prototxt")
    assert proc.returncode == 2 and "train.json" in proc.stderr
    from mspcnn.caffe import io as cio
    from mspcnn.train_net import solver_net

    net = solver_net(PROTOTXT_DIR / "solver_stage2.prototxt")
    kept = [lp for lp in net.layer if lp.name != "loss_high"]
    del net.layer[:]
    net.layer.extend(kept)
    cio.write_prototxt(net, tmp_path / "no_high.prototxt")
    proc = run_tool("probe_losses.py", "--data", tiny_market_db, "--weights", w1,
                    "--solver", PROTOTXT_DIR / "solver_stage2.prototxt", "--net", tmp_path / "no_high.prototxt")
    assert proc.returncode == 2 and "no loss_high layer" in proc.stderr, proc.stderr
    proc = run_tool("probe_losses.py", "--data", tiny_market_db, "--weights", w1, "--batches", "0")
    assert proc.returncode == 2 and "--batches" in proc.stderr
