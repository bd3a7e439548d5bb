// The staged tile of the register-blocked ncc_max forward kernels, shared by
// max_fast_kernel (ncc_forward.cu, CUDA cores) and max_tc_kernel
// (ncc_max_tc.cu, tensor cores). CUDA headers only.
//
// A block computes `tile_rows` output rows r0 .. r0 + TR - 1 of one (n, c)
// plane (W <= 32). It stages in shared memory, zero padded (or shifted by the
// plane means, the padding then at -mean):
//   As     rows r0 - h .. r0 + TR - 1 + h of a, columns -h .. 31 + h   (SW wide)
//   Bs     rows r0 - R2 - h .. r0 + TR - 1 + R2 + h of b, same columns
// and, computed from those rows in T (no separate statistics pass), the
// normalisation factors of docs/ncc_layer.md, section 2:
//   ka, nmaka   per output (TR x 32):              1 / ((n-1) sig_a), n mu_a ka
//   kb, mbkb    per candidate centre (TR+R-1 x 32): 1 / sig_b,         mu_b kb
// Lanes past W get the factors 0, and so does a flat patch (all its values
// equal) when the maps are shifted.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ncc_device.cuh"

namespace mspcnn {
namespace cuda {

constexpr int kLanes = 32;

// Width of a staged row: 32 output or candidate columns and the patch's halo.
template <typename T, int P>
__host__ __device__ constexpr int fast_width() {
  return kLanes + P - 1;
}

template <typename T, int P, int R>
__host__ __device__ inline int64_t fast_smem_elems(int tile_rows) {
  return int64_t(tile_rows + P - 1) * fast_width<T, P>() +
         int64_t(tile_rows + P + R - 2) * fast_width<T, P>() +
         2 * int64_t(tile_rows) * kLanes + 2 * int64_t(tile_rows + R - 1) * kLanes;
}

// The dynamic shared memory a register-blocked max kernel's staged tile may
// take: 48 KB, less plane_means' 512 bytes of static shared memory with the
// shift.
inline int64_t fast_smem_budget(bool shift) {
  return 48 * 1024 - (shift ? int64_t(sizeof(double)) * 64 : 0);
}

// The row tiles of the register-blocked max forward kernels (max_fast_kernel,
// and max_tiled_kernel, which must stage the same tiles to add its window in
// the same order): enough blocks to fill the GPU twice over, the rows of a tile
// halved until the staged tile (fast_smem_elems) fits in `budget` bytes.
template <typename T, int P, int R>
inline void fast_tiling(const NccGeometry& g, int num_sms, int64_t budget, int& tiles,
                        int& tile_rows) {
  tiles = int((2 * int64_t(num_sms) + g.planes() - 1) / g.planes());
  if (tiles < 1) tiles = 1;
  if (tiles > g.H) tiles = int(g.H);
  tile_rows = int((g.H + tiles - 1) / tiles);
  while (tile_rows > 1 && fast_smem_elems<T, P, R>(tile_rows) * int64_t(sizeof(T)) > budget)
    tile_rows = (tile_rows + 1) / 2;
  tiles = int((g.H + tile_rows - 1) / tile_rows);
}

// Means of the planes A and B (HW values each), for the shift: summed in
// double by the block's threads in a fixed order (the same value in every
// block of a plane), rounded to T; 0 when not finite (a NaN or an infinity
// then stays in the patches that touch it, as on the CPU). Every thread of the
// block calls it; the block is whole warps.
template <typename T>
__device__ inline void plane_means(const T* A, const T* B, int HW, T& ca, T& cb) {
  __shared__ double part[2][32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  double sa = 0.0, sb = 0.0;
  for (int i = tid; i < HW; i += nthreads) {
    sa += double(load(A + i));
    sb += double(load(B + i));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sa += __shfl_xor_sync(0xffffffffu, sa, off);
    sb += __shfl_xor_sync(0xffffffffu, sb, off);
  }
  if (tid % 32 == 0) {
    part[0][tid / 32] = sa;
    part[1][tid / 32] = sb;
  }
  __syncthreads();
  double ta = 0.0, tb = 0.0;
  for (int w = 0; w < (nthreads + 31) / 32; ++w) {
    ta += part[0][w];
    tb += part[1][w];
  }
  const double ma = ta / double(HW), mb = tb / double(HW);
  ca = isfinite(ma) ? T(ma) : T(0);
  cb = isfinite(mb) ? T(mb) : T(0);
}

// Where the staged arrays lie in the block's shared memory.
template <typename T>
struct Tile {
  T *As, *Bs, *ka, *nmaka, *kb, *mbkb;
};

template <typename T, int P, int R>
__device__ __forceinline__ Tile<T> tile_layout(T* smem, int tile_rows) {
  constexpr int SW = fast_width<T, P>();
  Tile<T> t;
  t.As = smem;                                     // (TR + P - 1) x SW
  t.Bs = t.As + (tile_rows + P - 1) * SW;          // (TR + P + R - 2) x SW
  t.ka = t.Bs + (tile_rows + P + R - 2) * SW;      // TR x 32
  t.nmaka = t.ka + tile_rows * kLanes;             // TR x 32
  t.kb = t.nmaka + tile_rows * kLanes;             // (TR + R - 1) x 32
  t.mbkb = t.kb + (tile_rows + R - 1) * kLanes;    // (TR + R - 1) x 32
  return t;
}

// Stages the TR (<= tile_rows) output rows from r0 of plane A, B (H x W each)
// and computes their factors; ends with a __syncthreads(). Every thread of
// the block calls it.
template <typename T, int P, int R, bool SHIFT>
__device__ __forceinline__ void stage_tile(const NccGeometry& g, const Tile<T>& t, int r0,
                                           int TR, const T* A, const T* B) {
  constexpr int h = P / 2, R2 = R / 2, SW = fast_width<T, P>();
  const int H = int(g.H), W = int(g.W);
  const double nm1 = double(P * P - 1), eps = g.eps;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  T ca = T(0), cb = T(0);  // the shift
  if constexpr (SHIFT) plane_means(A, B, H * W, ca, cb);
  for (int i = tid; i < (TR + P - 1) * SW; i += nthreads) {
    const int row = i / SW, c = i % SW;
    const T v = pixel(A, H, W, r0 - h + row, c - h);
    t.As[i] = SHIFT ? v - ca : v;
  }
  for (int i = tid; i < (TR + P + R - 2) * SW; i += nthreads) {
    const int row = i / SW, c = i % SW;
    const T v = pixel(B, H, W, r0 - R2 - h + row, c - h);
    t.Bs[i] = SHIFT ? v - cb : v;
  }
  __syncthreads();
  // Patch statistics from the staged rows (two passes over the zero-padded
  // patch).
  for (int i = tid; i < TR * kLanes + (TR + R - 1) * kLanes; i += nthreads) {
    const bool is_a = i < TR * kLanes;
    const int e = is_a ? i : i - TR * kLanes;
    const int row = e / kLanes, c = e % kLanes;
    T k = 0, m = 0;
    if (c < W) {
      const T* x = (is_a ? t.As : t.Bs) + row * SW + c;  // top-left of the patch
      T sum = 0;
      bool flat = SHIFT;
#pragma unroll
      for (int u = 0; u < P; ++u)
#pragma unroll
        for (int v = 0; v < P; ++v) {
          sum += x[u * SW + v];
          if constexpr (SHIFT) flat = flat && x[u * SW + v] == x[0];
        }
      const T mu = sum / T(P * P);
      T ss = 0;
#pragma unroll
      for (int u = 0; u < P; ++u)
#pragma unroll
        for (int v = 0; v < P; ++v) {
          const T d = x[u * SW + v] - mu;
          ss += d * d;
        }
      const T sig = sqrt(ss / T(nm1)) + T(eps);
      if (is_a) {
        k = T(1) / (T(nm1) * sig);
        m = T(P * P) * mu * k;
      } else {
        k = T(1) / sig;
        m = mu * k;
      }
      if (flat) k = m = T(0);
    }
    if (is_a) {
      t.ka[e] = k;
      t.nmaka[e] = m;
    } else {
      t.kb[e] = k;
      t.mbkb[e] = m;
    }
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace mspcnn
