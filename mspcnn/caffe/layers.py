"""Caffe's layer semantics in PyTorch, wherever they differ from PyTorch's
defaults (docs/caffe_semantics.md, checked against real Caffe in
tests/test_caffe_golden.py).

* :class:`BatchNorm`: Caffe's BatchNorm (no affine part), with its three
  accumulators (mean_acc, var_acc, factor) and ``use_global_stats``; not
  PyTorch's momentum running average.
* :class:`Scale`: per-channel gamma and (optional) beta, the affine part.
* :class:`Pooling`: MAX/AVE with Caffe's ceil rounding of the output size.
* :func:`fill_`: Caffe's fillers (constant, gaussian, uniform, xavier, msra).
* :func:`softmax_with_loss`, :func:`contrastive_loss`: Caffe's loss layers
  with their exact backward passes (custom autograd functions).
* :func:`dropout`: inverted dropout, the mask optionally given.
"""
import contextlib
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FLT_MIN = float(np.finfo(np.float32).tiny)

__all__ = ["BatchNorm", "deferred_accumulation", "Scale", "Pooling", "set_pool_kernels", "pool_output_size", "fill_", "softmax_with_loss",
           "contrastive_loss", "dropout", "l2_normalize"]


# ---------------------------------------------------------------------------
# BatchNorm accumulators: updated together
# ---------------------------------------------------------------------------
_DEFERRED = threading.local()


def _accumulate_all(updates):
    """Caffe's accumulator update, factor * maf + 1, mean_acc * maf + mean and
    var_acc * maf + (m / (m - 1)) var, for a list of (layer, mean, var, m), by multi-tensor
    operations over all of them: the same arithmetic on each tensor as one layer at a time, in five
    calls for the whole list instead of seven a layer (on a GPU each call is a kernel launch, and a
    training pass has 40 BatchNorm layers a branch, an iteration of [1]'s solver 160)."""
    if not updates:
        return
    # A layer updated twice goes into two rounds, in order (one multi-tensor call must not hold a
    # tensor twice); the multi-tensor calls take one device and dtype at a time.
    rounds, last = [], {}
    for u in updates:
        r = last.get(id(u[0]), -1) + 1
        last[id(u[0])] = r
        if r == len(rounds):
            rounds.append({})
        rounds[r].setdefault((u[0].mean_acc.device, u[0].mean_acc.dtype), []).append(u)
    with torch.no_grad():
        for members in (m for groups in rounds for m in groups.values()):
            norms = [u[0] for u in members]
            mafs = [float(n.moving_average_fraction) for n in norms]
            accs = [n.factor for n in norms] + [n.mean_acc for n in norms] + [n.var_acc for n in norms]
            torch._foreach_mul_(accs, mafs * 3)
            torch._foreach_add_(accs[:len(norms)], 1.0)
            unbiased = torch._foreach_mul([v for _, _, v, _ in members],
                                          [m / max(m - 1, 1) for _, _, _, m in members])
            torch._foreach_add_(accs[len(norms):], [mean for _, mean, _, _ in members] + list(unbiased))


@contextlib.contextmanager
def deferred_accumulation():
    """Inside this block, :meth:`BatchNorm.accumulate` queues its updates; they are made together
    when the block ends (also when it ends by an exception, as layer-by-layer updates would have
    been made up to that point). Nothing reads the accumulators while the batch statistics are in
    use, so the result is the same; nested blocks update at the end of the outermost."""
    if getattr(_DEFERRED, "updates", None) is not None:
        yield
        return
    _DEFERRED.updates = []
    try:
        yield
    finally:
        updates, _DEFERRED.updates = _DEFERRED.updates, None
        _accumulate_all(updates)


