// CPU kernels of the fused BatchNorm + Scale (+ ReLU) of Caffe's training phase
// (schemas in ../layer_ops.cpp, formulas in docs/caffe_semantics.md).
//
// Forward, per channel c over its m = N x S values (S: the product of the
// dimensions after C):
//   mean = sum(x) / m, var = sum((x - mean)^2) / m        (biased, as Caffe)
//   y    = [relu](gamma * (x - mean) / sqrt(var + eps) + beta)
// Backward, with dz = dy where y > 0 (relu) or dz = dy, and xh the normalised
// input:
//   dbeta = sum(dz), dgamma = sum(dz xh),
//   dx = gamma / sqrt(var + eps) * (dz - dbeta / m - xh * dgamma / m).
//
// Every per-channel sum is accumulated in double and in the same order
// whatever the thread count (one thread owns a channel), so the results are
// deterministic and do not depend on the number of threads. The elementwise
// parts run in the input's precision. In float32 this is closer to float64
// than the separate operations (float32 reductions over a few images are where
// BatchNorm loses its digits).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "grain.h"

namespace mspcnn {
namespace {

struct Layout {
  int64_t N, C, S;
  int64_t m() const { return N * S; }
  int64_t offset(int64_t n, int64_t c) const { return (n * C + c) * S; }
};

void check_bn_input(const at::Tensor& x, const at::Tensor& gamma, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": `x` must be N x C x ..., got a ", x.dim(),
              "-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": `x` must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": `x` must be on the CPU, got ", x.device());
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == x.size(1), op,
              ": `gamma` must have one value per channel (", x.size(1), "), got shape ",
              gamma.sizes());
  TORCH_CHECK(gamma.scalar_type() == x.scalar_type(), op,
              ": `gamma` must have the dtype of `x` (", x.scalar_type(), "), got ",
              gamma.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": `x` is empty (shape ", x.sizes(), ")");
}

Layout layout_of(const at::Tensor& x) {
  Layout L;
  L.N = x.size(0);
  L.C = x.size(1);
  L.S = x.numel() / (L.N * L.C);
  return L;
}

// The elementwise loops subtract `mu`, the mean rounded to the input's type;
// the rounding residue delta = mean - mu is folded into the per-channel
// constants (exactly, in double), so that float32 inputs with a large mean
// lose nothing to it.
template <typename scalar_t>
void forward_channel(const Layout& L, int64_t c, const scalar_t* x, scalar_t* y,
                     double gamma, double beta, double eps, bool relu,
                     double* mean_out, double* var_out) {
  const int64_t S = L.S;
  double sum = 0.0;
  for (int64_t n = 0; n < L.N; ++n) {
    const scalar_t* p = x + L.offset(n, c);
    double part = 0.0;
#pragma omp simd reduction(+ : part)
    for (int64_t s = 0; s < S; ++s) part += static_cast<double>(p[s]);
    sum += part;
  }
  const double mean = sum / static_cast<double>(L.m());
  double sq = 0.0;
  for (int64_t n = 0; n < L.N; ++n) {
    const scalar_t* p = x + L.offset(n, c);
    double part = 0.0;
#pragma omp simd reduction(+ : part)
    for (int64_t s = 0; s < S; ++s) {
      const double d = static_cast<double>(p[s]) - mean;
      part += d * d;
    }
    sq += part;
  }
  const double var = sq / static_cast<double>(L.m());
  const double inv = 1.0 / std::sqrt(var + eps);
  const scalar_t mu = static_cast<scalar_t>(mean);
  const double delta = mean - static_cast<double>(mu);
  // y = (x - mean) a + beta = (x - mu) a + (beta - delta a)
  const scalar_t a = static_cast<scalar_t>(gamma * inv);
  const scalar_t b = static_cast<scalar_t>(beta - delta * gamma * inv);
  for (int64_t n = 0; n < L.N; ++n) {
    const scalar_t* p = x + L.offset(n, c);
    scalar_t* q = y + L.offset(n, c);
    if (relu) {
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t v = (p[s] - mu) * a + b;
        q[s] = v < scalar_t(0) ? scalar_t(0) : v;  // NaN stays NaN, as torch.relu
      }
    } else {
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) q[s] = (p[s] - mu) * a + b;
    }
  }
  mean_out[c] = mean;
  var_out[c] = var;
}

