"""Our own CPU paths for the Caffe layers that cost most outside the convolutions.

A CPU training iteration of MSP-CNN spent about a third of its time outside the convolutions, in
Caffe's BatchNorm + Scale + ReLU written as a dozen separate PyTorch operations and in PyTorch's
NCHW pooling (docs/perf_notes.md). Here they compute the same functions faster:

* ``torch.ops.mspcnn.bn_scale_train`` (and its backward): BatchNorm with batch statistics, Scale
  and optionally ReLU in one operator::

      mean = sum(x) / m,  var = sum((x - mean)^2) / m      (per channel, m = N x H x W)
      y    = [relu](gamma * (x - mean) / sqrt(var + eps) + beta)
      dbeta = sum(dz),  dgamma = sum(dz * xh),
      dx   = gamma / sqrt(var + eps) * (dz - dbeta / m - xh * dgamma / m)

  (dz: the incoming gradient where y > 0, xh: the normalised input). The sums are accumulated in
  double, one channel per thread, in an order that does not depend on the thread count, and the
  rounding of the mean to float32 is folded into the per-channel constants: in float32 each
  output is float64's rounded (tests/test_layer_kernels.py), and the results do not change with
  the number of threads.
* pooling: PyTorch's NCHW pooling kernels run one plane at a time along short rows (9 x 4 to
  36 x 14 in the inception blocks); its channels-last kernels vectorise across channels and select
  the same elements. :func:`max_pool` and :func:`ave_pool` transpose to channels-last and back, and
  MAX pooling's backward is ours (``torch.ops.mspcnn.caffe_max_pool_backward``, a scatter of the
  gradient to the selected elements: PyTorch's would convert the gradient to channels-last and back).

:func:`bn_scale` and :func:`max_pool` / :func:`ave_pool` take these paths where they compute the
same function (CPU, float32 or float64, contiguous NCHW tensors, the batch-statistics phase for
BatchNorm) and PyTorch's plain operations everywhere else (GPU, channels-last, global statistics).
``MSPCNNBackbone.cpu_kernels = False`` (``solve(cpu_kernels=False)``) turns them off.
"""
import torch
import torch.nn.functional as F

from mspcnn import _extension  # noqa: F401  loads mspcnn._C, which registers the kernels

__all__ = ["bn_scale", "bn_kernel_applies", "bn_scale_native", "native_bn_applies", "max_pool", "ave_pool", "pool_kernel_applies"]


# --------------------------------------------------------------------------- BatchNorm + Scale
@torch.library.register_fake("mspcnn::bn_scale_train")
def _bn_fake(x, gamma, beta, eps, relu):
    c = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((c,), dtype=torch.float64),
            x.new_empty((c,), dtype=torch.float64))


@torch.library.register_fake("mspcnn::bn_scale_train_backward")
def _bn_backward_fake(grad_y, x, y, gamma, mean, var, eps, relu):
    return x.new_empty(x.shape), gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape)


# The autograd formula is registered in C++ (csrc/cpu/bn_cpu.cpp, `BnScaleTrain`): the network calls
# the operator 160 times an iteration, and a formula registered from Python cost about 100 us of
# interpreter time a call.


def bn_kernel_applies(norm, scale, x):
    """Whether :func:`bn_scale` runs the C++ operator for this layer pair and input."""
    return (not norm.uses_global_stats() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() >= 2 and x.numel() > 0 and x.is_contiguous() and scale.bias is not None
            and scale.weight.dtype == x.dtype and not torch.jit.is_tracing())


def native_bn_applies(norm, x):
    """Whether :func:`bn_scale` runs PyTorch's fused batch normalisation for this layer and input:
    a GPU tensor in the batch-statistics phase with more than one value per channel."""
    return (not norm.uses_global_stats() and x.device.type == "cuda" and x.dim() >= 2 and x.numel() > x.shape[1]
            and not torch.jit.is_tracing())


