// Operator schemas of Caffe layers computed by our own CPU kernels: the fused
// BatchNorm + Scale (+ ReLU) of the training phase and the backward pass of
// MAX pooling. A fragment of the `mspcnn` library declared in ncc_ops.cpp.
//
// The kernels are in cpu/bn_cpu.cpp and cpu/pool_cpu.cpp; the fake (meta)
// implementations, the autograd formulas and the choice between these
// operators and PyTorch's are in mspcnn/caffe/kernels.py. There are no CUDA
// kernels: on a GPU the layers run as PyTorch operations.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mspcnn, m) {
  // y = [relu](gamma * (x - mean) / sqrt(var + eps) + beta) with the batch
  // mean and biased variance of every channel over N and the trailing
  // dimensions; returns (y, mean, var), mean and var in float64 whatever the
  // dtype of x (the backward takes them back).
  m.def("bn_scale_train(Tensor x, Tensor gamma, Tensor beta, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("bn_scale_train_backward(Tensor grad_y, Tensor x, Tensor y, Tensor gamma, "
        "Tensor mean, Tensor var, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // The backward pass of MAX pooling: grad_y (N x C x OH x OW) added into an
  // N x C x height x width map at `index` (h * W + w within each plane).
  m.def("caffe_max_pool_backward(Tensor grad_y, Tensor index, int height, int width) -> Tensor");
}
