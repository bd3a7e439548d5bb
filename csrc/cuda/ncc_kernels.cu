// CUDA kernels of the wide-search NCC operators (docs/ncc_layer.md, "CUDA
// kernels"). This file includes only CUDA headers and ncc_kernels.h: raw
// pointers, kernels templated on the scalar type, an explicit stream. The
// launcher ncc_cuda.cpp checks the tensors and calls the host functions at the
// end of this file.
//
// Kernels:
//   stats_kernel           patch mean / std of every centre (two passes, double)
//   max_fast_kernel<P, R>  ncc_max forward, register-blocked decomposition
//   max_generic_kernel     ncc_max forward for any P, R (direct sums)
//   volume_kernel          ncc_volume forward (direct sums, coalesced stores)
//   max_coef_kernel        ncc_max backward: per-output gradient coefficients
//   max_grad_a_kernel      ... gradient of a, gathered (deterministic)
//   max_grad_b_atomic      ... gradient of b, scattered with atomicAdd
//   max_grad_b_gather      ... gradient of b, gathered (deterministic)
//   volume_centre_a/b      ncc_volume backward: per-centre sums
//   volume_grad_tiled      ... gradients, one block per row, shared memory
//   volume_grad_a/b        ... gradients, gathered (planes too wide for the
//                          tiled kernel's shared memory); both deterministic
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>

#include "../ncc_grad_coef.h"
#include "ncc_kernels.h"

namespace mspcnn {
namespace cuda {
namespace {

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
// Shared memory: the rows of a and b the tile needs (zero padded), and the
// normalisation factors ka, n ma ka (per output) and kb, mb kb (per centre),
// computed from those rows (no separate statistics pass).
constexpr int kLanes = 32;
constexpr bool kDefaultTwoColumns = false;  // measured: docs/perf_notes.md

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

template <typename T, int P, int R, int WPT>
__global__ void __launch_bounds__(WPT == 1 ? 1024 : 512)
    max_fast_kernel(NccGeometry g, int tile_rows, int tiles, int wsplit,
                    const T* __restrict__ a, const T* __restrict__ b,
                    T* __restrict__ values, int64_t* __restrict__ index) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int h = P / 2, R2 = R / 2, SW = fast_width<T, P>();
  const int H = int(g.H), W = int(g.W);
  // Block = (plane, row tile, part of the output columns).
  const int part = blockIdx.x % wsplit;
  const int plane = blockIdx.x / wsplit / tiles, tile = blockIdx.x / wsplit % tiles;
  const int r0 = tile * tile_rows;
  const int TR = min(tile_rows, H - r0);
  const T* A = a + int64_t(plane) * H * W;
  const T* B = b + int64_t(plane) * H * W;
  const double nm1 = double(P * P - 1), eps = g.eps;