# ---------------------------------------------------------------------------
# Fillers
# ---------------------------------------------------------------------------
def fill_(tensor, filler, generator=None):
    """Fill ``tensor`` in place as Caffe's filler ``filler`` would.

    ``filler`` is a ``FillerParameter`` message or None (Caffe's default: a
    constant 0). Fan-in is count / shape[0] (count / num_output), fan-out
    count / shape[1], as in Caffe."""
    kind = filler.type if filler is not None else "constant"
    with torch.no_grad():
        if kind == "constant":
            tensor.fill_(filler.value if filler is not None else 0.0)
            return tensor
        count = tensor.numel()
        fan_in = count / tensor.shape[0] if tensor.dim() > 0 and tensor.shape[0] else count
        fan_out = count / tensor.shape[1] if tensor.dim() > 1 and tensor.shape[1] else count
        norm = {0: fan_in, 1: fan_out, 2: (fan_in + fan_out) / 2}[int(filler.variance_norm)]
        if kind == "gaussian":
            if filler.sparse != -1:
                raise ValueError("gaussian filler: sparse is not supported")
            tensor.normal_(filler.mean, filler.std, generator=generator)
        elif kind == "uniform":
            tensor.uniform_(filler.min, filler.max, generator=generator)
        elif kind == "xavier":
            a = math.sqrt(3.0 / norm)
            tensor.uniform_(-a, a, generator=generator)
        elif kind == "msra":
            tensor.normal_(0.0, math.sqrt(2.0 / norm), generator=generator)
        else:
            raise ValueError(f"unknown filler type {kind!r} (constant, gaussian, uniform, "
                             "xavier, msra)")
    return tensor