def bn_scale_native(norm, scale, x, relu=False):
    """Caffe's BatchNorm (batch statistics) + Scale (+ ReLU) through PyTorch's fused
    ``F.batch_norm``, which normalises with the batch mean and the biased batch variance, eps inside
    the square root, as Caffe does, and applies Scale's gamma and beta as its affine part: one
    kernel forward and one backward instead of the dozen separate operations of the layers (on a GPU
    those were about 80% of an iteration's 12,000 operations, each a kernel launch). The batch mean
    and variance for Caffe's accumulators come from one extra reduction (``torch.var_mean``) without
    gradient. Any device; :func:`bn_scale` takes it on GPUs (:func:`native_bn_applies`). Same
    function as the separate layers, rounded in another order (tests/test_layer_kernels.py)."""
    norm.check_input(x)
    y, mean, var = _fused_batch_norm(x, scale.weight, scale.bias, norm.eps)
    norm.accumulate(mean.to(norm.mean_acc.dtype), var.to(norm.var_acc.dtype), x.numel() // norm.channels)
    return F.relu(y) if relu else y


def _fused_batch_norm(x, weight, bias, eps):
    """(y, batch mean, biased batch variance) of PyTorch's fused batch normalisation of ``x`` over
    all dimensions but the channels (1), the statistics without gradient, for Caffe's accumulators."""
    dims = [0] + list(range(2, x.dim()))
    with torch.no_grad():
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=float(eps)), mean, var


