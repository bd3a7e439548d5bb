// CUDA kernels of the ncc_max backward pass (docs/ncc_layer.md, "Backward of
// the maximum"). CUDA headers only; see ncc_forward.cu for the conventions.
//
// Kernels:
//   max_backward_fused<P>  one plane per block, both gradients in shared memory
//                          (float atomics: the default, not bitwise reproducible)
//   max_backward_rows<P>   one plane per block, a's gradient in registers and
//                          shuffles, b's by atomics (MSPCNN_NCC_MAX_BWD=rows or
//                          rows_global; not yet run on a GPU)
//   max_coef_kernel        per-output gradient coefficients (ncc_grad_coef.h,
//                          shared with the CPU kernel)
//   max_grad_a_kernel      gradient of a, gathered (deterministic)
//   max_grad_b_atomic      gradient of b, scattered with atomicAdd
//   max_grad_b_gather      gradient of b, gathered (deterministic)
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../ncc_grad_coef.h"
#include "ncc_device.cuh"
#include "ncc_kernels.h"

namespace mspcnn {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// ncc_max backward
// ---------------------------------------------------------------------------
// The gradient coefficients of one output from its two patches, staged with
// row pitch Wp (x: top-left of a's, y: of b's): the means, then the standard
// deviations and the covariance from the centred values, as the CPU kernel
// does, then ncc_grad_coef. The loops unroll where P is a compile-time constant.
template <typename T>
__device__ __forceinline__ NccGradCoef<T> patch_grad_coef(const T* x, const T* y, int Wp, int P,
                                                          T gv, T eps) {
  const T n = T(P * P), nm1 = T(P * P - 1);
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
  return ncc_grad_coef(gv, sxy, mua, s_a, mub, s_b, nm1, eps);
}

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
  const T eps = T(g.eps);
  for (int e = threadIdx.x; e < HW; e += blockDim.x) {
    const T gv = grad[plane * HW + e];
    if (gv == T(0)) continue;
    const int r = e / W, w = e % W;
    const int idx = int(index[plane * HW + e]);
    const int qr = r + idx / W - R2, qc = idx % W;
    const T* x = Ap + r * Wp + w;           // top-left of the patch of a
    const T* y = Bp + (qr + R2) * Wp + qc;  // top-left of the patch of b
    const NccGradCoef<T> k = patch_grad_coef(x, y, Wp, P, gv, eps);
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

// ---------------------------------------------------------------------------
// ncc_max backward by output rows (MSPCNN_NCC_MAX_BWD=rows or rows_global;
// P in {3, 5}, W <= 32; written 2026-12-01 without a GPU, opt-in until it has
// been measured; docs/ncc_layer.md, "The max backward by rows").
// ---------------------------------------------------------------------------
// The fused kernel above makes 2 P^2 shared-memory float atomics per output,
// and a float atomicAdd on shared memory is a compare-and-swap loop. Here the
// gradient of a, whose patch sits at the output's own position, takes none:
//   * a warp owns a band of consecutive output rows, its lane w the output
//     column w; it walks down its band row by row;
//   * a lane adds each output's P x P contributions to a into a window of P
//     rows x P columns in registers (padded row r0 + t in slot t mod P: with
//     the row loop unrolled by P every slot index is a compile-time constant);
//   * after output row r the window's padded row r is complete (later outputs
//     cover only rows below it): the P lanes whose patches cover column v hand
//     their values to lane v by shuffles, lane v adds them in a fixed order
//     (j = 0 .. P-1) and stores the row's value; only the P-1 rows at each
//     edge of a band, which the next band's outputs also reach, are added
//     with an atomic (P - 1 of about band + P - 1 rows);
//   * the window is flushed P - 1 rows past the band's last output.
// The gradient of b, whose patch the index chooses, keeps one atomic per
// element: in shared memory (rows) or, kGlobalB (rows_global), a float
// atomicAdd straight to global memory, a native reduction in the L2 cache with
// no loop, after the block has zeroed its plane of grad_b (no other block
// writes that plane). Per element the contributions are the fused kernel's
// expressions; the sums run in another order (equal to rounding).
constexpr int kRowWarps = 8;

template <typename T, int P, bool kGlobalB>
__global__ void __launch_bounds__(kRowWarps * 32)
    max_backward_rows(NccGeometry g, const T* __restrict__ grad, const T* __restrict__ a,
                      const T* __restrict__ b, const int64_t* __restrict__ index,
                      T* __restrict__ grad_a, T* __restrict__ grad_b) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int h = P / 2;
  const int H = int(g.H), W = int(g.W), R2 = int(g.R2());
  const int HW = H * W, Wp = W + 2 * h, rows_a = H + 2 * h, rows_b = H + 2 * R2 + 2 * h;
  const int64_t plane = blockIdx.x;
  T* Ap = smem;
  T* Bp = Ap + rows_a * Wp;
  T* GA = Bp + rows_b * Wp;  // H x W, unpadded
  T* GB = GA + HW;           // rows_b x Wp, padded (shared variant only)
  const T* A = a + plane * HW;
  const T* B = b + plane * HW;
  T* gB = grad_b + plane * HW;
  for (int i = threadIdx.x; i < rows_a * Wp; i += blockDim.x)
    Ap[i] = pixel(A, H, W, i / Wp - h, i % Wp - h);
  for (int i = threadIdx.x; i < rows_b * Wp; i += blockDim.x) {
    Bp[i] = pixel(B, H, W, i / Wp - R2 - h, i % Wp - h);
    if (!kGlobalB) GB[i] = T(0);
  }
  for (int i = threadIdx.x; i < HW; i += blockDim.x) {
    GA[i] = T(0);
    if (kGlobalB) gB[i] = T(0);
  }
  __syncthreads();  // also makes the zeros of gB visible to the block's atomics
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int band = (H + kRowWarps - 1) / kRowWarps;
  const int r0 = warp * band, r1 = min(H, r0 + band), n_out = r1 - r0;
  const T eps = T(g.eps);
  T win[P][P];
#pragma unroll
  for (int i = 0; i < P; ++i)
#pragma unroll
    for (int j = 0; j < P; ++j) win[i][j] = T(0);
  const int steps = n_out > 0 ? n_out + P - 1 : 0;  // warp-uniform
  for (int t0 = 0; t0 < steps; t0 += P) {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int t = t0 + s, r = r0 + t;
      if (t >= steps) break;
      if (t < n_out) {
        const T gv = lane < W ? grad[plane * HW + r * W + lane] : T(0);
        if (gv != T(0)) {
          const int idx = int(index[plane * HW + r * W + lane]);
          const int qr = r + idx / W - R2, qc = idx % W;
          const T* x = Ap + r * Wp + lane;        // top-left of the patch of a
          const T* y = Bp + (qr + R2) * Wp + qc;  // top-left of the patch of b
          const NccGradCoef<T> k = patch_grad_coef(x, y, Wp, P, gv, eps);
#pragma unroll
          for (int i = 0; i < P; ++i)
#pragma unroll
            for (int j = 0; j < P; ++j) {
              const T xv = x[i * Wp + j], yv = y[i * Wp + j];
              win[(s + i) % P][j] += k.al_a * yv + k.be_a * xv + k.c_a;
              const T vb = k.al_b * xv + k.be_b * yv + k.c_b;
              if (kGlobalB) {
                const int vr = qr + i - h, vc = qc + j - h;
                if (vr >= 0 && vr < H && vc >= 0 && vc < W) atomicAdd(gB + vr * W + vc, vb);
              } else {
                atomicAdd(GB + (qr + R2 + i) * Wp + qc + j, vb);
              }
            }
        }
      }
      // Padded row r (image row u) is complete in every lane's window: lane
      // lane + h - j holds column `lane` of it at its position j.
      T sum = T(0);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const int d = h - j;
        const T v = d > 0 ? __shfl_down_sync(0xffffffffu, win[s][j], d)
                          : d < 0 ? __shfl_up_sync(0xffffffffu, win[s][j], -d) : win[s][j];
        if (lane + d >= 0 && lane + d < 32) sum += v;
        win[s][j] = T(0);
      }
      const int u = r - h;
      if (u >= 0 && u < H && lane < W) {
        const bool own = max(u - h, 0) >= r0 && min(u + h, H - 1) < r1;  // warp-uniform
        if (own)
          GA[u * W + lane] = sum;
        else
          atomicAdd(GA + u * W + lane, sum);
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < HW; e += blockDim.x) {
    grad_a[plane * HW + e] = GA[e];
    if (!kGlobalB) grad_b[plane * HW + e] = GB[(e / W + R2 + h) * Wp + e % W + h];
  }
}

inline int64_t rows_backward_smem_bytes(const NccGeometry& g, size_t elem, bool global_b) {
  const int64_t Wp = g.W + 2 * g.h(), b_padded = (g.b_rows() + 2 * g.h()) * Wp;
  return ((g.H + 2 * g.h()) * Wp + b_padded + g.H * g.W + (global_b ? 0 : b_padded)) *
         int64_t(elem);
}

// MSPCNN_NCC_MAX_BWD: "rows" or "rows_global" (0 and 1 here), else -1 (the fused kernel).
int rows_backward_requested() {
  const char* env = getenv("MSPCNN_NCC_MAX_BWD");
  if (env == nullptr || strncmp(env, "rows", 4) != 0) return -1;
  return strcmp(env, "rows_global") == 0 ? 1 : 0;
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

}  // namespace

// ---------------------------------------------------------------------------
// Host entry points (declared in ncc_kernels.h)
// ---------------------------------------------------------------------------
bool max_backward_needs_stats(const NccGeometry& g, size_t elem_size, bool deterministic) {
  int device = 0, smem_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return deterministic || fused_backward_smem_bytes(g, elem_size) > smem_optin;
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
    // One plane per block, `smem` bytes of dynamic shared memory (asked for above 48 KB).
    auto launch = [&](auto kernel, int threads, int64_t smem) {
      if (smem > 48 * 1024) {
        const cudaError_t err = cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess) return err;
      }
      kernel<<<unsigned(g.planes()), threads, size_t(smem), stream>>>(
          g, grad, a, b, index, grad_a, grad_b);
      return cudaGetLastError();
    };
    const int rows = rows_backward_requested();
    if (rows >= 0 && (g.P == 3 || g.P == 5) && g.W <= 32) {
      const int64_t smem = rows_backward_smem_bytes(g, sizeof(T), rows == 1);
      constexpr int threads = kRowWarps * 32;
      if (g.P == 3) return rows ? launch(max_backward_rows<T, 3, true>, threads, smem)
                                : launch(max_backward_rows<T, 3, false>, threads, smem);
      return rows ? launch(max_backward_rows<T, 5, true>, threads, smem)
                  : launch(max_backward_rows<T, 5, false>, threads, smem);
    }
    if (g.P == 3) return launch(max_backward_fused<T, 3>, kThreads, fused_smem);
    if (g.P == 5) return launch(max_backward_fused<T, 5>, kThreads, fused_smem);
    return launch(max_backward_fused<T, 0>, kThreads, fused_smem);
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

#define MSPCNN_INSTANTIATE(T) \
  template cudaError_t ncc_max_backward<T>(const NccGeometry&, const T*, const T*,     \
                                           const T*, const int64_t*, const double*,    \
                                           const double*, const double*,               \
                                           const double*, T*, T*, T*, bool,            \
                                           cudaStream_t);
MSPCNN_INSTANTIATE(float)
MSPCNN_INSTANTIATE(double)
#undef MSPCNN_INSTANTIATE

}  // namespace cuda
}  // namespace mspcnn
