"""Our CPU kernels for Caffe layers (mspcnn.caffe.kernels): the fused BatchNorm + Scale (+ ReLU)
of the training phase (csrc/cpu/bn_cpu.cpp) against the separate layers and float64, and Caffe's
pooling (csrc/cpu/pool_cpu.cpp) against PyTorch's and a direct loop over Caffe's windows."""
import copy

import pytest
import torch

from mspcnn.caffe.kernels import bn_kernel_applies, bn_scale, bn_scale_native, native_bn_applies
from mspcnn.caffe.layers import BatchNorm, Scale
from mspcnn.model import MSPCNN


def separate(x, gamma, beta, eps, relu):
    """The same function in tensor operations, as the separate layers compute it."""
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims)
    c = x - mu.view(view)
    var = (c * c).mean(dims)
    y = c / torch.sqrt(var + eps).view(view) * gamma.view(view) + beta.view(view)
    return (torch.relu(y) if relu else y), mu, var


def case(shape, seed=0, dtype=torch.float64, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + offset
    gamma = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
    beta = torch.randn(shape[1], generator=g, dtype=dtype)
    return x, gamma, beta


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 7, 9), (5, 8)])
def test_gradcheck_float64(shape, relu):
    x, gamma, beta = case(shape)
    args = (x.requires_grad_(), gamma.requires_grad_(), beta.requires_grad_())
    fn = lambda a, b, c: torch.ops.mspcnn.bn_scale_train(a, b, c, 1e-5, relu)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("relu", [True, False])
def test_float64_equals_the_formula(relu):
    x, gamma, beta = case((4, 6, 10, 7), seed=1)
    y, mean, var = torch.ops.mspcnn.bn_scale_train(x, gamma, beta, 1e-5, relu)
    y_ref, mean_ref, var_ref = separate(x, gamma, beta, 1e-5, relu)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, var_ref, rtol=1e-12, atol=1e-12)


def test_float32_is_at_least_as_close_to_float64_as_the_separate_layers():
    """Sums in double and the mean's rounding folded into the constants: the fused float32 results
    are float64's rounded, nearer than the separate float32 operations' (a pool1-sized batch with a
    mean of 20 standard deviations, where float32 sums and the subtraction of the mean lose
    digits)."""
    # float32 inputs, so that the float64 reference sees the same numbers: only the arithmetic differs
    x, gamma, beta = (t.float().double() for t in case((4, 16, 72, 28), seed=2, offset=60.0))
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).double()
    leaves64 = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y64 = separate(*leaves64, 1e-5, True)[0]
    ref = [y64.detach()] + list(torch.autograd.grad(y64, leaves64, gy))

    def errors(fused):
        leaves = [t.float().requires_grad_() for t in (x, gamma, beta)]
        y = (torch.ops.mspcnn.bn_scale_train(*leaves, 1e-5, True)[0] if fused
             else separate(*leaves, 1e-5, True)[0])
        out = [y.detach()] + list(torch.autograd.grad(y, leaves, gy.float()))
        return [((a.double() - r).abs().max() / r.abs().max()).item() for a, r in zip(out, ref)]

    fused, sep = errors(True), errors(False)
    # y, dx, dgamma, dbeta: float32 rounding of the result (measured 3-7e-8), and no worse than the
    # separate layers' (measured 7e-8 to 1e-6)
    assert max(fused) < 2e-7, fused
    assert all(f <= s for f, s in zip(fused, sep)), (fused, sep)


def test_thread_count_does_not_change_the_result():
    x, gamma, beta = case((4, 32, 36, 14), seed=4, dtype=torch.float32)
    gy = torch.randn_like(x)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, mean, var = torch.ops.mspcnn.bn_scale_train(x, gamma, beta, 1e-5, True)
            grads = torch.ops.mspcnn.bn_scale_train_backward(gy, x, y, gamma, mean, var, 1e-5, True)
            results.append((y, mean, var) + tuple(grads))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_relu_keeps_nan_and_zeroes_negative():
    x = torch.tensor([[1.0, -1.0], [3.0, 5.0], [float("nan"), 0.0]]).T.contiguous()  # N=2, C=3
    y, mean, _ = torch.ops.mspcnn.bn_scale_train(x, torch.ones(3), torch.zeros(3), 1e-5, True)
    assert torch.isnan(y[:, 2]).all() and torch.isnan(mean[2])
    assert y[1, 0] == 0 and y[0, 0] > 0


