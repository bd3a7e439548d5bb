// Geometry of the wide-search NCC operator, shared by every backend.
//
// This header is plain C++ (no PyTorch, no CUDA includes) so that the CUDA
// kernels in cuda/*.cu can include it and still be compiled by nvcc
// on a machine whose PyTorch has no CUDA support.
//
// Notation (see docs/ncc_layer.md):
//   a, b      N x C x H x W maps, compared channel by channel
//   P         patch side (odd), h = P / 2, n = P * P
//   R         search rows (odd), R2 = R / 2; candidate row offsets d = -R2 .. R2
//   volume    N x (C * R * W) x H x W, channel c * R * W + k * W + col, k = d + R2
#pragma once
#include <cstdint>

// Member functions are callable from CUDA kernels, which take the geometry
// by value.
#if defined(__CUDACC__)
#define MSPCNN_HD __host__ __device__
#else
#define MSPCNN_HD
#endif

namespace mspcnn {

struct NccGeometry {
  int64_t N = 0, C = 0, H = 0, W = 0;
  int64_t P = 5, R = 5;
  double eps = 0.01;

  MSPCNN_HD int64_t h() const { return P / 2; }
  MSPCNN_HD int64_t R2() const { return R / 2; }
  MSPCNN_HD int64_t n() const { return P * P; }
  MSPCNN_HD int64_t candidates() const { return R * W; }          // per output position
  MSPCNN_HD int64_t plane() const { return H * W; }
  MSPCNN_HD int64_t planes() const { return N * C; }
  // Rows of b whose patch statistics are needed: centres -R2 .. H - 1 + R2.
  MSPCNN_HD int64_t b_rows() const { return H + 2 * R2(); }
};

}  // namespace mspcnn