  T* As = smem;                                  // (TR + P - 1) x SW
  T* Bs = As + (tile_rows + P - 1) * SW;         // (TR + P + R - 2) x SW
  T* kaS = Bs + (tile_rows + P + R - 2) * SW;    // TR x 32
  T* nmakaS = kaS + tile_rows * kLanes;          // TR x 32
  T* kbS = nmakaS + tile_rows * kLanes;          // (TR + R - 1) x 32
  T* mbkbS = kbS + (tile_rows + R - 1) * kLanes;  // (TR + R - 1) x 32

  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  for (int i = tid; i < (TR + P - 1) * SW; i += nthreads) {
    const int row = i / SW, c = i % SW;
    As[i] = pixel(A, H, W, r0 - h + row, c - h);
  }
  for (int i = tid; i < (TR + P + R - 2) * SW; i += nthreads) {
    const int row = i / SW, c = i % SW;
    Bs[i] = pixel(B, H, W, r0 - R2 - h + row, c - h);
  }
  __syncthreads();
  // Patch statistics from the staged rows (two passes over the zero-padded
  // patch): per output the factors ka = 1 / ((n-1) sig_a) and n mu_a ka, per
  // candidate centre kb = 1 / sig_b and mu_b kb. Lanes past W get 0.
  for (int i = tid; i < TR * kLanes + (TR + R - 1) * kLanes; i += nthreads) {
    const bool is_a = i < TR * kLanes;
    const int e = is_a ? i : i - TR * kLanes;
    const int row = e / kLanes, c = e % kLanes;
    T k = 0, m = 0;
    if (c < W) {
      const T* x = (is_a ? As : Bs) + row * SW + c;  // top-left of the patch
      T sum = 0;
#pragma unroll
      for (int u = 0; u < P; ++u)
#pragma unroll
        for (int v = 0; v < P; ++v) sum += x[u * SW + v];
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
    }
    if (is_a) {
      kaS[e] = k;
      nmakaS[e] = m;
    } else {
      kbS[e] = k;
      mbkbS[e] = m;
    }
  }
  __syncthreads();

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
template <typename T>
__device__ void stage_row(const NccGeometry& g, int64_t plane, int64_t r,
                          const T* a, const T* b, const double* ma,
                          const double* sa, const double* mb, const double* sb,
                          T* smem) {
  const int64_t H = g.H, W = g.W, P = g.P, h = g.h(), R = g.R, R2 = g.R2();
  const int64_t SW = W + 2 * h, BR = g.b_rows();
  const double nm1 = double(g.n() - 1);
  T* As = smem;
  T* Bs = As + P * SW;
  T* ka = Bs + (R + P - 1) * SW;
  T* nmaka = ka + W;
  T* kb = nmaka + W;
  T* mbkb = kb + R * W;
  const T* A = a + plane * H * W;
  const T* B = b + plane * H * W;
  for (int64_t i = threadIdx.x; i < P * SW; i += blockDim.x)
    As[i] = pixel(A, H, W, r - h + i / SW, i % SW - h);
  for (int64_t i = threadIdx.x; i < (R + P - 1) * SW; i += blockDim.x)
    Bs[i] = pixel(B, H, W, r - R2 - h + i / SW, i % SW - h);
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    const int64_t e = (plane * H + r) * W + w;
    const double k = 1.0 / (nm1 * (sa[e] + g.eps));
    ka[w] = T(k);
    nmaka[w] = T(double(g.n()) * ma[e] * k);
  }
  for (int64_t i = threadIdx.x; i < R * W; i += blockDim.x) {
    const int64_t e = (plane * BR + r + i / W) * W + i % W;  // centre row r - R2 + i / W
    const double k = 1.0 / (sb[e] + g.eps);
    kb[i] = T(k);
    mbkb[i] = T(mb[e] * k);
  }
}

inline int64_t generic_smem_elems(const NccGeometry& g) {
  const int64_t SW = g.W + 2 * g.h();
  return g.P * SW + (g.R + g.P - 1) * SW + 2 * g.W + 2 * g.R * g.W;
}

template <typename T>
__device__ __forceinline__ T candidate(const NccGeometry& g, const T* smem,
                                       int64_t w, int64_t k, int64_t col) {
  const int64_t W = g.W, P = g.P, h = g.h(), R = g.R, SW = W + 2 * h;
  const T* As = smem;
  const T* Bs = As + P * SW;
  const T* ka = Bs + (R + P - 1) * SW;
  const T* nmaka = ka + W;
  const T* kb = nmaka + W;
  const T* mbkb = kb + R * W;
  T x = T(0);
  for (int64_t i = 0; i < P; ++i) {
    const T* ar = As + i * SW + w;
    const T* br = Bs + (k + i) * SW + col;
    for (int64_t j = 0; j < P; ++j) x += ar[j] * br[j];
  }
  return x * (ka[w] * kb[k * W + col]) - nmaka[w] * mbkb[k * W + col];
}

template <typename T>
__global__ void max_generic_kernel(NccGeometry g, const T* __restrict__ a,
                                   const T* __restrict__ b, const double* ma,
                                   const double* sa, const double* mb,
                                   const double* sb, T* values, int64_t* index) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t plane = blockIdx.x / g.H, r = blockIdx.x % g.H;
  stage_row(g, plane, r, a, b, ma, sa, mb, sb, smem);
  __syncthreads();
  const int64_t W = g.W;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    T best = T(0);
    int best_k = INT_MAX;
    for (int64_t k = 0; k < g.R; ++k)
      for (int64_t col = 0; col < W; ++col) {
        const T v = candidate(g, smem, w, k, col);
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

template <typename T>
__global__ void volume_kernel(NccGeometry g, const T* __restrict__ a,
                              const T* __restrict__ b, const double* ma,
                              const double* sa, const double* mb,
                              const double* sb, T* volume) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t plane = blockIdx.x / g.H, r = blockIdx.x % g.H;
  stage_row(g, plane, r, a, b, ma, sa, mb, sb, smem);
  __syncthreads();
  const int64_t W = g.W, HW = g.H * W, per = g.R * W * W;
  // e -> (k, col, w) with w fastest: consecutive threads store consecutive w.
  for (int64_t e = threadIdx.x; e < per; e += blockDim.x) {
    const int64_t w = e % W, kc = e / W;  // kc = k * W + col
    volume[(plane * g.R * W + kc) * HW + r * W + w] = candidate(g, smem, w, kc / W, kc % W);
  }
}

// ---------------------------------------------------------------------------
// ncc_max backward
// ---------------------------------------------------------------------------
// Fused backward of one plane per block (the default path): both maps (zero
// padded) and both gradient accumulators live in shared memory; each thread
// takes outputs, recomputes the statistics and NCC of its two patches (two
// passes) and adds its contributions to the accumulators with shared-memory
// atomics. One read of a, b, grad and index, one write of each gradient.
// The order of the atomic additions varies between runs, so float results
// can differ in the last bits; under torch.use_deterministic_algorithms(True)
// the gather kernels below are used instead. kP != 0 fixes the patch size at
// compile time (unrolled loops).
template <typename T, int kP>
__global__ void __launch_bounds__(256)
    max_backward_fused(NccGeometry g, const T* __restrict__ grad,
                       const T* __restrict__ a, const T* __restrict__ b,
                       const int64_t* __restrict__ index, T* __restrict__ grad_a,
                       T* __restrict__ grad_b) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int H = int(g.H), W = int(g.W), R2 = int(g.R2());
  const int P = kP ? kP : int(g.P), h = P / 2;
  const int HW = H * W, Wp = W + 2 * h, rows_a = H + 2 * h, rows_b = H + 2 * R2 + 2 * h;
  const int64_t plane = blockIdx.x;
  T* Ap = smem;
  T* Bp = Ap + rows_a * Wp;
  T* GA = Bp + rows_b * Wp;
  T* GB = GA + rows_a * Wp;
  const T* A = a + plane * HW;
  const T* B = b + plane * HW;
  for (int i = threadIdx.x; i < rows_a * Wp; i += blockDim.x) {
    Ap[i] = pixel(A, H, W, i / Wp - h, i % Wp - h);
    GA[i] = T(0);
  }
  for (int i = threadIdx.x; i < rows_b * Wp; i += blockDim.x) {
    Bp[i] = pixel(B, H, W, i / Wp - R2 - h, i % Wp - h);
    GB[i] = T(0);
  }
  __syncthreads();
  const T n = T(P * P), nm1 = T(P * P - 1), eps = T(g.eps);
  for (int e = threadIdx.x; e < HW; e += blockDim.x) {
    const T gv = grad[plane * HW + e];
    if (gv == T(0)) continue;
    const int r = e / W, w = e % W;
    const int idx = int(index[plane * HW + e]);
    const int qr = r + idx / W - R2, qc = idx % W;
    const T* x = Ap + r * Wp + w;           // top-left of the patch of a
    const T* y = Bp + (qr + R2) * Wp + qc;  // top-left of the patch of b
    T sx = 0, sy = 0;
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int j = 0; j < P; ++j) {
        sx += x[i * Wp + j];
        sy += y[i * Wp + j];
      }
    const T mua = sx / n, mub = sy / n;
    T sxx = 0, syy = 0, sxy = 0;
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const T dx = x[i * Wp + j] - mua, dy = y[i * Wp + j] - mub;
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
      }
    const T s_a = sqrt(sxx / nm1), s_b = sqrt(syy / nm1);
    const NccGradCoef<T> k = ncc_grad_coef(gv, sxy, mua, s_a, mub, s_b, nm1, eps);
    T* gx = GA + r * Wp + w;
    T* gy = GB + (qr + R2) * Wp + qc;
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const T xv = x[i * Wp + j], yv = y[i * Wp + j];
        atomicAdd(gx + i * Wp + j, k.al_a * yv + k.be_a * xv + k.c_a);
        atomicAdd(gy + i * Wp + j, k.al_b * xv + k.be_b * yv + k.c_b);
      }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < HW; e += blockDim.x) {
    const int u = e / W, v = e % W;
    grad_a[plane * HW + e] = GA[(u + h) * Wp + v + h];
    grad_b[plane * HW + e] = GB[(u + R2 + h) * Wp + v + h];
  }
}

