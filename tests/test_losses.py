"""The NCC loss (mspcnn.losses): its formula on known correlations, with and without thresholds
and with balance_pairs; the shares of the two kinds of pair add up to it; float64 gradcheck."""
import pytest
import torch

from mspcnn.losses import ncc_loss, ncc_loss_shares
from mspcnn.ops import ncc_max


def maps(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2, 9, 5, generator=g, dtype=dtype)
    b = 0.6 * a + 0.8 * torch.randn(n, 2, 9, 5, generator=g, dtype=dtype)  # correlated: s spans -1..1
    return a, b


def by_hand(a, b, similar, pos_floor=-1.0, neg_ceiling=1.0, balance=False):
    """The loss from ncc_max's map, pair by pair, in plain Python."""
    s = ncc_max(a, b, 5, 5, 0.01)[0]
    costs = {True: [], False: []}
    for i in range(len(similar)):
        positive = bool(similar[i].trunc() != 0)
        values = s[i].reshape(-1).tolist()
        if positive:
            cost = [1 - v if v >= pos_floor else 0.0 for v in values]
        else:
            cost = [max(v, 0.0) if v <= neg_ceiling else 0.0 for v in values]
        costs[positive].append(sum(cost) / len(cost))
    n = len(similar)
    if balance and costs[True] and costs[False]:
        return 0.5 * sum(costs[True]) / len(costs[True]) + 0.5 * sum(costs[False]) / len(costs[False])
    return (sum(costs[True]) + sum(costs[False])) / n


@pytest.mark.parametrize("pos_floor, neg_ceiling", [(-1.0, 1.0), (0.3, 0.6)])
@pytest.mark.parametrize("balance", [False, True])
def test_loss_against_a_pair_by_pair_count(pos_floor, neg_ceiling, balance):
    a, b = maps()
    similar = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # 1 : 2, as the pair sampler draws them
    got = ncc_loss(a, b, similar, pos_floor=pos_floor, neg_ceiling=neg_ceiling, balance_pairs=balance)
    want = by_hand(a, b, similar, pos_floor, neg_ceiling, balance)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    pos, neg = ncc_loss_shares(a, b, similar, pos_floor=pos_floor, neg_ceiling=neg_ceiling, balance_pairs=balance)
    assert (pos + neg).item() == pytest.approx(got.item(), rel=1e-12)


def test_balance_reweighs_the_two_kinds_of_pair():
    """With 2 positive and 4 negative pairs, balancing multiplies the positive share by 3/2 and
    the negative share by 3/4; a batch of one kind of pair is unchanged; so is a 1 : 1 batch."""
    a, b = maps()
    similar = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    plain = ncc_loss_shares(a, b, similar)
    balanced = ncc_loss_shares(a, b, similar, balance_pairs=True)
    assert balanced[0].item() == pytest.approx(1.5 * plain[0].item(), rel=1e-12)
    assert balanced[1].item() == pytest.approx(0.75 * plain[1].item(), rel=1e-12)
    assert plain[0].item() > 0 and plain[1].item() > 0
    for sim in (torch.ones(6), torch.zeros(6), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])):
        assert ncc_loss(a, b, sim, balance_pairs=True).item() == pytest.approx(ncc_loss(a, b, sim).item(), rel=1e-12)
    only_neg = ncc_loss_shares(a, b, torch.zeros(6), balance_pairs=True)
    assert only_neg[0].item() == 0.0 and only_neg[1].item() > 0


@pytest.mark.parametrize("balance", [False, True])
def test_gradcheck(balance):
    a, b = maps(n=3, seed=1)
    a.requires_grad_(True)
    b.requires_grad_(True)
    similar = torch.tensor([1.0, 0.0, 0.0])
    assert torch.autograd.gradcheck(lambda x, y: ncc_loss(x, y, similar, balance_pairs=balance), (a, b))


def test_float32_and_shape_errors():
    a, b = maps(dtype=torch.float32)
    similar = torch.tensor([1, 0, 0, 1, 0, 0])  # integer labels, truncated like Caffe's
    got = ncc_loss(a, b, similar, balance_pairs=True)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(by_hand(a.double(), b.double(), similar.double(), balance=True), rel=1e-4)
    with pytest.raises(ValueError, match=r"`similar` must have shape \[6\]"):
        ncc_loss(a, b, torch.ones(5), balance_pairs=True)
    with pytest.raises(ValueError, match=r"`similar` must have shape \[6\]"):
        ncc_loss_shares(a, b, torch.ones(6, 1))
