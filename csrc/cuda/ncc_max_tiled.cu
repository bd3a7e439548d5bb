// ncc_max forward with register-tiled horizontal sums (max_tiled_kernel): an
// opt-in path (MSPCNN_NCC_MAX_FWD=tiled) until it has run on a GPU against the
// default kernel (docs/ncc_layer.md, "The tiled max forward"). CUDA headers
// only; float32 maps with the plane-mean shift (the default), the geometries
// of has_fast_max_kernel.
//
// What it changes against max_fast_kernel (ncc_forward.cu). That kernel gives
// each thread one output column w and one candidate column col, so every
// multiply-add of a horizontal sum H(u, k, w, col) = sum_j a(u, w + j)
// b(u + k, col + j) reads its b value from shared memory (one load per
// multiply-add, and two more per candidate for the factors kb, mu_b kb):
// Nsight Compute found it bound by those loads. Here a thread owns one output
// column w and CT (16 or 8) consecutive candidate columns c0 .. c0 + CT - 1 at
// one row offset k: per staged row it loads P values of a and CT + P - 1 of b
// (128-bit or 64-bit loads) and does P CT multiply-adds, and per output row it
// loads its factors with vector loads: about 1.3 loads per candidate at CT = 16
// against 8.
//
// The arithmetic is max_fast_kernel's, operation for operation, so the result
// is the same bit for bit: the same staged tiles (the same tile rows,
// fast_tiling, so the window's slots hold the same rows), the same factors
// (stage_tile), each horizontal sum the same chain of P fused multiply-adds in
// order j, the window added in the order of its slots, the same normalisation
// expression. Only the order of the comparisons differs, and the order of the
// maximum (better(): larger first, NaN above numbers, ties to the smaller
// index) is a total order, so any order picks the same candidate:
//   1. each thread walks its CT candidates in increasing index (the kernel's
//      strict comparison keeps the first maximum, or the first NaN);
//   2. the 32 / CT threads of the same (k, w), lanes w_lo + i * WPW of a warp,
//      combine by shuffles;
//   3. one of them writes (value, index) for (row, k, w) to a double-buffered
//      table in shared memory; after every P output rows the block synchronises
//      and its threads combine the R offsets of each output and store it.
// Threads: R groups (one per k) of 32 / CT warps; in a warp, WPW = CT / 2 output
// columns x 32 / CT candidate groups.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>

#include "ncc_device.cuh"
#include "ncc_kernels.h"
#include "ncc_tile.cuh"

