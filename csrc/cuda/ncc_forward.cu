// CUDA kernels of the NCC forward passes (docs/ncc_layer.md, "CUDA kernels"):
// patch statistics, ncc_max and ncc_volume. CUDA headers only (ncc_kernels.h,
// ncc_device.cuh): raw pointers, kernels templated on the scalar type, an
// explicit stream; the launcher ncc_cuda.cpp checks the tensors and calls the
// host functions at the end of this file.
//
// The plane-mean shift (docs/ncc_layer.md, section 2), as the CPU kernels do:
// the max kernels subtract each (n, c) plane's mean from both maps (the
// zero padding becoming -mean) and give a flat patch the factors 0, so that X
// no longer carries n mu_a mu_b and a flat patch's NCC is exactly 0. On by
// default since it ran on an H200 (2026-11-30: at a feature mean of 10 the
// largest error fell from 5.6e-4 to 1.3e-6, forward 2.7% slower);
// MSPCNN_NCC_CUDA_SHIFT=0 gives the kernels without it.
//
// Kernels:
//   stats_kernel           patch mean / std of every centre (two passes, double)
//   max_fast_kernel<P, R>  ncc_max forward, register-blocked decomposition
//                          (SHIFT: the plane-mean shift, see above)
//   max_generic_kernel     ncc_max forward for any P, R (direct sums)
//   volume_kernel          ncc_volume forward (centred direct sums, coalesced
//                          stores; no shift needed)
//   volume_tiled_kernel    the same sums as a register-tiled matrix product
//                          (MSPCNN_NCC_VOLUME_FWD=tiled; not yet run on a GPU)
// The tiled max forward (MSPCNN_NCC_MAX_FWD=tiled): ncc_max_tiled.cu.
// The backward kernels: ncc_max_backward.cu and ncc_volume_backward.cu.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "ncc_device.cuh"
#include "ncc_kernels.h"
#include "ncc_tile.cuh"

namespace mspcnn {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Patch statistics
// ---------------------------------------------------------------------------
// One block per plane; 32-bit index arithmetic inside the plane.
template <typename T>
__global__ void stats_kernel(NccGeometry g, const T* __restrict__ a,
                             const T* __restrict__ b, double* ma, double* sa,
                             double* mb, double* sb) {
  const int H = int(g.H), W = int(g.W), h = int(g.h()), BR = int(g.b_rows());
  const int R2 = int(g.R2()), P = int(g.P);
  const int64_t plane = blockIdx.x;
  const double n = double(P * P);
  for (int t = threadIdx.x; t < (H + BR) * W; t += blockDim.x) {
    const bool is_a = t < H * W;
    const int e = is_a ? t : t - H * W;
    const int w = e % W, rr = e / W;
    const T* x = (is_a ? a : b) + plane * H * W;
    const int cr = is_a ? rr : rr - R2;
    const int u0 = max(cr - h, 0), u1 = min(cr + h + 1, H);
    const int v0 = max(w - h, 0), v1 = min(w + h + 1, W);
    double sum = 0.0;
    for (int u = u0; u < u1; ++u)
      for (int v = v0; v < v1; ++v) sum += double(load(x + u * W + v));
    const double mu = sum / n;
    double ss = 0.0;
    for (int u = u0; u < u1; ++u)
      for (int v = v0; v < v1; ++v) {
        const double dv = double(load(x + u * W + v)) - mu;
        ss += dv * dv;
      }
    const int inside = (u1 > u0 ? u1 - u0 : 0) * (v1 - v0);
    ss += double(P * P - inside) * mu * mu;
    const int64_t o = plane * (is_a ? H : BR) * W + e;
    (is_a ? ma : mb)[o] = mu;
    (is_a ? sa : sb)[o] = sqrt(ss / (n - 1.0));
  }
}

// ---------------------------------------------------------------------------
// ncc_max forward, register-blocked (P in {3, 5}, R in {1, 3, 5}, W <= 32)
// ---------------------------------------------------------------------------
// One block computes a tile of `tile_rows` output rows of one plane. Thread
// (x = col, y) owns candidate column col for the two output columns
// w0 = y and w1 = y + ceil(W / 2) (two columns per thread halve the
// shared-memory loads of b, which bound the kernel). For every row u of a it
// forms, for each of the R row offsets d,
//   Hs_u(w, d, col) = sum_j a(u, w + j) b(u + d, col + j)       (P FMAs)
// and keeps the last P of them per d in registers (win[d][*]); their sum is
// the patch product X of output row u - h. A warp is one pair of output
// columns, its 32 lanes the candidate columns: the maximum over col is a warp
// shuffle reduction, the maximum over d is in registers.
//
// Shared memory (ncc_tile.cuh): the rows of a and b the tile needs (zero
// padded), and the normalisation factors ka, n ma ka (per output) and kb,
// mb kb (per centre), computed from those rows (no separate statistics pass).
constexpr bool kDefaultTwoColumns = false;  // measured: docs/perf_notes.md

// Warp-wide maximum of (value, index) in the order of better().
template <typename T>
__device__ __forceinline__ void warp_best(T& best, int& best_k) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, best, off);
    const int ok = __shfl_xor_sync(0xffffffffu, best_k, off);
    if (better(ov, ok, best, best_k)) {
      best = ov;
      best_k = ok;
    }
  }
}