template <typename scalar_t>
void backward_channel(const Layout& L, int64_t c, const scalar_t* gy,
                      const scalar_t* x, const scalar_t* y, double gamma,
                      double mean, double var, double eps, bool relu,
                      scalar_t* gx, scalar_t* ggamma, scalar_t* gbeta) {
  const int64_t S = L.S;
  const double inv = 1.0 / std::sqrt(var + eps);
  const scalar_t mu = static_cast<scalar_t>(mean);
  const double mud = static_cast<double>(mu);
  const double delta = mean - mud;
  double s1 = 0.0, s2 = 0.0;  // sum(dz), sum(dz (x - mu))
  for (int64_t n = 0; n < L.N; ++n) {
    const int64_t o = L.offset(n, c);
    // dz goes to gx first (the ReLU's selection in a loop of its own: inside
    // the double reduction it kept the loop scalar), then the sums read it.
    const scalar_t* dz = gy + o;
    if (relu) {
      scalar_t* d = gx + o;
      const scalar_t* g = gy + o;
      const scalar_t* yp = y + o;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) d[s] = yp[s] > scalar_t(0) ? g[s] : scalar_t(0);
      dz = d;
    }
    const scalar_t* xp = x + o;
    double p1 = 0.0, p2 = 0.0;
#pragma omp simd reduction(+ : p1, p2)
    for (int64_t s = 0; s < S; ++s) {
      const double d = static_cast<double>(dz[s]);
      p1 += d;
      p2 += d * (static_cast<double>(xp[s]) - mud);
    }
    s1 += p1;
    s2 += p2;
  }
  const double m = static_cast<double>(L.m());
  const double s2c = s2 - delta * s1;  // sum(dz (x - mean))
  ggamma[c] = static_cast<scalar_t>(s2c * inv);
  gbeta[c] = static_cast<scalar_t>(s1);
  // dx = k (dz - s1/m) - k inv^2 s2c/m (x - mean)
  //    = k dz - kc2 (x - mu) - (k s1/m - kc2 delta)
  const double k = gamma * inv, kc2 = k * inv * inv * s2c / m;
  const scalar_t kt = static_cast<scalar_t>(k), kc2t = static_cast<scalar_t>(kc2);
  const scalar_t c0 = static_cast<scalar_t>(k * s1 / m - kc2 * delta);
  for (int64_t n = 0; n < L.N; ++n) {
    const int64_t o = L.offset(n, c);
    const scalar_t* dz = relu ? gx + o : gy + o;
    const scalar_t* xp = x + o;
    scalar_t* d = gx + o;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) d[s] = kt * dz[s] - kc2t * (xp[s] - mu) - c0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_train_cpu(
    const at::Tensor& x_in, const at::Tensor& gamma_in, const at::Tensor& beta_in,
    double eps, bool relu) {
  const char* op = "bn_scale_train";
  check_bn_input(x_in, gamma_in, op);
  TORCH_CHECK(beta_in.sizes() == gamma_in.sizes() &&
                  beta_in.scalar_type() == gamma_in.scalar_type(),
              op, ": `beta` must be like `gamma` (", gamma_in.sizes(), ", ",
              gamma_in.scalar_type(), "), got ", beta_in.sizes(), ", ",
              beta_in.scalar_type());
  TORCH_CHECK(eps > 0.0, op, ": `eps` must be > 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  const Layout L = layout_of(x);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({L.C}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({L.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_scale_train_cpu", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pg = gamma.data_ptr<scalar_t>();
    const scalar_t* pb = beta.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    double* pm = mean.data_ptr<double>();
    double* pv = var.data_ptr<double>();
    at::parallel_for(0, L.C, grain_for(L.m()), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        forward_channel<scalar_t>(L, c, px, py, pg[c], pb[c], eps, relu, pm, pv);
    });
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_train_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& gamma_in, const at::Tensor& mean_in, const at::Tensor& var_in,
    double eps, bool relu) {
  const char* op = "bn_scale_train_backward";
  check_bn_input(x_in, gamma_in, op);
  for (const at::Tensor* t : {&grad_in, &y_in}) {
    TORCH_CHECK(t->sizes() == x_in.sizes() && t->scalar_type() == x_in.scalar_type(), op,
                ": `grad_y` and `y` must have the shape and dtype of `x` (",
                x_in.sizes(), ", ", x_in.scalar_type(), "), got ", t->sizes(), ", ",
                t->scalar_type());
  }
  for (const at::Tensor* t : {&mean_in, &var_in}) {
    TORCH_CHECK(t->sizes() == gamma_in.sizes() && t->scalar_type() == at::kDouble,
                op, ": `mean` and `var` must be float64 with one value per channel, got ",
                t->sizes(), ", ", t->scalar_type());
  }
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), y = y_in.contiguous();
  const at::Tensor gamma = gamma_in.contiguous(), mean = mean_in.contiguous(),
                   var = var_in.contiguous();
  const Layout L = layout_of(x);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor ggamma = at::empty({L.C}, x.options());
  at::Tensor gbeta = at::empty({L.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_scale_train_backward_cpu", [&] {
    const scalar_t* pgy = grad.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* py = y.data_ptr<scalar_t>();
    const scalar_t* pg = gamma.data_ptr<scalar_t>();
    const double* pm = mean.data_ptr<double>();
    const double* pv = var.data_ptr<double>();
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    scalar_t* pgg = ggamma.data_ptr<scalar_t>();
    scalar_t* pgb = gbeta.data_ptr<scalar_t>();
    at::parallel_for(0, L.C, grain_for(L.m()), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        backward_channel<scalar_t>(L, c, pgy, px, py, pg[c], pm[c], pv[c], eps, relu,
                                   pgx, pgg, pgb);
    });
  });
  return {gx, ggamma, gbeta};
}

// The autograd formula, registered in C++: the network calls the operator 160
// times per iteration, and a formula registered from Python (as the NCC
// operators' are) cost about 100 us of interpreter time per call here.
class BnScaleTrain : public torch::autograd::Function<BnScaleTrain> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x, const at::Tensor& gamma,
                                                const at::Tensor& beta, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mspcnn::bn_scale_train", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>();
    auto [y, mean, var] = op.call(x, gamma, beta, eps, relu);
    ctx->save_for_backward({x, y, gamma, mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mspcnn::bn_scale_train_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                             bool)>();
    const auto saved = ctx->get_saved_variables();
    auto [gx, ggamma, gbeta] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                ctx->saved_data["eps"].toDouble(), ctx->saved_data["relu"].toBool());
    return {gx, ggamma, gbeta, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_train_autograd(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, double eps, bool relu) {
  auto out = BnScaleTrain::apply(x, gamma, beta, eps, relu);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mspcnn, CPU, m) {
  m.impl("bn_scale_train", &bn_scale_train_cpu);
  m.impl("bn_scale_train_backward", &bn_scale_train_backward_cpu);
}

// Autograd for every device key: the operator has CPU kernels only, and other
// devices fail in the dispatch below with PyTorch's "no kernel" error.
TORCH_LIBRARY_IMPL(mspcnn, Autograd, m) {
  m.impl("bn_scale_train", &bn_scale_train_autograd);
}

}  // namespace mspcnn
