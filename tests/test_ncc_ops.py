"""Tests of the wide-search NCC operators (mspcnn.ops) against their definition.

The same tests run on the CPU kernels and, where a GPU and the CUDA build are
present, on the CUDA kernels (tests marked ``cuda``).
"""
import math

import pytest
import torch
from torch.autograd import gradcheck

from mspcnn.ops import ncc_max, ncc_max_reference, ncc_volume, ncc_volume_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Float32 tolerance against the float64 reference, stated in docs/ncc_layer.md:
# NCC values lie in about [-1, 1]; the kernels accumulate the patch products in
# float32 and subtract the mean product, so the absolute error is a few ulp of
# n * max|a| * max|b| / ((n - 1) sig_a sig_b).
F32_ATOL = 2e-5
F32_GRAD_RTOL = 1e-4


def maps(shape, device, dtype=torch.float64, requires_grad=False, positive=False):
    a = torch.randn(shape, dtype=dtype, device=device)
    b = torch.randn(shape, dtype=dtype, device=device)
    if positive:  # like pool1 features after ReLU: non-negative, non-zero mean
        a, b = a.relu(), b.relu()
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def max_values(a, b, **kw):
    return ncc_max(a, b, **kw)[0]


def argmax_stable(volume, N, C, candidates, H, W, tol):
    """Mask of outputs whose best candidate beats the second by more than tol."""
    if candidates == 1:
        return torch.ones(N, C, H, W, dtype=torch.bool)
    top2 = volume.reshape(N, C, candidates, H, W).topk(2, dim=2).values
    return (top2[:, :, 0] - top2[:, :, 1]) > tol


# ---------------------------------------------------------------------------
# Forward against the reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("patch,search_rows", [(3, 1), (3, 3), (5, 5), (5, 3), (7, 5)])
@pytest.mark.parametrize("H,W", [(6, 1), (5, 4), (7, 13), (3, 9)])
def test_forward_matches_reference_float64(device, patch, search_rows, H, W):
    a, b = maps((2, 3, H, W), device)
    kw = dict(patch=patch, search_rows=search_rows, eps=0.01)
    vol = ncc_volume(a, b, **kw)
    ref = ncc_volume_reference(a.cpu(), b.cpu(), **kw)
    assert vol.shape == (2, 3 * search_rows * W, H, W)
    torch.testing.assert_close(vol.cpu(), ref, atol=1e-12, rtol=0)
    values, index = ncc_max(a, b, **kw)
    rvalues, rindex = ncc_max_reference(a.cpu(), b.cpu(), **kw)
    torch.testing.assert_close(values.cpu(), rvalues, atol=1e-12, rtol=0)
    assert index.dtype == torch.int64
    stable = argmax_stable(ref, 2, 3, search_rows * W, H, W, 1e-9)
    assert torch.equal(index.cpu()[stable], rindex[stable])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positive", [False, True])
