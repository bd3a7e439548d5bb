"""CUDA kernels of the NCC operators against the CPU kernels and the reference
(the device-generic tests in test_ncc_ops.py also run on CUDA). Skipped
without a GPU."""
import pytest
import torch

from mspcnn.ops import ncc_max, ncc_max_reference, ncc_volume

pytestmark = pytest.mark.cuda


def centred_bound(patch):
    """The CUDA volume's float32 bound against float64 (its centred form): the rounding of the sum
    grows with the patch. Emulated largest errors on ReLU'd 72 x 28 maps (tools/emulate_cuda_ncc.py,
    12 planes each, means 0 and 10): 3.3e-7 at 3 x 3, 8.4e-7 at 5 x 5, 1.0e-6 at 7 x 7, 1.5e-6 at
    9 x 9."""
    return 2e-6 * max(1.0, patch / 5)


def pair(shape, dtype=torch.float32, positive=False):
    a, b = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    if positive:
        a, b = a.relu(), b.relu()
    return a, b


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (3, 3, 28), (7, 5, 28), (5, 5, 40), (3, 1, 64)])
def test_cuda_matches_cpu(N, patch, rows, W):
    """Fast kernel (P in {3, 5}, R in {1, 3, 5}, W <= 32) and generic kernel
    (other shapes) against the CPU kernel, forward and backward, float32."""
    a, b = pair((N, 8, 30, W), positive=True)
    outs = {}
    for dev in ("cpu", "cuda"):
        x = a.to(dev).requires_grad_(True)
        y = b.to(dev).requires_grad_(True)
        v, i = ncc_max(x, y, patch, rows)
        vol = ncc_volume(x, y, patch, rows)
        gv = torch.linspace(-1, 1, v.numel()).reshape(v.shape).to(dev)
        gvol = torch.linspace(-1, 1, vol.numel()).reshape(vol.shape).to(dev)
        ga, gb = torch.autograd.grad((v * gv).sum() + (vol * gvol).sum(), (x, y))
        outs[dev] = [t.detach().cpu() for t in (v, i, vol, ga, gb)]
    c, g = outs["cpu"], outs["cuda"]
    torch.testing.assert_close(g[0], c[0], atol=2e-5, rtol=0)
    assert (g[1] == c[1]).float().mean() > 0.999  # indices may differ only at near-ties
    # The volume: each device against float64 (the CPU's float32 volume alone can be 2e-5 off on
    # ReLU'd maps; the CUDA kernel's centred form is predicted within 1e-6, emulate_cuda_ncc.py).
    vol64 = ncc_volume(a.double(), b.double(), patch, rows)
    assert (g[2].double() - vol64).abs().max() <= centred_bound(patch)
    assert (c[2].double() - vol64).abs().max() <= 2e-5
    for x, y in ((g[3], c[3]), (g[4], c[4])):
        assert (x - y).norm() / y.norm() < 1e-4


def test_cuda_pool1_against_reference_float64():
    a, b = pair((2, 32, 72, 28), torch.float64)
    v, i = ncc_max(a.cuda(), b.cuda())
    rv, ri = ncc_max_reference(a, b)
    torch.testing.assert_close(v.cpu(), rv, atol=1e-12, rtol=0)
    assert (i.cpu() == ri).float().mean() > 0.9999


def test_mixed_devices_rejected():
    a, b = pair((1, 2, 6, 5))
    with pytest.raises(ValueError, match=r"ncc_max: `a` and `b` must be on the same device, "
                                         r"got cuda:0 and cpu"):
        ncc_max(a.cuda(), b)
    with pytest.raises(RuntimeError, match=r"ncc_volume: `a` and `b` must be on the same device"):
        torch.ops.mspcnn.ncc_volume(a.cuda(), b, 3, 3, 0.01)


def test_cuda_limits_named():
    a, b = pair((1, 1, 4, 65))
    with pytest.raises(ValueError, match=r"ncc_max: the CUDA kernel supports maps at most 64 wide, "
                                         r"`a` is 65 wide"):
        ncc_max(a.cuda(), b.cuda())
    a, b = pair((1, 1, 4, 8))
    with pytest.raises(ValueError, match=r"`patch` <= 15, got 17"):
        ncc_volume(a.cuda(), b.cuda(), patch=17)


