// ncc_max forward on tensor cores: an opt-in path, never the default
// (docs/ncc_layer.md, "Tensor cores"; mspcnn.ops.ncc_max(precision=...)).
// CUDA headers only; float32 maps; compute capability 8.0 or newer.
//
// For one output row r of a plane and one row offset k, the patch products of
// every output column w against every candidate column col form a matrix
// product with K = P * P:
//   X[w][col] = sum_{kk < P*P} A_r[w][kk] B_{r+k}[col][kk],
//   A_r[w][i P + j] = a(r + i - h, w + j - h),  B_s[col][i P + j] = b(s + i - h - R2, col + j - h)
// (rows of the staged tile, ncc_tile.cuh). One warp computes it for W <= 32
// as 2 x 4 tiles of mma.sync m16n8k8 (w in 2 tiles of 16, col in 4 tiles of
// 8), K padded with zeros to a multiple of 8 (25 -> 32 at P = 5). The operands
// are read from the staged rows directly, each lane at the offsets of its
// fragment (PTX ISA, "Matrix fragments for mma.m16n8k8" with .tf32):
//   A (16 x 8, row):  a0 (g, t)  a1 (g + 8, t)  a2 (g, t + 4)  a3 (g + 8, t + 4)
//   B (8 x 8, col):   b0 (t, g)  b1 (t + 4, g)
//   C (16 x 8):       c0 (g, 2t) c1 (g, 2t + 1) c2 (g + 8, 2t) c3 (g + 8, 2t + 1)
// with g = lane / 4, t = lane % 4. tools/emulate_cuda_ncc.py --tc repeats this
// index arithmetic in NumPy (tests/test_ncc_tc_emulation.py).
//
// PASSES = 1 (TF32): each operand rounded to TF32 (10 explicit mantissa bits,
// cvt.rna), products exact, sums in float32. PASSES = 3 (3xTF32): each
// operand split as hi + lo, both TF32, and X = lo*hi + hi*lo + hi*hi, which
// drops only lo*lo (about 2^-22 relative): float32-like accuracy at three
// times the tensor work.
//
// The epilogue normalises every candidate (X ka kb - n mu_a ka mu_b kb, the
// factors of the staged tile, on the plane-mean-shifted maps) and keeps the
// first maximum per output, as the float32 kernels. The selected candidate's
// value is then computed again in float32 from the staged rows (P rows of P
// fused multiply-adds, 1 / (R W) of the work): the returned value is the float32
// NCC of the returned index, so the values and the gradient (the ordinary
// backward, which routes through the index) are as accurate as the default
// kernels'; only the choice of the maximum can differ, where two candidates
// are closer than the tensor-core rounding.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "ncc_device.cuh"
#include "ncc_kernels.h"
#include "ncc_tile.cuh"

namespace mspcnn {
namespace cuda {
namespace {

constexpr int kTcWarps = 8;         // warps per block
constexpr int kTcRowsPerWarp = 3;   // output rows per warp: a tile of 24 rows

__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  return __float_as_uint(x);
#endif
}

// hi = tf32(x); with PASSES == 3 also lo = tf32(x - hi).
template <int PASSES>
__device__ __forceinline__ void split(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  if constexpr (PASSES == 3) lo = to_tf32(x - __uint_as_float(hi));
}

// d += a b, one m16n8k8 tile, TF32 operands, float32 accumulators.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the launcher refuses devices older than compute capability 8.0
#endif
}

// Block = (plane, tile of tile_rows output rows), kTcWarps warps; warp y takes
// the tile's rows y, y + kTcWarps, ...
template <int P, int R, int PASSES>
__global__ void __launch_bounds__(kTcWarps * 32)
    max_tc_kernel(NccGeometry g, int tile_rows, int tiles, const float* __restrict__ a,
                  const float* __restrict__ b, float* __restrict__ values,
                  int64_t* __restrict__ index) {
  extern __shared__ unsigned char smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  constexpr int SW = fast_width<float, P>(), PP = P * P, KSTEPS = (PP + 7) / 8;
  const int H = int(g.H), W = int(g.W);
  const int plane = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int r0 = tile * tile_rows;
  const int TR = min(tile_rows, H - r0);
  const float* A = a + int64_t(plane) * H * W;
  const float* B = b + int64_t(plane) * H * W;
  const Tile<float> t = tile_layout<float, P, R>(smem, tile_rows);
  stage_tile<float, P, R, true>(g, t, r0, TR, A, B);

  const int lane = threadIdx.x, gq = lane >> 2, tq = lane & 3;
  // The K entries this lane feeds, per k-step: kk = 8 s + tq (+ 4), patch
  // entry (i, j) = (kk / P, kk % P) at offset i * SW + j of a staged row;
  // entries past P*P are the zero padding of K.
  int koff[KSTEPS][2];
  bool kin[KSTEPS][2];
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int kk = 8 * s + tq + 4 * e;
      kin[s][e] = kk < PP;
      koff[s][e] = kin[s][e] ? (kk / P) * SW + kk % P : 0;
    }

