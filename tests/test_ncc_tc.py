"""The tensor-core path of ncc_max (``tensor_cores='tf32'`` / ``'3xtf32'``, csrc/cuda/ncc_max_tc.cu).

On the CPU: its arguments, and tools/emulate_cuda_ncc.py's model of the kernel (the fragment index
arithmetic against a plain matrix product, the TF32 rounding, the predicted accuracy). On a GPU
(marked cuda): the kernel itself against float64."""
import numpy as np
import pytest
import torch

from conftest import load_tool
from mspcnn.ops import ncc_max, ncc_volume

emulate = load_tool("emulate_cuda_ncc")


def maps(shape, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen).relu() + offset,
            torch.randn(shape, generator=gen).relu() + offset)


# ----------------------------------------------------------------------------- arguments (any machine)
def test_tensor_cores_argument_is_checked():
    a, b = maps((1, 2, 10, 12))
    with pytest.raises(ValueError, match=r"`tensor_cores` must be None, 'tf32' or '3xtf32', got 'bf16'"):
        ncc_max(a, b, tensor_cores="bf16")
    with pytest.raises(ValueError, match=r"runs on CUDA devices only, the maps are on cpu"):
        ncc_max(a, b, tensor_cores="tf32")
    # the default path is untouched by the new argument
    v, i = ncc_max(a, b, tensor_cores=None)
    v0, i0 = ncc_max(a, b)
    assert torch.equal(v, v0) and torch.equal(i, i0)


# ----------------------------------------------------------------------------- the kernel's model (CPU)
@pytest.mark.parametrize("patch,ri,k", [(5, 0, 0), (5, 3, 4), (3, 2, 1), (3, 0, 2)])
def test_fragment_index_arithmetic_is_the_patch_product(patch, ri, k):
    """tc_warp_products repeats max_tc_kernel's offsets (koff / kin), the m16n8k8 fragment layouts of
    the PTX ISA and the epilogue's slots; in exact arithmetic it must give every X[w][col] =
    sum_ij a(ri + i, w + j) b(ri + k + i, col + j) of the staged rows, for all 32 x 32 lanes."""
    rng = np.random.default_rng(patch * 100 + ri * 10 + k)
    SW = 32 + patch - 1
    As = rng.standard_normal((ri + patch, SW))
    Bs = rng.standard_normal((ri + k + patch, SW))
    X = emulate.tc_warp_products(As, Bs, ri, k, patch)
    direct = np.zeros((32, 32))
    for i in range(patch):
        for j in range(patch):
            direct += np.outer(As[ri + i, j:j + 32], Bs[ri + k + i, j:j + 32])
    np.testing.assert_allclose(X, direct, rtol=0, atol=1e-12)


def _first_max(values):
    """The kernels' order: the first maximum in index order, a NaN above every number; index 0 when
    nothing beats -inf."""
    best, idx = -np.inf, None
    for i, v in enumerate(values):
        if not (v <= best) and best == best:
            best, idx = v, i
    return 0 if idx is None else idx


@pytest.mark.parametrize("case", ["random", "ties", "nan", "minus_inf", "narrow"])
def test_epilogue_and_reduction_choose_the_first_maximum(case):
    """tc_warp_epilogue repeats max_tc_kernel's normalisation, per-lane maximum, xor-shuffle
    reduction and the lane that writes each output column; on the same candidate values it must
    choose exactly what a plain first-maximum scan chooses: with exact ties spread over lanes, with
    NaN candidates, with a row whose candidates are all -inf (index 0), and with few columns."""
    rng = np.random.default_rng(["random", "ties", "nan", "minus_inf", "narrow"].index(case))
    F32 = np.float32
    W, R = (9, 3) if case == "narrow" else (28, 5)
    Xk = [rng.standard_normal((32, 32)).astype(F32) for _ in range(R)]
    ka, nmaka = rng.uniform(0.5, 2, 32).astype(F32), rng.uniform(-1, 1, 32).astype(F32)
    kb, mbkb = rng.uniform(0.5, 2, (R, 32)).astype(F32), rng.uniform(-1, 1, (R, 32)).astype(F32)
    if case == "ties":  # few distinct values, unit factors: many exact ties across lanes and offsets
        Xk = [np.round(x).astype(F32) for x in Xk]
        ka[:], kb[:], nmaka[:], mbkb[:] = 1, 1, 0, 0
    if case == "nan":
        Xk[2][5, 7] = Xk[1][5, 20] = Xk[4][11, 0] = np.nan
    if case == "minus_inf":
        nmaka[6] = np.inf
        mbkb[:] = 1
    got = emulate.tc_warp_epilogue(Xk, ka, nmaka, kb, mbkb, W)
    assert sorted(got) == list(range(W))
    for w in range(W):
        values = [emulate.fma(Xk[k][w, col], F32(ka[w] * kb[k][col]), -F32(nmaka[w] * mbkb[k][col]))[()]
                  for k in range(R) for col in range(W)]
        assert got[w] == _first_max(values), (case, w)
    if case == "nan":
        assert got[5] == 1 * W + 20 and got[11] == 4 * W + 0
    if case == "minus_inf":
        assert got[6] == 0


