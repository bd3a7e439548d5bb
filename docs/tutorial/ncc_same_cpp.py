"""The C++ source of the tutorial's operator, compiled on the fly with
torch.utils.cpp_extension.load_inline (steps 2-4 import it).

ncc_same(a, b, patch, eps): for every channel and pixel (r, w), the normalized cross-correlation of
the P x P patch of `a` centred at (r, w) with the patch of `b` at the same place (zero outside the
map). It is mspcnn's wide-search NCC with one candidate instead of R x W: the same formula, the same
gradient, none of the search. Plain loops, float64 accumulation, no parallelism: the point is to
read it next to the formula in docs/ncc_layer.md, section 2.
"""
from torch.utils.cpp_extension import load_inline

CPP = r"""
#include <torch/extension.h>
#include <cmath>

// Mean and std (unbiased, without eps) of the P x P patch of plane x centred at (r, w).
static void patch_stats(const double* x, int64_t H, int64_t W, int64_t P, int64_t r, int64_t w,
                        double& mu, double& s) {
  const int64_t h = P / 2, n = P * P;
  double sum = 0;
  for (int64_t i = -h; i <= h; ++i)
    for (int64_t j = -h; j <= h; ++j) {
      const int64_t u = r + i, v = w + j;
      if (u >= 0 && u < H && v >= 0 && v < W) sum += x[u * W + v];
    }
  mu = sum / n;
  double ss = 0;
  for (int64_t i = -h; i <= h; ++i)
    for (int64_t j = -h; j <= h; ++j) {
      const int64_t u = r + i, v = w + j;
      const double d = (u >= 0 && u < H && v >= 0 && v < W ? x[u * W + v] : 0.0) - mu;
      ss += d * d;
    }
  s = std::sqrt(ss / (n - 1));
}

static double pixel(const double* x, int64_t H, int64_t W, int64_t u, int64_t v) {
  return (u >= 0 && u < H && v >= 0 && v < W) ? x[u * W + v] : 0.0;
}

// Forward: out[n, c, r, w] = sum((x - mu_x)(y - mu_y)) / ((n - 1)(s_x + eps)(s_y + eps)).
torch::Tensor ncc_same_forward(torch::Tensor a, torch::Tensor b, int64_t P, double eps) {
  TORCH_CHECK(a.dim() == 4 && a.sizes() == b.sizes(), "a and b: one N x C x H x W shape");
  TORCH_CHECK(P >= 3 && P % 2 == 1, "patch must be odd and >= 3");
  auto A = a.to(torch::kDouble).contiguous(), B = b.to(torch::kDouble).contiguous();
  const int64_t planes = a.size(0) * a.size(1), H = a.size(2), W = a.size(3), h = P / 2;
  auto out = torch::empty({a.size(0), a.size(1), H, W}, A.options());
  const double *pa = A.data_ptr<double>(), *pb = B.data_ptr<double>();
  double* po = out.data_ptr<double>();
  for (int64_t p = 0; p < planes; ++p)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t w = 0; w < W; ++w) {
        const double *x = pa + p * H * W, *y = pb + p * H * W;
        double mx, sx, my, sy;
        patch_stats(x, H, W, P, r, w, mx, sx);
        patch_stats(y, H, W, P, r, w, my, sy);
        double cov = 0;
        for (int64_t i = -h; i <= h; ++i)
          for (int64_t j = -h; j <= h; ++j)
            cov += (pixel(x, H, W, r + i, w + j) - mx) * (pixel(y, H, W, r + i, w + j) - my);
        po[(p * H + r) * W + w] = cov / ((P * P - 1) * (sx + eps) * (sy + eps));
      }
  return out.to(a.scalar_type());
}

// Backward: each output scatters into the P x P pixels of its two patches, with
//   dNCC/dx_i = (y_i - mu_y) / ((n-1) sig_x sig_y) - NCC (x_i - mu_x) / ((n-1) s_x sig_x)
// (sig = s + eps; the second term is 0 when s_x = 0), and symmetrically for y.
std::vector<torch::Tensor> ncc_same_backward(torch::Tensor grad, torch::Tensor a, torch::Tensor b,
                                             int64_t P, double eps) {
  auto G = grad.to(torch::kDouble).contiguous();
  auto A = a.to(torch::kDouble).contiguous(), B = b.to(torch::kDouble).contiguous();
  auto ga = torch::zeros_like(A), gb = torch::zeros_like(B);
  const int64_t planes = a.size(0) * a.size(1), H = a.size(2), W = a.size(3), h = P / 2;
  const double nm1 = double(P * P - 1);
  const double *pa = A.data_ptr<double>(), *pb = B.data_ptr<double>(), *pg = G.data_ptr<double>();
  double *pga = ga.data_ptr<double>(), *pgb = gb.data_ptr<double>();
  for (int64_t p = 0; p < planes; ++p)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t w = 0; w < W; ++w) {
        const double g = pg[(p * H + r) * W + w];
        if (g == 0) continue;
        const double *x = pa + p * H * W, *y = pb + p * H * W;
        double mx, sx, my, sy;
        patch_stats(x, H, W, P, r, w, mx, sx);
        patch_stats(y, H, W, P, r, w, my, sy);
        const double gx = sx + eps, gy = sy + eps;
        double cov = 0;
        for (int64_t i = -h; i <= h; ++i)
          for (int64_t j = -h; j <= h; ++j)
            cov += (pixel(x, H, W, r + i, w + j) - mx) * (pixel(y, H, W, r + i, w + j) - my);
        const double ncc = cov / (nm1 * gx * gy);
        for (int64_t i = -h; i <= h; ++i)
          for (int64_t j = -h; j <= h; ++j) {
            const int64_t u = r + i, v = w + j;
            if (u < 0 || u >= H || v < 0 || v >= W) continue;  // padding has no gradient
            const double dx = x[u * W + v] - mx, dy = y[u * W + v] - my;
            pga[p * H * W + u * W + v] += g * (dy / (nm1 * gx * gy) - (sx > 0 ? ncc * dx / (nm1 * sx * gx) : 0));
            pgb[p * H * W + u * W + v] += g * (dx / (nm1 * gx * gy) - (sy > 0 ? ncc * dy / (nm1 * sy * gy) : 0));
          }
      }
  return {ga.to(a.scalar_type()), gb.to(b.scalar_type())};
}
"""


def load(verbose=False):
    """Compile (once; later calls reuse the build in torch's extension cache) and return the module
    with ncc_same_forward and ncc_same_backward."""
    return load_inline(name="tutorial_ncc_same", cpp_sources=[CPP],
                       functions=["ncc_same_forward", "ncc_same_backward"], extra_cflags=["-O2"],
                       verbose=verbose)