# ---------------------------------------------------------------------------
# BatchNorm and Scale
# ---------------------------------------------------------------------------
class BatchNorm(nn.Module):
    """Caffe's BatchNorm layer.

    TRAIN (``use_global_stats`` false): normalise with the batch mean and the
    biased batch variance over N (and H, W), then update the accumulators:
    factor = maf * factor + 1, mean_acc = maf * mean_acc + mu,
    var_acc = maf * var_acc + m / (m - 1) * var (m values per channel).
    Global stats: mean = mean_acc / factor, var = var_acc / factor (both 0 when
    factor is 0), constants for the backward pass. ``use_global_stats=None``
    follows the phase: batch statistics in training mode, global in eval mode
    (Caffe's default). The three accumulators are buffers and are exported as
    the layer's three blobs."""

    def __init__(self, channels, eps=1e-5, moving_average_fraction=0.999, use_global_stats=None):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.moving_average_fraction = moving_average_fraction
        self.use_global_stats = use_global_stats
        self.register_buffer("mean_acc", torch.zeros(channels))
        self.register_buffer("var_acc", torch.zeros(channels))
        self.register_buffer("factor", torch.zeros(1))

    def uses_global_stats(self):
        """Whether this layer normalises with its accumulated statistics (``use_global_stats``, or,
        when that is None, eval mode) rather than the batch's."""
        return self.use_global_stats if self.use_global_stats is not None else not self.training

    def global_stats(self):
        """(mean, var) from the accumulators, as Caffe computes them."""
        f = self.factor.item()
        scale = 0.0 if f == 0 else 1.0 / f
        return self.mean_acc * scale, self.var_acc * scale

    def _view(self, t, x):
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    def check_input(self, x):
        """ValueError unless ``x`` is N x channels x ... (for every path that normalises ``x``)."""
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"BatchNorm: expected N x {self.channels} x ..., got {list(x.shape)}")

    def forward(self, x):
        self.check_input(x)
        if self.uses_global_stats():
            mean, var = self.global_stats()
            return (x - self._view(mean, x)) / self._view(torch.sqrt(var + self.eps), x)
        dims = [0] + list(range(2, x.dim()))
        mu = x.mean(dim=dims)
        centred = x - self._view(mu, x)
        var = (centred * centred).mean(dim=dims)
        y = centred / self._view(torch.sqrt(var + self.eps), x)
        self.accumulate(mu, var, x.numel() // self.channels)
        return y

    def accumulate(self, mean, var, m):
        """Caffe's update of the accumulators with a batch's ``mean`` and biased ``var`` over ``m``
        values per channel (the unbiased variance m / (m - 1) var is what accumulates). Inside
        :func:`deferred_accumulation` the update is queued and made, with every other layer's, when
        the block ends."""
        # (detach() only where needed: it is an operation too, and the fused paths' statistics
        # are computed without gradient)
        update = (self, mean.detach() if mean.requires_grad else mean, var.detach() if var.requires_grad else var, m)
        pending = getattr(_DEFERRED, "updates", None)
        if pending is not None:
            pending.append(update)
            return
        _accumulate_all([update])

    def extra_repr(self):
        return (f"{self.channels}, eps={self.eps}, moving_average_fraction="
                f"{self.moving_average_fraction}, use_global_stats={self.use_global_stats}")


class Scale(nn.Module):
    """Caffe's Scale layer with one bottom: y = x * gamma (+ beta), per channel."""

    def __init__(self, channels, bias_term=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias_term else None

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.weight.view(shape)
        return y + self.bias.view(shape) if self.bias is not None else y


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------
def set_pool_kernels(module, enabled):
    """Set ``cpu_kernel`` on every :class:`Pooling` inside ``module`` (a model, a CaffeNet)."""
    for mod in module.modules():
        if isinstance(mod, Pooling):
            mod.cpu_kernel = bool(enabled)


def pool_output_size(size, kernel, stride, pad):
    """Caffe's pooled size: ceil((size + 2 pad - kernel) / stride) + 1, minus 1
    when pad > 0 and the last window would start in the padding."""
    pooled = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad > 0 and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


class Pooling(nn.Module):
    """Caffe's Pooling (MAX or AVE), Caffe's output size. MAX takes the first
    maximum of each window (strict '>'); AVE divides by the window clipped to
    the padded map (padding counts, overhang past it does not).

    ``cpu_kernel`` (attribute, default True): on the CPU, contiguous float32/64
    maps go through PyTorch's channels-last kernels and, for MAX, our backward
    (:mod:`mspcnn.caffe.kernels`); False, and everywhere else, PyTorch's NCHW
    pooling (the same values)."""

    def __init__(self, method="MAX", kernel=(2, 2), stride=(2, 2), pad=(0, 0), global_pooling=False):
        super().__init__()
        if method not in ("MAX", "AVE"):
            raise ValueError(f"Pooling: method must be MAX or AVE, got {method!r}")
        self.method, self.kernel, self.stride, self.pad = method, tuple(kernel), tuple(stride), tuple(pad)
        self.global_pooling = global_pooling
        self.cpu_kernel = True

    def output_size(self, h, w):
        if self.global_pooling:
            return 1, 1
        return (pool_output_size(h, self.kernel[0], self.stride[0], self.pad[0]),
                pool_output_size(w, self.kernel[1], self.stride[1], self.pad[1]))

    def forward(self, x):
        h, w = (int(v) for v in x.shape[-2:])  # plain ints: a traced (exported) net gets a fixed kernel
        kernel, stride, pad = self.kernel, self.stride, self.pad
        if self.global_pooling:
            kernel, stride, pad = (h, w), (1, 1), (0, 0)
        from . import kernels  # here: kernels loads the compiled extension, layers must not need it

        if self.method == "MAX":
            y = kernels.max_pool(x, kernel, stride, pad, self.cpu_kernel)
        else:
            # global pooling (one output per plane) is faster in NCHW, as PyTorch does it
            y = kernels.ave_pool(x, kernel, stride, pad, self.cpu_kernel and not self.global_pooling)
        expected = self.output_size(h, w)
        if tuple(y.shape[-2:]) != expected:  # PyTorch and Caffe round differently here
            raise ValueError(f"Pooling: PyTorch gives {tuple(y.shape[-2:])} but Caffe {expected} "
                             f"for input {h}x{w}, kernel {kernel}, stride {stride}, pad {pad}")
        return y

    def extra_repr(self):
        if self.global_pooling:
            return f"{self.method}, global"
        return f"{self.method}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}"


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------
class _SoftmaxWithLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, label, normalization, ignore_label):
        prob = torch.softmax(logits, dim=1)
        lab = label.long()
        valid = torch.ones_like(lab, dtype=torch.bool) if ignore_label is None else lab != ignore_label
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        p = prob.gather(1, safe.unsqueeze(1)).squeeze(1)
        losses = -torch.log(torch.clamp(p, min=FLT_MIN)) * valid
        # Without an ignore_label every label counts: known here, without reading the device
        # (a .item() makes the host wait for the GPU at every forward pass).
        count = lab.numel() if ignore_label is None else valid.sum().item()
        norm = {"FULL": lab.numel(), "VALID": count, "BATCH_SIZE": logits.shape[0], "NONE": 1}[normalization]
        norm = max(float(norm), 1.0)
        ctx.save_for_backward(prob, safe, valid)
        ctx.norm = norm
        return losses.sum() / norm

    @staticmethod
    def backward(ctx, grad):
        prob, safe, valid = ctx.saved_tensors
        g = prob.clone()
        g.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(prob[:, :1]))
        g = g * valid.unsqueeze(1)
        return g * (grad / ctx.norm), None, None, None


