"""MSP-CNN's losses that are not plain Caffe layers.

The classification and high-level losses are Caffe's SoftmaxWithLoss and
ContrastiveLoss (:mod:`mspcnn.caffe.layers`). The low-level loss compares the
pool1 maps of the two images of a pair through the wide-search NCC operator
(docs/method.md, section 3, reconstructed; the paper gives no formula).
"""
import torch

from mspcnn.defaults import NCC_EPS, NCC_NEG_CEILING, NCC_PATCH, NCC_POS_FLOOR, NCC_SEARCH_ROWS
from mspcnn.ops import ncc_max

__all__ = ["ncc_loss", "ncc_loss_shares"]


def _ncc_costs(a, b, similar, patch, search_rows, eps, pos_floor, neg_ceiling):
    """Every patch's cost (N x C x H x W) and which pairs are positive (N booleans)."""
    if similar.shape != a.shape[:1]:
        raise ValueError(f"ncc_loss: `similar` must have shape [{a.shape[0]}], got "
                         f"{list(similar.shape)}")
    s, _ = ncc_max(a, b, patch, search_rows, eps)
    pos = similar.trunc() != 0
    pos_cost = torch.where(s >= pos_floor, 1.0 - s, torch.zeros_like(s))
    neg_cost = torch.where(s <= neg_ceiling, s.clamp(min=0), torch.zeros_like(s))
    return torch.where(pos.view(-1, 1, 1, 1), pos_cost, neg_cost), pos


def _pair_weights(pos, balance_pairs, dtype):
    """Each pair's weight in the loss: 1 / N; with ``balance_pairs`` 1 / (2 x its kind's count), or
    1 / N when the batch holds only one kind of pair. Computed on pos's device without reading the
    counts back (no host synchronisation: the loss can be captured in a CUDA graph)."""
    n = pos.numel()
    if not balance_pairs:
        return torch.full(pos.shape, 1.0 / max(n, 1), dtype=dtype, device=pos.device)
    n_pos = pos.sum().to(dtype)
    n_neg = n - n_pos
    balanced = torch.where(pos, 0.5 / n_pos.clamp(min=1), 0.5 / n_neg.clamp(min=1))
    return torch.where((n_pos > 0) & (n_neg > 0), balanced, torch.full_like(balanced, 1.0 / max(n, 1)))


def ncc_loss(a, b, similar, patch=NCC_PATCH, search_rows=NCC_SEARCH_ROWS, eps=NCC_EPS,
             pos_floor=NCC_POS_FLOOR, neg_ceiling=NCC_NEG_CEILING, balance_pairs=False):
    """Low-level similarity loss on feature maps ``a``, ``b`` (N x C x H x W).

    With s = ncc_max(a, b) (the best wide-search NCC of every patch of ``a``):
    a positive pair (``similar`` != 0) costs (1 - s) where s >= pos_floor and
    0 elsewhere (noisy patches are ignored); a negative pair costs max(s, 0)
    where s <= neg_ceiling and 0 elsewhere (shared, non-discriminative
    patterns are ignored). The mean over N, C, H, W.

    The defaults (pos_floor -1, neg_ceiling 1) keep every patch: thresholds
    are chosen by a measured sweep. ``similar`` is an N-vector (float or int;
    truncated like Caffe's labels). The gradient flows through the selected
    candidate of each patch (ncc_max).

    ``balance_pairs`` (off by default; a reconstruction choice, not the
    paper's) weighs the two kinds of pair equally: half the mean cost of the
    positive pairs plus half that of the negative pairs (each pair's cost its
    mean over C, H, W), instead of the mean over all pairs, where the negative
    pairs, twice as many, weigh twice as much. A batch with one kind of pair
    only gets the plain mean."""
    cost, pos = _ncc_costs(a, b, similar, patch, search_rows, eps, pos_floor, neg_ceiling)
    if not balance_pairs:
        return cost.mean()
    return (cost.mean(dim=(1, 2, 3)) * _pair_weights(pos, True, cost.dtype)).sum()


def ncc_loss_shares(a, b, similar, patch=NCC_PATCH, search_rows=NCC_SEARCH_ROWS, eps=NCC_EPS,
                    pos_floor=NCC_POS_FLOOR, neg_ceiling=NCC_NEG_CEILING, balance_pairs=False):
    """The positive pairs' and the negative pairs' shares of :func:`ncc_loss` (same arguments).

    Two scalars that add up to ncc_loss (to rounding), each differentiable: the share of a
    kind of pair is the sum of its pairs' mean costs times their weights in the loss (1 / N, or
    with ``balance_pairs`` 1 / (2 x the kind's count)). A kind absent from the batch has share 0.
    Used by tools/probe_losses.py to see what each kind of pair asks of the network."""
    cost, pos = _ncc_costs(a, b, similar, patch, search_rows, eps, pos_floor, neg_ceiling)
    per_pair = cost.mean(dim=(1, 2, 3)) * _pair_weights(pos, balance_pairs, cost.dtype)
    return (per_pair * pos).sum(), (per_pair * ~pos).sum()
