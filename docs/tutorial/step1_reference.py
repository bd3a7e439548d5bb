"""Step 1: the formula in plain PyTorch, checked against loops.

The operator: for every channel and pixel, the normalized cross-correlation (NCC) of the P x P patch
of `a` centred there with the patch of `b` at the same place, zero outside the map:

    NCC(x, y) = sum((x - mu_x)(y - mu_y)) / ((n - 1)(s_x + eps)(s_y + eps)),   n = P * P,

mu the patch mean, s its standard deviation (divided by n - 1). `unfold` cuts every patch out of a
zero-padded map, so the formula becomes a few tensor operations, and autograd differentiates it.
This reference is slow and memory-hungry, but obviously right: every faster version is tested
against it. Run: python docs/tutorial/step1_reference.py   (a second on a CPU)
"""
import torch
import torch.nn.functional as F


def ncc_same_reference(a, b, patch=3, eps=0.01):
    """N x C x H x W -> N x C x H x W, in plain PyTorch (unfold, mean, sum)."""
    n, c, h, w = a.shape

    def normalised(x):
        cols = F.unfold(x.reshape(n * c, 1, h, w), patch, padding=patch // 2)  # (N C) x P^2 x (H W)
        centred = cols - cols.mean(dim=1, keepdim=True)
        std = centred.pow(2).sum(dim=1, keepdim=True).div(patch * patch - 1).sqrt()
        return centred / (std + eps)

    out = (normalised(a) * normalised(b)).sum(dim=1) / (patch * patch - 1)
    return out.reshape(n, c, h, w)


def ncc_same_loops(a, b, patch=3, eps=0.01):
    """The same, one patch at a time, exactly as the formula reads."""
    n_, c_, h_, w_ = a.shape
    r = patch // 2
    pa = F.pad(a, (r, r, r, r))
    pb = F.pad(b, (r, r, r, r))
    out = torch.empty_like(a)
    for n in range(n_):
        for c in range(c_):
            for i in range(h_):
                for j in range(w_):
                    x = pa[n, c, i:i + patch, j:j + patch].flatten()
                    y = pb[n, c, i:i + patch, j:j + patch].flatten()
                    sx, sy = x.std(unbiased=True), y.std(unbiased=True)
                    cov = ((x - x.mean()) * (y - y.mean())).sum()
                    out[n, c, i, j] = cov / ((patch * patch - 1) * (sx + eps) * (sy + eps))
    return out


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 6, 5, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.rand(2, 3, 6, 5, generator=g, dtype=torch.float64)  # b resembles a
    ref, loops = ncc_same_reference(a, b), ncc_same_loops(a, b)
    err = (ref - loops).abs().max().item()
    print(f"reference vs loops: max difference {err:.2e}; NCC ranges from {ref.min():.3f} to {ref.max():.3f}")
    assert err < 1e-12
    print("OK step 1")