namespace mspcnn {
namespace cuda {
namespace {

// Offsets (in floats) of the staged arrays in the block's shared memory, each
// rounded up to 16 bytes for the vector loads, then the (value, index) tables.
template <int P, int R>
struct TiledLayout {
  static constexpr int SW = fast_width<float, P>();
  static __host__ __device__ int64_t up4(int64_t n) { return (n + 3) / 4 * 4; }
  int64_t As, Bs, ka, nmaka, kb, mbkb, best_v, best_k, total;
  __host__ __device__ explicit TiledLayout(int tile_rows) {
    As = 0;
    Bs = As + up4(int64_t(tile_rows + P - 1) * SW);
    ka = Bs + up4(int64_t(tile_rows + P + R - 2) * SW);
    nmaka = ka + int64_t(tile_rows) * kLanes;
    kb = nmaka + int64_t(tile_rows) * kLanes;
    mbkb = kb + int64_t(tile_rows + R - 1) * kLanes;
    best_v = mbkb + int64_t(tile_rows + R - 1) * kLanes;  // [2][P][R][32] float
    best_k = best_v + 2 * P * R * kLanes;                  // [2][P][R][32] int
    total = best_k + 2 * P * R * kLanes;
  }
};

// Loads n consecutive floats from shared memory at p (VEC-aligned) into v.
template <int VEC, int N>
__device__ __forceinline__ void load_row(const float* p, float (&v)[N]) {
  static_assert(N % VEC == 0, "a whole number of vector loads");
#pragma unroll
  for (int i = 0; i < N; i += VEC) {
    if constexpr (VEC == 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + i);
      v[i] = q.x, v[i + 1] = q.y, v[i + 2] = q.z, v[i + 3] = q.w;
    } else {
      const float2 q = *reinterpret_cast<const float2*>(p + i);
      v[i] = q.x, v[i + 1] = q.y;
    }
  }
}

template <int P, int R, int CT>
__global__ void __launch_bounds__(R * (kLanes / CT) * kLanes)
    max_tiled_kernel(NccGeometry g, int tile_rows, int tiles, const float* __restrict__ a,
                     const float* __restrict__ b, float* __restrict__ values,
                     int64_t* __restrict__ index) {
  constexpr int SW = fast_width<float, P>();
  constexpr int NCG = kLanes / CT;     // candidate groups of 32 columns
  constexpr int WPW = kLanes / NCG;    // output columns per warp
  constexpr int GROUP = NCG * kLanes;  // threads per offset k
  constexpr int NB = CT + P - 1;       // b values per staged row
  constexpr int VB = SW % 4 == 0 ? 4 : 2;  // b rows are 16-byte aligned when SW is a multiple of 4
  static_assert(NB % VB == 0 && CT % 4 == 0, "vector loads");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  const TiledLayout<P, R> L(tile_rows);
  Tile<float> t;
  t.As = smem + L.As;
  t.Bs = smem + L.Bs;
  t.ka = smem + L.ka;
  t.nmaka = smem + L.nmaka;
  t.kb = smem + L.kb;
  t.mbkb = smem + L.mbkb;
  float* best_v = smem + L.best_v;
  int* best_k = reinterpret_cast<int*>(smem + L.best_k);

  const int H = int(g.H), W = int(g.W);
  const int plane = blockIdx.x / tiles, r0 = (blockIdx.x % tiles) * tile_rows;
  const int TR = min(tile_rows, H - r0);
  stage_tile<float, P, R, true>(g, t, r0, TR, a + int64_t(plane) * H * W,
                                b + int64_t(plane) * H * W);

  const int tid = threadIdx.x;
  const int k = tid / GROUP, lane = tid % kLanes;
  const int w = (tid % GROUP) / kLanes * WPW + lane % WPW;  // output column, <= 31
  const int c0 = lane / WPW * CT;                            // first candidate column
  const int first = c0 < W ? k * W + c0 : INT_MAX;           // its candidate index

  float win[P][CT];  // the window: slot s holds the horizontal sums of staged rows = s mod P
  for (int base = 0; base < TR + P - 1; base += P) {
    const int buf = (base / P) & 1;
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int uu = base + s;  // staged row (block-uniform)
      if (uu >= TR + P - 1) break;
      float av[P], bv[NB];
#pragma unroll
      for (int j = 0; j < P; ++j) av[j] = t.As[uu * SW + w + j];
      load_row<VB>(t.Bs + (uu + k) * SW + c0, bv);
#pragma unroll
      for (int c = 0; c < CT; ++c) {
        float hs = 0.f;
#pragma unroll
        for (int j = 0; j < P; ++j) hs += av[j] * bv[c + j];
        win[s][c] = hs;
      }
      if (uu < P - 1) continue;
      const int ri = uu - (P - 1);  // output row r0 + ri
      const float c2 = t.ka[ri * kLanes + w], c1 = t.nmaka[ri * kLanes + w];
      float kbq[CT], mq[CT];
      load_row<4>(t.kb + (ri + k) * kLanes + c0, kbq);
      load_row<4>(t.mbkb + (ri + k) * kLanes + c0, mq);
      float best = -INFINITY;
      int bk = first;
#pragma unroll
      for (int c = 0; c < CT; ++c) {
        float x = win[0][c];
#pragma unroll
        for (int i = 1; i < P; ++i) x += win[i][c];
        const float v = x * (c2 * kbq[c]) - c1 * mq[c];
        // As max_fast_kernel: take v when larger, or NaN while the best is not.
        if (c0 + c < W && !(v <= best) && best == best) {
          best = v;
          bk = k * W + c0 + c;
        }
      }
#pragma unroll
      for (int off = WPW; off < kLanes; off <<= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, off);
        const int ok = __shfl_xor_sync(0xffffffffu, bk, off);
        if (better(ov, ok, best, bk)) {
          best = ov;
          bk = ok;
        }
      }
      if (c0 == 0) {
        const int e = ((buf * P + s) * R + k) * kLanes + w;
        best_v[e] = best;
        best_k[e] = bk;
      }
    }
    __syncthreads();
    // The R offsets of this pass's output rows, one thread per (row, w).
    for (int e = tid; e < P * kLanes; e += blockDim.x) {
      const int s = e / kLanes, wo = e % kLanes, ri = base + s - (P - 1);
      if (ri < 0 || ri >= TR || wo >= W) continue;
      const int e0 = (buf * P + s) * R * kLanes + wo;
      float best = best_v[e0];
      int bk = best_k[e0];
#pragma unroll
      for (int kk = 1; kk < R; ++kk) {
        const float v = best_v[e0 + kk * kLanes];
        const int i = best_k[e0 + kk * kLanes];
        if (better(v, i, best, bk)) {
          best = v;
          bk = i;
        }
      }
      const int64_t o = (int64_t(plane) * H + r0 + ri) * W + wo;
      values[o] = best;
      index[o] = bk;
    }
  }
}

