// Argument checks shared by the CPU kernels and the CUDA launcher.
//
// The Python wrappers in mspcnn/ops/ncc.py check the same conditions first
// and raise ValueError/TypeError; these checks guard direct calls of
// torch.ops.mspcnn.* and give the same wording.
#pragma once
#include <ATen/ATen.h>
#include "ncc_geometry.h"

namespace mspcnn {

inline void check_map(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": `", name,
              "` must be a 4-D tensor N x C x H x W, got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              op, ": `", name, "` must be float32 or float64, got ",
              t.scalar_type());
}

inline NccGeometry check_inputs(const at::Tensor& a, const at::Tensor& b,
                                int64_t patch, int64_t search_rows, double eps,
                                const char* op) {
  check_map(a, op, "a");
  check_map(b, op, "b");
  TORCH_CHECK(a.sizes() == b.sizes(), op,
              ": `a` and `b` must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op,
              ": `a` and `b` must have the same dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op,
              ": `a` and `b` must be on the same device, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(patch >= 3 && patch % 2 == 1, op,
              ": `patch` must be an odd integer >= 3, got ", patch);
  TORCH_CHECK(search_rows >= 1 && search_rows % 2 == 1, op,
              ": `search_rows` must be an odd integer >= 1, got ", search_rows);
  TORCH_CHECK(eps >= 0.0 && eps < 1e300, op,
              ": `eps` must be finite and >= 0, got ", eps);
  // Sizes that only add zero padding (and would run for hours): see size_limits in
  // mspcnn/ops/_checks.py.
  const int64_t H = a.size(2), W = a.size(3), HW = H > W ? H : W;
  TORCH_CHECK(HW == 0 || patch <= 2 * HW + 1, op, ": `patch` ", patch,
              " is larger than 2 max(H, W) + 1 = ", 2 * HW + 1);
  TORCH_CHECK(H == 0 || search_rows <= 2 * H + patch - 2, op, ": `search_rows` ",
              search_rows, " is larger than 2 H + patch - 2 = ", 2 * H + patch - 2);
  NccGeometry g;
  g.N = a.size(0);
  g.C = a.size(1);
  g.H = a.size(2);
  g.W = a.size(3);
  g.P = patch;
  g.R = search_rows;
  g.eps = eps;
  return g;
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref,
                       at::IntArrayRef shape, const char* op, const char* name,
                       bool same_dtype) {
  TORCH_CHECK(t.sizes() == shape, op, ": `", name, "` must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name,
              "` must be on device ", ref.device(), ", got ", t.device());
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name,
                "` must have dtype ", ref.scalar_type(), ", got ",
                t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": `", name,
                "` must be int64, got ", t.scalar_type());
  }
}

}  // namespace mspcnn
