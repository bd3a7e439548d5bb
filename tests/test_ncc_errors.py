"""Bad input to the NCC operators gets an error naming the argument and what
was expected, from the Python functions, the references and direct
torch.ops calls alike."""
import pytest
import torch

from mspcnn.ops import ncc_max, ncc_max_reference, ncc_volume, ncc_volume_reference

OPS = [ncc_volume, ncc_max, ncc_volume_reference, ncc_max_reference]


def good(shape=(1, 2, 6, 5), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "make,kwargs,exc,message",
    [
        (lambda: (torch.randn(1, 2, 6, 5), torch.randn(1, 2, 6, 4)), {}, ValueError,
         r"`a` and `b` must have the same shape, got \[1, 2, 6, 5\] and \[1, 2, 6, 4\]"),
        (lambda: (torch.randn(1, 2, 6, 5), torch.randn(1, 2, 6, 5, dtype=torch.float64)), {},
         TypeError, r"`a` and `b` must have the same dtype, got torch.float32 and torch.float64"),
        (lambda: (torch.ones(1, 2, 6, 5, dtype=torch.int64), torch.ones(1, 2, 6, 5)), {},
         TypeError, r"`a` must be float32 or float64, got torch.int64"),
        (lambda: (torch.randn(1, 2, 6, 5), torch.ones(1, 2, 6, 5, dtype=torch.uint8)), {},
         TypeError, r"`b` must be float32 or float64, got torch.uint8"),
        (lambda: (torch.randn(2, 6, 5), torch.randn(2, 6, 5)), {}, ValueError,
         r"`a` must be a 4-D tensor N x C x H x W, got a 3-D tensor of shape \[2, 6, 5\]"),
        (lambda: ([[1.0]], torch.randn(1, 1, 1, 1)), {}, TypeError,
         r"`a` must be a torch.Tensor, got list"),
        (good, {"patch": 4}, ValueError, r"`patch` must be an odd integer >= 3, got 4"),
        (good, {"patch": 1}, ValueError, r"`patch` must be an odd integer >= 3, got 1"),
        (good, {"patch": 3.0}, TypeError, r"`patch` must be an int, got float"),
        (good, {"search_rows": 2}, ValueError, r"`search_rows` must be an odd integer >= 1, got 2"),
        (good, {"search_rows": 0}, ValueError, r"`search_rows` must be an odd integer >= 1, got 0"),
        (good, {"eps": -0.1}, ValueError, r"`eps` must be finite and >= 0, got -0.1"),
        (good, {"eps": float("nan")}, ValueError, r"`eps` must be finite and >= 0, got nan"),
        # sizes that only add padding would run for hours: refused at once (maps are 6 x 5)
        (good, {"search_rows": 10**7 + 1}, ValueError,
         r"`search_rows` 10000001 is larger than 2 H \+ patch - 2 = 15 for maps of height 6"),
        (good, {"patch": 10**7 + 1}, ValueError, r"`patch` 10000001 is larger than 2 max\(H, W\) \+ 1 = 13"),
    ],
)
def test_bad_input_message(op, make, kwargs, exc, message):
    a, b = make()
    with pytest.raises(exc, match=f"{op.__name__}: {message}"):
        op(a, b, **kwargs)


def test_mismatched_devices_named():
    a, b = good()
    with pytest.raises(ValueError, match=r"ncc_max: `a` and `b` must be on the same device, "
                                         r"got cpu and meta"):
        ncc_max(a, b.to("meta"))


def test_direct_torch_ops_calls_are_checked_in_cpp():
    a, b = good()
    with pytest.raises(RuntimeError, match=r"ncc_max: `patch` must be an odd integer >= 3, got 2"):
        torch.ops.mspcnn.ncc_max(a, b, 2, 5, 0.01)
    with pytest.raises(RuntimeError, match=r"ncc_volume: `a` and `b` must have the same shape"):
        torch.ops.mspcnn.ncc_volume(a, b[:, :1], 3, 5, 0.01)
    with pytest.raises(RuntimeError, match=r"ncc_volume: `a` must be float32 or float64, got Long"):
        torch.ops.mspcnn.ncc_volume(a.long(), b.long(), 3, 5, 0.01)
    v, i = torch.ops.mspcnn.ncc_max(a, b, 3, 5, 0.01)
    with pytest.raises(RuntimeError, match=r"ncc_max_backward: `index` must be int64, got Int"):
        torch.ops.mspcnn.ncc_max_backward(v, a, b, i.int(), 3, 5, 0.01)
    with pytest.raises(RuntimeError, match=r"ncc_volume_backward: `grad` must have shape"):
        torch.ops.mspcnn.ncc_volume_backward(v, a, b, v, 3, 5, 0.01)


def test_errors_under_torch_compile_name_the_argument():
    a, b = good()
    f = torch.compile(lambda x, y: ncc_max(x, y, 4)[0], backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"`patch` must be an odd integer >= 3, got 4"):
        f(a, b)


def test_absurd_sizes_refused_by_the_kernels_too():
    """The C++ checks repeat the size limits for direct torch.ops calls (no Python checks there)."""
    a, b = torch.randn(1, 2, 6, 5), torch.randn(1, 2, 6, 5)
    with pytest.raises(RuntimeError, match=r"`search_rows` 10000001 is larger than 2 H \+ patch - 2 = 13"):
        torch.ops.mspcnn.ncc_max(a, b, 3, 10**7 + 1, 0.01)
    with pytest.raises(RuntimeError, match=r"`patch` 10000001 is larger than 2 max\(H, W\) \+ 1 = 13"):
        torch.ops.mspcnn.ncc_volume(a, b, 10**7 + 1, 1, 0.01)
