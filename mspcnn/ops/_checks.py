"""Argument checks of the NCC operators (shared by the operators, their fake
implementations and the reference). Each error names the argument and what was
expected; the C++ kernels repeat the checks for direct ``torch.ops`` calls."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)

# Limits of the CUDA kernels (csrc/cuda/ncc_forward.cu and the backward files): a block keeps the
# rows of both maps it needs and one row of outputs in shared memory.
CUDA_MAX_WIDTH = 64
CUDA_MAX_PATCH = 15
CUDA_MAX_SEARCH_ROWS = 15


def cuda_limits(op, a, patch, search_rows):
    """Raise ValueError when a CUDA input exceeds the kernels' limits."""
    W = a.shape[3]
    if W > CUDA_MAX_WIDTH:
        raise ValueError(
            f"{op}: the CUDA kernel supports maps at most {CUDA_MAX_WIDTH} wide, `a` is {W} "
            "wide (move the inputs to the CPU)"
        )
    if patch > CUDA_MAX_PATCH:
        raise ValueError(f"{op}: the CUDA kernel supports `patch` <= {CUDA_MAX_PATCH}, got {patch}")
    if search_rows > CUDA_MAX_SEARCH_ROWS:
        raise ValueError(
            f"{op}: the CUDA kernel supports `search_rows` <= {CUDA_MAX_SEARCH_ROWS}, "
            f"got {search_rows}"
        )


def check_map(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{op}: `{name}` must be a 4-D tensor N x C x H x W, "
            f"got a {t.dim()}-D tensor of shape {list(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: `{name}` must be float32 or float64, got {t.dtype}")


def check_odd(op, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: `{name}` must be an int, got {type(value).__name__}")
    if value < minimum or value % 2 == 0:
        raise ValueError(f"{op}: `{name}` must be an odd integer >= {minimum}, got {value}")


def check_inputs(op, a, b, patch, search_rows, eps):
    """Validate the arguments of ncc_volume / ncc_max (and their references)."""
    check_map(op, "a", a)
    check_map(op, "b", b)
    if a.shape != b.shape:
        raise ValueError(
            f"{op}: `a` and `b` must have the same shape, got {list(a.shape)} and {list(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: `a` and `b` must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(
            f"{op}: `a` and `b` must be on the same device, got {a.device} and {b.device}"
        )
    check_odd(op, "patch", patch, 3)
    check_odd(op, "search_rows", search_rows, 1)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: `eps` must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: `eps` must be finite and >= 0, got {eps}")
    size_limits(op, a, patch, search_rows)
    if a.device.type == "cuda":
        cuda_limits(op, a, patch, search_rows)


def size_limits(op, a, patch, search_rows):
    """Reject a patch or a search window so large that it only adds zero padding: patch at most
    2 max(H, W) + 1 (a larger patch holds the whole map and more zeros) and search_rows at most
    2 H + patch - 2 (further candidate rows lie wholly in the padding). Without these limits an
    absurd value (e.g. 10**7 + 1) would run for hours or exhaust memory."""
    H, W = a.shape[2], a.shape[3]
    if max(H, W) > 0 and patch > 2 * max(H, W) + 1:
        raise ValueError(f"{op}: `patch` {patch} is larger than 2 max(H, W) + 1 = {2 * max(H, W) + 1} for "
                         f"{H} x {W} maps (a larger patch only adds zero padding)")
    if H > 0 and search_rows > 2 * H + patch - 2:
        raise ValueError(f"{op}: `search_rows` {search_rows} is larger than 2 H + patch - 2 = {2 * H + patch - 2} "
                         f"for maps of height {H} (further candidate rows lie wholly in the zero padding)")