def bn_scale(norm, scale, x, relu=False, kernel=True):
    """``[relu](scale(norm(x)))`` for a :class:`~mspcnn.caffe.layers.BatchNorm` ``norm`` and a
    :class:`~mspcnn.caffe.layers.Scale` ``scale``, updating ``norm``'s accumulators in the
    training phase. ``kernel``: use the C++ operator where :func:`bn_kernel_applies` (CPU) and
    PyTorch's fused batch normalisation where :func:`native_bn_applies` (GPU), the default; False
    always runs the separate layers."""
    if kernel and bn_kernel_applies(norm, scale, x):
        norm.check_input(x)
        y, mean, var = torch.ops.mspcnn.bn_scale_train(x, scale.weight, scale.bias, float(norm.eps),
                                                        bool(relu))
        norm.accumulate(mean.to(norm.mean_acc.dtype), var.to(norm.var_acc.dtype), x.numel() // norm.channels)
        return y
    if kernel and native_bn_applies(norm, x):
        return bn_scale_native(norm, scale, x, relu)
    y = scale(norm(x))
    return torch.relu(y) if relu else y


def paired_bn_scale(norm_a, norm_b, scale, x, relu=False, kernel=True):
    """:func:`bn_scale` for the two branches of the Siamese net in one batch: ``x`` is 2N x C x ...
    with the pairs interleaved (anchor 0, partner 0, anchor 1, ...); the anchors are normalised with
    their own batch statistics into ``norm_a``, the partners with theirs into ``norm_b`` (Caffe's
    per-branch BatchNorm), both by the shared ``scale``. Where PyTorch's fused batch normalisation
    applies to both (:func:`native_bn_applies`: GPUs), the interleaved batch viewed as N x 2C x ...
    (a view, no copy) holds each branch's channels apart, so one ``F.batch_norm`` with gamma and beta
    repeated normalises both: each branch's statistics are over exactly its own N x ... values.
    Elsewhere, or where the two layers' settings differ, each half goes through :func:`bn_scale`
    and the result is interleaved again."""
    n2, c = x.shape[0], x.shape[1]
    if (n2 % 2 == 0 and x.is_contiguous() and kernel and norm_a.eps == norm_b.eps
            and native_bn_applies(norm_a, x) and native_bn_applies(norm_b, x)):
        norm_a.check_input(x)
        v = x.view(n2 // 2, 2 * c, *x.shape[2:])
        bias = None if scale.bias is None else scale.bias.repeat(2)
        y, mean, var = _fused_batch_norm(v, scale.weight.repeat(2), bias, norm_a.eps)
        m = v.numel() // (2 * c)
        norm_a.accumulate(mean[:c].to(norm_a.mean_acc.dtype), var[:c].to(norm_a.var_acc.dtype), m)
        norm_b.accumulate(mean[c:].to(norm_b.mean_acc.dtype), var[c:].to(norm_b.var_acc.dtype), m)
        y = y.view(x.shape)
        return F.relu(y) if relu else y
    ya = bn_scale(norm_a, scale, x[0::2].contiguous(), relu, kernel)
    yb = bn_scale(norm_b, scale, x[1::2].contiguous(), relu, kernel)
    return torch.stack([ya, yb], 1).flatten(0, 1)


# --------------------------------------------------------------------------- pooling
@torch.library.register_fake("mspcnn::caffe_max_pool_backward")
def _max_backward_fake(grad_y, index, height, width):
    return grad_y.new_empty((grad_y.shape[0], grad_y.shape[1], height, width))


class _MaxPool(torch.autograd.Function):
    """MAX pooling of a contiguous NCHW map: forward by PyTorch's channels-last kernel (the same
    selection, vectorised across channels), backward by our scatter of the gradient into the
    selected elements (``caffe_max_pool_backward``)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pad):
        y, index = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel, stride, pad,
                                ceil_mode=True, return_indices=True)
        index = index.contiguous()
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(index)
        ctx.size = (x.shape[2], x.shape[3])
        return y.contiguous(), index

    @staticmethod
    def backward(ctx, grad_y, _grad_index):
        (index,) = ctx.saved_tensors
        return torch.ops.mspcnn.caffe_max_pool_backward(grad_y.contiguous(), index, *ctx.size), None, None, None


class _AvePool(torch.autograd.Function):
    """AVE pooling of a contiguous NCHW map computed by PyTorch's channels-last kernels, forward and
    backward, with NCHW output and input gradient."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pad):
        x_cl = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x_cl)
        ctx.params = (kernel, stride, pad)
        return F.avg_pool2d(x_cl, kernel, stride, pad, ceil_mode=True, count_include_pad=True).contiguous()

    @staticmethod
    def backward(ctx, grad_y):
        (x_cl,) = ctx.saved_tensors
        kernel, stride, pad = ctx.params
        gx = torch.ops.aten.avg_pool2d_backward(grad_y.contiguous(memory_format=torch.channels_last), x_cl,
                                                list(kernel), list(stride), list(pad), True, True, None)
        return gx.contiguous(), None, None, None


def pool_kernel_applies(x):
    """Whether :func:`max_pool` / :func:`ave_pool` take the channels-last path for this input (not
    while tracing: an exported graph keeps the plain pooling operator)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and x.numel() > 0 and x.is_contiguous() and not torch.jit.is_tracing())


def max_pool(x, kernel, stride, pad, use_kernel=True):
    """``F.max_pool2d(x, kernel, stride, pad, ceil_mode=True)`` (Caffe's MAX pooling where the
    output sizes agree, which :class:`mspcnn.caffe.layers.Pooling` checks): for a contiguous CPU
    map and ``use_kernel``, through PyTorch's channels-last kernel and our backward (the same
    values and gradients, 4x faster forward and backward at the network's sizes); else directly."""
    if use_kernel and pool_kernel_applies(x):
        return _MaxPool.apply(x, kernel, stride, pad)[0]
    return F.max_pool2d(x, kernel, stride, pad, ceil_mode=True)


def ave_pool(x, kernel, stride, pad, use_kernel=True):
    """``F.avg_pool2d(x, kernel, stride, pad, ceil_mode=True, count_include_pad=True)`` (Caffe's
    AVE pooling where the output sizes agree): for a contiguous CPU map and ``use_kernel``, computed
    in the channels-last layout and converted back (the same values to rounding, 1.2-1.3x faster
    forward and backward at the network's sizes); else directly."""
    if use_kernel and pool_kernel_applies(x):
        return _AvePool.apply(x, kernel, stride, pad)
    return F.avg_pool2d(x, kernel, stride, pad, ceil_mode=True, count_include_pad=True)