inline int64_t fused_backward_smem_bytes(const NccGeometry& g, size_t elem) {
  const int64_t Wp = g.W + 2 * g.h();
  return 2 * ((g.H + 2 * g.h()) + (g.b_rows() + 2 * g.h())) * Wp * int64_t(elem);
}

// Per output p with incoming gradient g and selected centre q, the gradient
// of a at patch element x (partner y) is al_a y + be_a x + c_a, of b at y is
// al_b x + be_b y + c_b (ncc_grad_coef.h, shared with the CPU).
template <typename T>
__global__ void max_coef_kernel(NccGeometry g, const T* __restrict__ grad,
                                const T* __restrict__ a, const T* __restrict__ b,
                                const int64_t* __restrict__ index,
                                const double* ma, const double* sa,
                                const double* mb, const double* sb, T* coef) {
  const int64_t H = g.H, W = g.W, P = g.P, h = g.h(), R2 = g.R2(), BR = g.b_rows();
  const int64_t total = g.planes() * H * W;
  const double nm1 = double(g.n() - 1);
  GRID_STRIDE(e, total) {
    const double gv = double(grad[e]);
    NccGradCoef<double> k = {0, 0, 0, 0, 0, 0};
    if (gv != 0.0) {
      const int64_t w = e % W, r = (e / W) % H, plane = e / (H * W);
      const int64_t idx = index[e];
      const int64_t qr = r + idx / W - R2, qc = idx % W;
      const int64_t eb = (plane * BR + qr + R2) * W + qc;
      const double mua = ma[e], s_a = sa[e], mub = mb[eb], s_b = sb[eb];
      const T* A = a + plane * H * W;
      const T* B = b + plane * H * W;
      double cov = 0.0;
      for (int64_t i = -h; i <= h; ++i)
        for (int64_t j = -h; j <= h; ++j)
          cov += (double(pixel(A, H, W, r + i, w + j)) - mua) *
                 (double(pixel(B, H, W, qr + i, qc + j)) - mub);
      k = ncc_grad_coef(gv, cov, mua, s_a, mub, s_b, nm1, g.eps);
    }
    coef[0 * total + e] = T(k.al_a);
    coef[1 * total + e] = T(k.be_a);
    coef[2 * total + e] = T(k.c_a);
    coef[3 * total + e] = T(k.al_b);
    coef[4 * total + e] = T(k.be_b);
    coef[5 * total + e] = T(k.c_b);
  }
  (void)P;
}