def test_module_path_updates_the_accumulators_as_caffe():
    """bn_scale with the fused operator and with the separate layers: same output and the same
    three accumulators (float64, so equal to rounding)."""
    x, gamma, beta = case((3, 5, 4, 4), seed=5)
    outs = []
    for fused in (True, False):
        norm, scale = BatchNorm(5).double().train(), Scale(5).double()
        with torch.no_grad():
            scale.weight.copy_(gamma)
            scale.bias.copy_(beta)
        y = bn_scale(norm, scale, x, relu=True, kernel=fused)
        y = bn_scale(norm, scale, x * 2, relu=True, kernel=fused)
        outs.append((y, norm.mean_acc.clone(), norm.var_acc.clone(), norm.factor.clone()))
        assert bn_kernel_applies(norm, scale, x) is True
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


GPU = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape,bias", [((3, 5, 4, 4), True), ((6, 5), True), ((3, 5, 4, 4), False)])
def test_native_path_equals_the_separate_layers_in_float64(shape, relu, bias, device):
    """PyTorch's fused batch normalisation (the GPU path; on the CPU too): the same outputs,
    gradients and Caffe accumulators as the separate BatchNorm and Scale layers, two batches."""
    x, gamma, beta = (t.to(device) for t in case(shape, seed=6))
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
    outs = []
    for native in (True, False):
        norm, scale = BatchNorm(5).double().train().to(device), Scale(5, bias_term=bias).double().to(device)
        with torch.no_grad():
            scale.weight.copy_(gamma)
            if bias:
                scale.bias.copy_(beta)
        xs = [x.clone().requires_grad_(), (x * 2 - 1).clone().requires_grad_()]
        grads = []
        for xi in xs:
            if native:
                y = bn_scale_native(norm, scale, xi, relu=relu)
            else:
                y = scale(norm(xi))
                y = torch.relu(y) if relu else y
            params = [xi, scale.weight] + ([scale.bias] if bias else [])
            grads += list(torch.autograd.grad(y, params, gy)) + [y.detach()]
        outs.append(grads + [norm.mean_acc.clone(), norm.var_acc.clone(), norm.factor.clone()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_native_path_gradcheck_float64():
    x, gamma, beta = case((3, 4, 5, 2), seed=8)
    norm, scale = BatchNorm(4).double().train(), Scale(4).double()
    fn = lambda a: bn_scale_native(norm, scale, a, relu=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_native_path_is_taken_only_on_a_gpu_in_the_batch_statistics_phase():
    norm = BatchNorm(5).train()
    assert not native_bn_applies(norm, torch.randn(2, 5, 4, 4))  # CPU: the C++ operator or the layers
    assert not native_bn_applies(norm, torch.randn(2, 5, 4, 4, device="meta"))
    if torch.cuda.is_available():
        x = torch.randn(2, 5, 4, 4, device="cuda")
        assert native_bn_applies(norm, x)
        assert not native_bn_applies(norm.eval(), x)  # global statistics: the separate layers
        assert not native_bn_applies(BatchNorm(5).train(), torch.randn(1, 5, device="cuda"))  # one value


def test_falls_back_where_it_does_not_apply():
    norm, scale = BatchNorm(5).train(), Scale(5)
    x = torch.randn(2, 5, 4, 4)
    assert bn_kernel_applies(norm, scale, x)
    assert not bn_kernel_applies(norm, scale, x.contiguous(memory_format=torch.channels_last))
    assert not bn_kernel_applies(norm.eval(), scale, x)  # global statistics: the separate layers
    assert not bn_kernel_applies(BatchNorm(5, use_global_stats=True).train(), scale, x)
    assert not bn_kernel_applies(norm.train(), Scale(5, bias_term=False), x)
    y = bn_scale(norm.eval(), scale, x, relu=True)
    torch.testing.assert_close(y, torch.relu(scale(norm(x))))


def test_bad_inputs_are_clear_errors():
    x = torch.randn(2, 5, 4, 4)
    with pytest.raises(RuntimeError, match="one value per channel"):
        torch.ops.mspcnn.bn_scale_train(x, torch.ones(4), torch.zeros(4), 1e-5, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.mspcnn.bn_scale_train(x.half(), torch.ones(5).half(), torch.zeros(5).half(), 1e-5, True)
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.mspcnn.bn_scale_train(x[:0], torch.ones(5), torch.zeros(5), 1e-5, True)
    with pytest.raises(ValueError, match="expected N x 6"):
        bn_scale(BatchNorm(6).train(), Scale(5), x, relu=True)


def test_siamese_model_fused_equals_separate_in_float64():
    """The whole network (stage 2, both branches, dropout off) with the fused operator and with
    the separate layers: same losses, gradients and BatchNorm accumulators, in float64 (in float32
    they differ at the level float32 rounding moves max pooling and ReLU: tools/precision_train.py)."""
    torch.manual_seed(0)
    model = MSPCNN(20, use_low=True, dropout=0.0, generator=torch.Generator().manual_seed(1)).double().train()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(3, 3, 144, 56, generator=g, dtype=torch.float64),
             torch.randn(3, 3, 144, 56, generator=g, dtype=torch.float64),
             torch.tensor([1.0, 7.0, 19.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    results = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        m.backbone.cpu_kernels = fused
        losses = m(*batch)
        losses["total"].backward()
        results.append((losses, {n: p.grad for n, p in m.named_parameters()}, dict(m.named_buffers())))
    (l_f, g_f, b_f), (l_s, g_s, b_s) = results
    for key in ("cls", "high", "low", "total"):
        torch.testing.assert_close(l_f[key], l_s[key], rtol=1e-10, atol=1e-12)
    for name in g_s:
        scale = g_s[name].abs().max().item()
        if name.endswith(".bias") and scale < 1e-6:  # the biases BatchNorm follows: exact gradient 0
            continue
        assert (g_f[name] - g_s[name]).abs().max().item() <= 1e-8 * scale + 1e-14, name
    for name in b_s:
        torch.testing.assert_close(b_f[name], b_s[name], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- pooling
def caffe_pool_loop(x, method, kernel, stride, pad):
    """Caffe's PoolingLayer::Forward_cpu, written out (NaN aside)."""
    from mspcnn.caffe.layers import pool_output_size

    N, C, H, W = x.shape
    OH, OW = (pool_output_size(H, kernel[0], stride[0], pad[0]), pool_output_size(W, kernel[1], stride[1], pad[1]))
    y = torch.empty(N, C, OH, OW, dtype=x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            hs, ws = oh * stride[0] - pad[0], ow * stride[1] - pad[1]
            he, we = min(hs + kernel[0], H + pad[0]), min(ws + kernel[1], W + pad[1])
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
            win = x[:, :, hs:he, ws:we].reshape(N, C, -1)
            if method == "MAX":
                y[:, :, oh, ow] = win.max(-1).values if win.shape[-1] else torch.finfo(x.dtype).min
            else:
                y[:, :, oh, ow] = win.sum(-1) / size
    return y


# (H, W, kernel, stride, pad): the network's layers, and other geometries: windows that overhang
# the padded map (ceil rounding), padding on one axis, a kernel taller than wide.
POOLS = [(144, 56, (2, 2), (2, 2), (0, 0)), (72, 28, (3, 3), (2, 2), (0, 0)), (18, 7, (3, 3), (2, 2), (0, 1)),
         (72, 28, (3, 3), (1, 1), (1, 1)), (9, 4, (9, 4), (1, 1), (0, 0)), (10, 11, (3, 2), (2, 3), (1, 1)),
         (7, 9, (2, 3), (3, 2), (1, 0)), (16, 12, (3, 3), (2, 2), (1, 1))]


def grads(fn, x, g):
    x = x.detach().requires_grad_()
    y = fn(x)
    return y.detach(), torch.autograd.grad(y, x, g)[0]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("H,W,kernel,stride,pad", [p for p in POOLS if p[0] <= 18])
def test_pool_equals_caffe_loop(method, H, W, kernel, stride, pad):
    from mspcnn.caffe.kernels import ave_pool, max_pool

    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(H * W), dtype=torch.float64)
    y = (max_pool if method == "MAX" else ave_pool)(x, kernel, stride, pad)
    torch.testing.assert_close(y, caffe_pool_loop(x, method, kernel, stride, pad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,W,kernel,stride,pad", POOLS)
def test_pool_paths_give_pytorchs_values_and_gradients(H, W, kernel, stride, pad):
    """Float32: the channels-last path and our MAX backward against PyTorch's NCHW pooling: MAX
    values and gradients exactly, AVE to rounding."""
    from mspcnn.caffe.kernels import ave_pool, max_pool

    x = torch.randn(2, 4, H, W, generator=torch.Generator().manual_seed(1))
    for fn in (max_pool, ave_pool):
        y = fn(x, kernel, stride, pad)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        ours = grads(lambda t: fn(t, kernel, stride, pad, use_kernel=True), x, g)
        ref = grads(lambda t: fn(t, kernel, stride, pad, use_kernel=False), x, g)
        tol = 0 if fn is max_pool else 1e-6
        for a, b in zip(ours, ref):
            assert a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("H,W,kernel,stride,pad", [POOLS[i] for i in (1, 2, 3, 5, 6)])
def test_pool_gradcheck_float64(H, W, kernel, stride, pad):
    from mspcnn.caffe.kernels import ave_pool, max_pool

    x = torch.randn(1, 2, min(H, 12), min(W, 10), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: max_pool(t, kernel, stride, pad), (x,))
    assert torch.autograd.gradcheck(lambda t: ave_pool(t, kernel, stride, pad), (x,))


def test_max_pool_first_maximum_and_nan():
    from mspcnn.caffe.kernels import max_pool

    x = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, float("nan")], [5.0, 2.0]]]]).requires_grad_()
    y = max_pool(x, (2, 2), (2, 2), (0, 0))
    assert y[0, 0, 0, 0] == 1 and torch.isnan(y[0, 1, 0, 0])
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx[0, 0].flatten().tolist() == [1, 0, 0, 0]  # the first maximum takes the gradient
    assert gx[0, 1].flatten()[1] == 1 and gx[0, 1].sum() == 1  # the NaN was selected


def test_pooling_layer_uses_the_kernel_or_pytorch_with_the_same_values():
    from mspcnn.caffe.layers import Pooling

    x = torch.randn(2, 3, 18, 7)
    for method, kernel, stride, pad in (("MAX", (3, 3), (2, 2), (0, 1)), ("AVE", (3, 3), (1, 1), (1, 1))):
        layer = Pooling(method, kernel, stride, pad)
        ours = layer(x)
        layer.cpu_kernel = False
        torch.testing.assert_close(ours, layer(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, layer(x.contiguous(memory_format=torch.channels_last)),
                                   rtol=1e-6, atol=1e-6)


def test_max_pool_backward_bad_inputs_are_clear_errors():
    g = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="int64 of the shape"):
        torch.ops.mspcnn.caffe_max_pool_backward(g, torch.zeros(1, 2, 3, 2, dtype=torch.long), 5, 5)
    with pytest.raises(RuntimeError, match="N x C x OH x OW"):
        torch.ops.mspcnn.caffe_max_pool_backward(g[0], torch.zeros(2, 3, 3, dtype=torch.long), 5, 5)
    with pytest.raises(RuntimeError, match=">= 1"):
        torch.ops.mspcnn.caffe_max_pool_backward(g, torch.zeros(1, 2, 3, 3, dtype=torch.long), 0, 5)


# --------------------------------------------------------------------------- against real Caffe 1.0
GOLDEN = __import__("pathlib").Path(__file__).parent / "data" / "caffe_golden" / "layers"


def golden(name):
    import numpy as np

    return {k: torch.from_numpy(v) for k, v in np.load(GOLDEN / "train" / f"{name}.npz").items()}


def close_to_caffe(got, ref, what):
    """The golden README's tolerance: max |got - ref| <= 1e-5 max |ref|."""
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), f"{what}: {err:.3g}"


@pytest.mark.parametrize("bottom,bn,scale,top", [("conv1", "bn1", "scale1", "relu1"), ("fc1", "bn2", "scale2", "relu2")])
def test_bn_scale_relu_kernel_against_caffe(bottom, bn, scale, top):
    """Caffe's BatchNorm -> Scale -> ReLU of the golden `layers` net (TRAIN), forward and backward,
    through the fused operator; and the accumulators after the forward pass."""
    fwd, bwd, pdiff, after = golden("forward"), golden("backward"), golden("param_diff"), golden("params_after_forward")
    x = fwd[bottom].requires_grad_()
    gamma, beta = after[f"{scale}/0"].clone().requires_grad_(), after[f"{scale}/1"].clone().requires_grad_()
    y, mean, var = torch.ops.mspcnn.bn_scale_train(x, gamma, beta, 1e-5, True)
    close_to_caffe(y, fwd[top], f"{top} forward")
    gx, gg, gb = torch.autograd.grad(y, (x, gamma, beta), bwd[top])
    close_to_caffe(gx, bwd[bottom], f"{bottom} diff")
    close_to_caffe(gg, pdiff[f"{scale}/0"], f"{scale} gamma diff")
    close_to_caffe(gb, pdiff[f"{scale}/1"], f"{scale} beta diff")
    norm = BatchNorm(x.shape[1]).train()
    norm.accumulate(mean.float(), var.float(), x.numel() // x.shape[1])
    for i, blob in enumerate((norm.mean_acc, norm.var_acc, norm.factor)):
        close_to_caffe(blob, after[f"{bn}/{i}"], f"{bn} blob {i}")


def test_pooling_paths_against_caffe():
    """The golden net's pooling layers (MAX 2/2, AVE 3/1 pad 1, MAX 3/2 pad_w 1, AVE 3/2 pad 1)
    through max_pool / ave_pool, and MAX's backward where its input has no other consumer."""
    from mspcnn.caffe.kernels import ave_pool, max_pool

    fwd, bwd = golden("forward"), golden("backward")
    close_to_caffe(max_pool(fwd["relu1"], (2, 2), (2, 2), (0, 0)), fwd["poolA"], "poolA")
    close_to_caffe(ave_pool(fwd["relu1"], (3, 3), (1, 1), (1, 1)), fwd["poolB"], "poolB")
    close_to_caffe(ave_pool(fwd["poolD"], (3, 3), (2, 2), (1, 1)), fwd["poolH"], "poolH")
    x = fwd["poolB"].requires_grad_()
    y = max_pool(x, (3, 3), (2, 2), (0, 1))
    close_to_caffe(y, fwd["poolD"], "poolD")
    close_to_caffe(torch.autograd.grad(y, x, bwd["poolD"])[0], bwd["poolB"], "poolB diff")


def test_opcheck():
    """Schemas, fake implementations and the autograd registration (C++ for bn_scale_train) as
    torch.library checks them (what torch.compile relies on)."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    gamma, beta = (torch.rand(3) + 0.5).requires_grad_(), torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.mspcnn.bn_scale_train.default, (x, gamma, beta, 1e-5, True))
    torch.library.opcheck(torch.ops.mspcnn.bn_scale_train.default, (x.detach()[:, :, :, 0], gamma, beta, 1e-5, False))
    index = torch.randint(0, 20, (2, 3, 3, 5))
    torch.library.opcheck(torch.ops.mspcnn.caffe_max_pool_backward.default, (torch.randn(2, 3, 3, 5), index, 4, 5))


# ----------------------------------------------------------------------------- accumulators together
@pytest.fixture
def gpu_code_path(monkeypatch):
    """The GPU's BatchNorm path (PyTorch's fused batch normalisation) taken on the CPU."""
    import mspcnn.caffe.kernels as K

    monkeypatch.setattr(K, "bn_kernel_applies", lambda norm, scale, t: False)
    monkeypatch.setattr(K, "native_bn_applies", lambda norm, t: not norm.uses_global_stats() and t.numel() > t.shape[1])


def _op_names():
    """A dispatch mode that records the name of every PyTorch operation run inside it (``.names``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    return OpNames()


def _accumulate_one_by_one(updates):
    """Caffe's accumulator update written out layer by layer (the reference for the batched one)."""
    with torch.no_grad():
        for norm, mean, var, m in updates:
            norm.factor.mul_(norm.moving_average_fraction).add_(1.0)
            norm.mean_acc.mul_(norm.moving_average_fraction).add_(mean)
            norm.var_acc.mul_(norm.moving_average_fraction).add_(var * (m / max(m - 1, 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deferred_accumulation_equals_layer_by_layer_updates(dtype):
    """Inside deferred_accumulation the BatchNorm layers queue their updates and the block's end
    makes them together (multi-tensor calls, grouped by dtype): bitwise the same accumulators as
    Caffe's update made layer by layer, for layers of different widths, moving_average_fraction and
    dtype, a layer updated twice, and a nested block (updated at the end of the outermost)."""
    from mspcnn.caffe.layers import deferred_accumulation

    g = torch.Generator().manual_seed(0)

    def layers():
        out = [BatchNorm(4, moving_average_fraction=0.999), BatchNorm(7, moving_average_fraction=0.9),
               BatchNorm(3, moving_average_fraction=0.5).double()]
        for n in out:
            n.to(dtype if n.mean_acc.dtype == torch.float32 else torch.float64)
        return out

    a, b = layers(), layers()
    stats = [(i, torch.rand(n.channels, generator=g, dtype=torch.float64), torch.rand(
        n.channels, generator=g, dtype=torch.float64), m) for i, n, m in [(0, a[0], 50), (1, a[1], 7), (2, a[2], 1),
                                                                          (0, a[0], 20)]]
    _accumulate_one_by_one([(b[i], mean.to(b[i].mean_acc.dtype), var.to(b[i].mean_acc.dtype), m)
                            for i, mean, var, m in stats])
    with deferred_accumulation():
        for i, mean, var, m in stats[:2]:
            a[i].accumulate(mean.to(a[i].mean_acc.dtype), var.to(a[i].mean_acc.dtype), m)
        with deferred_accumulation():
            for i, mean, var, m in stats[2:]:
                a[i].accumulate(mean.to(a[i].mean_acc.dtype), var.to(a[i].mean_acc.dtype), m)
        assert all(float(n.factor) == 0 for n in a)  # nothing made before the outermost block ends
    for x, y in zip(a, b):
        for t in ("factor", "mean_acc", "var_acc"):
            assert torch.equal(getattr(x, t), getattr(y, t)), t
    # outside a block: made at once; an exception inside a block still makes the queued updates
    c = BatchNorm(4, moving_average_fraction=0.999)
    with pytest.raises(RuntimeError, match="boom"):
        with deferred_accumulation():
            c.accumulate(torch.ones(4), torch.ones(4), 10)
            raise RuntimeError("boom")
    assert float(c.factor) == 1.0 and torch.equal(c.mean_acc, torch.ones(4))


def test_a_training_pass_updates_the_accumulators_in_five_calls_a_branch(request):
    """The GPU's code path (PyTorch's fused batch normalisation, run here on the CPU): each branch's
    40 BatchNorm layers update their accumulators in one group of multi-tensor calls at the end of
    the branch's pass, instead of layer by layer (about 280 operations a branch, each a kernel launch
    on a GPU), with the same accumulators as the C++ path's layer-by-layer updates in float64."""
    torch.manual_seed(0)
    model = MSPCNN(10).double().train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 144, 56, dtype=torch.float64)
    y = torch.randn(2, 3, 144, 56, dtype=torch.float64)
    label, sim = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    ref(x, y, label, sim)  # the C++ path, layer by layer
    request.getfixturevalue("gpu_code_path")
    counter = _op_names()
    with counter:
        model(x, y, label, sim)
    assert counter.names.count("native_batch_norm") == 80  # 40 layers a branch
    assert counter.names.count("_foreach_mul_") == 2 and counter.names.count("add_") == 0
    for (name, t), (_, r) in zip(model.state_dict().items(), ref.state_dict().items()):
        if name.endswith(("mean_acc", "var_acc", "factor")):
            torch.testing.assert_close(t, r, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("share_bn_stats", [False, True])
def test_both_branches_in_one_interleaved_pass_equal_two_passes_in_float64(request, native, share_bn_stats):
    """MSPCNN.pair_branches (the default on GPUs): the anchors and partners as one batch of 2N
    interleaved images, each branch normalised by its own BatchNorm statistics (paired_bn_scale:
    one fused batch normalisation on an N x 2C view where it applies, ``native``; else each half
    through bn_scale). Stage 2 (all three losses), two iterations' forward and backward: the same
    losses, gradients and accumulators as two separate passes, in float64; shared statistics too."""
    if native:  # the GPU's code path, on the CPU
        request.getfixturevalue("gpu_code_path")
    torch.manual_seed(0)
    two = MSPCNN(12, use_low=True, share_bn_stats=share_bn_stats).double().train()
    one = copy.deepcopy(two)
    two.pair_branches, one.pair_branches = False, True
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(3, 3, 144, 56, generator=g, dtype=torch.float64)
        y = torch.randn(3, 3, 144, 56, generator=g, dtype=torch.float64)
        label = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
        sim = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        mask = (torch.rand(3, 256, generator=g) > 0.5).double() * 2
        out = {}
        for name, model in (("two", two), ("one", one)):
            model.zero_grad()
            losses = model(x, y, label, sim, dropout_mask=mask)
            losses["total"].backward()
            out[name] = losses
        for k in out["two"]:
            torch.testing.assert_close(out["one"][k], out["two"][k], rtol=1e-10, atol=1e-12, msg=k)
        assert float(out["two"]["low"].detach()) != 0.0
    for (name, p), (_, q) in zip(one.named_parameters(), two.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, t), (_, r) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(t, r, rtol=1e-10, atol=1e-12, msg=name)


def test_interleaved_pass_issues_fewer_operations(gpu_code_path):
    """On the GPU's code path (run on the CPU) one interleaved pass over both branches issues about
    two thirds of the computing operations of two passes (forward and backward of stage 1; 616
    against 964, counting every operation but views, slices, detach and allocations, which launch
    no kernel: with them 1,347 against 1,437)."""
    views = {"view", "_unsafe_view", "slice", "select", "detach", "t", "unsqueeze", "squeeze", "expand",
             "as_strided", "transpose", "permute", "alias", "empty", "empty_like"}
    torch.manual_seed(0)
    model = MSPCNN(10).train()
    x, y = torch.randn(2, 3, 144, 56), torch.randn(2, 3, 144, 56)
    label, sim = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])
    counts = {}
    for paired in (False, True):
        model.pair_branches = paired
        model.zero_grad(set_to_none=True)
        counter = _op_names()
        with counter:
            model(x, y, label, sim)["total"].backward()
        counts[paired] = sum(name not in views for name in counter.names)
    assert counts[True] < 0.7 * counts[False], counts
