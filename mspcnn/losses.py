"""MSP-CNN's losses that are not plain Caffe layers.

The classification and high-level losses are Caffe's SoftmaxWithLoss and
ContrastiveLoss (:mod:`mspcnn.caffe.layers`). The low-level loss compares the
pool1 maps of the two images of a pair through the wide-search NCC operator
(docs/method.md, section 3, reconstructed; the paper gives no formula).
"""
import torch

from mspcnn.defaults import NCC_EPS, NCC_NEG_CEILING, NCC_PATCH, NCC_POS_FLOOR, NCC_SEARCH_ROWS
from mspcnn.ops import ncc_max

__all__ = ["ncc_loss"]


def ncc_loss(a, b, similar, patch=NCC_PATCH, search_rows=NCC_SEARCH_ROWS, eps=NCC_EPS,
             pos_floor=NCC_POS_FLOOR, neg_ceiling=NCC_NEG_CEILING):
    """Low-level similarity loss on feature maps ``a``, ``b`` (N x C x H x W).

    With s = ncc_max(a, b) (the best wide-search NCC of every patch of ``a``):
    a positive pair (``similar`` != 0) costs (1 - s) where s >= pos_floor and
    0 elsewhere (noisy patches are ignored); a negative pair costs max(s, 0)
    where s <= neg_ceiling and 0 elsewhere (shared, non-discriminative
    patterns are ignored). The mean over N, C, H, W.

    The defaults (pos_floor -1, neg_ceiling 1) keep every patch: thresholds
    are chosen by a measured sweep. ``similar`` is an N-vector (float or int;
    truncated like Caffe's labels). The gradient flows through the selected
    candidate of each patch (ncc_max)."""
    if similar.shape != a.shape[:1]:
        raise ValueError(f"ncc_loss: `similar` must have shape [{a.shape[0]}], got "
                         f"{list(similar.shape)}")
    s, _ = ncc_max(a, b, patch, search_rows, eps)
    pos = (similar.trunc() != 0).view(-1, 1, 1, 1)
    pos_cost = torch.where(s >= pos_floor, 1.0 - s, torch.zeros_like(s))
    neg_cost = torch.where(s <= neg_ceiling, s.clamp(min=0), torch.zeros_like(s))
    return torch.where(pos, pos_cost, neg_cost).mean()