def test_deterministic_backward():
    """With torch.use_deterministic_algorithms(True) the gradient of b is
    gathered instead of accumulated atomically: bitwise identical runs, and the
    same values as the atomic path up to rounding."""
    a, b = pair((4, 32, 72, 28), positive=True)
    x = a.cuda().requires_grad_(True)
    y = b.cuda().requires_grad_(True)

    def grads():
        v, _ = ncc_max(x, y)
        return torch.autograd.grad(v.sum(), (x, y))

    atomic = grads()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(prev)
    for f, s, t in zip(first, second, atomic):
        assert torch.equal(f, s)
        torch.testing.assert_close(f, t, atol=1e-5, rtol=1e-5)


def test_cuda_stream_and_device_guard():
    """Kernels run on the current stream."""
    a, b = pair((2, 4, 12, 10))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        v, _ = ncc_max(a.cuda(), b.cuda(), 3, 3)
    s.synchronize()
    torch.testing.assert_close(v.cpu(), ncc_max(a, b, 3, 3)[0], atol=2e-5, rtol=0)


def test_tall_planes_use_the_unfused_backward():
    """Planes too tall for the fused shared-memory backward take the global
    kernels; they give the same gradients as the CPU."""
    a, b = pair((1, 2, 1500, 8))
    outs = []
    for dev in ("cpu", "cuda"):
        x = a.to(dev).requires_grad_(True)
        y = b.to(dev).requires_grad_(True)
        v, _ = ncc_max(x, y, 3, 3)
        outs.append([t.cpu() for t in torch.autograd.grad(v.sum(), (x, y))])
    for c, g in zip(*outs):
        assert (g - c).norm() / c.norm() < 1e-4


@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (3, 1, 13), (7, 3, 9), (5, 5, 64), (11, 3, 12)])
def test_volume_backward_tiled_equals_gathers(monkeypatch, patch, rows, W):
    """The tiled volume backward (one block per row, shared memory; the default where it fits)
    against the direct gathers (MSPCNN_NCC_VOLUME_BWD=gather) and the CPU kernel, float64, with a
    gradient volume that is not all ones. (5, 5, 64) needs 178 KB of shared memory a block: the
    kernels opt in to more than 48 KB (since 2026-12-01, with ka and kb staged; not yet run then).
    (11, 3, 12): V's loop reads its 11 terms in two chunks of 8 (since 2026-12-01, not yet run)."""
    a, b = pair((2, 3, 17, W), torch.float64, positive=True)
    x, y = a.cuda().requires_grad_(True), b.cuda().requires_grad_(True)
    vol = ncc_volume(x, y, patch, rows)
    gvol = torch.randn(vol.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).cuda()
    tiled = torch.autograd.grad(vol, (x, y), gvol)
    monkeypatch.setenv("MSPCNN_NCC_VOLUME_BWD", "gather")
    gathered = torch.autograd.grad(ncc_volume(x, y, patch, rows), (x, y), gvol)
    xc, yc = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    cpu = torch.autograd.grad(ncc_volume(xc, yc, patch, rows), (xc, yc), gvol.cpu())
    for t, g, c in zip(tiled, gathered, cpu):
        torch.testing.assert_close(t, g, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(t.cpu(), c, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (3, 3, 64), (5, 1, 9), (3, 5, 30), (7, 5, 28)])