template <int P, int R, int CT>
cudaError_t launch_tiled(const NccGeometry& g, const float* a, const float* b, float* values,
                         int64_t* index, int num_sms, cudaStream_t stream) {
  // The tiles of max_fast_kernel<float, P, R, *, true> (the window's slots follow them).
  int tiles = 0, tile_rows = 0;
  fast_tiling<float, P, R>(g, num_sms, fast_smem_budget(true), tiles, tile_rows);
  const int64_t smem = TiledLayout<P, R>(tile_rows).total * int64_t(sizeof(float));
  // Beside plane_means' static shared memory; above 48 KB in all, opt in (up to
  // 227 KB on an H100 / H200).
  if (smem > fast_smem_budget(true)) {
    const cudaError_t e = cudaFuncSetAttribute(max_tiled_kernel<P, R, CT>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  const unsigned threads = unsigned(R * (kLanes / CT) * kLanes);
  max_tiled_kernel<P, R, CT><<<unsigned(g.planes() * tiles), threads, size_t(smem), stream>>>(
      g, tile_rows, tiles, a, b, values, index);
  return cudaGetLastError();
}

}  // namespace

bool max_tiled_requested() {
  const char* env = getenv("MSPCNN_NCC_MAX_FWD");
  return env != nullptr && env[0] == 't';
}

cudaError_t ncc_max_forward_tiled(const NccGeometry& g, const float* a, const float* b,
                                  float* values, int64_t* index, int num_sms,
                                  cudaStream_t stream) {
  if (!has_fast_max_kernel(g)) return cudaErrorInvalidValue;
  // MSPCNN_NCC_MAX_TILE=8: 8 candidate columns a thread instead of 16 (half the
  // registers, twice the threads; a tuning knob for tools/bench_ncc.py).
  const char* env = getenv("MSPCNN_NCC_MAX_TILE");
  const bool eight = env != nullptr && env[0] == '8';
#define MSPCNN_TILED(P_, R_)                                                       \
  if (g.P == P_ && g.R == R_)                                                      \
    return eight ? launch_tiled<P_, R_, 8>(g, a, b, values, index, num_sms, stream) \
                 : launch_tiled<P_, R_, 16>(g, a, b, values, index, num_sms, stream);
  MSPCNN_TILED(3, 1) MSPCNN_TILED(3, 3) MSPCNN_TILED(3, 5)
  MSPCNN_TILED(5, 1) MSPCNN_TILED(5, 3) MSPCNN_TILED(5, 5)
#undef MSPCNN_TILED
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mspcnn