// Gradient of a at pixel u: a sum over the P x P outputs whose patch covers u.
template <typename T>
__global__ void max_grad_a_kernel(NccGeometry g, const T* __restrict__ a,
                                  const T* __restrict__ b,
                                  const int64_t* __restrict__ index,
                                  const T* __restrict__ coef, T* grad_a) {
  const int64_t H = g.H, W = g.W, h = g.h(), R2 = g.R2();
  const int64_t total = g.planes() * H * W;
  GRID_STRIDE(e, total) {
    const int64_t v = e % W, u = (e / W) % H, plane = e / (H * W);
    const T* B = b + plane * H * W;
    const double x = double(a[e]);
    double acc = 0.0;
    for (int64_t i = -h; i <= h; ++i) {
      const int64_t pr = u - i;
      if (pr < 0 || pr >= H) continue;
      for (int64_t j = -h; j <= h; ++j) {
        const int64_t pw = v - j;
        if (pw < 0 || pw >= W) continue;
        const int64_t p = (plane * H + pr) * W + pw;
        const int64_t idx = index[p];
        const int64_t qr = pr + idx / W - R2, qc = idx % W;
        const double y = double(pixel(B, H, W, qr + i, qc + j));
        acc += double(coef[p]) * y + double(coef[total + p]) * x + double(coef[2 * total + p]);
      }
    }
    grad_a[e] = T(acc);
  }
}

// Gradient of b, scattered: each output adds to the P x P pixels of its
// selected patch (atomicAdd: the order of the additions, and so the last
// bits of float results, can differ between runs).
template <typename T>
__global__ void max_grad_b_atomic(NccGeometry g, const T* __restrict__ a,
                                  const T* __restrict__ b,
                                  const int64_t* __restrict__ index,
                                  const T* __restrict__ coef, T* grad_b) {
  const int64_t H = g.H, W = g.W, h = g.h(), R2 = g.R2();
  const int64_t total = g.planes() * H * W;
  GRID_STRIDE(p, total) {
    const T al = coef[3 * total + p], be = coef[4 * total + p], c = coef[5 * total + p];
    if (al == T(0) && be == T(0) && c == T(0)) continue;
    const int64_t pw = p % W, pr = (p / W) % H, plane = p / (H * W);
    const int64_t idx = index[p];
    const int64_t qr = pr + idx / W - R2, qc = idx % W;
    const T* A = a + plane * H * W;
    const T* B = b + plane * H * W;
    T* G = grad_b + plane * H * W;
    for (int64_t i = -h; i <= h; ++i) {
      const int64_t vr = qr + i;
      if (vr < 0 || vr >= H) continue;
      for (int64_t j = -h; j <= h; ++j) {
        const int64_t vc = qc + j;
        if (vc < 0 || vc >= W) continue;
        const T x = pixel(A, H, W, pr + i, pw + j);
        atomicAdd(G + vr * W + vc, al * x + be * load(B + vr * W + vc) + c);
      }
    }
  }
}

// Gradient of b, gathered: pixel v looks at every output whose candidate rows
// can reach it and adds the contributions of those that selected a patch
// covering v, in a fixed order (deterministic).
template <typename T>
__global__ void max_grad_b_gather(NccGeometry g, const T* __restrict__ a,
                                  const T* __restrict__ b,
                                  const int64_t* __restrict__ index,
                                  const T* __restrict__ coef, T* grad_b) {
  const int64_t H = g.H, W = g.W, h = g.h(), R2 = g.R2();
  const int64_t total = g.planes() * H * W;
  GRID_STRIDE(e, total) {
    const int64_t vc = e % W, vr = (e / W) % H, plane = e / (H * W);
    const T* A = a + plane * H * W;
    const double y = double(b[e]);
    double acc = 0.0;
    const int64_t r_lo = vr - h - R2 < 0 ? 0 : vr - h - R2;
    const int64_t r_hi = vr + h + R2 >= H ? H - 1 : vr + h + R2;
    for (int64_t pr = r_lo; pr <= r_hi; ++pr)
      for (int64_t pw = 0; pw < W; ++pw) {
        const int64_t p = (plane * H + pr) * W + pw;
        const int64_t idx = index[p];
        const int64_t qr = pr + idx / W - R2, qc = idx % W;
        const int64_t i = vr - qr, j = vc - qc;
        if (i < -h || i > h || j < -h || j > h) continue;
        const double x = double(pixel(A, H, W, pr + i, pw + j));
        acc += double(coef[3 * total + p]) * x + double(coef[4 * total + p]) * y +
               double(coef[5 * total + p]);
      }
    grad_b[e] = T(acc);
  }
}

// ---------------------------------------------------------------------------
// ncc_volume backward (deterministic gathers)
// ---------------------------------------------------------------------------
// With G1(p, k, col) = g ka(p) kb(q), q = (r + k - R2, col):
//   grad_a(u) = sum_{p covers u} sum_{k,col} G1 b(u + q - p)
//               - box(T3a) - a(u) box(Ha) + box(Ha ma)
//   grad_b(v) = sum_{q covers v} sum_{p -> q} G1 a(p + v - q)
//               - box(T3b) - b(v) box(Hb) + box(Hb mb)
// work holds: ka (planes*H*W), T3a, Ha, then kb (planes*BR*W), T3b, Hb.
template <typename T>
__global__ void volume_centre_a(NccGeometry g, const T* __restrict__ grad,
                                const T* __restrict__ volume, const double* ma,
                                const double* sa, const double* mb,
                                const double* sb, double* work) {
  const int64_t H = g.H, W = g.W, R = g.R, R2 = g.R2(), BR = g.b_rows(), HW = H * W;
  const int64_t total = g.planes() * HW;
  const double nm1 = double(g.n() - 1);
  double* ka = work;
  double* t3a = ka + total;
  double* Ha = t3a + total;
  GRID_STRIDE(e, total) {
    const int64_t w = e % W, r = (e / W) % H, plane = e / HW;
    const double k_a = 1.0 / (nm1 * (sa[e] + g.eps));
    double gn = 0.0, t3 = 0.0;
    for (int64_t k = 0; k < R; ++k)
      for (int64_t col = 0; col < W; ++col) {
        const int64_t o = ((plane * R + k) * W + col) * HW + r * W + w;
        const double gv = double(grad[o]);
        const int64_t eb = (plane * BR + r + k) * W + col;  // centre row r + k - R2
        gn += gv * double(volume[o]);
        t3 += gv * k_a / (sb[eb] + g.eps) * mb[eb];
      }
    ka[e] = k_a;
    t3a[e] = t3;
    Ha[e] = sa[e] > 0.0 ? gn * k_a / sa[e] : 0.0;
  }
  (void)R2;
}