def test_volume_tiled_forward_equals_the_direct_kernel(monkeypatch, dtype, patch, rows, W):
    """MSPCNN_NCC_VOLUME_FWD=tiled (volume_tiled_kernel: the centred sums as a register-tiled matrix
    product) gives the direct kernel's volume bit for bit, on ReLU'd maps with a large mean; (7, 5) in
    float64 needs more than 48 KB of shared memory and falls back to the direct kernel. Emulated on the
    CPU (test_bench_tools.py); not yet run on a GPU when written (2026-12-01)."""
    torch.manual_seed(7)
    a = (torch.randn(3, 4, 19, W).relu() + 10).to(dtype).cuda()
    b = (torch.randn(3, 4, 19, W).relu() + 10).to(dtype).cuda()
    monkeypatch.delenv("MSPCNN_NCC_VOLUME_FWD", raising=False)
    direct = ncc_volume(a, b, patch, rows)
    monkeypatch.setenv("MSPCNN_NCC_VOLUME_FWD", "tiled")
    tiled = ncc_volume(a, b, patch, rows)
    assert torch.equal(tiled, direct)


@pytest.mark.parametrize("tile", ["16", "8"])
@pytest.mark.parametrize("patch,rows,W,H", [(5, 5, 28, 72), (5, 5, 28, 19), (3, 3, 20, 30), (5, 1, 32, 9),
                                            (3, 5, 13, 40), (5, 3, 9, 8)])
def test_max_tiled_forward_equals_the_fast_kernel(monkeypatch, tile, patch, rows, W, H):
    """MSPCNN_NCC_MAX_FWD=tiled (max_tiled_kernel: register-tiled horizontal sums, MSPCNN_NCC_MAX_TILE
    candidate columns a thread) gives max_fast_kernel's values and indices bit for bit, on ReLU'd maps
    with a large mean, a flat block (ties) and a NaN. Emulated thread by thread on the CPU
    (test_bench_tools.py); not yet run on a GPU when written (2026-12-01). If only last bits of some
    values differ, the two kernels' normalisations were contracted into different fused
    multiply-adds by ptxas (the message says how many)."""
    torch.manual_seed(11)
    a = torch.randn(2, 6, H, W).relu() + 10
    b = torch.randn(2, 6, H, W).relu() + 10
    a[0, 1, 1:5, 2:8] = 10.0
    b[1, 2, H // 2, W - 2] = float("nan")
    a, b = a.cuda(), b.cuda()
    monkeypatch.delenv("MSPCNN_NCC_MAX_FWD", raising=False)
    monkeypatch.delenv("MSPCNN_NCC_CUDA_SHIFT", raising=False)
    fast_v, fast_i = ncc_max(a, b, patch, rows)
    monkeypatch.setenv("MSPCNN_NCC_MAX_FWD", "tiled")
    monkeypatch.setenv("MSPCNN_NCC_MAX_TILE", tile)
    tiled_v, tiled_i = ncc_max(a, b, patch, rows)
    differ = (tiled_v.view(torch.int32) != fast_v.view(torch.int32)).sum().item()
    assert torch.equal(tiled_i, fast_i), f"{(tiled_i != fast_i).sum().item()} indices differ"
    assert differ == 0, f"{differ} values differ, largest {(tiled_v - fast_v).abs().nan_to_num().max().item():.2e}"
    assert tiled_v.isnan().any()


def test_max_tiled_forward_request_falls_back_where_it_has_no_kernel(monkeypatch):
    """The tiled max forward is float32 with the plane-mean shift only: float64, the shift turned off
    (MSPCNN_NCC_CUDA_SHIFT=0) and patch 7 run the kernels they ran before, with the same results."""
    torch.manual_seed(3)
    cases = [(torch.float64, "1", 5), (torch.float32, "0", 5), (torch.float32, "1", 7)]
    for dtype, shift, patch in cases:
        a, b = (torch.randn(2, 3, 15, 28, dtype=dtype).relu().cuda() for _ in range(2))
        monkeypatch.setenv("MSPCNN_NCC_CUDA_SHIFT", shift)
        monkeypatch.delenv("MSPCNN_NCC_MAX_FWD", raising=False)
        before = ncc_max(a, b, patch, 5)
        monkeypatch.setenv("MSPCNN_NCC_MAX_FWD", "tiled")
        after = ncc_max(a, b, patch, 5)
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (3, 3, 32), (7, 1, 9), (5, 5, 40)])
def test_volume_centre_fused_matches_the_separate_kernels(monkeypatch, dtype, patch, rows, W):
    """MSPCNN_NCC_VOLUME_CENTRE=fused (volume_centre_fused + volume_centre_b_sum: the per-centre sums
    of the volume backward from one read of the gradient volume) gives the gradients of the separate
    kernels to rounding (the sums run in another order); W = 40 falls back to them. Emulated on the
    CPU (test_bench_tools.py); not yet run on a GPU when written (2026-12-01)."""
    torch.manual_seed(5)
    a = (torch.randn(2, 3, 17, W).relu() + 1).to(dtype).cuda().requires_grad_(True)
    b = (torch.randn(2, 3, 17, W).relu() + 1).to(dtype).cuda().requires_grad_(True)
    vol = ncc_volume(a, b, patch, rows)
    gvol = torch.randn_like(vol)
    monkeypatch.delenv("MSPCNN_NCC_VOLUME_CENTRE", raising=False)
    separate = torch.autograd.grad(vol, (a, b), gvol, retain_graph=True)
    monkeypatch.setenv("MSPCNN_NCC_VOLUME_CENTRE", "fused")
    fused = torch.autograd.grad(vol, (a, b), gvol)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    for f, s_ in zip(fused, separate):
        torch.testing.assert_close(f, s_, **tol)
        if W > 32:
            assert torch.equal(f, s_)



