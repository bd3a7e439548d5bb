"""Step 4: a real PyTorch operator: registered, checked by opcheck, traced by torch.compile.

An autograd.Function works in eager mode only. torch.library makes the kernel an operator
(`tutorial::ncc_same`): it gets a schema, a *fake* implementation that computes only the output's
shape and dtype (what torch.compile and meta tensors need), and an autograd formula. opcheck then
tests the registration itself (schema, fake, autograd, dispatch) on sample inputs. mspcnn's real
operators are registered the same way, with the schema in C++ (csrc/ncc_ops.cpp) and the Python
side in mspcnn/ops/ncc.py. Run: python docs/tutorial/step4_custom_op.py   (torch.compile takes
about 20 seconds the first time)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncc_same_cpp import load  # noqa: E402
from step1_reference import ncc_same_reference  # noqa: E402

ext = load()


@torch.library.custom_op("tutorial::ncc_same", mutates_args=())
def ncc_same(a: torch.Tensor, b: torch.Tensor, patch: int, eps: float) -> torch.Tensor:
    return ext.ncc_same_forward(a, b, patch, eps)


@ncc_same.register_fake
def _(a, b, patch, eps):
    return torch.empty_like(a)


@torch.library.custom_op("tutorial::ncc_same_backward", mutates_args=())
def ncc_same_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, patch: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    grad_a, grad_b = ext.ncc_same_backward(grad.contiguous(), a, b, patch, eps)
    return grad_a, grad_b


@ncc_same_backward.register_fake
def _(grad, a, b, patch, eps):
    return torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    a, b, patch, eps = inputs
    ctx.save_for_backward(a, b)
    ctx.patch, ctx.eps = patch, eps


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a, grad_b = ncc_same_backward(grad, a, b, ctx.patch, ctx.eps)
    return grad_a, grad_b, None, None


ncc_same.register_autograd(_backward, setup_context=_setup)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ncc_same, (a, b, 3, 0.01))
    print("opcheck passed: schema, fake implementation, autograd registration, dispatch")

    def loss(x, y):  # what a network would do with it
        return (1 - torch.ops.tutorial.ncc_same(x, y, 3, 0.01)).mean()

    compiled = torch.compile(loss, fullgraph=True)
    value = compiled(a, b)
    value.backward()
    expected = (1 - ncc_same_reference(a.detach(), b.detach(), 3, 0.01)).mean()
    print(f"torch.compile(fullgraph=True): loss {value.item():.6f}, reference {expected.item():.6f}")
    assert abs(value.item() - expected.item()) < 1e-10 and a.grad is not None
    print("OK step 4. Next: the real operator, with the search over R rows and W columns, the max and its"
          " index, fast C++ and CUDA kernels: docs/ncc_layer.md, mspcnn/ops/ncc.py, csrc/.")
