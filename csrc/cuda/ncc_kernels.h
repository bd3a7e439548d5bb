// Host-side entry points of the CUDA kernels: ncc_forward.cu (statistics and
// forward passes), ncc_max_tc.cu (the tensor-core max forward), ncc_max_tiled.cu
// (the tiled max forward), ncc_max_backward.cu and ncc_volume_backward.cu.
//
// Plain C++ with raw pointers and an explicit stream, so that the kernels file
// includes only CUDA headers and compiles with nvcc alone; the launcher
// (ncc_cuda.cpp) checks the tensors and passes their pointers and the current
// stream. Every function is instantiated for float and double. Buffers:
//   a, b                  N*C planes of H x W
//   ma, sa                patch mean / std (no eps) of a: N*C x H x W (double)
//   mb, sb                the same for b, centre rows -R2 .. H-1+R2:
//                         N*C x (H + 2 R2) x W (double)
//   volume, grad_volume   N x (C*R*W) x H x W
// Each returns cudaSuccess or the first launch error.
#pragma once
#include <cuda_runtime_api.h>

#include "../ncc_geometry.h"

namespace mspcnn {
namespace cuda {

// Patch statistics of a (centre rows 0..H-1) and b (rows -R2..H-1+R2).
template <typename T>
cudaError_t patch_stats(const NccGeometry& g, const T* a, const T* b, double* ma,
                        double* sa, double* mb, double* sb, cudaStream_t stream);

// True when ncc_max_forward has a register-blocked kernel for this geometry
// (P in {3, 5}, R in {1, 3, 5}, W <= 32); otherwise a generic kernel is used.
bool has_fast_max_kernel(const NccGeometry& g);

template <typename T>
cudaError_t ncc_max_forward(const NccGeometry& g, const T* a, const T* b,
                            const double* ma, const double* sa, const double* mb,
                            const double* sb, T* values, int64_t* index,
                            int num_sms, cudaStream_t stream);

// ncc_max forward on tensor cores (ncc_max_tc.cu), an opt-in approximation of
// the maximum's choice: float32 maps, the geometries of has_fast_max_kernel,
// passes 1 (TF32) or 3 (3xTF32); compute capability 8.0 or newer (the
// launcher checks). The returned value is the float32 NCC of the returned
// index. cudaErrorInvalidValue for anything else.
cudaError_t ncc_max_forward_tc(const NccGeometry& g, const float* a, const float* b,
                               float* values, int64_t* index, int passes,
                               cudaStream_t stream);

// ncc_max forward with register-tiled horizontal sums (ncc_max_tiled.cu), the
// default kernel's result bit for bit with fewer shared-memory loads: float32
// maps with the plane-mean shift, the geometries of has_fast_max_kernel.
// Opt-in while it has not run on a GPU: ncc_max_forward takes it when
// max_tiled_requested() (MSPCNN_NCC_MAX_FWD=tiled). cudaErrorInvalidValue for
// other geometries.
bool max_tiled_requested();
cudaError_t ncc_max_forward_tiled(const NccGeometry& g, const float* a, const float* b,
                                  float* values, int64_t* index, int num_sms,
                                  cudaStream_t stream);
template <typename T>
cudaError_t ncc_volume_forward(const NccGeometry& g, const T* a, const T* b,
                               const double* ma, const double* sa,
                               const double* mb, const double* sb, T* volume,
                               cudaStream_t stream);

// True when ncc_max_backward takes the unfused path (deterministic mode, or
// planes too large for the fused shared-memory kernel): only then does it
// read ma, sa, mb, sb and coef.
bool max_backward_needs_stats(const NccGeometry& g, size_t elem_size, bool deterministic);

// coef: workspace of 6 * N*C*H*W values of T (used by the unfused path only).
// deterministic: gather both gradients (no atomics) instead of the fused
// shared-memory kernel, whose float atomics make the last bits vary.
template <typename T>
cudaError_t ncc_max_backward(const NccGeometry& g, const T* grad, const T* a,
                             const T* b, const int64_t* index, const double* ma,
                             const double* sa, const double* mb,
                             const double* sb, T* coef, T* grad_a, T* grad_b,
                             bool deterministic, cudaStream_t stream);

// work: workspace of work_elems doubles, at least 3 * N*C*H*W + 3 * N*C*(H + 2 R2)*W;
// volume_backward_work_elems(g) is what it uses: with MSPCNN_NCC_VOLUME_CENTRE=fused
// (and W <= 32) 2 * N*C*H*R*W more, for the fused per-centre sums, which run only
// where work_elems holds them. Deterministic (no atomics).
int64_t volume_backward_work_elems(const NccGeometry& g);
template <typename T>
cudaError_t ncc_volume_backward(const NccGeometry& g, const T* grad,
                                const T* a, const T* b, const T* volume,
                                const double* ma, const double* sa,
                                const double* mb, const double* sb,
                                double* work, int64_t work_elems, T* grad_a, T* grad_b,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace mspcnn
