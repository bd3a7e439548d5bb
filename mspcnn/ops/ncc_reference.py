"""Plain-PyTorch reference implementation of the wide-search NCC operators.

This is the definition of docs/method.md, section 2, written with unfold and einsum,
differentiated by autograd. It materialises every patch and the whole
N x (C*R*W) x H x W volume, so it is slow and memory-hungry; the tests compare
the C++/CUDA kernels against it and tools/bench_ncc.py uses it as the baseline.
"""
import torch
import torch.nn.functional as F

from mspcnn.defaults import NCC_EPS, NCC_PATCH, NCC_SEARCH_ROWS

from ._checks import check_inputs


def _patches(x, patch, extra_rows):
    """P x P patches of every channel, zero padded, for centres at rows
    -extra_rows .. H - 1 + extra_rows and columns 0 .. W - 1.
    Returns N x C x P*P x (H + 2 extra_rows) x W."""
    N, C, H, W = x.shape
    h = patch // 2
    xp = F.pad(x, (h, h, h + extra_rows, h + extra_rows))
    cols = F.unfold(xp.reshape(N * C, 1, xp.shape[2], xp.shape[3]), patch)
    return cols.reshape(N, C, patch * patch, H + 2 * extra_rows, W)


def _normalised(p, eps):
    """(x - mu) / (sigma + eps) along dim 2, sigma the unbiased std. A constant
    patch (zero variance) gets sigma 0 with a zero gradient for the sqrt."""
    n = p.shape[2]
    xc = p - p.mean(dim=2, keepdim=True)
    var = (xc * xc).sum(dim=2, keepdim=True) / (n - 1)
    positive = var > 0
    s = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))),
                    torch.zeros_like(var))
    return xc / (s + eps)


def ncc_volume_reference(a, b, patch=NCC_PATCH, search_rows=NCC_SEARCH_ROWS, eps=NCC_EPS):
    """Reference of :func:`mspcnn.ops.ncc_volume`: N x (C*R*W) x H x W, channel
    c*R*W + k*W + col holds the NCC of the patch of ``a`` at (r, w) with the
    patch of ``b`` at (r + k - R//2, col)."""
    check_inputs("ncc_volume_reference", a, b, patch, search_rows, eps)
    N, C, H, W = a.shape
    R2 = search_rows // 2
    n = patch * patch
    za = _normalised(_patches(a, patch, 0), eps)  # N x C x n x H x W
    zb = _normalised(_patches(b, patch, R2), eps)  # N x C x n x (H + 2 R2) x W
    rows = [
        torch.einsum("ncirw,ncirv->ncvrw", za, zb[:, :, :, k : k + H, :])
        for k in range(search_rows)
    ]
    volume = torch.stack(rows, dim=2) / (n - 1)  # N x C x R x W(col) x H x W
    return volume.reshape(N, C * search_rows * W, H, W)


def ncc_max_reference(a, b, patch=NCC_PATCH, search_rows=NCC_SEARCH_ROWS, eps=NCC_EPS):
    """Reference of :func:`mspcnn.ops.ncc_max`: the volume, then the maximum
    over the R*W candidates (the first one on ties, NaN counting as the
    largest, as torch.argmax) and its index k*W + col."""
    check_inputs("ncc_max_reference", a, b, patch, search_rows, eps)
    N, C, H, W = a.shape
    volume = ncc_volume_reference(a, b, patch, search_rows, eps)
    volume = volume.reshape(N, C, search_rows * W, H, W)
    index = volume.argmax(dim=2, keepdim=True)
    values = volume.gather(2, index)
    return values.squeeze(2), index.squeeze(2)
