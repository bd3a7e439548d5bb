// The gradient of one NCC value with respect to its two patches, shared by
// the CPU backward (cpu/ncc_cpu.cpp) and the CUDA backward kernels
// (cuda/ncc_max_backward.cu). Plain C++, callable from CUDA kernels.
//
// For patches x (of a) and y (of b) of n = P * P elements with means mu_a,
// mu_b, standard deviations s_a, s_b (n - 1 in the denominator, no eps) and
// covariance sum cov = sum (x - mu_a)(y - mu_b), the operator's value is
//   ncc = cov / ((n - 1) (s_a + eps) (s_b + eps)).
// With incoming gradient g, its gradient is affine in the patch elements
// (docs/ncc_layer.md, section 3):
//   d/dx_i = al_a y_i + be_a x_i + c_a,    d/dy_i = al_b x_i + be_b y_i + c_b,
//   al_a = g / ((n-1) (s_a+eps) (s_b+eps)),  be_a = -g ncc / ((n-1) (s_a+eps) s_a),
//   c_a  = -al_a mu_b - be_a mu_a,           and symmetrically for b.
// A flat patch (s = 0) has NCC = 0; its 1/s term is taken as 0, the limit
// along every path where NCC stays 0 (docs/ncc_layer.md, "Flat patches").
#pragma once
#include "ncc_geometry.h"

namespace mspcnn {

template <typename S>
struct NccGradCoef {
  S al_a, be_a, c_a;  // gradient of a at x_i: al_a y_i + be_a x_i + c_a
  S al_b, be_b, c_b;  // gradient of b at y_i: al_b x_i + be_b y_i + c_b
};

// nm1 = n - 1. S is the accumulation type (double on the CPU and in the
// deterministic CUDA path, the tensor's type in the fused CUDA kernel).
template <typename S>
MSPCNN_HD inline NccGradCoef<S> ncc_grad_coef(S g, S cov, S mu_a, S s_a, S mu_b, S s_b,
                                              S nm1, S eps) {
  const S siga = s_a + eps, sigb = s_b + eps;
  const S ncc = cov / (nm1 * siga * sigb);
  const S inv_sa = s_a > S(0) ? S(1) / s_a : S(0);
  const S inv_sb = s_b > S(0) ? S(1) / s_b : S(0);
  const S fa = g / (nm1 * siga), fb = g / (nm1 * sigb);
  NccGradCoef<S> c;
  c.al_a = fa / sigb;
  c.be_a = -fa * ncc * inv_sa;
  c.c_a = -c.al_a * mu_b - c.be_a * mu_a;
  c.al_b = fb / siga;
  c.be_b = -fb * ncc * inv_sb;
  c.c_b = -c.al_b * mu_a - c.be_b * mu_b;
  return c;
}

}  // namespace mspcnn