inline bool shift_enabled() {
  const char* env = getenv("MSPCNN_NCC_CUDA_SHIFT");
  return !(env && env[0] == '0');
}

// SHIFT: the plane-mean shift (a template parameter, so that the kernels
// without it are the same machine code as before it existed).
template <typename T, int P, int R, int WPT, bool SHIFT>
__global__ void __launch_bounds__(WPT == 1 ? 1024 : 512)
    max_fast_kernel(NccGeometry g, int tile_rows, int tiles, int wsplit,
                    const T* __restrict__ a, const T* __restrict__ b,
                    T* __restrict__ values, int64_t* __restrict__ index) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int SW = fast_width<T, P>();
  const int H = int(g.H), W = int(g.W);
  // Block = (plane, row tile, part of the output columns).
  const int part = blockIdx.x % wsplit;
  const int plane = blockIdx.x / wsplit / tiles, tile = blockIdx.x / wsplit % tiles;
  const int r0 = tile * tile_rows;
  const int TR = min(tile_rows, H - r0);
  const T* A = a + int64_t(plane) * H * W;
  const T* B = b + int64_t(plane) * H * W;

  // The staged rows and factors (ncc_tile.cuh).
  const Tile<T> t = tile_layout<T, P, R>(smem, tile_rows);
  const T* As = t.As;
  const T* Bs = t.Bs;
  const T* kaS = t.ka;
  const T* nmakaS = t.nmaka;
  const T* kbS = t.kb;
  const T* mbkbS = t.mbkb;
  stage_tile<T, P, R, SHIFT>(g, t, r0, TR, A, B);

  const int col = threadIdx.x;
  int wc[WPT];  // the output columns of this thread, all <= 31
#pragma unroll
  for (int c = 0; c < WPT; ++c) wc[c] = part * WPT * blockDim.y + threadIdx.y + c * blockDim.y;
  T win[WPT][R][P];
#pragma unroll
  for (int c = 0; c < WPT; ++c)
#pragma unroll
    for (int k = 0; k < R; ++k)
#pragma unroll
      for (int i = 0; i < P; ++i) win[c][k][i] = T(0);

  // The row loop is unrolled by P so that the window slot of row uu is the
  // compile-time constant uu % P: no register moves.
  for (int base = 0; base < TR + P - 1; base += P) {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int uu = base + s;
      if (uu >= TR + P - 1) break;
      T av[WPT][P];
#pragma unroll
      for (int c = 0; c < WPT; ++c)
#pragma unroll
        for (int j = 0; j < P; ++j) av[c][j] = As[uu * SW + wc[c] + j];
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const T* brow = Bs + (uu + k) * SW + col;
        T hs[WPT];
#pragma unroll
        for (int c = 0; c < WPT; ++c) hs[c] = T(0);
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const T bv = brow[j];
#pragma unroll
          for (int c = 0; c < WPT; ++c) hs[c] += av[c][j] * bv;
        }
#pragma unroll
        for (int c = 0; c < WPT; ++c) win[c][k][s] = hs[c];
      }
      if (uu < P - 1) continue;
      const int ri = uu - (P - 1);  // output row r0 + ri
      T c2[WPT], c1[WPT], best[WPT];
      int bk[WPT];