template <typename T>
__global__ void volume_centre_b(NccGeometry g, const T* __restrict__ grad,
                                const T* __restrict__ volume, const double* ma,
                                const double* sa, const double* mb,
                                const double* sb, double* work) {
  const int64_t H = g.H, W = g.W, R = g.R, R2 = g.R2(), BR = g.b_rows(), HW = H * W;
  const int64_t total_a = g.planes() * HW, total = g.planes() * BR * W;
  const double nm1 = double(g.n() - 1);
  double* kb = work + 3 * total_a;
  double* t3b = kb + total;
  double* Hb = t3b + total;
  GRID_STRIDE(e, total) {
    const int64_t col = e % W, qe = (e / W) % BR, plane = e / (BR * W);
    const int64_t qr = qe - R2;
    const double k_b = 1.0 / (sb[e] + g.eps);
    double gn = 0.0, t3 = 0.0;
    for (int64_t k = 0; k < R; ++k) {
      const int64_t r = qr - (k - R2);
      if (r < 0 || r >= H) continue;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t o = ((plane * R + k) * W + col) * HW + r * W + w;
        const int64_t ea = (plane * H + r) * W + w;
        const double gv = double(grad[o]);
        gn += gv * double(volume[o]);
        t3 += gv * k_b / (nm1 * (sa[ea] + g.eps)) * ma[ea];
      }
    }
    kb[e] = k_b;
    t3b[e] = t3;
    Hb[e] = sb[e] > 0.0 ? gn * k_b / (sb[e] * nm1) : 0.0;
  }
}

template <typename T>
__global__ void volume_grad_a(NccGeometry g, const T* __restrict__ grad,
                              const T* __restrict__ a, const T* __restrict__ b,
                              const double* ma, const double* work, T* grad_a) {
  const int64_t H = g.H, W = g.W, R = g.R, R2 = g.R2(), h = g.h(), BR = g.b_rows();
  const int64_t HW = H * W, total = g.planes() * HW;
  const double* ka = work;
  const double* t3a = ka + total;
  const double* Ha = t3a + total;
  const double* kb = work + 3 * total;
  GRID_STRIDE(e, total) {
    const int64_t v = e % W, u = (e / W) % H, plane = e / HW;
    const T* B = b + plane * HW;
    double t1 = 0.0, box_t3 = 0.0, box_h = 0.0, box_hm = 0.0;
    for (int64_t i = -h; i <= h; ++i) {
      const int64_t pr = u - i;
      if (pr < 0 || pr >= H) continue;
      for (int64_t j = -h; j <= h; ++j) {
        const int64_t pw = v - j;
        if (pw < 0 || pw >= W) continue;
        const int64_t p = (plane * H + pr) * W + pw;
        box_t3 += t3a[p];
        box_h += Ha[p];
        box_hm += Ha[p] * ma[p];
        const double k_a = ka[p];
        for (int64_t k = 0; k < R; ++k) {
          const int64_t br = u + k - R2;  // row of b matching pixel u
          if (br < 0 || br >= H) continue;
          const double* kbr = kb + (plane * BR + pr + k) * W;
          const T* grow = grad + ((plane * R + k) * W) * HW + pr * W + pw;
          for (int64_t col = 0; col < W; ++col) {
            const int64_t bc = col + j;
            if (bc < 0 || bc >= W) continue;
            t1 += double(grow[col * HW]) * k_a * kbr[col] * double(load(B + br * W + bc));
          }
        }
      }
    }
    grad_a[e] = T(t1 - box_t3 - double(a[e]) * box_h + box_hm);
  }
}