@pytest.mark.parametrize("variant", ["rows", "rows_global"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("patch,rows,H,W", [(5, 5, 72, 28), (3, 3, 17, 32), (5, 1, 9, 31), (3, 5, 6, 13),
                                            (7, 5, 20, 28), (5, 5, 20, 40)])
def test_max_backward_by_rows_matches_the_fused_kernel(monkeypatch, variant, dtype, patch, rows, H, W):
    """MSPCNN_NCC_MAX_BWD=rows / rows_global (max_backward_rows: a's gradient in registers and
    shuffles, b's by shared-memory or global atomics) gives the fused kernel's gradients to rounding
    (the sums run in another order) and the CPU's; patch 7 and W = 40 fall back to the fused kernel.
    Emulated on the CPU (test_bench_tools.py); not yet run on a GPU when written (2026-12-01)."""
    torch.manual_seed(patch + rows + H + W)
    a = torch.randn(2, 4, H, W, dtype=dtype).relu().cuda().requires_grad_(True)
    b = torch.randn(2, 4, H, W, dtype=dtype).relu().cuda().requires_grad_(True)
    v, _ = ncc_max(a, b, patch, rows)
    gv = torch.randn_like(v) * (torch.rand_like(v) > 0.1)
    monkeypatch.delenv("MSPCNN_NCC_MAX_BWD", raising=False)
    fused = torch.autograd.grad(v, (a, b), gv, retain_graph=True)
    monkeypatch.setenv("MSPCNN_NCC_MAX_BWD", variant)
    by_rows = torch.autograd.grad(v, (a, b), gv)
    ac, bc = a.detach().cpu().requires_grad_(True), b.detach().cpu().requires_grad_(True)
    vc, _ = ncc_max(ac, bc, patch, rows)
    cpu = torch.autograd.grad(vc, (ac, bc), gv.cpu())
    # float32: both CUDA kernels add the same float32 terms in other orders (emulated on ReLU'd 72 x 28
    # planes: up to 3e-7 of the largest gradient, 1.3e-7 in norm); against the CPU (double
    # accumulation) the bound of test_cuda_matches_cpu.
    for r_, f, c in zip(by_rows, fused, cpu):
        assert c.abs().max().item() > 0
        if dtype == torch.float64:
            assert (r_ - f).abs().max().item() <= 1e-10 * c.abs().max().item()
            assert (r_.cpu() - c).abs().max().item() <= 1e-10 * c.abs().max().item()
        else:
            assert (r_ - f).norm() / f.norm() < 1e-5
            assert (r_.cpu() - c).norm() / c.norm() < 1e-4

@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (7, 5, 28)])
def test_shift_keeps_float32_accuracy_with_a_large_mean(monkeypatch, patch, rows, W):
    """The default (MSPCNN_NCC_CUDA_SHIFT unset): the forward kernels shift each plane by its mean,
    as the CPU kernel does (test_ncc_ops.py,
    test_float32_keeps_its_accuracy_when_the_features_have_a_large_mean), in the fast kernel (5, 5)
    and the generic one (7, 5). Predicted on the CPU by tools/emulate_cuda_ncc.py for the fast
    kernel: 1.5e-6 at a mean of 10 and only near-tie argmax changes, against 4.4e-4 and 12 changes
    (gaps up to 6.7e-5) without the shift; measured on an H200 (tools/bench_ncc.py, 2 pairs):
    1.3e-6 and 3 changes (gaps up to 2.4e-7), against 5.6e-4 and 23 (gaps up to 8.0e-5)."""
    from test_ncc_ops import F32_ATOL, argmax_stable

    monkeypatch.delenv("MSPCNN_NCC_CUDA_SHIFT", raising=False)
    torch.manual_seed(3)
    a = torch.randn(2, 32, 72, W).relu() + 10.0
    b = torch.randn(2, 32, 72, W).relu() + 10.0
    values, index = ncc_max(a.cuda(), b.cuda(), patch, rows)
    v64, i64 = ncc_max(a.double(), b.double(), patch, rows)
    assert (values.cpu().double() - v64).abs().max() <= F32_ATOL / 4
    vol = ncc_volume(a.cuda(), b.cuda(), patch, rows).cpu()
    vol64 = ncc_volume(a.double(), b.double(), patch, rows)
    assert (vol.double() - vol64).abs().max() <= F32_ATOL
    stable = argmax_stable(vol64, 2, 32, rows * W, 72, W, 10 * F32_ATOL)
    assert torch.equal(index.cpu()[stable], i64[stable])


