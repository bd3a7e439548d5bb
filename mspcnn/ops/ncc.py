"""The wide-search NCC operators as PyTorch custom operators.

The schemas are declared once in C++ (csrc/ncc_ops.cpp) and the kernels are
registered per device (csrc/cpu/ncc_cpu.cpp, csrc/cuda/ncc_cuda.cpp). This
module adds what Python owns:

* fake implementations (output shapes for torch.compile and meta tensors),
* the autograd formulas, which call the backward operators,
* the user-facing functions with argument checking and documentation.

The backward operators compute the exact derivative (eps included); they are
not themselves differentiable (no double backward).
"""
import torch

from mspcnn import _extension  # noqa: F401  loads mspcnn._C, which registers the kernels
from mspcnn.defaults import NCC_EPS, NCC_PATCH, NCC_SEARCH_ROWS

from ._checks import check_inputs

__all__ = ["ncc_volume", "ncc_max"]

# --------------------------------------------------------------------------
# Fake implementations: shapes, dtypes and devices of the outputs only.
# --------------------------------------------------------------------------
@torch.library.register_fake("mspcnn::ncc_volume")
def _ncc_volume_fake(a, b, patch, search_rows, eps):
    check_inputs("ncc_volume", a, b, patch, search_rows, eps)
    N, C, H, W = a.shape
    return a.new_empty((N, C * search_rows * W, H, W))


@torch.library.register_fake("mspcnn::ncc_max")
def _ncc_max_fake(a, b, patch, search_rows, eps):
    check_inputs("ncc_max", a, b, patch, search_rows, eps)
    return a.new_empty(a.shape), a.new_empty(a.shape, dtype=torch.long)


@torch.library.register_fake("mspcnn::ncc_max_tc")
def _ncc_max_tc_fake(a, b, patch, search_rows, eps, passes):
    check_inputs("ncc_max", a, b, patch, search_rows, eps)
    return a.new_empty(a.shape), a.new_empty(a.shape, dtype=torch.long)


@torch.library.register_fake("mspcnn::ncc_volume_backward")
def _ncc_volume_backward_fake(grad, a, b, volume, patch, search_rows, eps):
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
        b, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("mspcnn::ncc_max_backward")
def _ncc_max_backward_fake(grad, a, b, index, patch, search_rows, eps):
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
        b, memory_format=torch.contiguous_format
    )


# --------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------
def _volume_setup_context(ctx, inputs, output):
    a, b, patch, search_rows, eps = inputs
    ctx.save_for_backward(a, b, output)
    ctx.params = (patch, search_rows, eps)


def _volume_backward(ctx, grad):
    a, b, volume = ctx.saved_tensors
    grad_a, grad_b = torch.ops.mspcnn.ncc_volume_backward.default(
        grad, a, b, volume, *ctx.params
    )
    return grad_a, grad_b, None, None, None


def _max_setup_context(ctx, inputs, output):
    # ncc_max (5 inputs) and ncc_max_tc (6: `passes` last) share the backward.
    a, b, patch, search_rows, eps = inputs[:5]
    _, index = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(a, b, index)
    ctx.params = (patch, search_rows, eps)
    ctx.non_tensor_inputs = len(inputs) - 2


def _max_backward(ctx, grad_values, _grad_index):
    a, b, index = ctx.saved_tensors
    grad_a, grad_b = torch.ops.mspcnn.ncc_max_backward.default(
        grad_values, a, b, index, *ctx.params
    )
    return (grad_a, grad_b) + (None,) * ctx.non_tensor_inputs


torch.library.register_autograd(
    "mspcnn::ncc_volume", _volume_backward, setup_context=_volume_setup_context
)
torch.library.register_autograd(
    "mspcnn::ncc_max", _max_backward, setup_context=_max_setup_context
)
torch.library.register_autograd(
    "mspcnn::ncc_max_tc", _max_backward, setup_context=_max_setup_context
)