def softmax_with_loss(logits, label, normalization="VALID", ignore_label=None):
    """Caffe's SoftmaxWithLoss over axis 1 of N x K logits: the sum of
    -log(max(p_label, FLT_MIN)) divided by the normaliser (VALID: the count of
    non-ignored labels). Backward: (p - onehot) / normaliser, as Caffe.
    ``label`` may be float (Caffe blobs are float) with integer values."""
    if logits.dim() != 2:
        raise ValueError(f"softmax_with_loss: logits must be N x K, got {list(logits.shape)}")
    if label.shape != logits.shape[:1]:
        raise ValueError(f"softmax_with_loss: label must have shape [{logits.shape[0]}], "
                         f"got {list(label.shape)}")
    return _SoftmaxWithLoss.apply(logits, label, normalization, ignore_label)


class _ContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, y, margin, legacy):
        diff = a - b
        dist_sq = (diff * diff).sum(dim=1)
        similar = y.trunc() != 0
        dist = torch.sqrt(dist_sq)
        if legacy:
            dissimilar_term = torch.clamp(margin - dist_sq, min=0)
        else:
            dissimilar_term = torch.clamp(margin - dist, min=0) ** 2
        n = a.shape[0]
        loss = torch.where(similar, dist_sq, dissimilar_term).sum() / (2.0 * n)
        ctx.save_for_backward(diff, dist_sq, dist, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return loss

    @staticmethod
    def backward(ctx, grad):
        diff, dist_sq, dist, similar = ctx.saved_tensors
        n = diff.shape[0]
        margin = ctx.margin
        if ctx.legacy:
            coef = torch.where(margin - dist_sq > 0, -torch.ones_like(dist), torch.zeros_like(dist))
        else:
            mdist = margin - dist
            coef = torch.where(mdist > 0, -mdist / (dist + 1e-4), torch.zeros_like(dist))
        coef = torch.where(similar, torch.ones_like(dist), coef)
        ga = diff * (coef / n).unsqueeze(1) * grad
        return ga, -ga, None, None, None


def contrastive_loss(a, b, y, margin=1.0, legacy_version=False):
    """Caffe's ContrastiveLoss: E = 1/(2N) sum(y d^2 + (1 - y) max(margin - d, 0)^2)
    (legacy: max(margin - d^2, 0)), y truncated to int. Backward as Caffe: for
    a dissimilar pair the gradient divides by (d + 1e-4), so d = 0 gives 0, not
    NaN."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"contrastive_loss: a and b must be N x D of one shape, got "
                         f"{list(a.shape)} and {list(b.shape)}")
    if y.shape != a.shape[:1]:
        raise ValueError(f"contrastive_loss: y must have shape [{a.shape[0]}], got {list(y.shape)}")
    return _ContrastiveLoss.apply(a, b, y, float(margin), bool(legacy_version))


def l2_normalize(x, eps=1e-12):
    """Each row of N x D ``x`` divided by its L2 norm (norm floored at eps).
    BVLC Caffe has no such layer; prototxt files use the type L2Normalize."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=eps)


def draw_dropout_mask(shape, ratio, dtype=torch.float32):
    """The keep-mask :func:`dropout` draws (booleans, on the CPU): one draw of PyTorch's CPU
    generator per call. Code that passes masks in (CUDA graphs) draws them here, so that a seed
    gives the same masks either way."""
    return torch.rand(shape, dtype=dtype) >= ratio


def dropout(x, ratio, training, mask=None):
    """Caffe's Dropout: TRAIN y = x * mask / (1 - ratio), TEST identity. A
    given ``mask`` (0/1, shaped like x) replaces the random draw.

    The mask is drawn from PyTorch's CPU generator whatever the device of x
    (for x on the CPU this is the same draw as ``torch.rand_like(x)``), so a
    seed gives the same masks on the CPU and on a GPU, and the random state a
    snapshot stores (the CPU generator's) is all a bit-exact resume needs.
    Caffe draws GPU masks with cuRAND instead; its streams are not reproduced
    either way."""
    if not training:
        return x
    if mask is None:
        mask = draw_dropout_mask(x.shape, ratio, x.dtype)
        if x.is_cuda:  # page-locked, so that the copy does not wait for the GPU's queued work
            mask = mask.pin_memory().to(x.device, non_blocking=True)
        mask = mask.to(device=x.device, dtype=x.dtype)
    return x * mask.to(x.dtype) / (1.0 - ratio)