#pragma unroll
      for (int c = 0; c < WPT; ++c) {
        c2[c] = kaS[ri * kLanes + wc[c]];
        c1[c] = nmakaS[ri * kLanes + wc[c]];
        best[c] = -INFINITY;
        bk[c] = col;
      }
      // Candidates are visited in increasing index k * W + col. Take v when
      // it is larger, or NaN while the best so far is not: the first maximum
      // (or the first NaN) wins, as torch.argmax.
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const T kbq = kbS[(ri + k) * kLanes + col], mq = mbkbS[(ri + k) * kLanes + col];
#pragma unroll
        for (int c = 0; c < WPT; ++c) {
          T x = win[c][k][0];
#pragma unroll
          for (int i = 1; i < P; ++i) x += win[c][k][i];
          const T v = x * (c2[c] * kbq) - c1[c] * mq;
          if (!(v <= best[c]) && best[c] == best[c]) {
            best[c] = v;
            bk[c] = k * W + col;
          }
        }
      }
#pragma unroll
      for (int c = 0; c < WPT; ++c) {
        if (col >= W) {
          best[c] = -INFINITY;
          bk[c] = INT_MAX;
        }
        warp_best(best[c], bk[c]);
        if (col == 0 && wc[c] < W) {
          const int64_t o = (int64_t(plane) * H + r0 + ri) * W + wc[c];
          values[o] = best[c];
          index[o] = bk[c];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Generic forward kernels (any P, R; W <= 64): one block per (plane, row r).
// ---------------------------------------------------------------------------
// Shared memory: the P rows of a and the R + P - 1 rows of b the row needs,
// zero padded to width W + 2h, and the normalisation factors.
//
// The generic kernels' two forms of an NCC value:
// * box-sum (max_generic_kernel): X ka kb - (n mu_a ka)(mu_b kb), X the sum of
//   the products of the staged values, unshifted or (kBoxSumShifted) shifted
//   by the plane means;
// * centred (volume_kernel): sum (a - mu_a)(b - mu_b) ka kb, both patches
//   centred on their own means as the products are formed. The box-sum form
//   cancels two large terms wherever both patches' means are large beside
//   their spread (ReLU features), and the shift removes only the plane's share
//   of the means: on an H200 a few volume outputs of ReLU'd maps were off by
//   3e-5 to 9e-5. Centred, a rounding of mu_a or mu_b to T multiplies
//   sum (b - mu_b) or sum (a - mu_a), which is 0, and a flat patch's centred
//   values are 0 (docs/perf_notes.md, "The volume's cancellation"); it costs
//   two subtractions per multiply-add.
enum RowForm { kBoxSum = 0, kBoxSumShifted = 1, kCentred = 2 };

// The layout of generic_smem_elems: the staged rows, then per output column ka
// and fa, per candidate centre kb and fb. fa, fb: n mu_a ka and mu_b kb in the
// box-sum forms, mu_a and mu_b in the centred one.
template <typename Ptr>
struct RowLayout {
  Ptr As, Bs, ka, fa, kb, fb;
};

template <typename Ptr>
__device__ __forceinline__ RowLayout<Ptr> row_layout(const NccGeometry& g, Ptr smem) {
  const int64_t SW = g.W + 2 * g.h();
  RowLayout<Ptr> L;
  L.As = smem;
  L.Bs = L.As + g.P * SW;
  L.ka = L.Bs + (g.R + g.P - 1) * SW;
  L.fa = L.ka + g.W;
  L.kb = L.fa + g.W;
  L.fb = L.kb + g.R * g.W;
  return L;
}

template <typename T, int FORM>
__device__ void stage_row(const NccGeometry& g, int64_t plane, int64_t r,
                          const T* a, const T* b, const double* ma,
                          const double* sa, const double* mb, const double* sb,
                          T* smem) {
  constexpr bool SHIFT = FORM == kBoxSumShifted;
  const int64_t H = g.H, W = g.W, P = g.P, h = g.h(), R = g.R, R2 = g.R2();
  const int64_t SW = W + 2 * h, BR = g.b_rows();
  const double nm1 = double(g.n() - 1);
  const RowLayout<T*> L = row_layout(g, smem);
  const T* A = a + plane * H * W;
  const T* B = b + plane * H * W;
  // With the shift, a flat patch (s = 0) gets the factors 0.
  T ca = T(0), cb = T(0);
  if constexpr (SHIFT) plane_means(A, B, int(H * W), ca, cb);
  for (int64_t i = threadIdx.x; i < P * SW; i += blockDim.x) {
    const T v = pixel(A, H, W, r - h + i / SW, i % SW - h);
    L.As[i] = SHIFT ? v - ca : v;
  }
  for (int64_t i = threadIdx.x; i < (R + P - 1) * SW; i += blockDim.x) {
    const T v = pixel(B, H, W, r - R2 - h + i / SW, i % SW - h);
    L.Bs[i] = SHIFT ? v - cb : v;
  }
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    const int64_t e = (plane * H + r) * W + w;
    const double k = SHIFT && sa[e] == 0.0 ? 0.0 : 1.0 / (nm1 * (sa[e] + g.eps));
    L.ka[w] = T(k);
    L.fa[w] = FORM == kCentred ? T(ma[e]) : T(double(g.n()) * (SHIFT ? ma[e] - double(ca) : ma[e]) * k);
  }
  for (int64_t i = threadIdx.x; i < R * W; i += blockDim.x) {
    const int64_t e = (plane * BR + r + i / W) * W + i % W;  // centre row r - R2 + i / W
    const double k = SHIFT && sb[e] == 0.0 ? 0.0 : 1.0 / (sb[e] + g.eps);
    L.kb[i] = T(k);
    L.fb[i] = FORM == kCentred ? T(mb[e]) : T((SHIFT ? mb[e] - double(cb) : mb[e]) * k);
  }
}

__host__ __device__ inline int64_t generic_smem_elems(const NccGeometry& g) {
  const int64_t SW = g.W + 2 * g.h();
  return g.P * SW + (g.R + g.P - 1) * SW + 2 * g.W + 2 * g.R * g.W;
}

// a * b + c with one rounding (the compiler contracts x += a * b to this by
// default; written out where two kernels must agree bit for bit).
template <typename T>
__device__ __forceinline__ T fused_madd(T a, T b, T c) {
  if constexpr (sizeof(T) == sizeof(float)) return fmaf(a, b, c);
  else return fma(a, b, c);
}

// The NCC of output column w (of the staged row) against candidate (k, col).
template <typename T, bool CENTRED>
__device__ __forceinline__ T candidate(const NccGeometry& g, const T* smem,
                                       int64_t w, int64_t k, int64_t col) {
  const int64_t P = g.P, SW = g.W + 2 * g.h(), c = k * g.W + col;
  const RowLayout<const T*> L = row_layout(g, smem);
  T x = T(0);
  if constexpr (CENTRED) {
    const T mua = L.fa[w], mub = L.fb[c];
    for (int64_t i = 0; i < P; ++i) {
      const T* ar = L.As + i * SW + w;
      const T* br = L.Bs + (k + i) * SW + col;
      for (int64_t j = 0; j < P; ++j) x = fused_madd(ar[j] - mua, br[j] - mub, x);
    }
    return x * (L.ka[w] * L.kb[c]);
  } else {
    for (int64_t i = 0; i < P; ++i) {
      const T* ar = L.As + i * SW + w;
      const T* br = L.Bs + (k + i) * SW + col;
      for (int64_t j = 0; j < P; ++j) x += ar[j] * br[j];
    }
    return x * (L.ka[w] * L.kb[c]) - L.fa[w] * L.fb[c];
  }
}

template <typename T, bool SHIFT>
__global__ void max_generic_kernel(NccGeometry g, const T* __restrict__ a,
                                   const T* __restrict__ b, const double* ma,
                                   const double* sa, const double* mb,
                                   const double* sb, T* values, int64_t* index) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t plane = blockIdx.x / g.H, r = blockIdx.x % g.H;
  stage_row<T, SHIFT ? kBoxSumShifted : kBoxSum>(g, plane, r, a, b, ma, sa, mb, sb, smem);
  __syncthreads();
  const int64_t W = g.W;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    T best = T(0);
    int best_k = INT_MAX;
    for (int64_t k = 0; k < g.R; ++k)
      for (int64_t col = 0; col < W; ++col) {
        const T v = candidate<T, false>(g, smem, w, k, col);
        const int idx = int(k * W + col);
        if (best_k == INT_MAX || better(v, idx, best, best_k)) {
          best = v;
          best_k = idx;
        }
      }
    values[(plane * g.H + r) * W + w] = best;
    index[(plane * g.H + r) * W + w] = best_k;
  }
}