def test_pool1_shape_float32_against_reference(device, positive):
    """The MSP-CNN shape (32 x 72 x 28) in float32 against the float64 reference."""
    N, C, H, W = 2, 32, 72, 28
    a, b = maps((N, C, H, W), device, torch.float32, positive=positive)
    a.requires_grad_(True)
    b.requires_grad_(True)
    a64 = a.detach().cpu().double().requires_grad_(True)
    b64 = b.detach().cpu().double().requires_grad_(True)

    values, index = ncc_max(a, b)
    rvol = ncc_volume_reference(a64, b64)
    rvalues, rindex = ncc_max_reference(a64, b64)
    assert values.dtype == torch.float32
    assert (values.detach().cpu().double() - rvalues).abs().max() <= F32_ATOL
    stable = argmax_stable(rvol.detach(), N, C, 5 * W, H, W, 10 * F32_ATOL)
    assert stable.float().mean() > 0.99
    assert torch.equal(index.cpu()[stable], rindex[stable])

    # Gradients through the selected candidates, where the choice is stable.
    g = torch.randn_like(values) * stable.to(device)
    ga, gb = torch.autograd.grad(values, (a, b), g)
    ra, rb = torch.autograd.grad(rvalues, (a64, b64), g.cpu().double())
    for x, r in ((ga, ra), (gb, rb)):
        assert (x.cpu().double() - r).norm() / r.norm() < F32_GRAD_RTOL

    vol = ncc_volume(a, b)
    assert (vol.detach().cpu().double() - rvol.detach()).abs().max() <= F32_ATOL


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("patch", [3, 5])
@pytest.mark.parametrize("search_rows", [1, 3, 5])
@pytest.mark.parametrize("H,W", [(5, 1), (6, 4), (4, 13)])
def test_gradcheck(device, patch, search_rows, H, W):
    a, b = maps((2, 2, H, W), device, requires_grad=True)
    kw = dict(patch=patch, search_rows=search_rows, eps=0.01)
    fast = W == 13  # random projections of the Jacobian: same check, fewer backward calls
    assert gradcheck(lambda x, y: ncc_volume(x, y, **kw), (a, b), fast_mode=fast)
    assert gradcheck(lambda x, y: max_values(x, y, **kw), (a, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("patch", [7, 9, 15, 17])
def test_gradcheck_wide_patches(device, patch):
    """The CPU max backward loads each patch row as 8-lane vectors, the last one masked: one vector
    up to P = 8 (7: one lane masked), then full vectors and a masked one (9: one lane of the second;
    15: seven; 17: two full vectors and one lane). All against the numerical Jacobian."""
    if patch > 15 and device == "cuda":
        pytest.skip("the CUDA kernels take P <= 15")
    a, b = maps((1, 2, 6, 11), device, requires_grad=True)
    assert gradcheck(lambda x, y: max_values(x, y, patch=patch, search_rows=3, eps=0.01), (a, b))
    # float32 against float64 at the same choices of candidate
    x, y = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    values, index = ncc_max(x, y, patch, 3)
    g = torch.randn_like(values)
    ga, gb = torch.autograd.grad(values, (x, y), g)
    ra, rb = torch.ops.mspcnn.ncc_max_backward(g.double(), a.detach(), b.detach(), index, patch, 3, 0.01)
    for got, ref in ((ga, ra), (gb, rb)):
        assert (got.double() - ref).norm() / ref.norm() < F32_GRAD_RTOL


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_eps_zero_and_large(device):
    """The eps terms of the derivative are exact, not the eps = 0 formula of [2]."""
    a, b = maps((1, 2, 5, 6), device, requires_grad=True)
    for eps in (0.0, 0.5, 2.0):
        assert gradcheck(lambda x, y: ncc_volume(x, y, 3, 3, eps), (a, b))
        assert gradcheck(lambda x, y: max_values(x, y, patch=3, search_rows=3, eps=eps), (a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_volume_gradient_matches_reference(device):
    a, b = maps((2, 3, 9, 7), device, requires_grad=True)
    vol = ncc_volume(a, b, 5, 5)
    g = torch.randn_like(vol)
    ga, gb = torch.autograd.grad(vol, (a, b), g)
    a64, b64 = a.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
    ra, rb = torch.autograd.grad(ncc_volume_reference(a64, b64, 5, 5), (a64, b64), g.cpu())
    torch.testing.assert_close(ga.cpu(), ra, atol=1e-11, rtol=0)
    torch.testing.assert_close(gb.cpu(), rb, atol=1e-11, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("patch,search_rows", [(3, 3), (5, 5), (5, 1), (7, 3)])
@pytest.mark.parametrize("W", [17, 28, 33])
def test_volume_gradient_at_wide_rows(dtype, patch, search_rows, W):
    """The CPU volume backward at rows wider than its register blocks (2 vectors: 8 doubles or 16
    floats with AVX2, twice that with AVX-512; rows padded to a multiple, 28 is pool1's width), for
    the blocked patches (3, 5) and the plain loops (7), against the reference's autograd in float64.
    Float32 within F32_GRAD_RTOL of the largest gradient (random maps, no near-flat patches)."""
    torch.manual_seed(W + 10 * patch + search_rows)
    a, b = maps((2, 2, 11, W), "cpu")
    vol = ncc_volume(a.to(dtype), b.to(dtype), patch, search_rows)
    g = torch.randn(vol.shape, dtype=torch.float64)
    x, y = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    ga, gb = torch.autograd.grad(ncc_volume(x, y, patch, search_rows), (x, y), g.to(dtype))
    a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ra, rb = torch.autograd.grad(ncc_volume_reference(a64, b64, patch, search_rows), (a64, b64), g)
    for got, want in ((ga, ra), (gb, rb)):
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, atol=1e-11, rtol=0)
        else:
            assert (got.double() - want).abs().max() <= F32_GRAD_RTOL * want.abs().max()


# ---------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_constant_patch_gives_zero_ncc_and_finite_gradient(device):
    a, b = maps((1, 2, 8, 9), device)
    a[:, :, 1:6, 2:8] = 0.7  # a constant region larger than a 3 x 3 patch
    b[:, 1] = -1.25  # a whole constant channel
    a.requires_grad_(True)
    b.requires_grad_(True)
    vol = ncc_volume(a, b, 3, 3)
    values, _ = ncc_max(a, b, 3, 3)
    vol5 = vol.reshape(1, 2, 3 * 9, 8, 9)
    # Patches inside the constant region: centres rows 2..4, columns 3..6.
    assert vol5[:, :, :, 2:5, 3:7].abs().max() < 1e-9
    # Channel 1 of b is constant: every candidate patch away from its border is.
    interior = vol5[0, 1].reshape(3, 9, 8, 9)[:, 1:8, 2:6, :]  # k, col, r, w
    assert interior.abs().max() < 1e-9
    (vol.sum() + values.sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    a64, b64 = a.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
    ncc_volume_reference(a64, b64, 3, 3).sum().backward()
    torch.testing.assert_close(vol.detach().cpu(), ncc_volume_reference(a64, b64, 3, 3).detach(),
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("offset", [0.0, 10.0])
@pytest.mark.parametrize("patch,rows,W", [(3, 3, 28), (3, 1, 64), (5, 5, 28)])
def test_float32_volume_near_flat_patches(offset, patch, rows, W):
    """The CPU volume in float32 on ReLU'd maps: near-flat patches (a few small values among zeros)
    sit far from the plane mean that the box-sum form shifts by, and lost digits there (up to 5.8e-5
    at 3 x 3 patches); the kernel computes such entries again in the centred form
    (docs/perf_notes.md, "The volume's cancellation")."""
    torch.manual_seed(0)
    a = torch.randn(3, 8, 30, W).relu() + offset
    b = torch.randn(3, 8, 30, W).relu() + offset
    vol = ncc_volume(a, b, patch, rows)
    vol64 = ncc_volume(a.double(), b.double(), patch, rows)
    assert (vol.double() - vol64).abs().max() <= 2e-6


def test_float32_keeps_its_accuracy_when_the_features_have_a_large_mean():
    """ReLU features are non-negative: their patch means are large beside their spread, and the
    box-sum form (sum of products minus n times the product of the means) loses float32 digits to
    that subtraction. The CPU kernel shifts each plane by its mean first; before that, at a mean of
    10, values were off by 2.8e-4 and 17 of 129,024 argmax choices moved (tools/bench_ncc.py).
    CPU here; the CUDA kernels' shift has its own test (test_ncc_cuda.py)."""
    torch.manual_seed(3)
    a = torch.randn(2, 32, 72, 28).relu() + 10.0
    b = torch.randn(2, 32, 72, 28).relu() + 10.0
    values, index = ncc_max(a, b)
    v64, i64 = ncc_max(a.double(), b.double())
    assert (values.double() - v64).abs().max() <= F32_ATOL / 4
    vol = ncc_volume(a, b)
    vol64 = ncc_volume(a.double(), b.double())
    assert (vol.double() - vol64).abs().max() <= F32_ATOL
    stable = argmax_stable(vol64, 2, 32, 5 * 28, 72, 28, 10 * F32_ATOL)
    assert torch.equal(index[stable], i64[stable])


@pytest.mark.parametrize("device", DEVICES)
def test_zero_patches_give_exactly_zero_in_float32(device):
    """The zeros ReLU leaves (and the padding): a flat patch has covariance 0 with every other, so
    its NCC is exactly 0 and its argmax the first candidate, in float32 as in the definition (the
    kernel's shift by the plane mean must not turn them into rounding noise divided by eps)."""
    torch.manual_seed(4)
    a = torch.rand(2, 3, 20, 12, device=device) + 0.5
    b = torch.rand(2, 3, 20, 12, device=device) + 0.5
    a[:, :, 4:12, 2:9] = 0.0  # flat 3 x 3 patches centred at rows 5..10, columns 3..7
    b[:, 1] = 0.0  # a whole flat channel of b
    values, index = ncc_max(a, b, 3, 3)
    assert values[:, :, 5:11, 3:8].abs().max().item() == 0.0
    assert index[:, :, 5:11, 3:8].max().item() == 0
    vol = ncc_volume(a, b, 3, 3).reshape(2, 3, 3 * 12, 20, 12)
    assert vol[:, 1].abs().max().item() == 0.0
    assert vol[:, :, :, 5:11, 3:8].abs().max().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_the_outputs_that_use_it(device):
    """Documented behaviour: NaN in an input makes exactly the outputs whose
    patches (or, for ncc_max, whose candidates) contain it NaN; elsewhere the
    result is unchanged. ncc_max reports NaN as the maximum."""
    a, b = maps((1, 1, 9, 7), device)
    a[0, 0, 4, 3] = math.nan
    b[0, 0, 1, 5] = math.nan
    vol = ncc_volume(a, b, 3, 3)
    ref = ncc_volume_reference(a.cpu(), b.cpu(), 3, 3)
    assert torch.equal(vol.isnan().cpu(), ref.isnan())
    torch.testing.assert_close(vol.cpu().nan_to_num(7.0), ref.nan_to_num(7.0), atol=1e-12, rtol=0)
    values, index = ncc_max(a, b, 3, 3)
    rvalues, rindex = ncc_max_reference(a.cpu(), b.cpu(), 3, 3)
    assert torch.equal(values.isnan().cpu(), rvalues.isnan())
    assert 0 < values.isnan().sum() < values.numel()
    assert torch.equal(index.cpu()[values.isnan().cpu()], rindex[rvalues.isnan()])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_channels_last_inputs(device):
    big_a, big_b = maps((2, 3, 10, 14), device)
    a, b = big_a[:, :, :, ::2], big_b[:, :, :, ::2]  # strided views
    assert not a.is_contiguous()
    cl_a = a.contiguous().to(memory_format=torch.channels_last)
    cl_b = b.contiguous().to(memory_format=torch.channels_last)
    ref_vol = ncc_volume(a.contiguous(), b.contiguous(), 3, 3)
    ref_max = ncc_max(a.contiguous(), b.contiguous(), 3, 3)
    for x, y in ((a, b), (cl_a, cl_b)):
        torch.testing.assert_close(ncc_volume(x, y, 3, 3), ref_vol, atol=0, rtol=0)
        v, i = ncc_max(x, y, 3, 3)
        torch.testing.assert_close(v, ref_max[0], atol=0, rtol=0)
        assert torch.equal(i, ref_max[1])
    # Gradients arrive in the layout autograd expects and equal the contiguous ones.
    xs = [t.clone().requires_grad_() for t in (cl_a, cl_b, a.contiguous(), b.contiguous())]
    g1 = torch.autograd.grad(max_values(xs[0], xs[1], patch=3, search_rows=3).sum(), xs[:2])
    g2 = torch.autograd.grad(max_values(xs[2], xs[3], patch=3, search_rows=3).sum(), xs[2:])
    # The CUDA backward adds the gradient of b atomically: equal up to rounding.
    tol = 0 if device == "cpu" else 1e-14
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    a, b = maps((0, 4, 6, 5), device, requires_grad=True)
    vol = ncc_volume(a, b, 3, 5)
    values, index = ncc_max(a, b, 3, 5)
    assert vol.shape == (0, 4 * 5 * 5, 6, 5)
    assert values.shape == index.shape == (0, 4, 6, 5)
    (vol.sum() + values.sum()).backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("device", DEVICES)
def test_patch_larger_than_map_is_defined_by_zero_padding(device):
    """A patch wider than the map still works: the padding is part of the patch."""
    a, b = maps((1, 2, 2, 3), device)
    for fn, ref in ((ncc_volume, ncc_volume_reference),):
        torch.testing.assert_close(fn(a, b, 7, 3).cpu(), ref(a.cpu(), b.cpu(), 7, 3),
                                   atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_index_addresses_the_volume(device):
    a, b = maps((2, 3, 6, 5), device)
    vol = ncc_volume(a, b, 3, 3).reshape(2, 3, 15, 6, 5)
    values, index = ncc_max(a, b, 3, 3)
    torch.testing.assert_close(vol.gather(2, index.unsqueeze(2)).squeeze(2), values,
                               atol=1e-12, rtol=0)


def test_finds_a_known_shift():
    """b is a copy of a moved 1 row down and 3 columns right: the best match of
    an interior patch is exactly that displacement, with NCC close to 1."""
    a = torch.randn(1, 4, 20, 16, dtype=torch.float64)
    b = torch.zeros_like(a)
    b[:, :, 1:, 3:] = a[:, :, :-1, :-3]
    values, index = ncc_max(a, b, 5, 3, eps=0.0)
    W = 16
    k, col = index // W, index % W
    inner = (slice(None), slice(None), slice(3, 17), slice(2, 11))
    assert torch.all(k[inner] == 2)  # row offset +1
    cols = torch.arange(16).view(1, 1, 1, 16).expand_as(col)
    assert torch.all(col[inner] == cols[inner] + 3)
    assert torch.allclose(values[inner], torch.ones_like(values[inner]))


# ---------------------------------------------------------------------------
# Operator registration: opcheck, torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    a, b = maps((2, 3, 6, 5), device, dtype, requires_grad=True)
    for op in (torch.ops.mspcnn.ncc_volume.default, torch.ops.mspcnn.ncc_max.default):
        torch.library.opcheck(op, (a, b, 3, 3, 0.01))
        torch.library.opcheck(op, (a.detach(), b.detach(), 5, 1, 0.1))
    vol = torch.ops.mspcnn.ncc_volume.default(a, b, 3, 3, 0.01)
    values, index = torch.ops.mspcnn.ncc_max.default(a, b, 3, 3, 0.01)
    torch.library.opcheck(torch.ops.mspcnn.ncc_volume_backward.default,
                          (torch.randn_like(vol), a.detach(), b.detach(), vol.detach(), 3, 3, 0.01))
    torch.library.opcheck(torch.ops.mspcnn.ncc_max_backward.default,
                          (torch.randn_like(values), a.detach(), b.detach(), index, 3, 3, 0.01))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def loss(x, y):
        v, _ = ncc_max(x, y, 3, 3)
        return (1 - v).clamp(min=0).mean() + ncc_volume(x, y, 3, 1).square().mean()

    a, b = maps((2, 3, 8, 6), device, requires_grad=True)
    eager = torch.autograd.grad(loss(a, b), (a, b))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    out = torch.autograd.grad(compiled(a, b), (a, b))
    for x, y in zip(out, eager):
        torch.testing.assert_close(x, y)


@pytest.mark.slow
def test_torch_compile_inductor():
    def loss(x, y):
        v, _ = ncc_max(x * 2, y, 3, 3)
        return v.relu().mean()

    a, b = maps((2, 3, 8, 6), "cpu", torch.float32, requires_grad=True)
    eager = torch.autograd.grad(loss(a, b), (a, b))
    out = torch.autograd.grad(torch.compile(loss, fullgraph=True)(a, b), (a, b))
    for x, y in zip(out, eager):
        torch.testing.assert_close(x, y)