def test_tf32_rounding():
    """cvt.rna.tf32.f32: 10 explicit mantissa bits, to nearest, ties away from zero."""
    ulp = 2.0 ** -10
    x = np.array([1.0, 1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 4, 1 + 3 * ulp / 4, 3.0, np.inf, -np.inf], np.float32)
    want = np.array([1.0, 1 + ulp, -(1 + ulp), 1.0, 1 + ulp, 3.0, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(emulate.tf32(x), want)
    assert np.isnan(emulate.tf32(np.array([np.nan], np.float32))).all()
    r = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    t = emulate.tf32(r)
    assert (t.view(np.uint32) & 0x1FFF == 0).all()
    assert (np.abs(t - r) <= np.abs(r) * 2.0 ** -11 * (1 + 1e-6)).all()
    hi, lo = emulate.tc_split(r, 3)
    assert (np.abs(hi.astype(np.float64) + lo - r) <= np.abs(r) * 2.0 ** -21).all()


def test_truncating_tensor_core_model_by_hand():
    """The truncating accumulation model (emulate.mma_truncating), on sums worked by hand: 1 - 2^-25 is
    a tie between float32's 1 - 2^-24 and 1 (round to nearest even: 1), cut toward zero to 1 - 2^-24;
    a product below the guard bits' reach (3 below float32's 24 at 1.0: 2^-26) is cut to 0; with 5 guard
    bits 3 x 2^-28 stays, and 1 - 3 x 2^-28 is cut to 1 - 2^-24."""
    one, eight = np.float32(1.0), np.zeros(8, np.float32)
    a, b = eight.copy(), eight.copy()
    b[0] = 1.0
    a[0] = -2.0 ** -25
    assert np.float32(1.0 - 2.0 ** -25) == 1.0  # round to nearest
    assert emulate.mma_truncating(one, a, b) == np.float32(1 - 2.0 ** -24)
    a[0] = -(2.0 ** -27 + 2.0 ** -28)
    assert emulate.mma_truncating(one, a, b, extra_bits=3) == 1.0
    assert emulate.mma_truncating(one, a, b, extra_bits=5) == np.float32(1 - 2.0 ** -24)
    a[:] = 0.5
    b[:] = 0.25
    assert emulate.mma_truncating(np.float32(-1.0), a, b) == 0.0  # exact sums stay exact


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_emulated_tensor_cores_accuracy(offset):
    """The predicted accuracy on one ReLU'd pool1 plane (2,016 outputs): the returned value is the
    float32 NCC of the returned index, as accurate as the shifted float32 kernel's own (the same
    staged rows and factors: 3.0e-6 at mean 0, 6.4e-7 at mean 10, emulated); 3xTF32 picks the
    float64 maximum everywhere, TF32 may pick a candidate within its rounding (a gap below 1e-3)."""
    rows = {r["variant"]: r for r in emulate.compare_tc(1, 1, offset, 0)}
    fast = {r["variant"]: r for r in emulate.compare(1, 1, offset, 0)}["CUDA fast kernel, shifted (emulated)"]
    tf32, x3 = rows["tensor cores, TF32 (emulated)"], rows["tensor cores, 3xTF32 (emulated)"]
    for r in (tf32, x3):
        assert r["value_at_index_max_abs_error"] <= max(1.5 * fast["value_max_abs_error"], 1e-6)
        assert r["value_at_index_max_abs_error"] <= 5e-6
    assert x3["argmax_changes"] == 0 and x3["value_max_abs_error"] <= 5e-6
    assert tf32["argmax_changes"] <= 20 and tf32["argmax_change_max_gap"] <= 1e-3


def test_emulation_predicts_tf32_fails_at_3x3_patches(monkeypatch):
    """Why 3 x 3 patches are refused, on the CPU: on the GPU test's inputs for (3, 3, 32), offset 0,
    the emulated TF32 kernel chooses candidates up to 2.6e-3 below the float64 maximum (the H200
    measured 2.6e-3), beyond the path's 1e-3 contract; at 5 x 5 patches (the network's) the same
    inputs' shape (5, 5, 28) stays at 1.9e-4. Nine products per candidate leave a near-flat patch's
    normalisation (1 / its standard deviation) less averaging than 25 do. 3xTF32 at 3 x 3 is emulated
    too, with the truncating accumulation model: it predicts no failure."""
    N, C, H = 2, 8, 72
    gaps = {}
    for patch, rows, W in [(3, 3, 32), (5, 5, 28)]:
        monkeypatch.setattr(emulate, "H", H)
        monkeypatch.setattr(emulate, "W", W)
        a, b = maps((N, C, H, W), 0.0, seed=patch * 10 + rows)
        vol = ncc_volume(a.double(), b.double(), patch, rows).view(N, C, rows * W, H, W)
        best = vol.max(2)[0]
        for passes, accumulate in ((1, "ieee"), (3, "truncate")) if patch == 3 else ((1, "ieee"),):
            gap = 0.0
            for n in range(N):
                for c in range(C):
                    _, i, _ = emulate.emulate_tc_plane(a[n, c].numpy(), b[n, c].numpy(), passes, P=patch, R=rows,
                                                       accumulate=accumulate)
                    at = vol[n, c].gather(0, torch.from_numpy(np.asarray(i, np.int64)).unsqueeze(0))[0]
                    gap = max(gap, float((best[n, c] - at).max()))
            gaps[patch, passes] = gap
    assert gaps[3, 1] > 2e-3 and gaps[5, 1] < 5e-4, gaps
    # The H200's 3xTF32 missed its 1e-5 bound at two of four 3 x 3 shapes. Not predicted, even with
    # the tensor cores' accumulation modelled as truncating (alignment to the largest term, 3 guard
    # bits): the cause is not the accumulation's rounding.
    assert gaps[3, 3] < 1e-6, gaps


# ----------------------------------------------------------------------------- the kernel (GPU)
needs_tc = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="needs a CUDA device of compute capability 8.0 or newer")


@pytest.mark.cuda
@needs_tc
@pytest.mark.parametrize("mode", ["tf32", "3xtf32"])
@pytest.mark.parametrize("offset", [0.0, 10.0])
@pytest.mark.parametrize("patch,rows,W", [(5, 5, 28), (5, 3, 32), (5, 1, 9), (5, 5, 20)])
def test_tensor_cores_against_float64(mode, offset, patch, rows, W):
    """The value is the float32 NCC of the returned index; the index is the float64 maximum up to
    the tensor-core rounding: 3xTF32 within 1e-5 of it and at 99.9% of the outputs the same index,
    TF32 within 1e-3 and at 99.5% (emulated on these inputs: 3xTF32 gaps of 1.4e-7 at most, TF32
    1.5e-4 to 8.2e-4 with 99.9% the same index). On an H200 (2026-11-30) (5, 5, 28) and (5, 1, 9)
    passed; 3 x 3 patches, then in this list, failed (test_tensor_cores_refuse_3x3_patches)."""
    from test_ncc_ops import F32_ATOL
    N, C, H = 2, 8, 72
    a, b = maps((N, C, H, W), offset, seed=patch * 10 + rows)
    v, i = ncc_max(a.cuda(), b.cuda(), patch, rows, tensor_cores=mode)
    v, i = v.cpu().double(), i.cpu()
    assert i.dtype == torch.int64 and int(i.min()) >= 0 and int(i.max()) < rows * W
    vol = ncc_volume(a.double(), b.double(), patch, rows).view(N, C, rows * W, H, W)
    best, best_i = vol.max(2)
    at_index = vol.gather(2, i.unsqueeze(2)).squeeze(2)
    assert (v - at_index).abs().max() <= F32_ATOL / 4  # the shifted float32 kernel's bound
    assert (best - at_index).max() <= (1e-3 if mode == "tf32" else 1e-5)
    assert (i == best_i).double().mean() >= (0.995 if mode == "tf32" else 0.999)


@pytest.mark.cuda
@needs_tc
def test_tensor_cores_gradient_is_the_default_backward_at_its_index():
    a, b = maps((2, 4, 30, 28))
    x, y = a.cuda().requires_grad_(True), b.cuda().requires_grad_(True)
    v, i = ncc_max(x, y, tensor_cores="3xtf32")
    g = torch.randn_like(v)
    ga, gb = torch.autograd.grad((v * g).sum(), (x, y))
    ra, rb = torch.ops.mspcnn.ncc_max_backward(g, x.detach(), y.detach(), i, 5, 5, 0.01)
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@needs_tc
def test_tensor_cores_refuse_what_they_do_not_support():
    a, b = maps((1, 2, 12, 28))
    with pytest.raises(TypeError, match=r"takes float32 maps, got torch.float64"):
        ncc_max(a.double().cuda(), b.double().cuda(), tensor_cores="tf32")
    with pytest.raises(ValueError, match=r"supports patch 5, search_rows 1, 3 or 5 and maps at most 32 wide"):
        ncc_max(a.cuda(), b.cuda(), patch=7, tensor_cores="tf32")
    a, b = maps((1, 2, 12, 33))
    with pytest.raises(ValueError, match=r"width 33"):
        ncc_max(a.cuda(), b.cuda(), tensor_cores="3xtf32")


@pytest.mark.cuda
@needs_tc
@pytest.mark.parametrize("mode", ["tf32", "3xtf32"])
def test_tensor_cores_refuse_3x3_patches(mode):
    """On an H200 (2026-11-30) the path failed its bounds at 3 x 3 patches: TF32 chose candidates
    2.6e-3 below the maximum (test shape 3, 3, 32; the emulation predicts it, test below), and
    3xTF32 missed 1e-5 at two of four shapes, which the emulation does not predict (the hardware's
    accumulation is not the model's). So both the function and the operator refuse them."""
    a, b = maps((1, 2, 12, 28))
    with pytest.raises(ValueError, match=r"supports patch 5.*got patch 3.*3 x 3 patches it failed"):
        ncc_max(a.cuda(), b.cuda(), patch=3, search_rows=3, tensor_cores=mode)
    with pytest.raises(RuntimeError, match=r"supports patch 5, search_rows 1, 3 or 5"):
        torch.ops.mspcnn.ncc_max_tc(a.cuda(), b.cuda(), 3, 3, 0.01, 1 if mode == "tf32" else 3)


@pytest.mark.cuda
@needs_tc
def test_tensor_cores_operator_refuses_other_passes_in_a_subprocess():
    """The operator itself refuses `passes` other than 1 or 3 with a RuntimeError. Run in a child
    process: on an H200 (2026-11-30, torch 2.11.0+cu130) this call crashed the interpreter with a
    segmentation fault (inside the dispatcher's redispatch from the Python autograd wrapper, cause
    not found), which took the rest of the GPU test run down with it; here a crash is one failure."""
    import subprocess
    import sys
    code = ("import torch, mspcnn.ops\n"
            "a = torch.rand(1, 2, 12, 28, device='cuda')\n"
            "try:\n"
            "    torch.ops.mspcnn.ncc_max_tc(a, a.clone(), 5, 5, 0.01, 2)\n"
            "except RuntimeError as exc:\n"
            "    print('refused:', exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert "refused:" in proc.stdout and "`passes` must be 1 (TF32) or 3" in proc.stdout


@pytest.mark.cuda
@needs_tc
def test_tensor_cores_opcheck():
    """The registration (fake implementation, autograd, schema) passes torch.library.opcheck."""
    a, b = maps((1, 2, 10, 12))
    x, y = a.cuda().requires_grad_(True), b.cuda().requires_grad_(True)
    torch.library.opcheck(torch.ops.mspcnn.ncc_max_tc.default, (x, y, 5, 3, 0.01, 3))
