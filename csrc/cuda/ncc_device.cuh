// Device helpers shared by the CUDA kernel files of the NCC operators
// (ncc_forward.cu, ncc_max_backward.cu, ncc_volume_backward.cu): launch sizes,
// zero-padded pixel reads and the order of the maximum. CUDA headers only.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../ncc_geometry.h"

namespace mspcnn {
namespace cuda {

constexpr int kThreads = 256;

inline int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return int(b < 65535 * 32 ? (b > 0 ? b : 1) : 65535 * 32);
}

#define GRID_STRIDE(i, total)                                             \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += int64_t(gridDim.x) * blockDim.x)

template <typename T>
__device__ __forceinline__ T load(const T* p) {
  return __ldg(p);
}

// Pixel (u, v) of a plane, 0 outside the map.
template <typename T>
__device__ __forceinline__ T pixel(const T* x, int64_t H, int64_t W, int64_t u,
                                   int64_t v) {
  return (u >= 0 && u < H && v >= 0 && v < W) ? load(x + u * W + v) : T(0);
}

// The order of the maximum: larger value first, NaN above every number (as
// torch.max), ties broken by the smaller candidate index (as torch.argmax).
template <typename T>
__device__ __forceinline__ bool better(T v, int k, T best, int best_k) {
  const bool v_nan = v != v, b_nan = best != best;
  if (b_nan) return v_nan && k < best_k;
  if (v_nan) return true;
  return v > best || (v == best && k < best_k);
}

}  // namespace cuda
}  // namespace mspcnn
