// CPU kernel of the backward pass of Caffe's MAX pooling (schema in
// ../layer_ops.cpp): the gradient of each output goes to the input element its
// window selected, given as index = h * W + w within the plane (PyTorch's
// convention, what max_pool2d_with_indices returns in either memory layout).
//
// The forward pass needs no kernel of ours: PyTorch's channels-last max pooling
// vectorises across channels and selects the same elements (the first maximum
// of each window; NaN propagates); mspcnn/caffe/kernels.py transposes to it and
// back. Its backward, though, converts the gradient to channels-last and back
// and costs 10-40x this scatter, which reads the NCHW gradient and indices once.
// Every (n, c) plane is computed by one thread, in order: the sums do not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "grain.h"

namespace mspcnn {
namespace {

at::Tensor caffe_max_pool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& idx_in,
                                       int64_t height, int64_t width) {
  const char* op = "caffe_max_pool_backward";
  TORCH_CHECK(grad_in.dim() == 4, op, ": `grad_y` must be N x C x OH x OW, got a ", grad_in.dim(),
              "-D tensor");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble, op,
              ": `grad_y` must be float32 or float64, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.device().is_cpu() && idx_in.device().is_cpu(), op,
              ": `grad_y` and `index` must be on the CPU, got ", grad_in.device(), " and ",
              idx_in.device());
  TORCH_CHECK(idx_in.sizes() == grad_in.sizes() && idx_in.scalar_type() == at::kLong, op,
              ": `index` must be int64 of the shape of `grad_y` (", grad_in.sizes(), "), got ",
              idx_in.sizes(), ", ", idx_in.scalar_type());
  TORCH_CHECK(height >= 1 && width >= 1, op, ": height and width must be >= 1, got ", height,
              " x ", width);
  const at::Tensor grad = grad_in.contiguous(), idx = idx_in.contiguous();
  const int64_t planes = grad.size(0) * grad.size(1), per = grad.size(2) * grad.size(3);
  const int64_t plane = height * width;
  at::Tensor gx = at::zeros({grad.size(0), grad.size(1), height, width}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "caffe_max_pool_backward_cpu", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const int64_t* pi = idx.data_ptr<int64_t>();
    scalar_t* px = gx.data_ptr<scalar_t>();
    at::parallel_for(0, planes, grain_for(plane), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* g = pg + p * per;
        const int64_t* i = pi + p * per;
        scalar_t* d = px + p * plane;
        for (int64_t o = 0; o < per; ++o) {
          const int64_t k = i[o];
          if (k >= 0 && k < plane) d[k] += g[o];
        }
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mspcnn, CPU, m) {
  m.impl("caffe_max_pool_backward", &caffe_max_pool_backward_cpu);
}

}  // namespace mspcnn
