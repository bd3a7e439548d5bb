// CPU kernels of the wide-search NCC operators.
//
// Every (n, c) plane is independent: at::parallel_for hands planes to threads
// and each plane is computed by one thread with its own scratch buffers, so
// no two threads ever write the same element (results are deterministic).
//
// The forward pass uses the box-sum decomposition of docs/ncc_layer.md:
//   NCC(p, q) = (X(p, q) - n mu_a(p) mu_b(q)) / ((n - 1) sig_a(p) sig_b(q))
// where X(p, q) = sum over the patch of a(p + t) b(q + t). For a row offset d
// and a row u of `a`, the horizontal part
//   Hs_u(w, col) = sum_j a(u, w + j) b(u + d, col + j)
// is a W x W matrix (P multiply-adds per element), and X for output row r is
// the sum of Hs_u over the P rows u = r - h .. r + h. Hs rows are kept in a
// ring buffer of P rows per offset d, so each is computed once. Both maps are
// first shifted by their plane means (the NCC does not change), so that X does
// not carry the large product of the means of non-negative features.
// Patch statistics are computed exactly (two passes, in double). In float32,
// the volume's entries whose patches make that form lose digits (near-flat
// patches far from the plane mean) are computed again directly (kRefineRho).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ncc_checks.h"

namespace mspcnn {
namespace {

// ---------------------------------------------------------------------------
// Per-plane helpers
// ---------------------------------------------------------------------------

// Zero-padded copy of an H x W plane: `top` extra rows above and below,
// `side` extra columns left and right.
template <typename scalar_t>
void pad_plane(const scalar_t* x, int64_t H, int64_t W, int64_t top,
               int64_t side, scalar_t* out) {
  const int64_t Wp = W + 2 * side;
  std::fill(out, out + (H + 2 * top) * Wp, scalar_t(0));
  for (int64_t u = 0; u < H; ++u) {
    std::copy(x + u * W, x + (u + 1) * W, out + (u + top) * Wp + side);
  }
}

// Patch mean and standard deviation (without eps) of a plane, for centres at
// rows row0 .. row0 + rows - 1 (which may lie outside the map) and columns
// 0 .. W - 1, zero padding outside the map. Separable box sums of x and x*x
// in double: var = (Q - S*S/n) / (n - 1), clamped at 0 (a NaN variance gives
// 0 as well). Every inner loop runs along a row with no branch, so that the
// compiler vectorises it (the square roots included: setup.py builds with
// -fno-math-errno); the sums are added in the same order as a direct loop
// over the patch, rows outer and columns inner.
template <typename scalar_t>
void patch_stats(const scalar_t* x, int64_t H, int64_t W, int64_t P,
                 int64_t row0, int64_t rows, double* mean, double* sdev) {
  const int64_t h = P / 2, Wp = W + 2 * h;
  const double n = double(P * P);
  std::vector<double> xp(Wp, 0.0), xq(Wp, 0.0);
  std::vector<double> hs(H * W), hq(H * W);  // horizontal box sums per map row
  for (int64_t u = 0; u < H; ++u) {
    for (int64_t v = 0; v < W; ++v) {
      const double xv = double(x[u * W + v]);
      xp[v + h] = xv;
      xq[v + h] = xv * xv;
    }
    double* s = hs.data() + u * W;
    double* q = hq.data() + u * W;
    for (int64_t w = 0; w < W; ++w) {
      s[w] = xp[w];
      q[w] = xq[w];
    }
    for (int64_t j = 1; j < P; ++j)
      for (int64_t w = 0; w < W; ++w) {
        s[w] += xp[w + j];
        q[w] += xq[w + j];
      }
  }
  std::vector<double> s(W), q(W);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t cr = row0 + r;
    const int64_t u0 = std::max<int64_t>(cr - h, 0);
    const int64_t u1 = std::min<int64_t>(cr + h + 1, H);
    std::fill(s.begin(), s.end(), 0.0);
    std::fill(q.begin(), q.end(), 0.0);
    for (int64_t u = u0; u < u1; ++u)
      for (int64_t w = 0; w < W; ++w) {
        s[w] += hs[u * W + w];
        q[w] += hq[u * W + w];
      }
    double* m = mean + r * W;
    double* sd = sdev + r * W;
    for (int64_t w = 0; w < W; ++w) {
      const double var = (q[w] - s[w] * s[w] / n) / (n - 1.0);
      m[w] = s[w] / n;
      sd[w] = var > 0.0 ? std::sqrt(var) : 0.0;
    }
  }
}

// Statistics of both maps of one plane, in the forms the inner loops use.
struct PlaneStats {
  // a: H x W centres. b: (H + 2 R2) x W centres, row index u + R2.
  std::vector<double> ma, sa, mb, sb;
  void compute_sizes(const NccGeometry& g) {
    ma.resize(g.plane());
    sa.resize(g.plane());
    mb.resize(g.b_rows() * g.W);
    sb.resize(g.b_rows() * g.W);
  }
  template <typename scalar_t>
  void compute(const NccGeometry& g, const scalar_t* a, const scalar_t* b) {
    compute_sizes(g);
    patch_stats(a, g.H, g.W, g.P, 0, g.H, ma.data(), sa.data());
    patch_stats(b, g.H, g.W, g.P, -g.R2(), g.b_rows(), mb.data(), sb.data());
  }
};

// SIMD vectors through the GCC/Clang vector extension, as wide as the
// target's registers: 64 bytes (16 floats or 8 doubles) where the compiler
// targets AVX-512, else 32 bytes (AVX2: 8 floats or 4 doubles; SSE: two
// registers). kVecBytes is that width.
// (MSPCNN_VEC_BYTES=16, 32 or 64 at build time overrides it, for comparisons.)
#if defined(MSPCNN_VEC_BYTES)
constexpr int kVecBytes = MSPCNN_VEC_BYTES;
#elif defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif
static_assert(kVecBytes == 16 || kVecBytes == 32 || kVecBytes == 64, "MSPCNN_VEC_BYTES: 16, 32 or 64");
template <typename scalar_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
  typedef int32_t IE;
  static constexpr int64_t L = kVecBytes / 4;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
  typedef int64_t IE;
  static constexpr int64_t L = kVecBytes / 8;
};
template <typename V, typename T>
inline V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void storeu(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Mean of a plane in double; 0 when it is not finite (NaN or infinite values).
template <typename scalar_t>
double plane_mean(const scalar_t* x, int64_t count) {
  double s = 0.0;
  for (int64_t i = 0; i < count; ++i) s += double(x[i]);
  const double m = count ? s / double(count) : 0.0;
  return std::isfinite(m) ? m : 0.0;
}

template <typename scalar_t>
bool has_nan(const scalar_t* x, int64_t count) {
  bool nan = false;
  for (int64_t i = 0; i < count; ++i) nan |= x[i] != x[i];
  return nan;
}

// The volume's float32 refinement (docs/perf_notes.md, "The volume's
// cancellation"). The box-sum form X ka kb - (n ma ka)(mb kb) with the shifted
// maps rounds X with an error of about eps32 * sum |a - ca||b - cb|, which in
// NCC units is eps32 n / (n - 1) * rho_a * rho_b with
//   rho = sqrt(s^2 + (mu - c)^2) / (s + eps)
// per patch: 1 or 2 for most patches, up to about 40 for the near-flat ones
// that ReLU leaves (small s, mean far from the plane's). A volume entry whose
// rho_a rho_b exceeds kRefineRho is computed again in the direct centred form,
// sum (a - mu_a)(b - mu_b) / ((n - 1)(s_a + eps)(s_b + eps)), in double: a few
// percent of the entries of ReLU'd maps. Float32 only (double has digits to
// spare); the maximum (ncc_max) keeps the box-sum values.
constexpr double kRefineRho = 4.0;

template <typename scalar_t>
double direct_ncc(const NccGeometry& g, const scalar_t* a, const scalar_t* b,
                  const PlaneStats& st, int64_t r, int64_t w, int64_t d, int64_t col) {
  const int64_t H = g.H, W = g.W, h = g.P / 2;
  const int64_t ea = r * W + w, eb = (r + d + g.R2()) * W + col;
  const double sa = st.sa[ea], sb = st.sb[eb];
  if (sa == 0.0 || sb == 0.0) return 0.0;  // a flat patch: covariance 0
  const double mua = st.ma[ea], mub = st.mb[eb];
  double x = 0.0;
  for (int64_t i = -h; i <= h; ++i)
    for (int64_t j = -h; j <= h; ++j) {
      const int64_t ua = r + i, va = w + j, ub = r + d + i, vb = col + j;
      const double av = (ua >= 0 && ua < H && va >= 0 && va < W) ? double(a[ua * W + va]) : 0.0;
      const double bv = (ub >= 0 && ub < H && vb >= 0 && vb < W) ? double(b[ub * W + vb]) : 0.0;
      x += (av - mua) * (bv - mub);
    }
  return x / (double(g.n() - 1) * (sa + g.eps) * (sb + g.eps));
}

// Forward pass of one plane. Writes the whole volume (volume != nullptr) or
// the maximum over candidates and its index (values/index != nullptr).
//
// SIMD lanes run along the output column w: the W output columns are padded
// to Wv = NV * L, and for a row offset d the horizontal sums are
//   Hs_u(col, w) = sum_j a(u, w + j) b(u + d, col + j),
// i.e. P shifted rows of a (vectors over w) times scalars of b. Every
// candidate (k, col) then gives one vector of NCC values for the L outputs
// (r, w..w+L-1); the running maximum over candidates is element-wise, and the
// candidates are visited in index order k * W + col with a strict '>', so
// the first maximum wins as in torch.argmax. Volume rows are stored
// contiguously. Lanes past W hold zeros and are never written out.
//
// kNaN selects the comparison that treats NaN as larger than any number (used
// only for planes that contain NaN). kP and kNV, when not 0, fix P and NV at
// compile time so that the inner loops unroll (common shapes are
// instantiated in forward_plane_shape); 0 means "read from the geometry".
template <typename scalar_t, bool kNaN, int kP, int kNV>
void forward_plane(const NccGeometry& g, const scalar_t* a, const scalar_t* b,
                   scalar_t* volume, scalar_t* values, int64_t* index) {
  using V = typename Simd<scalar_t>::V;
  using I = typename Simd<scalar_t>::I;
  using IE = typename Simd<scalar_t>::IE;
  constexpr int64_t L = Simd<scalar_t>::L;
  const int64_t H = g.H, W = g.W, R = g.R, R2 = g.R2();
  const int64_t P = kP ? kP : g.P, h = P / 2;
  const int64_t BR = g.b_rows(), HW = H * W;
  const int64_t NV = kNV ? kNV : (W + L - 1) / L, Wv = NV * L;
  const int64_t Wa = Wv + 2 * h + L;  // padded row of a, room for every load
  const int64_t Wb = W + 2 * h;       // padded row of b
  const double n = double(g.n());

  PlaneStats st;
  st.compute(g, a, b);
  // Both maps are shifted by their plane means ca, cb (rounded to scalar_t;
  // 0 for a plane that is not finite, so that a NaN or an infinity stays in
  // the patches that touch it), the zero padding becoming -ca, -cb. The NCC is
  // unchanged (every patch, padding included, moves by the same constant, and
  // the means below move with it), but X no longer carries n ma mb: ReLU
  // features have a large positive mean, and X - n ma mb lost float32 digits.
  const double ca = double(scalar_t(plane_mean(a, H * W)));
  const double cb = double(scalar_t(plane_mean(b, H * W)));
  // NCC = X * (ka kb) - (n ma ka) (mb kb), with the shifted X, ma and mb;
  // lanes past W get 0. A flat patch (s = 0: all padding, or the zeros that
  // ReLU leaves) has covariance 0 with any other: both of its factors are 0,
  // so its NCC is exactly 0 (a NaN in X still gives NaN), as in the direct
  // form, and not the shifted terms' rounding noise scaled by 1 / eps.
  std::vector<scalar_t> ka(H * Wv, scalar_t(0)), nmaka(H * Wv, scalar_t(0));
  std::vector<scalar_t> kb(BR * W), mbkb(BR * W);
  for (int64_t r = 0; r < H; ++r)
    for (int64_t w = 0; w < W; ++w) {
      if (st.sa[r * W + w] == 0.0) continue;
      const double k = 1.0 / ((n - 1.0) * (st.sa[r * W + w] + g.eps));
      ka[r * Wv + w] = scalar_t(k);
      nmaka[r * Wv + w] = scalar_t(n * (st.ma[r * W + w] - ca) * k);
    }
  for (int64_t i = 0; i < BR * W; ++i) {
    const bool flat = st.sb[i] == 0.0;
    const double k = flat ? 0.0 : 1.0 / (st.sb[i] + g.eps);
    kb[i] = scalar_t(k);
    mbkb[i] = scalar_t((st.mb[i] - cb) * k);
  }
  // The refinement's factors (see kRefineRho): rho_a per output (0 past W and
  // for flat patches), rho_b per centre, and each output row's largest rho_a.
  const bool refine = volume && std::is_same<scalar_t, float>::value;
  std::vector<scalar_t> rho_a(refine ? H * Wv : 0, scalar_t(0)), rho_b(refine ? BR * W : 0);
  std::vector<double> rho_a_row(refine ? H : 0, 0.0);
  auto rho = [&](double mu, double s, double c) {
    return s == 0.0 ? 0.0 : std::sqrt(s * s + (mu - c) * (mu - c)) / (s + g.eps);
  };
  if (refine) {
    for (int64_t r = 0; r < H; ++r)
      for (int64_t w = 0; w < W; ++w) {
        const double v = rho(st.ma[r * W + w], st.sa[r * W + w], ca);
        rho_a[r * Wv + w] = scalar_t(v);
        rho_a_row[r] = std::max(rho_a_row[r], v);
      }
    for (int64_t i = 0; i < BR * W; ++i) rho_b[i] = scalar_t(rho(st.mb[i], st.sb[i], cb));
  }

  std::vector<scalar_t> apad((H + 2 * h) * Wa, scalar_t(-ca));
  std::vector<scalar_t> bpad((BR + 2 * h) * Wb, scalar_t(-cb));
  for (int64_t u = 0; u < H; ++u)
    for (int64_t v = 0; v < W; ++v) {
      apad[(u + h) * Wa + h + v] = a[u * W + v] - scalar_t(ca);
      bpad[(u + R2 + h) * Wb + h + v] = b[u * W + v] - scalar_t(cb);
    }

  // ring[(k * P + slot) * W * NV + col * NV + cv]: Hs_u for offset
  // d = k - R2 in slot (u + h) % P.
  const int64_t plane_v = W * NV;
  std::vector<V> ring(R * P * plane_v), as(P * NV);

  // Rows outside a map are padding (-ca or -cb, not 0): computed like the
  // others, from the padded copies.
  auto compute_hs = [&](int64_t u, int64_t d, V* out) {
    const scalar_t* arow = apad.data() + (u + h) * Wa;
    const scalar_t* brow = bpad.data() + (u + d + R2 + h) * Wb;
    // The P shifted copies of the a row, reused for every candidate column.
    for (int64_t j = 0; j < P; ++j)
      for (int64_t cv = 0; cv < NV; ++cv) as[j * NV + cv] = loadu<V>(arow + j + cv * L);
    for (int64_t col = 0; col < W; ++col) {
      for (int64_t cv = 0; cv < NV; ++cv) {
        V acc{};
        for (int64_t j = 0; j < P; ++j) acc += as[j * NV + cv] * brow[col + j];
        out[col * NV + cv] = acc;
      }
    }
  };
  auto slot = [&](int64_t k, int64_t u) {
    return ring.data() + (k * P + (u + h) % P) * plane_v;
  };

  for (int64_t k = 0; k < R; ++k)
    for (int64_t u = -h; u < h; ++u) compute_hs(u, k - R2, slot(k, u));

  // The running maxima and their indices: local arrays (kept in registers)
  // when NV is fixed at compile time, so that no candidate waits for the
  // previous one's store.
  constexpr int64_t kBest = kNV > 0 ? kNV : 1;
  V best_fixed[kBest];
  I best_i_fixed[kBest];
  std::vector<V> best_heap(kNV > 0 ? 0 : NV);
  std::vector<I> best_i_heap(kNV > 0 ? 0 : NV);
  V* const best = kNV > 0 ? best_fixed : best_heap.data();
  I* const best_i = kNV > 0 ? best_i_fixed : best_i_heap.data();
  alignas(64) scalar_t lanes[L];
  alignas(64) IE ilanes[L];
  for (int64_t r = 0; r < H; ++r) {
    for (int64_t cv = 0; cv < NV; ++cv) {
      best[cv] = V{} - std::numeric_limits<scalar_t>::infinity();
      best_i[cv] = I{};
    }
    const scalar_t* karow = ka.data() + r * Wv;
    const scalar_t* nmrow = nmaka.data() + r * Wv;
    for (int64_t k = 0; k < R; ++k) {
      const int64_t d = k - R2;
      compute_hs(r + h, d, slot(k, r + h));
      const V* s0 = ring.data() + k * P * plane_v;
      const scalar_t* kbrow = kb.data() + (r + d + R2) * W;
      const scalar_t* mbrow = mbkb.data() + (r + d + R2) * W;
      // NCC of the L outputs of lane group cv against candidate column col.
      auto ncc = [&](int64_t col, int64_t cv) {
        const int64_t e = col * NV + cv;
        V x = s0[e];
        for (int64_t s = 1; s < P; ++s) x += s0[s * plane_v + e];
        return x * (loadu<V>(karow + cv * L) * kbrow[col]) - loadu<V>(nmrow + cv * L) * mbrow[col];
      };
      if (volume) {
        const scalar_t* rbrow = refine ? rho_b.data() + (r + d + R2) * W : nullptr;
        for (int64_t col = 0; col < W; ++col)
          for (int64_t cv = 0; cv < NV; ++cv) {
            V v = ncc(col, cv);
            // Entries whose box-sum value may have lost digits: the direct form.
            // (A non-finite rho, from a NaN or an infinity, never compares true.)
            if (refine && rho_a_row[r] * double(rbrow[col]) > kRefineRho) {
              const V need = loadu<V>(rho_a.data() + r * Wv + cv * L) * rbrow[col];
              bool any = false;  // lanes past W have rho_a = 0
              for (int64_t l = 0; l < L; ++l) any |= need[l] > scalar_t(kRefineRho);
              if (any) {
                storeu(lanes, v);
                for (int64_t l = 0; l < L && cv * L + l < W; ++l)
                  if (need[l] > scalar_t(kRefineRho))
                    lanes[l] = scalar_t(direct_ncc(g, a, b, st, r, cv * L + l, d, col));
                v = loadu<V>(lanes);
              }
            }
            scalar_t* vo = volume + (k * W + col) * HW + r * W + cv * L;
            const int64_t cols = std::min<int64_t>(L, W - cv * L);
            if (cols == L) {
              storeu(vo, v);
            } else {
              storeu(lanes, v);
              std::copy(lanes, lanes + cols, vo);
            }
          }
        continue;
      }
      for (int64_t col = 0; col < W; ++col) {
        const I idx = I{} + IE(k * W + col);
        for (int64_t cv = 0; cv < NV; ++cv) {
          const V v = ncc(col, cv);
          auto m = v > best[cv];
          if (kNaN) m = m | ((v != v) & (best[cv] == best[cv]));
          best[cv] = m ? v : best[cv];
          best_i[cv] = m ? idx : best_i[cv];
        }
      }
    }
    if (!volume) {
      for (int64_t cv = 0; cv < NV; ++cv) {
        storeu(lanes, best[cv]);
        storeu(ilanes, best_i[cv]);
        const int64_t cols = std::min<int64_t>(L, W - cv * L);
        for (int64_t l = 0; l < cols; ++l) {
          values[r * W + cv * L + l] = lanes[l];
          index[r * W + cv * L + l] = int64_t(ilanes[l]);
        }
      }
    }
  }
}

template <typename scalar_t, bool kNaN>
void forward_plane_shape(const NccGeometry& g, const scalar_t* a,
                         const scalar_t* b, scalar_t* volume, scalar_t* values,
                         int64_t* index) {
  constexpr int64_t L = Simd<scalar_t>::L;
  const int64_t NV = (g.W + L - 1) / L;
#define MSPCNN_FWD(P_, NV_) \
  if (g.P == P_ && NV == NV_) \
    return forward_plane<scalar_t, kNaN, P_, NV_>(g, a, b, volume, values, index);
  MSPCNN_FWD(3, 1) MSPCNN_FWD(3, 2) MSPCNN_FWD(3, 4) MSPCNN_FWD(5, 1) MSPCNN_FWD(5, 2)
  MSPCNN_FWD(5, 4) MSPCNN_FWD(7, 2) MSPCNN_FWD(7, 4)
#undef MSPCNN_FWD
  forward_plane<scalar_t, kNaN, 0, 0>(g, a, b, volume, values, index);
}

template <typename scalar_t>
void forward_plane_dispatch(const NccGeometry& g, const scalar_t* a,
                            const scalar_t* b, scalar_t* volume,
                            scalar_t* values, int64_t* index) {
  if (has_nan(a, g.plane()) || has_nan(b, g.plane()))
    forward_plane_shape<scalar_t, true>(g, a, b, volume, values, index);
  else
    forward_plane_shape<scalar_t, false>(g, a, b, volume, values, index);
}

// Backward pass of ncc_max for one plane: each output sends its gradient to
// the two patches of its selected candidate. With x, y the two patches
// (zero padded), xc = x - mu_a, yc = y - mu_b, s the std without eps and
// sig = s + eps (docs/ncc_layer.md, "Backward"):
//   dNCC/dx = (yc / sig_b - NCC xc / s_a) / ((n - 1) sig_a)
//   dNCC/dy = (xc / sig_a - NCC yc / s_b) / ((n - 1) sig_b)
// A constant patch has s = 0 and xc = 0, and its 1/s term is taken as 0;
// gradients reaching the padding are dropped.
//
// SIMD rows: a patch row is loaded as vectors of 8 lanes of scalar_t from
// padded copies at any column, ceil(P / 8) of them (one up to P = 8, the
// common case); the lanes of the last vector past the patch belong to the
// neighbours and are masked out by selects (never by multiplying with 0, so
// that a NaN next to a patch stays where it is). Each output row is done in
// two passes:
//  1. per output, the covariance of its two centred patches (accumulated in
//     scalar_t, summed over the lanes in double) and its coefficients, in
//     double, from per-centre reciprocals taken once per plane, so that no
//     division is left per output:
//       ncc = cov ka kb,  al = al_a = al_b = g ka kb,
//       be_a = -g ka ncc / s_a,  be_b = -g kb ncc / ((n - 1) s_b),
//     with ka = 1 / ((n - 1) sig_a), kb = 1 / sig_b (ncc_grad_coef.h's
//     formulas with the reciprocals taken out). Nothing is written that a
//     later output reads, so the processor overlaps the outputs.
//  2. the scatter, in the centred form
//       grad_x += al (y - mu_b) + be_a (x - mu_a),
//       grad_y += al (x - mu_a) + be_b (y - mu_b),
//     which equals ncc_grad_coef.h's al y + be x + c without the cancellation
//     of c against the uncentred terms (float32 sums stay accurate when the
//     features have a large mean). Columns are visited with a stride of 8 so
//     that consecutive outputs never write overlapping vectors of grad_a (for
//     P > 8 the vectors of one output's row overlap the next chunk's; the
//     writes are in order within the thread, so this costs speed, not
//     correctness).
// Gradients are accumulated in scalar_t; the error against a float64 backward
// is measured in docs/perf_notes.md.
// kOne: P <= 8, one vector per patch row (the full-vector loops compile away).
template <typename scalar_t, bool kOne>
void max_backward_plane(const NccGeometry& g, const scalar_t* grad,
                        const scalar_t* a, const scalar_t* b,
                        const int64_t* index, scalar_t* grad_a,
                        scalar_t* grad_b) {
  constexpr int64_t L = 8;
  typedef scalar_t V __attribute__((vector_size(L * sizeof(scalar_t))));
  typedef typename Simd<scalar_t>::IE IE;
  typedef IE M __attribute__((vector_size(L * sizeof(scalar_t))));
  const int64_t H = g.H, W = g.W, P = g.P, h = g.h(), R2 = g.R2();
  const int64_t Wp = W + 2 * h, BR = g.b_rows();
  const double nm1 = double(g.n() - 1);
  PlaneStats st;
  st.compute(g, a, b);
  // ka = 1 / ((n-1) sig_a), kb = 1 / sig_b, is = 1 / s (0 for a flat patch).
  std::vector<double> ka(H * W), isa(H * W), kb(BR * W), isb(BR * W);
  for (int64_t i = 0; i < H * W; ++i) {
    ka[i] = 1.0 / (nm1 * (st.sa[i] + g.eps));
    isa[i] = st.sa[i] > 0.0 ? 1.0 / st.sa[i] : 0.0;
  }
  for (int64_t i = 0; i < BR * W; ++i) {
    kb[i] = 1.0 / (st.sb[i] + g.eps);
    isb[i] = st.sb[i] > 0.0 ? 1.0 / st.sb[i] : 0.0;
  }
  // Padded copies (L spare elements at the end for the last row's loads: a
  // vector starting at patch column j0 < P of the last row ends before it).
  std::vector<scalar_t> ap((H + 2 * h) * Wp + L, scalar_t(0)),
      bp((BR + 2 * h) * Wp + L, scalar_t(0));
  std::vector<scalar_t> ga(ap.size(), scalar_t(0)), gb(bp.size(), scalar_t(0));
  for (int64_t u = 0; u < H; ++u) {
    std::copy(a + u * W, a + (u + 1) * W, ap.data() + (u + h) * Wp + h);
    std::copy(b + u * W, b + (u + 1) * W, bp.data() + (u + R2 + h) * Wp + h);
  }
  // Patch columns j0 .. j0 + 7 per vector; full vectors first, then the
  // last one (lanes j0 + lane < P), masked.
  const int64_t last = kOne ? 0 : (P - 1) / L * L;
  M lane;
  for (int64_t j = 0; j < L; ++j) lane[j] = IE(j);
  const M in = lane < IE(P - last);
  const V zero = V{};
  // One output row's coefficients (pass 1 -> pass 2); yoff < 0: no gradient.
  std::vector<int64_t> yoff(W);
  std::vector<scalar_t> c_al(W), c_ba(W), c_bb(W), c_ma(W), c_mb(W);
  for (int64_t r = 0; r < H; ++r) {
    for (int64_t w = 0; w < W; ++w) {
      const int64_t p = r * W + w;
      const double gv = double(grad[p]);
      if (gv == 0.0) {
        yoff[w] = -1;
        continue;
      }
      const int64_t idx = index[p];
      const int64_t qr = r + idx / W - R2, qc = idx % W;  // centre in b
      const int64_t q = (qr + R2) * W + qc;
      yoff[w] = (qr + R2) * Wp + qc;
      const scalar_t mua = scalar_t(st.ma[p]), mub = scalar_t(st.mb[q]);
      const scalar_t* x = ap.data() + r * Wp + w;
      const scalar_t* y = bp.data() + yoff[w];
      V full = zero, acc = zero;
      for (int64_t i = 0; i < P; ++i) {
        for (int64_t j0 = 0; j0 < last; j0 += L)
          full += (loadu<V>(x + i * Wp + j0) - mua) * (loadu<V>(y + i * Wp + j0) - mub);
        acc += (loadu<V>(x + i * Wp + last) - mua) * (loadu<V>(y + i * Wp + last) - mub);
      }
      acc = in ? acc : zero;
      double cov = 0.0;
      if (last > 0)
        for (int64_t j = 0; j < L; ++j) cov += double(full[j]);
      for (int64_t j = 0; j < P - last; ++j) cov += double(acc[j]);
      const double kab = ka[p] * kb[q];
      const double ncc = cov * kab;
      c_al[w] = scalar_t(gv * kab);
      c_ba[w] = scalar_t(-gv * ka[p] * ncc * isa[p]);
      c_bb[w] = scalar_t(-gv * kb[q] / nm1 * ncc * isb[q]);
      c_ma[w] = mua;
      c_mb[w] = mub;
    }
    for (int64_t s = 0; s < std::min<int64_t>(L, W); ++s) {
      for (int64_t w = s; w < W; w += L) {
        if (yoff[w] < 0) continue;
        const scalar_t* x = ap.data() + r * Wp + w;
        const scalar_t* y = bp.data() + yoff[w];
        scalar_t* gx = ga.data() + r * Wp + w;
        scalar_t* gy = gb.data() + yoff[w];
        const scalar_t al = c_al[w], ba = c_ba[w], bb = c_bb[w];
        const scalar_t mua = c_ma[w], mub = c_mb[w];
        for (int64_t i = 0; i < P; ++i) {
          for (int64_t j0 = 0; j0 < last; j0 += L) {
            const int64_t o = i * Wp + j0;
            const V xc = loadu<V>(x + o) - mua, yc = loadu<V>(y + o) - mub;
            storeu(gx + o, loadu<V>(gx + o) + (al * yc + ba * xc));
            storeu(gy + o, loadu<V>(gy + o) + (al * xc + bb * yc));
          }
          const int64_t o = i * Wp + last;
          const V xc = loadu<V>(x + o) - mua, yc = loadu<V>(y + o) - mub;
          const V dx = al * yc + ba * xc, dy = al * xc + bb * yc;
          storeu(gx + o, loadu<V>(gx + o) + (in ? dx : zero));
          storeu(gy + o, loadu<V>(gy + o) + (in ? dy : zero));
        }
      }
    }
  }
  for (int64_t u = 0; u < H; ++u)
    for (int64_t v = 0; v < W; ++v) {
      grad_a[u * W + v] = ga[(u + h) * Wp + v + h];
      grad_b[u * W + v] = gb[(u + R2 + h) * Wp + v + h];
    }
}

// The P shifted products of a K x Wv matrix M (rows padded to Wv, a multiple
// of 2 L) with a sequence s: out[j][x] = sum_{k < K} M[k][x] s[k + j], for
// j < P, x < Wv, the terms added in increasing k. Register-blocked: P x 2
// vectors of accumulators, each pair of vectors of M loaded once for all P
// shifts. (The volume backward's T1 terms; P is 3 or 5 here, see below.)
template <typename T, int P>
void shifted_products(const T* __restrict__ M, int64_t K, int64_t Wv, const T* __restrict__ s,
                      T* __restrict__ out) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::L;
  for (int64_t c = 0; c < Wv; c += 2 * L) {
    V acc[P][2];
    for (int j = 0; j < P; ++j) acc[j][0] = acc[j][1] = V{};
    for (int64_t k = 0; k < K; ++k) {
      const V m0 = loadu<V>(M + k * Wv + c), m1 = loadu<V>(M + k * Wv + c + L);
      for (int j = 0; j < P; ++j) {
        const T sv = s[k + j];
        acc[j][0] += m0 * sv;
        acc[j][1] += m1 * sv;
      }
    }
    for (int j = 0; j < P; ++j) {
      storeu(out + j * Wv + c, acc[j][0]);
      storeu(out + j * Wv + c + L, acc[j][1]);
    }
  }
}