// ncc_volume forward: the centred form (see RowForm above).
template <typename T>
__global__ void volume_kernel(NccGeometry g, const T* __restrict__ a,
                              const T* __restrict__ b, const double* ma,
                              const double* sa, const double* mb,
                              const double* sb, T* volume) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t plane = blockIdx.x / g.H, r = blockIdx.x % g.H;
  stage_row<T, kCentred>(g, plane, r, a, b, ma, sa, mb, sb, smem);
  __syncthreads();
  const int64_t W = g.W, HW = g.H * W, per = g.R * W * W;
  // e -> (k, col, w) with w fastest: consecutive threads store consecutive w.
  for (int64_t e = threadIdx.x; e < per; e += blockDim.x) {
    const int64_t w = e % W, kc = e / W;  // kc = k * W + col
    volume[(plane * g.R * W + kc) * HW + r * W + w] = candidate<T, true>(g, smem, w, kc / W, kc % W);
  }
}

// ncc_volume forward, tiled (MSPCNN_NCC_VOLUME_FWD=tiled; W <= 64 and the
// shared memory of volume_tiled_smem_elems): the same centred sums as
// volume_kernel, bit for bit. For one output row the volume is a matrix
// product, X[w][c] = sum_kk Ac[kk][w] Bc[kk][c] with kk = i P + j, Ac the
// centred patch entries of output column w (a - mu_a) and Bc those of
// candidate c = k W + col (b - mu_b). The block stages Ac (P^2 x W4) and Bc
// (P^2 x C4; W4, C4: W and R W rounded up to 4, the padding 0) once, then each
// thread computes a 4 x 4 tile of X (4 output columns, 4 candidates) with 16
// accumulators: per kk, 2 shared loads of 4 values (float; 8 loads in double)
// and 16 fused multiply-adds, where
// volume_kernel's thread makes 2 loads and 2 subtractions per multiply-add.
// Each accumulator runs the chain of candidate<T, true> in its order (kk
// ascending, fused multiply-adds from 0), then x (ka kb) as it does: the same
// value. Threads are numbered with the output-column group fastest, so a
// warp's lanes cover whole rows of W outputs of a few candidates: its stores
// are contiguous runs of W values (the volume's innermost dimension is w).
__host__ __device__ inline int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

