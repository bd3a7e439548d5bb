// CUDA kernels of the ncc_volume backward pass (docs/ncc_layer.md, "Backward
// of the volume"). CUDA headers only; see ncc_forward.cu for the conventions.
// Every kernel here is deterministic (no atomics).
//
// Kernels:
//   volume_centre_a/b      per-centre sums
//   volume_centre_fused    the same sums from one read of the gradient volume
//   volume_centre_b_sum    (MSPCNN_NCC_VOLUME_CENTRE=fused; not yet run on a GPU)
//   volume_grad_tiled      gradients, one block per row, shared memory
//   volume_grad_a/b        gradients, gathered (planes too wide for the tiled
//                          kernel's shared memory, or MSPCNN_NCC_VOLUME_BWD=gather)
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>

#include "ncc_device.cuh"
#include "ncc_kernels.h"

namespace mspcnn {
namespace cuda {
namespace {

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

// The per-centre sums of volume_centre_a and volume_centre_b from one read of
// the gradient volume and the volume, instead of one read each
// (MSPCNN_NCC_VOLUME_CENTRE=fused, W <= 32; written 2026-12-01 without a GPU,
// not yet run). Block = (plane, output row r), kCentreWarps warps; lane = the
// output column w; warp y takes the candidates kc = k W + col = y, y +
// kCentreWarps, ... For each, a lane adds its output's two terms (those of
// volume_centre_a: G V and G ka kb mu_b) and the warp sums the candidate's two
// terms over the row's outputs (those of volume_centre_b: G V and G ka kb
// mu_a) into part[(plane, r, kc)]; volume_centre_b_sum then adds, for each
// candidate centre, the R output rows that compare with it. The factors are
// the same ka = 1 / ((n-1)(s_a + eps)) and kb = 1 / (s_b + eps), multiplied
// where the separate kernels divide, and the sums run in another order: the
// results agree with theirs to rounding (docs/perf_notes.md).
constexpr int kCentreWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kCentreWarps * 32)
    volume_centre_fused(NccGeometry g, const T* __restrict__ grad, const T* __restrict__ volume,
                        const double* __restrict__ ma, const double* __restrict__ sa,
                        const double* __restrict__ mb, const double* __restrict__ sb,
                        double* __restrict__ work, double* __restrict__ part) {
  __shared__ double red[kCentreWarps][2][32];
  const int H = int(g.H), W = int(g.W), R = int(g.R), BR = int(g.b_rows());
  const int64_t HW = int64_t(H) * W, total_a = g.planes() * HW;
  const int64_t plane = blockIdx.x / H;
  const int r = int(blockIdx.x % H);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool on = lane < W;
  const int64_t e = (plane * H + r) * W + (on ? lane : 0);
  const double nm1 = double(g.n() - 1);
  const double k_a = on ? 1.0 / (nm1 * (sa[e] + g.eps)) : 0.0, m_a = on ? ma[e] : 0.0;
  double gn_a = 0.0, t3_a = 0.0;
  for (int kc = warp; kc < R * W; kc += kCentreWarps) {
    const int k = kc / W, col = kc % W;
    const int64_t o = ((plane * R + k) * W + col) * HW + int64_t(r) * W + lane;
    const double gv = on ? double(grad[o]) : 0.0, vv = on ? double(volume[o]) : 0.0;
    const int64_t eb = (plane * BR + r + k) * W + col;  // the candidate centre, row r + k - R2
    const double k_b = 1.0 / (sb[eb] + g.eps);
    const double gk = gv * k_a * k_b;
    double gn = gv * vv, t3 = gk * m_a;
    gn_a += gn;
    t3_a += gk * mb[eb];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      gn += __shfl_down_sync(0xffffffffu, gn, off);
      t3 += __shfl_down_sync(0xffffffffu, t3, off);
    }
    if (lane == 0) {
      double* pp = part + 2 * ((plane * H + r) * R * W + kc);
      pp[0] = gn;
      pp[1] = t3;
    }
  }
  red[warp][0][lane] = gn_a;
  red[warp][1][lane] = t3_a;
  __syncthreads();
  if (warp == 0 && on) {
    double gn = 0.0, t3 = 0.0;
    for (int y = 0; y < kCentreWarps; ++y) {
      gn += red[y][0][lane];
      t3 += red[y][1][lane];
    }
    work[e] = k_a;
    work[total_a + e] = t3;
    work[2 * total_a + e] = sa[e] > 0.0 ? gn * k_a / sa[e] : 0.0;
  }
}

// volume_centre_fused's second step: per candidate centre (row qe - R2, col),
// the sums of the R output rows r = qe - k that compare with it at offset k.
__global__ void volume_centre_b_sum(NccGeometry g, const double* __restrict__ sb,
                                    const double* __restrict__ part, double* __restrict__ work) {
  const int64_t H = g.H, W = g.W, R = g.R, BR = g.b_rows();
  const int64_t total_a = g.planes() * H * W, total = g.planes() * BR * W;
  const double nm1 = double(g.n() - 1);
  double* kb = work + 3 * total_a;
  GRID_STRIDE(e, total) {
    const int64_t col = e % W, qe = (e / W) % BR, plane = e / (BR * W);
    double gn = 0.0, t3 = 0.0;
    for (int64_t k = 0; k < R; ++k) {
      const int64_t r = qe - k;
      if (r < 0 || r >= H) continue;
      const double* pp = part + 2 * ((plane * H + r) * R * W + k * W + col);
      gn += pp[0];
      t3 += pp[1];
    }
    const double k_b = 1.0 / (sb[e] + g.eps);
    kb[e] = k_b;
    kb[total + e] = t3;
    kb[2 * total + e] = sb[e] > 0.0 ? gn * k_b / (sb[e] * nm1) : 0.0;
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
// per-k partial sums live in shared memory (volume_tiled_smem_bytes), and so
// (since 2026-12-01, not yet run on a GPU) do the rows of ka and kb that V's
// loop reads, and V's loop reads the gradient volume kVChunk terms at a time
// before it sums them: the same values in the same order, so the same
// gradients bit for bit.
constexpr int kVChunk = 8;  // terms of V loaded together (volume_grad_tiled)

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
  double* kas = part + R * W;   // rows pa0 .. pa0 + S - 1 of ka, S = P + R - 1
  double* kbs = kas + (2 * h + R) * W;  // rows qb0 .. qb0 + S - 1 of kb (centre row + R2)
  const double* ka = work;
  const double* kb = work + 3 * total_a;
  const T* G = grad + plane * R * W * HW;
  // The factors the loop below reads, staged first (the same doubles: one global
  // read per term instead of three). grad_a reads ka rows u - h .. u + h and kb
  // rows u - h .. u + h + R - 1; grad_b ka rows u - h - R + 1 + R2 .. u + h + R2
  // and kb rows u - h + R2 .. u + h + R2. Rows outside the maps are never read.
  const int S = 2 * h + R;
  const int pa0 = kGradB ? u - h - R + 1 + R2 : u - h, qb0 = kGradB ? u - h + R2 : u - h;
  for (int idx = threadIdx.x; idx < S * W; idx += blockDim.x) {
    const int t = idx / W, x = idx % W, pr = pa0 + t, qe = qb0 + t;
    kas[idx] = (pr >= 0 && pr < H) ? ka[(plane * H + pr) * W + x] : 0.0;
    kbs[idx] = (qe >= 0 && qe < BR) ? kb[(plane * BR + qe) * W + x] : 0.0;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * W * W; idx += blockDim.x) {
    // c: the column of the candidate centre; x: the output column (fastest,
    // so that the reads of the gradient volume are coalesced)
    const int k = idx / (W * W), c = (idx / W) % W, x = idx % W;
    // The terms are read kVChunk at a time: first the values of the gradient
    // volume, from addresses clamped into the plane so that the loads need no
    // branch and are in flight together, then the sum as before (the same
    // expression, term by term: the same doubles, bit for bit). With each load
    // inside the sum, every term waited for its read (Nsight Compute,
    // 2026-11-30: latency-bound, DRAM at 6%).
    double s = 0.0;
    for (int i0 = -h; i0 <= h; i0 += kVChunk) {
      T gv[kVChunk];
#pragma unroll
      for (int t = 0; t < kVChunk; ++t) {
        const int i = min(i0 + t, h);
        const int pr = min(max(kGradB ? u - i - k + R2 : u - i, 0), H - 1);
        gv[t] = G[(int64_t(k) * W + c) * HW + int64_t(pr) * W + x];
      }
#pragma unroll
      for (int t = 0; t < kVChunk; ++t) {
        const int i = i0 + t;
        const int pr = kGradB ? u - i - k + R2 : u - i;  // output row
        if (i > h || pr < 0 || pr >= H) continue;
        const int qe = kGradB ? u - i + R2 : pr + k;  // candidate centre row + R2
        s += double(gv[t]) * kas[(pr - pa0) * W + x] * kbs[(qe - qb0) * W + c];
      }
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

// The workspace of the per-centre sums (ka, T3a, Ha, then kb, T3b, Hb), and the
// fused kernels' partial table after it.
inline int64_t volume_centre_work_elems(const NccGeometry& g) {
  return 3 * g.planes() * g.H * g.W + 3 * g.planes() * g.b_rows() * g.W;
}
inline int64_t volume_centre_part_elems(const NccGeometry& g) {
  return 2 * g.planes() * g.H * g.R * g.W;
}

bool volume_centre_fused_requested(const NccGeometry& g) {
  const char* env = getenv("MSPCNN_NCC_VOLUME_CENTRE");
  return env != nullptr && env[0] == 'f' && g.W <= 32 && g.planes() * g.H < INT_MAX;
}

inline int64_t volume_tiled_smem_bytes(const NccGeometry& g) {
  return (g.R * g.W * g.W + g.R * (g.W + 2 * g.h()) + g.R * g.W + 2 * (2 * g.h() + g.R) * g.W) *
         int64_t(sizeof(double));
}

}  // namespace

// ---------------------------------------------------------------------------
// Host entry points (declared in ncc_kernels.h)
// ---------------------------------------------------------------------------
int64_t volume_backward_work_elems(const NccGeometry& g) {
  return volume_centre_work_elems(g) + (volume_centre_fused_requested(g) ? volume_centre_part_elems(g) : 0);
}

template <typename T>
cudaError_t ncc_volume_backward(const NccGeometry& g, const T* grad,
                                const T* a, const T* b, const T* volume,
                                const double* ma, const double* sa,
                                const double* mb, const double* sb,
                                double* work, int64_t work_elems, T* grad_a, T* grad_b,
                                cudaStream_t stream) {
  const int64_t total_a = g.planes() * g.H * g.W, total_b = g.planes() * g.b_rows() * g.W;
  const int64_t centre = volume_centre_work_elems(g);
  if (volume_centre_fused_requested(g) && work_elems >= centre + volume_centre_part_elems(g)) {
    double* part = work + centre;
    volume_centre_fused<T><<<unsigned(g.planes() * g.H), kCentreWarps * 32, 0, stream>>>(
        g, grad, volume, ma, sa, mb, sb, work, part);
    volume_centre_b_sum<<<blocks_for(total_b), kThreads, 0, stream>>>(g, sb, part, work);
  } else {
    volume_centre_a<T><<<blocks_for(total_a), kThreads, 0, stream>>>(g, grad, volume, ma, sa, mb, sb, work);
    volume_centre_b<T><<<blocks_for(total_b), kThreads, 0, stream>>>(g, grad, volume, ma, sa, mb, sb, work);
  }
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  // The tiled kernels when their shared memory fits in what a block may have
  // (at the pool1 shape, W = 28, R = 5: 38 KB; above 48 KB the kernels opt in
  // to more, up to the device's limit: 227 KB on an H100 / H200);
  // MSPCNN_NCC_VOLUME_BWD=gather forces the direct gathers (for comparisons).
  const char* env = getenv("MSPCNN_NCC_VOLUME_BWD");
  const bool gather = env != nullptr && env[0] == 'g';
  const int64_t smem = volume_tiled_smem_bytes(g);
  int device = 0, optin = 48 * 1024;
  if (smem > 48 * 1024 && cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  bool tiled = !gather && smem <= optin && g.planes() * g.H < INT_MAX;
  if (tiled && smem > 48 * 1024) {
    tiled = cudaFuncSetAttribute(volume_grad_tiled<T, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 int(smem)) == cudaSuccess &&
            cudaFuncSetAttribute(volume_grad_tiled<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 int(smem)) == cudaSuccess;
    if (!tiled) cudaGetLastError();  // a refused opt-in only means the gathers below
  }
  if (tiled) {
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

#define MSPCNN_INSTANTIATE(T) \
  template cudaError_t ncc_volume_backward<T>(const NccGeometry&, const T*, const T*,  \
                                              const T*, const T*, const double*,       \
                                              const double*, const double*,            \
                                              const double*, double*, int64_t, T*, T*, \
                                              cudaStream_t);
MSPCNN_INSTANTIATE(float)
MSPCNN_INSTANTIATE(double)
#undef MSPCNN_INSTANTIATE

}  // namespace cuda
}  // namespace mspcnn
