// Thin launcher of the CUDA kernels: checks the tensors, makes them
// contiguous, allocates outputs and workspaces, takes the current stream and
// registers the CUDA implementations of the operators. Compiled only where
// PyTorch has CUDA (setup.py).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ncc_checks.h"
#include "ncc_kernels.h"

namespace mspcnn {
namespace {

// The limits of the CUDA kernels (mspcnn/ops/ncc.py states the same).
constexpr int64_t kMaxWidth = 64, kMaxPatch = 15, kMaxRows = 15;

NccGeometry check_cuda_inputs(const at::Tensor& a, const at::Tensor& b,
                              int64_t patch, int64_t search_rows, double eps,
                              const char* op) {
  const auto g = check_inputs(a, b, patch, search_rows, eps, op);
  TORCH_CHECK(a.is_cuda(), op, ": `a` must be a CUDA tensor for the CUDA kernel, got ",
              a.device());
  TORCH_CHECK(g.W <= kMaxWidth, op, ": the CUDA kernel supports maps at most ", kMaxWidth,
              " wide, `a` is ", g.W, " wide (move the inputs to the CPU)");
  TORCH_CHECK(patch <= kMaxPatch, op, ": the CUDA kernel supports `patch` <= ", kMaxPatch,
              ", got ", patch);
  TORCH_CHECK(search_rows <= kMaxRows, op, ": the CUDA kernel supports `search_rows` <= ",
              kMaxRows, ", got ", search_rows);
  return g;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

struct Stats {
  at::Tensor ma, sa, mb, sb;
};

// The data of an optional statistics buffer, nullptr when it was not computed.
double* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<double>() : nullptr;
}

template <typename T>
Stats compute_stats(const NccGeometry& g, const at::Tensor& a, const at::Tensor& b,
                    cudaStream_t stream, const char* op) {
  auto opts = a.options().dtype(at::kDouble);
  Stats s{at::empty({g.planes(), g.H, g.W}, opts), at::empty({g.planes(), g.H, g.W}, opts),
          at::empty({g.planes(), g.b_rows(), g.W}, opts),
          at::empty({g.planes(), g.b_rows(), g.W}, opts)};
  check_launch(cuda::patch_stats<T>(g, a.data_ptr<T>(), b.data_ptr<T>(), s.ma.data_ptr<double>(),
                                    s.sa.data_ptr<double>(), s.mb.data_ptr<double>(),
                                    s.sb.data_ptr<double>(), stream),
               op);
  return s;
}

at::Tensor ncc_volume_cuda(const at::Tensor& a_, const at::Tensor& b_, int64_t patch,
                           int64_t search_rows, double eps) {
  const char* op = "ncc_volume";
  const auto g = check_cuda_inputs(a_, b_, patch, search_rows, eps, op);
  const c10::cuda::CUDAGuard guard(a_.device());
  const auto a = a_.contiguous(), b = b_.contiguous();
  auto out = at::empty({g.N, g.C * g.R * g.W, g.H, g.W}, a.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_volume_cuda", [&] {
    const auto s = compute_stats<scalar_t>(g, a, b, stream, op);
    check_launch(cuda::ncc_volume_forward<scalar_t>(
                     g, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), s.ma.data_ptr<double>(),
                     s.sa.data_ptr<double>(), s.mb.data_ptr<double>(), s.sb.data_ptr<double>(),
                     out.data_ptr<scalar_t>(), stream),
                 op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ncc_max_cuda(const at::Tensor& a_, const at::Tensor& b_,
                                                int64_t patch, int64_t search_rows,
                                                double eps) {
  const char* op = "ncc_max";
  const auto g = check_cuda_inputs(a_, b_, patch, search_rows, eps, op);
  const c10::cuda::CUDAGuard guard(a_.device());
  const auto a = a_.contiguous(), b = b_.contiguous();
  auto values = at::empty({g.N, g.C, g.H, g.W}, a.options());
  auto index = at::empty({g.N, g.C, g.H, g.W}, a.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, index};
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_max_cuda", [&] {
    // The register-blocked kernel computes its statistics in shared memory;
    // the generic kernel reads them from a separate pass.
    Stats s;
    if (!cuda::has_fast_max_kernel(g)) s = compute_stats<scalar_t>(g, a, b, stream, op);
    check_launch(cuda::ncc_max_forward<scalar_t>(
                     g, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), ptr(s.ma), ptr(s.sa),
                     ptr(s.mb), ptr(s.sb), values.data_ptr<scalar_t>(),
                     index.data_ptr<int64_t>(), sms, stream),
                 op);
  });
  return {values, index};
}

// The tensor-core forward (ncc_max_tc.cu): an opt-in approximation of the
// maximum's choice; its backward is ncc_max_backward's, through the index.
std::tuple<at::Tensor, at::Tensor> ncc_max_tc_cuda(const at::Tensor& a_, const at::Tensor& b_,
                                                   int64_t patch, int64_t search_rows,
                                                   double eps, int64_t passes) {
  const char* op = "ncc_max_tc";
  const auto g = check_cuda_inputs(a_, b_, patch, search_rows, eps, op);
  TORCH_CHECK(a_.scalar_type() == at::kFloat, op,
              ": the tensor-core path takes float32 maps, got ", a_.scalar_type());
  TORCH_CHECK(passes == 1 || passes == 3, op, ": `passes` must be 1 (TF32) or 3 (3xTF32), got ",
              passes);
  // Patch 3 is refused: on an H200 (2026-11-30) it failed the accuracy bounds of
  // tests/test_ncc_tc.py (TF32 as emulated, 3xTF32 beyond the emulation's prediction).
  TORCH_CHECK(cuda::has_fast_max_kernel(g) && patch == 5, op,
              ": the tensor-core path supports patch 5, search_rows 1, 3 or 5 and maps at "
              "most 32 wide; got patch ", patch, ", search_rows ", search_rows, ", width ", g.W);
  const c10::cuda::CUDAGuard guard(a_.device());
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, op, ": TF32 tensor cores need compute capability 8.0 or newer; ",
              prop->name, " has ", prop->major, ".", prop->minor);
  const auto a = a_.contiguous(), b = b_.contiguous();
  auto values = at::empty({g.N, g.C, g.H, g.W}, a.options());
  auto index = at::empty({g.N, g.C, g.H, g.W}, a.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, index};
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cuda::ncc_max_forward_tc(g, a.data_ptr<float>(), b.data_ptr<float>(),
                                        values.data_ptr<float>(), index.data_ptr<int64_t>(),
                                        int(passes), stream),
               op);
  return {values, index};
}