# The tensor-core paths of ncc_max (CUDA): name -> passes of the kernel.
TENSOR_CORE_PASSES = {"tf32": 1, "3xtf32": 3}


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def ncc_volume(a, b, patch=NCC_PATCH, search_rows=NCC_SEARCH_ROWS, eps=NCC_EPS):
    """Wide-search normalized cross-correlation volume (docs/method.md, section 2).

    For every channel c and position (r, w) of ``a``, the P x P patch of ``a``
    centred there is compared with the patches of ``b`` centred at rows
    r - R//2 .. r + R//2 and every column 0 .. W-1 (zero padding outside):
    NCC(x, y) = sum((x - mu_x)(y - mu_y)) / ((n - 1)(s_x + eps)(s_y + eps)),
    n = P*P, s the unbiased standard deviation of the patch.

    Args:
        a, b: N x C x H x W float32 or float64 tensors on the same device.
        patch: odd patch side P >= 3.
        search_rows: odd number of candidate rows R >= 1.
        eps: added to each patch's standard deviation.

    Returns:
        N x (C*R*W) x H x W tensor; channel c*R*W + k*W + col holds the NCC
        with the patch of ``b`` at row r + k - R//2, column col.

    Differentiable in ``a`` and ``b`` (exact gradient, eps included). Memory is
    R*W times that of ``a``; use :func:`ncc_max` when only the best match is
    needed. NaN in an input makes every output whose patches contain it NaN.
    """
    check_inputs("ncc_volume", a, b, patch, search_rows, eps)
    return torch.ops.mspcnn.ncc_volume.default(a, b, int(patch), int(search_rows), float(eps))


def ncc_max(a, b, patch=NCC_PATCH, search_rows=NCC_SEARCH_ROWS, eps=NCC_EPS, tensor_cores=None):
    """Best wide-search NCC match of every patch (the form used by MSP-CNN).

    Same arguments as :func:`ncc_volume`. Returns ``(values, index)``, both
    N x C x H x W: the maximum of the R*W candidates of each (n, c, r, w) and
    its candidate index k*W + col (int64; on ties the smallest index, as
    torch.argmax). The gradient of ``values`` flows to the two patches of the
    selected candidate only. The volume is never stored. NaN counts as larger
    than every number: an output with a NaN candidate is NaN.

    ``tensor_cores`` (CUDA, float32, compute capability 8.0 or newer; patch 3
    or 5, search_rows 1, 3 or 5, maps at most 32 wide) computes the candidates'
    patch products on tensor cores instead, an explicit trade never made by
    default: ``"tf32"`` rounds both maps to TF32 (10 mantissa bits), so that
    the maximum can go to a candidate within about 1e-3 of the true one;
    ``"3xtf32"`` splits each value into two TF32 parts (float32-like accuracy,
    three times the tensor work). Either way the returned value is the
    float32 NCC of the returned index, and the gradient is the default one
    for that index (docs/ncc_layer.md, "Tensor cores"). ``None`` (the
    default): the kernels of the inputs' dtype.
    """
    check_inputs("ncc_max", a, b, patch, search_rows, eps)
    if tensor_cores is None:
        return torch.ops.mspcnn.ncc_max.default(a, b, int(patch), int(search_rows), float(eps))
    if tensor_cores not in TENSOR_CORE_PASSES:
        raise ValueError(f"ncc_max: `tensor_cores` must be None, 'tf32' or '3xtf32', got {tensor_cores!r}")
    if a.device.type != "cuda":
        raise ValueError(f"ncc_max: `tensor_cores={tensor_cores!r}` runs on CUDA devices only, the maps are "
                         f"on {a.device} (leave tensor_cores=None there)")
    if a.dtype != torch.float32:
        raise TypeError(f"ncc_max: `tensor_cores={tensor_cores!r}` takes float32 maps, got {a.dtype}")
    if patch != 5 or search_rows not in (1, 3, 5) or a.shape[3] > 32:
        # 3 x 3 patches are refused: measured on an H200, TF32 chose candidates up to 2.6e-3 (emulated:
        # 2.2e-2) below the maximum and 3xTF32 missed its 1e-5 bound (docs/ncc_layer.md, "Tensor cores").
        raise ValueError(f"ncc_max: the tensor-core path supports patch 5, search_rows 1, 3 or 5 and maps at "
                         f"most 32 wide; got patch {patch}, search_rows {search_rows}, width {a.shape[3]} (at "
                         f"3 x 3 patches it failed its accuracy bounds; leave tensor_cores=None there)")
    return torch.ops.mspcnn.ncc_max_tc.default(a, b, int(patch), int(search_rows), float(eps),
                                              TENSOR_CORE_PASSES[tensor_cores])
