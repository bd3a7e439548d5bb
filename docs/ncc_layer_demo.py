"""The claims of docs/ncc_layer.md, run: each section of the page checked numerically, in seconds.

    python docs/ncc_layer_demo.py

1. The definition: ncc_volume's channel c*R*W + k*W + col is the NCC of the patch of a at (r, w)
   with the patch of b at (r + k - R//2, col), zero padding included; ncc_max is its maximum.
2. The forward rewrites: NCC = (X - n mu_a mu_b) ka kb with per-centre factors, and X as a box sum
   of per-pixel products split into a horizontal and a vertical sum.
3. The backward pass: the exact derivative, eps included (gradcheck at eps 0, 0.01 and 2).
4. ncc_max routes the gradient through the chosen candidate only.
5. The operator passes torch.library.opcheck.
For building such a layer yourself, step by step: docs/tutorial/.
"""
import torch
import torch.nn.functional as F

from mspcnn.ops import ncc_max, ncc_volume, ncc_volume_reference

torch.manual_seed(0)
P, R, eps = 3, 3, 0.01
h, n, R2 = P // 2, P * P, R // 2


def patch_any(x, u, v):
    H, W = x.shape
    out = torch.zeros(P, P, dtype=x.dtype)
    for i in range(P):
        for j in range(P):
            uu, vv = u - h + i, v - h + j
            if 0 <= uu < H and 0 <= vv < W:
                out[i, j] = x[uu, vv]
    return out.flatten()


def ncc(x, y):
    sx, sy = x.std() + eps, y.std() + eps
    return ((x - x.mean()) * (y - y.mean())).sum() / ((n - 1) * sx * sy)


a = torch.rand(1, 2, 6, 5, dtype=torch.float64)
b = torch.rand(1, 2, 6, 5, dtype=torch.float64)
H, W = 6, 5
print("1. the definition")
vol = ncc_volume(a, b, P, R, eps)
worst = 0.0
for c in range(2):
    for r in range(H):
        for w in range(W):
            for k in range(R):
                for col in range(W):
                    want = ncc(patch_any(a[0, c], r, w), patch_any(b[0, c], r + k - R2, col))
                    worst = max(worst, abs(vol[0, c * R * W + k * W + col, r, w].item() - want.item()))
values, index = ncc_max(a, b, P, R, eps)
best = vol.view(1, 2, R * W, H, W).max(dim=2)
print(f"   ncc_volume vs the formula, every candidate: max difference {worst:.1e}; ncc_max = max of the volume:"
      f" {torch.equal(values, best.values) and torch.equal(index, best.indices)}")
assert worst < 1e-12 and torch.equal(values, best.values)

print("2. the forward rewrites")
x, y = patch_any(a[0, 0], 2, 2), patch_any(b[0, 0], 3, 1)
X = (x * y).sum()
ka, kb = 1 / ((n - 1) * (x.std() + eps)), 1 / (y.std() + eps)
rewritten = (X - n * x.mean() * y.mean()) * ka * kb
pa, pb = F.pad(a[0, 0], (h, h, h, h)), F.pad(b[0, 0], (h, h, h, h))
d, r0, w0, col = 1, 2, 2, 1  # output (r0, w0), candidate centre (r0 + d, col)
Hs = [sum(pa[u + h, w0 + j + h] * pb[u + d + h, col + j + h] for j in range(-h, h + 1)) for u in range(r0 - h, r0 + h + 1)]
print(f"   (X - n mu_a mu_b) ka kb - NCC = {abs(rewritten - ncc(x, y)).item():.1e};"
      f" X - sum of the horizontal sums Hs = {abs(X - sum(Hs)).item():.1e}")
assert abs(rewritten - ncc(x, y)) < 1e-12 and abs(X - sum(Hs)) < 1e-12

print("3. the backward pass, eps included")
ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
for e in (0.0, 0.01, 2.0):
    assert torch.autograd.gradcheck(lambda s, t: ncc_volume(s, t, P, R, e), (ag, bg))
    assert torch.autograd.gradcheck(lambda s, t: ncc_max(s, t, P, R, e)[0], (ag, bg))
print("   gradcheck of ncc_volume and ncc_max at eps 0, 0.01 and 2: passed")

print("4. ncc_max routes the gradient through the chosen candidate")
g = torch.zeros_like(values)
g[0, 1, 3, 2] = 1.0  # one output's gradient
ga, gb = torch.autograd.grad(ncc_max(ag, bg, P, R, eps)[0], (ag, bg), g)
k, col = divmod(int(index[0, 1, 3, 2]), W)
rows_b = {u for u in range(3 + k - R2 - h, 3 + k - R2 + h + 1)}
touched_b = {int(u) for u in torch.nonzero(gb[0, 1])[:, 0]}
print(f"   one output (channel 1, row 3, column 2) chose row offset {k - R2}, column {col}: its gradient reaches "
      f"{int((ga != 0).sum())} pixels of a and {int((gb != 0).sum())} of b, all inside the two patches")
assert touched_b <= rows_b and int((ga != 0).sum()) <= n and int((gb != 0).sum()) <= n

print("5. the operator registration")
torch.library.opcheck(torch.ops.mspcnn.ncc_max.default, (ag, bg, P, R, eps))
print("   torch.library.opcheck(ncc_max): passed")
assert torch.allclose(ncc_volume_reference(a, b, P, R, eps), vol)
print("OK: every check of docs/ncc_layer.md holds")