std::tuple<at::Tensor, at::Tensor> ncc_max_backward_cuda(
    const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& b_,
    const at::Tensor& index_, int64_t patch, int64_t search_rows, double eps) {
  const char* op = "ncc_max_backward";
  const auto g = check_cuda_inputs(a_, b_, patch, search_rows, eps, op);
  check_like(grad_, a_, a_.sizes(), op, "grad", true);
  check_like(index_, a_, a_.sizes(), op, "index", false);
  const c10::cuda::CUDAGuard guard(a_.device());
  const auto a = a_.contiguous(), b = b_.contiguous();
  const auto grad = grad_.contiguous(), index = index_.contiguous();
  auto grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  if (a.numel() == 0) return {grad_a, grad_b};
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  // Under torch.use_deterministic_algorithms(True) both gradients are
  // gathered instead of accumulated with shared-memory atomics.
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_max_backward_cuda", [&] {
    // The fused kernel recomputes the statistics it needs in shared memory;
    // the unfused path (planes too large for shared memory) reads them.
    Stats s;
    at::Tensor coef;
    if (cuda::max_backward_needs_stats(g, sizeof(scalar_t), deterministic)) {
      s = compute_stats<scalar_t>(g, a, b, stream, op);
      coef = at::empty({6, a.numel()}, a.options());
    }
    check_launch(cuda::ncc_max_backward<scalar_t>(
                     g, grad.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                     b.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), ptr(s.ma), ptr(s.sa),
                     ptr(s.mb), ptr(s.sb),
                     coef.defined() ? coef.data_ptr<scalar_t>() : nullptr,
                     grad_a.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>(), deterministic,
                     stream),
                 op);
  });
  return {grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor> ncc_volume_backward_cuda(
    const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& b_,
    const at::Tensor& volume_, int64_t patch, int64_t search_rows, double eps) {
  const char* op = "ncc_volume_backward";
  const auto g = check_cuda_inputs(a_, b_, patch, search_rows, eps, op);
  const std::vector<int64_t> vshape{g.N, g.C * g.R * g.W, g.H, g.W};
  check_like(grad_, a_, vshape, op, "grad", true);
  check_like(volume_, a_, vshape, op, "volume", true);
  const c10::cuda::CUDAGuard guard(a_.device());
  const auto a = a_.contiguous(), b = b_.contiguous();
  const auto grad = grad_.contiguous(), volume = volume_.contiguous();
  auto grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  if (a.numel() == 0) return {grad_a, grad_b};
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_volume_backward_cuda", [&] {
    const auto s = compute_stats<scalar_t>(g, a, b, stream, op);
    auto work = at::empty({cuda::volume_backward_work_elems(g)}, a.options().dtype(at::kDouble));
    check_launch(cuda::ncc_volume_backward<scalar_t>(
                     g, grad.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                     b.data_ptr<scalar_t>(), volume.data_ptr<scalar_t>(),
                     s.ma.data_ptr<double>(), s.sa.data_ptr<double>(), s.mb.data_ptr<double>(),
                     s.sb.data_ptr<double>(), work.data_ptr<double>(), work.numel(),
                     grad_a.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>(), stream),
                 op);
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(mspcnn, CUDA, m) {
  m.impl("ncc_volume", &ncc_volume_cuda);
  m.impl("ncc_volume_backward", &ncc_volume_backward_cuda);
  m.impl("ncc_max", &ncc_max_cuda);
  m.impl("ncc_max_tc", &ncc_max_tc_cuda);
  m.impl("ncc_max_backward", &ncc_max_backward_cuda);
}

}  // namespace mspcnn
