// CUDA kernels of the ncc_max backward pass (docs/ncc_layer.md, "Backward of
// the maximum"). CUDA headers only; see ncc_forward.cu for the conventions.
//
// Kernels:
//   max_backward_fused<P>  one plane per block, both gradients in shared memory
//                          (float atomics: the default, not bitwise reproducible)
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

#include "../ncc_grad_coef.h"
#include "ncc_device.cuh"
#include "ncc_kernels.h"

namespace mspcnn {
namespace cuda {
namespace {

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
