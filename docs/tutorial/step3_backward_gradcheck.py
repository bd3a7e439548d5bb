"""Step 3: the backward pass, and the numerical gradient check that proves it.

The gradient of one output with respect to a pixel x_i of its patch of `a` (sig = s + eps):

    dNCC/dx_i = (y_i - mu_y) / ((n - 1) sig_x sig_y) - NCC (x_i - mu_x) / ((n - 1) s_x sig_x)

and symmetrically for `b`; every output adds this into the P x P pixels of its two patches
(ncc_same_backward in ncc_same_cpp.py). A torch.autograd.Function ties the two kernels together.
torch.autograd.gradcheck then compares the analytic gradient with finite differences in float64:
the test every custom layer needs (Caffe has the same one, GradientChecker). Run:
python docs/tutorial/step3_backward_gradcheck.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncc_same_cpp import load  # noqa: E402
from step1_reference import ncc_same_reference  # noqa: E402

ext = load()


class NccSame(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, patch, eps):
        ctx.save_for_backward(a, b)
        ctx.patch, ctx.eps = patch, eps
        return ext.ncc_same_forward(a, b, patch, eps)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a, grad_b = ext.ncc_same_backward(grad.contiguous(), a, b, ctx.patch, ctx.eps)
        return grad_a, grad_b, None, None


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for patch in (3, 5):
        assert torch.autograd.gradcheck(lambda x, y: NccSame.apply(x, y, patch, 0.01), (a, b))
        print(f"patch {patch}: gradcheck passed (analytic gradient = finite differences, float64)")
    # The same gradient as autograd through the plain-PyTorch reference:
    w = torch.randn(1, 2, 6, 5, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((NccSame.apply(a, b, 3, 0.01) * w).sum(), (a, b))
    theirs = torch.autograd.grad((ncc_same_reference(a, b, 3, 0.01) * w).sum(), (a, b))
    err = max((x - y).abs().max().item() for x, y in zip(ours, theirs))
    print(f"C++ backward vs autograd through the reference: max difference {err:.2e}")
    assert err < 1e-10
    print("OK step 3")