inline int64_t volume_tiled_smem_elems(const NccGeometry& g) {
  const int64_t PP = g.P * g.P;
  return round4(generic_smem_elems(g)) + PP * round4(g.W) + PP * round4(g.R * g.W);
}

// Four consecutive values of a shared row, 16-byte aligned for float (one
// 128-bit load instead of four).
template <typename T>
__device__ __forceinline__ void load4(const T* p, T (&v)[4]) {
  if constexpr (sizeof(T) == sizeof(float)) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    v[0] = p[0], v[1] = p[1], v[2] = p[2], v[3] = p[3];
  }
}

template <typename T>
__global__ void volume_tiled_kernel(NccGeometry g, const T* __restrict__ a,
                                    const T* __restrict__ b, const double* ma,
                                    const double* sa, const double* mb,
                                    const double* sb, T* volume) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t plane = blockIdx.x / g.H, r = blockIdx.x % g.H;
  stage_row<T, kCentred>(g, plane, r, a, b, ma, sa, mb, sb, smem);
  __syncthreads();
  const int P = int(g.P), PP = P * P, W = int(g.W), RW = int(g.R * g.W);
  const int W4 = int(round4(W)), C4 = int(round4(RW));
  const int SW = W + 2 * int(g.h());
  const RowLayout<const T*> L = row_layout(g, static_cast<const T*>(smem));
  T* Ac = smem + round4(generic_smem_elems(g));  // [kk][w], w < W4 (16-byte aligned)
  T* Bc = Ac + PP * W4;                  // [kk][c], c < C4
  for (int e = threadIdx.x; e < PP * W4; e += blockDim.x) {
    const int kk = e / W4, w = e % W4, i = kk / P, j = kk % P;
    Ac[e] = w < W ? L.As[i * SW + w + j] - L.fa[w] : T(0);
  }
  for (int e = threadIdx.x; e < PP * C4; e += blockDim.x) {
    const int kk = e / C4, c = e % C4, i = kk / P, j = kk % P;
    const int k = c / W, col = c % W;
    Bc[e] = c < RW ? L.Bs[(k + i) * SW + col + j] - L.fb[c] : T(0);
  }
  __syncthreads();
  const int wg = W4 / 4, cells = wg * (C4 / 4);
  const int64_t HW = g.H * g.W;
  T* out = volume + plane * int64_t(RW) * HW + r * W;
  for (int cell = threadIdx.x; cell < cells; cell += blockDim.x) {
    const int w0 = 4 * (cell % wg), c0 = 4 * (cell / wg);
    T x[4][4];
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) x[p][q] = T(0);
    for (int kk = 0; kk < PP; ++kk) {
      const T* ar = Ac + kk * W4 + w0;
      const T* br = Bc + kk * C4 + c0;
      T av[4], bv[4];
      load4(ar, av);
      load4(br, bv);
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) x[p][q] = fused_madd(av[p], bv[q], x[p][q]);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int c = c0 + q;
      if (c >= RW) break;
      const T kbq = L.kb[c];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int w = w0 + p;
        if (w < W) out[c * HW + w] = x[p][q] * (L.ka[w] * kbq);
      }
    }
  }
}