def test_shift_off_and_on_agree_on_ordinary_maps(monkeypatch):
    """The shift changes rounding only: on maps with mean 0 the two settings agree to float32
    accuracy, forward values, volume and the gradients that flow through them."""
    a, b = pair((2, 8, 30, 28), positive=True)
    outs = []
    for setting in ("0", "1"):
        monkeypatch.setenv("MSPCNN_NCC_CUDA_SHIFT", setting)
        x = a.cuda().requires_grad_(True)
        y = b.cuda().requires_grad_(True)
        v, i = ncc_max(x, y)
        vol = ncc_volume(x, y)
        ga, gb = torch.autograd.grad(v.sum() + vol.square().sum(), (x, y))
        outs.append([t.detach().cpu() for t in (v, i, vol, ga, gb)])
    (v0, i0, vol0, ga0, gb0), (v1, i1, vol1, ga1, gb1) = outs
    torch.testing.assert_close(v1, v0, atol=2e-5, rtol=0)
    torch.testing.assert_close(vol1, vol0, atol=2e-5, rtol=0)
    assert (i1 == i0).float().mean() > 0.999
    for x, y in ((ga1, ga0), (gb1, gb0)):
        assert (x - y).norm() / y.norm() < 1e-4


@pytest.mark.parametrize("offset", [0.0, 10.0])
@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (3, 3, 64), (9, 3, 40)])
def test_volume_centred_form_is_accurate_at_any_mean(offset, patch, rows, W):
    """The CUDA volume forward centres both patches as it forms the products: on ReLU'd maps with
    mean 0 or 10 its largest error against float64 is near float32 rounding (centred_bound; for
    pool1 maps at 5 x 5, 4.7e-7 to 8.5e-7 predicted by tools/emulate_cuda_ncc.py --volume, where
    the box-sum form it replaced had 4.0e-7 to 5.9e-4 by the mean, and 1.5e-5 with the plane-mean
    shift at mean 0)."""
    torch.manual_seed(5)
    a = torch.randn(2, 16, 72, W).relu() + offset
    b = torch.randn(2, 16, 72, W).relu() + offset
    vol = ncc_volume(a.cuda(), b.cuda(), patch, rows).cpu()
    vol64 = ncc_volume(a.double(), b.double(), patch, rows)
    assert (vol.double() - vol64).abs().max() <= centred_bound(patch)