  for (int ri = threadIdx.y; ri < TR; ri += kTcWarps) {
    // A fragments of output row ri (the same for every offset k).
    uint32_t ahi[KSTEPS][2][4], alo[KSTEPS][2][4];
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const float* base = t.As + ri * SW + 16 * mt + gq;
        const float x0 = kin[s][0] ? base[koff[s][0]] : 0.f;      // (w = g,     kk = t)
        const float x1 = kin[s][0] ? base[koff[s][0] + 8] : 0.f;  // (w = g + 8, kk = t)
        const float x2 = kin[s][1] ? base[koff[s][1]] : 0.f;      // (w = g,     kk = t + 4)
        const float x3 = kin[s][1] ? base[koff[s][1] + 8] : 0.f;  // (w = g + 8, kk = t + 4)
        split<PASSES>(x0, ahi[s][mt][0], alo[s][mt][0]);
        split<PASSES>(x1, ahi[s][mt][1], alo[s][mt][1]);
        split<PASSES>(x2, ahi[s][mt][2], alo[s][mt][2]);
        split<PASSES>(x3, ahi[s][mt][3], alo[s][mt][3]);
      }
    // Slot q = 2 mt + half holds output column w = 16 mt + 8 half + gq.
    float c2[4], c1[4], best[4];
    int bk[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int w = 16 * (q >> 1) + 8 * (q & 1) + gq;
      c2[q] = t.ka[ri * kLanes + w];
      c1[q] = t.nmaka[ri * kLanes + w];
      best[q] = -INFINITY;
      bk[q] = INT_MAX;
    }
#pragma unroll 1
    for (int k = 0; k < R; ++k) {
      float acc[2][4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
#pragma unroll
      for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const float* base = t.Bs + (ri + k) * SW + 8 * nt + gq;
          const float y0 = kin[s][0] ? base[koff[s][0]] : 0.f;  // (kk = t,     col = g)
          const float y1 = kin[s][1] ? base[koff[s][1]] : 0.f;  // (kk = t + 4, col = g)
          uint32_t bhi[2], blo[2];
          split<PASSES>(y0, bhi[0], blo[0]);
          split<PASSES>(y1, bhi[1], blo[1]);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            if constexpr (PASSES == 3) {
              mma_tf32(acc[mt][nt], alo[s][mt], bhi);
              mma_tf32(acc[mt][nt], ahi[s][mt], blo);
            }
            mma_tf32(acc[mt][nt], ahi[s][mt], bhi);
          }
        }
      // Normalise and keep the maximum. Within a lane the candidates of a slot
      // come in increasing index k W + col (nt, then the register's column), so
      // the strict comparison keeps the first maximum (or the first NaN).
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * nt + 2 * tq + e;
          if (col >= W) continue;
          const float kbq = t.kb[(ri + k) * kLanes + col], mq = t.mbkb[(ri + k) * kLanes + col];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int q = 2 * mt + half;
              const float v = acc[mt][nt][2 * half + e] * (c2[q] * kbq) - c1[q] * mq;
              if (!(v <= best[q]) && best[q] == best[q]) {
                best[q] = v;
                bk[q] = k * W + col;
              }
            }
        }
    }
    // The four lanes of a group hold the same output columns: the maximum
    // over them in the order of better() (value, then the smaller index).
    int mine = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best[q], off);
        const int ok = __shfl_xor_sync(0xffffffffu, bk[q], off);
        if (better(ov, ok, best[q], bk[q])) {
          best[q] = ov;
          bk[q] = ok;
        }
      }
      if (q == tq) mine = bk[q];
    }
    // Lane tq writes slot tq. No candidate taken: every one was -inf, and
    // the first of them is index 0.
    const int w = 16 * (tq >> 1) + 8 * (tq & 1) + gq;
    if (w < W) {
      const int kk = mine == INT_MAX ? 0 : mine;
      const int kr = kk / W, col = kk - kr * W;
      // Rows of P fused multiply-adds, the row sums added in order (as the
      // float32 kernel's window: shorter chains than one of P * P).
      float x = 0.f;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        float hs = 0.f;
#pragma unroll
        for (int j = 0; j < P; ++j)
          hs = fmaf(t.As[(ri + i) * SW + w + j], t.Bs[(ri + kr + i) * SW + col + j], hs);
        x += hs;
      }
      const float v = x * (t.ka[ri * kLanes + w] * t.kb[(ri + kr) * kLanes + col]) -
                      t.nmaka[ri * kLanes + w] * t.mbkb[(ri + kr) * kLanes + col];
      const int64_t o = (int64_t(plane) * H + r0 + ri) * W + w;
      values[o] = v;
      index[o] = kk;
    }
  }
}

template <int P, int R, int PASSES>
cudaError_t launch_tc(const NccGeometry& g, const float* a, const float* b, float* values,
                      int64_t* index, cudaStream_t stream) {
  const int tile_rows = int(g.H < kTcWarps * kTcRowsPerWarp ? g.H : kTcWarps * kTcRowsPerWarp);
  const int tiles = int((g.H + tile_rows - 1) / tile_rows);
  const size_t smem = size_t(fast_smem_elems<float, P, R>(tile_rows)) * sizeof(float);
  const dim3 block(kLanes, kTcWarps);
  max_tc_kernel<P, R, PASSES><<<unsigned(g.planes() * tiles), block, smem, stream>>>(
      g, tile_rows, tiles, a, b, values, index);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ncc_max_forward_tc(const NccGeometry& g, const float* a, const float* b,
                               float* values, int64_t* index, int passes,
                               cudaStream_t stream) {
  // Patch 5 only: at 3 x 3 patches the path failed its accuracy bounds on an H200 (ncc_cuda.cpp).
  if (!has_fast_max_kernel(g) || g.P != 5 || (passes != 1 && passes != 3)) return cudaErrorInvalidValue;
#define MSPCNN_TC(P_, R_)                                                          \
  if (g.P == P_ && g.R == R_)                                                      \
    return passes == 3 ? launch_tc<P_, R_, 3>(g, a, b, values, index, stream)     \
                       : launch_tc<P_, R_, 1>(g, a, b, values, index, stream);
  MSPCNN_TC(5, 1) MSPCNN_TC(5, 3) MSPCNN_TC(5, 5)
#undef MSPCNN_TC
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mspcnn