bool volume_tiled_enabled() {
  const char* env = getenv("MSPCNN_NCC_VOLUME_FWD");
  return env != nullptr && std::string(env) == "tiled";
}

template <typename T, int P, int R, int WPT, bool SHIFT>
cudaError_t launch_fast(const NccGeometry& g, const T* a, const T* b,
                        const double* ma, const double* sa, const double* mb,
                        const double* sb, T* values, int64_t* index, int num_sms,
                        cudaStream_t stream) {
  // Enough blocks to fill the GPU twice over, and shared memory <= 48 KB
  // (the dynamic part and, with the shift, plane_means' 512 bytes).
  int tiles = 0, tile_rows = 0;
  fast_tiling<T, P, R>(g, num_sms, fast_smem_budget(SHIFT), tiles, tile_rows);
  const size_t smem = size_t(fast_smem_elems<T, P, R>(tile_rows)) * sizeof(T);
  // MSPCNN_NCC_WSPLIT=2 splits the output columns of a tile over two blocks
  // of half the size (a tuning knob for tools/bench_ncc.py; 1 by default).
  const char* env = getenv("MSPCNN_NCC_WSPLIT");
  const int wsplit = (env && env[0] == '2') ? 2 : 1;
  if (wsplit > 1)
    cudaFuncSetAttribute(max_fast_kernel<T, P, R, WPT, SHIFT>,
                         cudaFuncAttributePreferredSharedMemoryCarveout,
                         cudaSharedmemCarveoutMaxShared);
  const dim3 block(kLanes, unsigned((g.W + WPT * wsplit - 1) / (WPT * wsplit)));
  const int64_t grid = g.planes() * tiles * wsplit;
  max_fast_kernel<T, P, R, WPT, SHIFT><<<unsigned(grid), block, smem, stream>>>(
      g, tile_rows, tiles, wsplit, a, b, values, index);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Host entry points (declared in ncc_kernels.h)
// ---------------------------------------------------------------------------
template <typename T>
cudaError_t patch_stats(const NccGeometry& g, const T* a, const T* b, double* ma,
                        double* sa, double* mb, double* sb, cudaStream_t stream) {
  stats_kernel<T><<<unsigned(g.planes()), kThreads, 0, stream>>>(g, a, b, ma, sa, mb, sb);
  return cudaGetLastError();
}

bool has_fast_max_kernel(const NccGeometry& g) {
  return g.W <= kLanes && (g.P == 3 || g.P == 5) && (g.R == 1 || g.R == 3 || g.R == 5);
}

template <typename T>
cudaError_t ncc_max_forward(const NccGeometry& g, const T* a, const T* b,
                            const double* ma, const double* sa, const double* mb,
                            const double* sb, T* values, int64_t* index,
                            int num_sms, cudaStream_t stream) {
  if (has_fast_max_kernel(g)) {
    const bool shift = shift_enabled();
    // MSPCNN_NCC_MAX_FWD=tiled: the same result from max_tiled_kernel
    // (ncc_max_tiled.cu; float32 with the shift only).
    if constexpr (std::is_same<T, float>::value)
      if (shift && max_tiled_requested())
        return ncc_max_forward_tiled(g, a, b, values, index, num_sms, stream);
    // Output columns per thread: 2 halves the shared-memory loads of b, 1
    // doubles the threads per block (tools/bench_ncc.py compares them with
    // MSPCNN_NCC_COLS_PER_THREAD=1 or 2; docs/perf_notes.md has the numbers).
    const char* env = getenv("MSPCNN_NCC_COLS_PER_THREAD");
    const bool two = env ? env[0] == '2' : kDefaultTwoColumns;
#define MSPCNN_FAST_W(P_, R_, WPT_)                                                            \
  (shift ? launch_fast<T, P_, R_, WPT_, true>(g, a, b, ma, sa, mb, sb, values, index, num_sms, stream) \
         : launch_fast<T, P_, R_, WPT_, false>(g, a, b, ma, sa, mb, sb, values, index, num_sms, stream))
#define MSPCNN_FAST(P_, R_) \
  if (g.P == P_ && g.R == R_) return two ? MSPCNN_FAST_W(P_, R_, 2) : MSPCNN_FAST_W(P_, R_, 1);
    MSPCNN_FAST(3, 1) MSPCNN_FAST(3, 3) MSPCNN_FAST(3, 5)
    MSPCNN_FAST(5, 1) MSPCNN_FAST(5, 3) MSPCNN_FAST(5, 5)
#undef MSPCNN_FAST
#undef MSPCNN_FAST_W
  }
  const size_t smem = size_t(generic_smem_elems(g)) * sizeof(T);
  if (shift_enabled())
    max_generic_kernel<T, true><<<unsigned(g.planes() * g.H), 64, smem, stream>>>(
        g, a, b, ma, sa, mb, sb, values, index);
  else
    max_generic_kernel<T, false><<<unsigned(g.planes() * g.H), 64, smem, stream>>>(
        g, a, b, ma, sa, mb, sb, values, index);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ncc_volume_forward(const NccGeometry& g, const T* a, const T* b,
                               const double* ma, const double* sa,
                               const double* mb, const double* sb, T* volume,
                               cudaStream_t stream) {
  // The tiled kernel when asked for (not yet run on a GPU: opt-in until it has
  // been, against volume_kernel bit for bit) and its shared memory fits 48 KB.
  const size_t tiled = size_t(volume_tiled_smem_elems(g)) * sizeof(T);
  if (volume_tiled_enabled() && g.W <= 64 && tiled <= 48 * 1024) {
    volume_tiled_kernel<T><<<unsigned(g.planes() * g.H), kThreads, tiled, stream>>>(
        g, a, b, ma, sa, mb, sb, volume);
    return cudaGetLastError();
  }
  const size_t smem = size_t(generic_smem_elems(g)) * sizeof(T);
  volume_kernel<T><<<unsigned(g.planes() * g.H), kThreads, smem, stream>>>(
      g, a, b, ma, sa, mb, sb, volume);
  return cudaGetLastError();
}

#define MSPCNN_INSTANTIATE(T) \
  template cudaError_t patch_stats<T>(const NccGeometry&, const T*, const T*, double*, \
                                      double*, double*, double*, cudaStream_t); \
  template cudaError_t ncc_max_forward<T>(const NccGeometry&, const T*, const T*,      \
                                          const double*, const double*, const double*, \
                                          const double*, T*, int64_t*, int, cudaStream_t); \
  template cudaError_t ncc_volume_forward<T>(const NccGeometry&, const T*, const T*,   \
                                             const double*, const double*,             \
                                             const double*, const double*, T*,         \
                                             cudaStream_t);
MSPCNN_INSTANTIATE(float)
MSPCNN_INSTANTIATE(double)
#undef MSPCNN_INSTANTIATE

}  // namespace cuda
}  // namespace mspcnn