// The same for any P (the columns x < W only), as plain loops.
template <typename T>
void shifted_products_any(const T* __restrict__ M, int64_t K, int64_t Wv, int64_t W, int64_t P,
                          const T* __restrict__ s, T* __restrict__ out) {
  for (int64_t j = 0; j < P; ++j) {
    T* __restrict__ o = out + j * Wv;
    std::fill(o, o + W, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T sv = s[k + j];
      const T* __restrict__ m = M + k * Wv;
      for (int64_t x = 0; x < W; ++x) o[x] += m[x] * sv;
    }
  }
}

#if defined(__AVX__)
// One block of transpose_square in registers: d[c][r] = s[r][c], r, c < 8
// (float: pairs of rows interleaved, then quadruples within 128-bit lanes,
// then the 128-bit halves of rows i and i + 4 swapped) or < 4 (double), row
// stride n for both.
inline void transpose_block(const float* __restrict__ s, float* __restrict__ d, int64_t n) {
  __m256 x[8], t[8];
  for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(s + i * n);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    x[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    x[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    x[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    x[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * n, _mm256_permute2f128_ps(x[i], x[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * n, _mm256_permute2f128_ps(x[i], x[i + 4], 0x31));
  }
}
inline void transpose_block(const double* __restrict__ s, double* __restrict__ d, int64_t n) {
  const __m256d x0 = _mm256_loadu_pd(s), x1 = _mm256_loadu_pd(s + n),
                x2 = _mm256_loadu_pd(s + 2 * n), x3 = _mm256_loadu_pd(s + 3 * n);
  const __m256d t0 = _mm256_unpacklo_pd(x0, x1), t1 = _mm256_unpackhi_pd(x0, x1),
                t2 = _mm256_unpacklo_pd(x2, x3), t3 = _mm256_unpackhi_pd(x2, x3);
  _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(d + n, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(d + 2 * n, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(d + 3 * n, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#endif

// dst[c][r] = src[r][c] for r, c < n, both n x n with row stride n: with AVX
// in blocks of 32 bytes square (8 x 8 floats, 4 x 4 doubles) in registers
// where n is a multiple of the block, else element by element.
template <typename T>
void transpose_square(const T* __restrict__ src, T* __restrict__ dst, int64_t n) {
#if defined(__AVX__)
  constexpr int64_t B = 32 / sizeof(T);
  if (n % B == 0) {
    for (int64_t r0 = 0; r0 < n; r0 += B)
      for (int64_t c0 = 0; c0 < n; c0 += B) transpose_block(src + r0 * n + c0, dst + c0 * n + r0, n);
    return;
  }
#endif
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < n; ++c) dst[c * n + r] = src[r * n + c];
}

// For every map pixel (u, v), u < H, the sum of f over the patch centres
// (rows row0 .. row0 + rows - 1, columns 0 .. W - 1 of a centre grid) whose
// patch covers it, into out (H x W): the box of P x P centres around the
// pixel, clipped to the grid. Separable: sums along each centre row first,
// then down the columns (at most P terms each, in double).
inline void centre_boxes(const std::vector<double>& f, int64_t row0, int64_t rows,
                         int64_t W, int64_t h, int64_t H, std::vector<double>& rowsum,
                         std::vector<double>& out) {
  rowsum.resize(rows * W);
  out.resize(H * W);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < W; ++v) {
      double s = 0.0;
      for (int64_t w = std::max<int64_t>(v - h, 0); w <= std::min<int64_t>(v + h, W - 1); ++w)
        s += f[r * W + w];
      rowsum[r * W + v] = s;
    }
  for (int64_t u = 0; u < H; ++u) {
    double* __restrict__ o = out.data() + u * W;
    std::fill(o, o + W, 0.0);
    for (int64_t r = std::max<int64_t>(u - h, row0); r <= std::min<int64_t>(u + h, row0 + rows - 1); ++r) {
      const double* __restrict__ src = rowsum.data() + (r - row0) * W;
      for (int64_t v = 0; v < W; ++v) o[v] += src[v];
    }
  }
}

// Backward pass of ncc_volume for one plane, with the same decomposition as
// the forward pass (docs/ncc_layer.md, "Backward of the volume"):
//   grad_a(u) = T1a(u) - box(T3a)(u) - a(u) box(Ha)(u) + box(Ha ma)(u)
//   grad_b(v) = T1b(v) - box(T3b)(v) - b(v) box(Hb)(v) + box(Hb mb)(v)
// T1a/T1b are correlations of V_u = sum_i G1_{u-i} with the other map, where
// G1 = g ka kb is the incoming gradient scaled per candidate.
template <typename scalar_t>
void volume_backward_plane(const NccGeometry& g, const scalar_t* grad,
                           const scalar_t* a, const scalar_t* b,
                           const scalar_t* volume, scalar_t* grad_a,
                           scalar_t* grad_b) {
  const int64_t H = g.H, W = g.W, P = g.P, h = g.h(), R = g.R, R2 = g.R2();
  const int64_t Wp = W + 2 * h, HW = H * W, BR = g.b_rows();
  const double nm1 = double(g.n() - 1);

  PlaneStats st;
  st.compute(g, a, b);
  std::vector<scalar_t> ka(HW), kb(BR * W);
  for (int64_t i = 0; i < HW; ++i)
    ka[i] = scalar_t(1.0 / (nm1 * (st.sa[i] + g.eps)));
  for (int64_t i = 0; i < BR * W; ++i) kb[i] = scalar_t(1.0 / (st.sb[i] + g.eps));

  std::vector<scalar_t> apad((H + 2 * h) * Wp), bpad((BR + 2 * h) * Wp);
  pad_plane(a, H, W, h, h, apad.data());
  pad_plane(b, H, W, R2 + h, h, bpad.data());
  // Padded accumulators of the T1 terms (same layouts as apad / bpad).
  std::vector<scalar_t> t1a((H + 2 * h) * Wp, scalar_t(0)),
      t1b((BR + 2 * h) * Wp, scalar_t(0));
  std::vector<double> gnA(HW, 0.0), t3a(HW, 0.0), gnB(BR * W, 0.0),
      t3b(BR * W, 0.0);
  // G1 is kept transposed, g1t[r][col][w], so that the loops below run along
  // contiguous memory: its rows are written as the incoming gradient is read
  // (by w), and the T1 sums are products of a matrix's rows with shifts of a
  // map row (shifted_products). Rows padded with zeros to Wv.
  using V = typename Simd<scalar_t>::V;
  const int64_t L2 = 2 * Simd<scalar_t>::L, Wv = (W + L2 - 1) / L2 * L2, WWv = W * Wv;
  // V_u in both layouts, Wv x Wv (the rows past W stay zero).
  std::vector<scalar_t> g1t(H * WWv, scalar_t(0)), vsum_t(Wv * Wv, scalar_t(0)),
      vsum(Wv * Wv, scalar_t(0)), t1a_rows(P * Wv), t1b_rows(P * Wv);
  auto products = [&](const scalar_t* M, const scalar_t* seq, scalar_t* out) {
    if (P == 5)
      shifted_products<scalar_t, 5>(M, W, Wv, seq, out);
    else if (P == 3)
      shifted_products<scalar_t, 3>(M, W, Wv, seq, out);
    else
      shifted_products_any<scalar_t>(M, W, Wv, W, P, seq, out);
  };

  for (int64_t k = 0; k < R; ++k) {
    const int64_t d = k - R2;
    // G1_r(w, col) = g * ka(r, w) * kb(r + d, col), and the per-centre sums.
    // Candidate by candidate (col outer), so that the incoming gradient and the
    // volume, H x W contiguous values per candidate, are read in order.
    for (int64_t col = 0; col < W; ++col) {
      for (int64_t r = 0; r < H; ++r) {
        const int64_t qrow = (r + d + R2) * W;
        const scalar_t* __restrict__ kar = ka.data() + r * W;
        const double* __restrict__ mar = st.ma.data() + r * W;
        double* __restrict__ gnar = gnA.data() + r * W;
        double* __restrict__ t3ar = t3a.data() + r * W;
        const scalar_t* __restrict__ gp = grad + (k * W + col) * HW + r * W;
        const scalar_t* __restrict__ vp = volume + (k * W + col) * HW + r * W;
        scalar_t* __restrict__ g1r = g1t.data() + r * WWv + col * Wv;
        const scalar_t kbq = kb[qrow + col];
        const double mbq = st.mb[qrow + col];
        // The two sums over w in double, in vector lanes (the order of a
        // double sum of W terms moves it by about 1e-16 of its size).
        double gn_q = 0.0, t3_q = 0.0;
#pragma omp simd reduction(+ : gn_q, t3_q)
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t gv = gp[w];
          const scalar_t g1v = gv * kar[w] * kbq;
          g1r[w] = g1v;
          const double gn = double(gv) * double(vp[w]);
          gnar[w] += gn;
          gn_q += gn;
          t3ar[w] += double(g1v) * mbq;
          t3_q += double(g1v) * mar[w];
        }
        gnB[qrow + col] += gn_q;
        t3b[qrow + col] += t3_q;
      }
    }
    // V_u = sum of G1_r over the rows r whose patch covers row u.
    for (int64_t u = 0; u < H; ++u) {
      if (u + d < 0 || u + d >= H) continue;  // b row u + d is padding
      const int64_t r0 = std::max<int64_t>(u - h, 0);
      const int64_t r1 = std::min<int64_t>(u + h, H - 1);
      scalar_t* __restrict__ vt = vsum_t.data();  // V_u transposed: vt[col][w]
      std::copy(g1t.data() + r0 * WWv, g1t.data() + (r0 + 1) * WWv, vt);
      for (int64_t r = r0 + 1; r <= r1; ++r) {
        const scalar_t* __restrict__ src = g1t.data() + r * WWv;
        for (int64_t e = 0; e < WWv; e += Simd<scalar_t>::L)
          storeu(vt + e, loadu<V>(vt + e) + loadu<V>(src + e));
      }
      scalar_t* __restrict__ vs = vsum.data();  // and as it is: vs[w][col]
      transpose_square(vt, vs, Wv);
      const scalar_t* arow = apad.data() + (u + h) * Wp;
      const scalar_t* brow = bpad.data() + (u + d + R2 + h) * Wp;
      scalar_t* ta = t1a.data() + (u + h) * Wp;
      scalar_t* tb = t1b.data() + (u + d + R2 + h) * Wp;
      // T1a(w + j) += sum_col V(w, col) b(col + j); T1b(col + j) += sum_w a(w + j) V(w, col):
      // for every j, each into its own row (sums into the accumulator at
      // offsets j and j + 1 directly would overlap unaligned, and a load that
      // overlaps the previous store in part waits for it), then added in the
      // order of j.
      products(vt, brow, t1a_rows.data());
      products(vs, arow, t1b_rows.data());
      for (int64_t j = 0; j < P; ++j)
        for (int64_t x = 0; x < W; ++x) {
          ta[j + x] += t1a_rows[j * Wv + x];
          tb[j + x] += t1b_rows[j * Wv + x];
        }
    }
  }

  // Scalar per-centre factors of the second and third terms.
  std::vector<double> Ha(HW), Hama(HW), Hb(BR * W), Hbmb(BR * W);
  for (int64_t i = 0; i < HW; ++i) {
    const double inv_s = st.sa[i] > 0.0 ? 1.0 / st.sa[i] : 0.0;
    Ha[i] = gnA[i] * double(ka[i]) * inv_s;
    Hama[i] = Ha[i] * st.ma[i];
  }
  for (int64_t i = 0; i < BR * W; ++i) {
    const double inv_s = st.sb[i] > 0.0 ? 1.0 / st.sb[i] : 0.0;
    Hb[i] = gnB[i] * double(kb[i]) * inv_s / nm1;
    Hbmb[i] = Hb[i] * st.mb[i];
  }
  std::vector<double> rowsum, bt3a, bHa, bHama, bt3b, bHb, bHbmb;
  centre_boxes(t3a, 0, H, W, h, H, rowsum, bt3a);
  centre_boxes(Ha, 0, H, W, h, H, rowsum, bHa);
  centre_boxes(Hama, 0, H, W, h, H, rowsum, bHama);
  centre_boxes(t3b, -R2, BR, W, h, H, rowsum, bt3b);
  centre_boxes(Hb, -R2, BR, W, h, H, rowsum, bHb);
  centre_boxes(Hbmb, -R2, BR, W, h, H, rowsum, bHbmb);
  for (int64_t u = 0; u < H; ++u) {
    for (int64_t v = 0; v < W; ++v) {
      const int64_t i = u * W + v;
      const double xa = double(a[i]), xb = double(b[i]);
      grad_a[i] = scalar_t(double(t1a[(u + h) * Wp + v + h]) - bt3a[i] - xa * bHa[i] + bHama[i]);
      grad_b[i] = scalar_t(double(t1b[(u + R2 + h) * Wp + v + h]) - bt3b[i] - xb * bHb[i] + bHbmb[i]);
    }
  }
}

// ---------------------------------------------------------------------------
// Operator entry points
// ---------------------------------------------------------------------------

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": `", name,
              "` must be a CPU tensor for the CPU kernel, got ", t.device());
}

template <typename F>
void for_each_plane(const NccGeometry& g, F&& f) {
  at::parallel_for(0, g.planes(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) f(p);
  });
}

// Asks Linux to back a large, not yet touched buffer with transparent huge
// pages (2 MB instead of 4 KB: about 500 times fewer page faults when it is
// first written). The volume's output is hundreds of MB, freshly mapped on
// every call, and its page faults were most of the operator's time
// (docs/perf_notes.md). Advice only: where the kernel declines (THP off, or
// the buffer not freshly mapped), nothing changes.
void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096, kHuge = uintptr_t(2) << 20;
  if (nbytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kPage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

at::Tensor ncc_volume_cpu(const at::Tensor& a_, const at::Tensor& b_,
                          int64_t patch, int64_t search_rows, double eps) {
  const auto g = check_inputs(a_, b_, patch, search_rows, eps, "ncc_volume");
  check_cpu(a_, "ncc_volume", "a");
  const auto a = a_.contiguous(), b = b_.contiguous();
  auto out = at::empty({g.N, g.C * g.R * g.W, g.H, g.W}, a.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out.data_ptr(), size_t(out.nbytes()));
  const int64_t per = g.R * g.W * g.plane();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_volume_cpu", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for_each_plane(g, [&](int64_t p) {
      forward_plane_dispatch<scalar_t>(g, pa + p * g.plane(), pb + p * g.plane(),
                              po + p * per, nullptr, nullptr);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ncc_max_cpu(const at::Tensor& a_,
                                               const at::Tensor& b_,
                                               int64_t patch,
                                               int64_t search_rows,
                                               double eps) {
  const auto g = check_inputs(a_, b_, patch, search_rows, eps, "ncc_max");
  check_cpu(a_, "ncc_max", "a");
  const auto a = a_.contiguous(), b = b_.contiguous();
  auto values = at::empty({g.N, g.C, g.H, g.W}, a.options());
  auto index = at::empty({g.N, g.C, g.H, g.W}, a.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, index};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_max_cpu", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* pv = values.data_ptr<scalar_t>();
    int64_t* pi = index.data_ptr<int64_t>();
    for_each_plane(g, [&](int64_t p) {
      const int64_t o = p * g.plane();
      forward_plane_dispatch<scalar_t>(g, pa + o, pb + o, nullptr, pv + o, pi + o);
    });
  });
  return {values, index};
}

std::tuple<at::Tensor, at::Tensor> ncc_max_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& b_,
    const at::Tensor& index_, int64_t patch, int64_t search_rows, double eps) {
  const char* op = "ncc_max_backward";
  const auto g = check_inputs(a_, b_, patch, search_rows, eps, op);
  check_cpu(a_, op, "a");
  check_like(grad_, a_, a_.sizes(), op, "grad", true);
  check_like(index_, a_, a_.sizes(), op, "index", false);
  const auto a = a_.contiguous(), b = b_.contiguous();
  const auto grad = grad_.contiguous(), index = index_.contiguous();
  auto grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  if (a.numel() == 0) return {grad_a, grad_b};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_max_backward_cpu", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const int64_t* pi = index.data_ptr<int64_t>();
    scalar_t* ga = grad_a.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    for_each_plane(g, [&](int64_t p) {
      const int64_t o = p * g.plane();
      if (g.P <= 8)
        max_backward_plane<scalar_t, true>(g, pg + o, pa + o, pb + o, pi + o, ga + o, gb + o);
      else
        max_backward_plane<scalar_t, false>(g, pg + o, pa + o, pb + o, pi + o, ga + o, gb + o);
    });
  });
  return {grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor> ncc_volume_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& b_,
    const at::Tensor& volume_, int64_t patch, int64_t search_rows,
    double eps) {
  const char* op = "ncc_volume_backward";
  const auto g = check_inputs(a_, b_, patch, search_rows, eps, op);
  check_cpu(a_, op, "a");
  const std::vector<int64_t> vshape{g.N, g.C * g.R * g.W, g.H, g.W};
  check_like(grad_, a_, vshape, op, "grad", true);
  check_like(volume_, a_, vshape, op, "volume", true);
  const auto a = a_.contiguous(), b = b_.contiguous();
  const auto grad = grad_.contiguous(), volume = volume_.contiguous();
  auto grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  if (a.numel() == 0) return {grad_a, grad_b};
  const int64_t per = g.R * g.W * g.plane();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ncc_volume_backward_cpu", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pv = volume.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* ga = grad_a.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    for_each_plane(g, [&](int64_t p) {
      const int64_t o = p * g.plane();
      volume_backward_plane<scalar_t>(g, pg + p * per, pa + o, pb + o,
                                      pv + p * per, ga + o, gb + o);
    });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(mspcnn, CPU, m) {
  m.impl("ncc_volume", &ncc_volume_cpu);
  m.impl("ncc_volume_backward", &ncc_volume_backward_cpu);
  m.impl("ncc_max", &ncc_max_cpu);
  m.impl("ncc_max_backward", &ncc_max_backward_cpu);
}

}  // namespace mspcnn