template <typename T>
__global__ void volume_grad_b(NccGeometry g, const T* __restrict__ grad,
                              const T* __restrict__ a, const T* __restrict__ b,
                              const double* mb, const double* work, T* grad_b) {
  const int64_t H = g.H, W = g.W, R = g.R, R2 = g.R2(), h = g.h(), BR = g.b_rows();
  const int64_t HW = H * W, total_a = g.planes() * HW, total = g.planes() * BR * W;
  const double* ka = work;
  const double* kb = work + 3 * total_a;
  const double* t3b = kb + total;
  const double* Hb = t3b + total;
  GRID_STRIDE(e, total_a) {
    const int64_t vc = e % W, vr = (e / W) % H, plane = e / HW;
    const T* A = a + plane * HW;
    double t1 = 0.0, box_t3 = 0.0, box_h = 0.0, box_hm = 0.0;
    for (int64_t i = -h; i <= h; ++i) {
      const int64_t qr = vr - i;  // centre row of b, may lie outside the map
      if (qr < -R2 || qr >= H + R2) continue;
      for (int64_t j = -h; j <= h; ++j) {
        const int64_t qc = vc - j;
        if (qc < 0 || qc >= W) continue;
        const int64_t q = (plane * BR + qr + R2) * W + qc;
        box_t3 += t3b[q];
        box_h += Hb[q];
        box_hm += Hb[q] * mb[q];
        const double k_b = kb[q];
        for (int64_t k = 0; k < R; ++k) {
          const int64_t pr = qr - (k - R2);
          if (pr < 0 || pr >= H) continue;
          const int64_t ar = pr + i;  // row of a matching pixel v
          if (ar < 0 || ar >= H) continue;
          const T* grow = grad + ((plane * R + k) * W + qc) * HW + pr * W;
          const double* kar = ka + (plane * H + pr) * W;
          for (int64_t pw = 0; pw < W; ++pw) {
            const int64_t ac = pw + j;
            if (ac < 0 || ac >= W) continue;
            t1 += double(grow[pw]) * kar[pw] * k_b * double(load(A + ar * W + ac));
          }
        }
      }
    }
    grad_b[e] = T(t1 - box_t3 - double(b[e]) * box_h + box_hm);
  }
}

// ncc_volume backward, tiled: one block per (plane, row u) of the gradient it
// writes, with the correlation of docs/ncc_layer.md ("Backward of the volume")
// done in shared memory. With G1 = g ka kb,
//   grad_a: T1a(u, v) = sum_k sum_j sum_c b(u + k - R2, c + j) V_k(v - j, c),
//           V_k(w, c)  = sum_i G1(output (u - i, w); candidate (k, c))
//   grad_b: T1b(u, v) = sum_k sum_j sum_c a(u - k + R2, c + j) V_k(v - j, c),
//           V_k(q, c)  = sum_i G1(output (u - i - k + R2, c); candidate (k, q))
// P multiply-adds per (k, candidate column, output column) build V, then P W
// per output and k, where the gathers above take P^2 R W per output; the box
// terms are those of the gathers. V, the padded rows of the other map and the
// per-k partial sums live in shared memory (volume_tiled_smem_bytes).
template <typename T, bool kGradB>
__global__ void volume_grad_tiled(NccGeometry g, const T* __restrict__ grad,
                                  const T* __restrict__ a, const T* __restrict__ b,
                                  const double* __restrict__ m,
                                  const double* __restrict__ work, T* __restrict__ out) {
  extern __shared__ double vsm[];
  const int H = int(g.H), W = int(g.W), R = int(g.R), R2 = int(g.R2()), h = int(g.h());
  const int BR = int(g.b_rows()), Wp = W + 2 * h;
  const int64_t HW = int64_t(H) * W, total_a = g.planes() * HW, total_b = g.planes() * BR * W;
  const int64_t plane = blockIdx.x / H;
  const int u = int(blockIdx.x % H);
  double* V = vsm;              // R x W x W, [k][c][w] with w the output column
  double* row = V + R * W * W;  // R x Wp, zero-padded rows of the other map
  double* part = row + R * Wp;  // R x W partial sums
  const double* ka = work;
  const double* kb = work + 3 * total_a;
  const T* G = grad + plane * R * W * HW;
  for (int idx = threadIdx.x; idx < R * W * W; idx += blockDim.x) {
    // c: the column of the candidate centre; x: the output column (fastest,
    // so that the reads of the gradient volume are coalesced)
    const int k = idx / (W * W), c = (idx / W) % W, x = idx % W;
    double s = 0.0;
    for (int i = -h; i <= h; ++i) {
      const int pr = kGradB ? u - i - k + R2 : u - i;  // output row
      if (pr < 0 || pr >= H) continue;
      const int qe = kGradB ? u - i + R2 : pr + k;  // candidate centre row + R2
      s += double(G[(int64_t(k) * W + c) * HW + int64_t(pr) * W + x]) *
           ka[(plane * H + pr) * W + x] * kb[(plane * BR + qe) * W + c];
    }
    V[kGradB ? (k * W + x) * W + c : (k * W + c) * W + x] = s;
  }
  const T* other = (kGradB ? a : b) + plane * HW;
  for (int idx = threadIdx.x; idx < R * Wp; idx += blockDim.x) {
    const int k = idx / Wp, c = idx % Wp - h;
    const int r = kGradB ? u - k + R2 : u + k - R2;
    row[idx] = (r >= 0 && r < H && c >= 0 && c < W) ? double(other[r * W + c]) : 0.0;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * W; idx += blockDim.x) {
    const int k = idx / W, v = idx % W;
    const double* Vk = V + k * W * W;
    double s = 0.0;
    for (int j = -h; j <= h; ++j) {
      const int w = v - j;
      if (w < 0 || w >= W) continue;
      const double* rk = row + k * Wp + j + h;
      for (int c = 0; c < W; ++c) s += rk[c] * Vk[c * W + w];
    }
    part[idx] = s;
  }
  __syncthreads();
  const double* t3 = kGradB ? kb + total_b : ka + total_a;
  const double* Hx = kGradB ? kb + 2 * total_b : ka + 2 * total_a;
  for (int v = threadIdx.x; v < W; v += blockDim.x) {
    double t1 = 0.0, box_t3 = 0.0, box_h = 0.0, box_hm = 0.0;
    for (int k = 0; k < R; ++k) t1 += part[k * W + v];
    for (int i = -h; i <= h; ++i) {
      const int r = u - i;  // grad_a: output row; grad_b: candidate centre row
      if (kGradB ? (r < -R2 || r >= H + R2) : (r < 0 || r >= H)) continue;
      for (int j = -h; j <= h; ++j) {
        const int c = v - j;
        if (c < 0 || c >= W) continue;
        const int64_t p = kGradB ? (plane * BR + r + R2) * W + c : (plane * H + r) * W + c;
        box_t3 += t3[p];
        box_h += Hx[p];
        box_hm += Hx[p] * m[p];
      }
    }
    const int64_t e = (plane * H + u) * W + v;
    out[e] = T(t1 - box_t3 - double(kGradB ? b[e] : a[e]) * box_h + box_hm);
  }
}

inline int64_t volume_tiled_smem_bytes(const NccGeometry& g) {
  return (g.R * g.W * g.W + g.R * (g.W + 2 * g.h()) + g.R * g.W) * int64_t(sizeof(double));
}

template <typename T, int P, int R, int WPT>
cudaError_t launch_fast(const NccGeometry& g, const T* a, const T* b,
                        const double* ma, const double* sa, const double* mb,
                        const double* sb, T* values, int64_t* index, int num_sms,
                        cudaStream_t stream) {
  // Enough blocks to fill the GPU twice over, and shared memory <= 48 KB.
  int tiles = int((2 * int64_t(num_sms) + g.planes() - 1) / g.planes());
  if (tiles < 1) tiles = 1;
  if (tiles > g.H) tiles = int(g.H);
  int tile_rows = int((g.H + tiles - 1) / tiles);
  while (tile_rows > 1 && fast_smem_elems<T, P, R>(tile_rows) * int64_t(sizeof(T)) > 48 * 1024)
    tile_rows = (tile_rows + 1) / 2;
  tiles = int((g.H + tile_rows - 1) / tile_rows);
  const size_t smem = size_t(fast_smem_elems<T, P, R>(tile_rows)) * sizeof(T);
  // MSPCNN_NCC_WSPLIT=2 splits the output columns of a tile over two blocks
  // of half the size (a tuning knob for tools/bench_ncc.py; 1 by default).
  const char* env = getenv("MSPCNN_NCC_WSPLIT");
  const int wsplit = (env && env[0] == '2') ? 2 : 1;
  if (wsplit > 1)
    cudaFuncSetAttribute(max_fast_kernel<T, P, R, WPT>,
                         cudaFuncAttributePreferredSharedMemoryCarveout,
                         cudaSharedmemCarveoutMaxShared);
  const dim3 block(kLanes, unsigned((g.W + WPT * wsplit - 1) / (WPT * wsplit)));
  const int64_t grid = g.planes() * tiles * wsplit;
  max_fast_kernel<T, P, R, WPT><<<unsigned(grid), block, smem, stream>>>(
      g, tile_rows, tiles, wsplit, a, b, values, index);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Host entry points
// ---------------------------------------------------------------------------
template <typename T>
cudaError_t patch_stats(const NccGeometry& g, const T* a, const T* b, double* ma,
                        double* sa, double* mb, double* sb, cudaStream_t stream) {
  stats_kernel<T><<<unsigned(g.planes()), kThreads, 0, stream>>>(g, a, b, ma, sa, mb, sb);
  return cudaGetLastError();
}

bool max_backward_needs_stats(const NccGeometry& g, size_t elem_size, bool deterministic) {
  int device = 0, smem_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return deterministic || fused_backward_smem_bytes(g, elem_size) > smem_optin;
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
    // Output columns per thread: 2 halves the shared-memory loads of b, 1
    // doubles the threads per block (tools/bench_ncc.py compares them with
    // MSPCNN_NCC_COLS_PER_THREAD=1 or 2; docs/perf_notes.md has the numbers).
    const char* env = getenv("MSPCNN_NCC_COLS_PER_THREAD");
    const bool two = env ? env[0] == '2' : kDefaultTwoColumns;
#define MSPCNN_FAST(P_, R_)                                                                   \
  if (g.P == P_ && g.R == R_)                                                                 \
    return two ? launch_fast<T, P_, R_, 2>(g, a, b, ma, sa, mb, sb, values, index, num_sms, stream) \
               : launch_fast<T, P_, R_, 1>(g, a, b, ma, sa, mb, sb, values, index, num_sms, stream);
    MSPCNN_FAST(3, 1) MSPCNN_FAST(3, 3) MSPCNN_FAST(3, 5)
    MSPCNN_FAST(5, 1) MSPCNN_FAST(5, 3) MSPCNN_FAST(5, 5)
#undef MSPCNN_FAST
  }
  const size_t smem = size_t(generic_smem_elems(g)) * sizeof(T);
  max_generic_kernel<T><<<unsigned(g.planes() * g.H), 64, smem, stream>>>(
      g, a, b, ma, sa, mb, sb, values, index);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ncc_volume_forward(const NccGeometry& g, const T* a, const T* b,
                               const double* ma, const double* sa,
                               const double* mb, const double* sb, T* volume,
                               cudaStream_t stream) {
  const size_t smem = size_t(generic_smem_elems(g)) * sizeof(T);
  volume_kernel<T><<<unsigned(g.planes() * g.H), kThreads, smem, stream>>>(
      g, a, b, ma, sa, mb, sb, volume);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ncc_max_backward(const NccGeometry& g, const T* grad, const T* a,
                             const T* b, const int64_t* index, const double* ma,
                             const double* sa, const double* mb,
                             const double* sb, T* coef, T* grad_a, T* grad_b,
                             bool deterministic, cudaStream_t stream) {
  const int64_t total = g.planes() * g.H * g.W;
  const int64_t fused_smem = fused_backward_smem_bytes(g, sizeof(T));
  int device = 0, smem_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (!deterministic && fused_smem <= smem_optin) {
    auto launch = [&](auto kernel) {
      if (fused_smem > 48 * 1024) {
        const cudaError_t err = cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(fused_smem));
        if (err != cudaSuccess) return err;
      }
      kernel<<<unsigned(g.planes()), kThreads, size_t(fused_smem), stream>>>(
          g, grad, a, b, index, grad_a, grad_b);
      return cudaGetLastError();
    };
    if (g.P == 3) return launch(max_backward_fused<T, 3>);
    if (g.P == 5) return launch(max_backward_fused<T, 5>);
    return launch(max_backward_fused<T, 0>);
  }
  const int blocks = blocks_for(total);
  max_coef_kernel<T><<<blocks, kThreads, 0, stream>>>(g, grad, a, b, index, ma, sa, mb, sb, coef);
  max_grad_a_kernel<T><<<blocks, kThreads, 0, stream>>>(g, a, b, index, coef, grad_a);
  if (deterministic) {
    max_grad_b_gather<T><<<blocks, kThreads, 0, stream>>>(g, a, b, index, coef, grad_b);
  } else {
    cudaError_t err = cudaMemsetAsync(grad_b, 0, size_t(total) * sizeof(T), stream);
    if (err != cudaSuccess) return err;
    max_grad_b_atomic<T><<<blocks, kThreads, 0, stream>>>(g, a, b, index, coef, grad_b);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t ncc_volume_backward(const NccGeometry& g, const T* grad,
                                const T* a, const T* b, const T* volume,
                                const double* ma, const double* sa,
                                const double* mb, const double* sb,
                                double* work, T* grad_a, T* grad_b,
                                cudaStream_t stream) {
  const int64_t total_a = g.planes() * g.H * g.W, total_b = g.planes() * g.b_rows() * g.W;
  volume_centre_a<T><<<blocks_for(total_a), kThreads, 0, stream>>>(g, grad, volume, ma, sa, mb, sb, work);
  volume_centre_b<T><<<blocks_for(total_b), kThreads, 0, stream>>>(g, grad, volume, ma, sa, mb, sb, work);
  // The tiled kernels when their shared memory fits in 48 KB (at the pool1
  // shape, W = 28, R = 5: 34 KB); MSPCNN_NCC_VOLUME_BWD=gather forces the
  // direct gathers (for comparisons).
  const char* env = getenv("MSPCNN_NCC_VOLUME_BWD");
  const bool gather = env != nullptr && env[0] == 'g';
  const int64_t smem = volume_tiled_smem_bytes(g);
  if (!gather && smem <= 48 * 1024 && g.planes() * g.H < INT_MAX) {
    int threads = int((g.R * g.W + 31) / 32 * 32);
    threads = threads < 64 ? 64 : (threads > 256 ? 256 : threads);
    const unsigned blocks = unsigned(g.planes() * g.H);
    volume_grad_tiled<T, false><<<blocks, threads, smem, stream>>>(g, grad, a, b, ma, work, grad_a);
    volume_grad_tiled<T, true><<<blocks, threads, smem, stream>>>(g, grad, a, b, mb, work, grad_b);
  } else {
    volume_grad_a<T><<<blocks_for(total_a), kThreads, 0, stream>>>(g, grad, a, b, ma, work, grad_a);
    volume_grad_b<T><<<blocks_for(total_a), kThreads, 0, stream>>>(g, grad, a, b, mb, work, grad_b);
  }
  return cudaGetLastError();
}

#define MSPCNN_INSTANTIATE(T)                                                          \
  template cudaError_t patch_stats<T>(const NccGeometry&, const T*, const T*, double*, \
                                      double*, double*, double*, cudaStream_t);        \
  template cudaError_t ncc_max_forward<T>(const NccGeometry&, const T*, const T*,      \
                                          const double*, const double*, const double*, \
                                          const double*, T*, int64_t*, int, cudaStream_t); \
  template cudaError_t ncc_volume_forward<T>(const NccGeometry&, const T*, const T*,   \
                                             const double*, const double*,             \
                                             const double*, const double*, T*,         \
                                             cudaStream_t);                            \
  template cudaError_t ncc_max_backward<T>(const NccGeometry&, const T*, const T*,     \
                                           const T*, const int64_t*, const double*,    \
                                           const double*, const double*,               \
                                           const double*, T*, T*, T*, bool,            \
                                           cudaStream_t);                              \
  template cudaError_t ncc_volume_backward<T>(const NccGeometry&, const T*, const T*,  \
                                              const T*, const T*, const double*,       \
                                              const double*, const double*,            \
                                              const double*, double*, T*, T*,          \
                                              cudaStream_t);
MSPCNN_INSTANTIATE(float)
MSPCNN_INSTANTIATE(double)
#undef MSPCNN_INSTANTIATE

}  // namespace cuda
}  // namespace mspcnn
