#!/usr/bin/env python
"""The float32 arithmetic of the CUDA ncc_max forward, emulated in NumPy on the CPU.

The register-blocked CUDA kernel (`max_fast_kernel` in csrc/cuda/ncc_forward.cu) computes its own
patch statistics in float32 from the rows it stages in shared memory, and sums the patch products
as horizontal sums of P fused multiply-adds kept in a window of P rows. This tool repeats that
arithmetic operation by operation in NumPy (a fused multiply-add is one rounding: the product and
the sum in double, then rounded to float32), with and without the plane-mean shift (the kernel's
default since 2026-11-30; `MSPCNN_NCC_CUDA_SHIFT=0` turns it off), and compares each with the
float64 operator, beside the CPU kernel's
own float32 result. It predicts the CUDA kernel's accuracy on a machine without a GPU; the GPU tests
(tests/test_ncc_cuda.py) measure the kernel itself.

Inputs as in tools/bench_ncc.py's accuracy check: pool1-like maps, ReLU of a normal draw plus an
offset (0 and 10: the offset is where float32 loses digits in X - n mu_a mu_b).

    python tools/emulate_cuda_ncc.py [--pairs 1] [--channels 8] [--offsets 0 10] [--seed 0] [--json FILE]
                                     [--volume] [--tc [--tc-accumulate ieee truncate]]

About 1.5 s per channel and offset on one core. ``--volume`` also emulates the CUDA ncc_volume
forward (`volume_kernel`): the box-sum form X k_a k_b - (n mu_a k_a)(mu_b k_b) it had until
2026-11-30 (without and with the plane-mean shift) and the centred direct form it has now, each
against float64 beside the CPU kernel, on the same maps (about 0.3 s per channel and offset).
``--tc`` also emulates the opt-in tensor-core ncc_max forward (`max_tc_kernel`, TF32 and 3xTF32):
the argmax it chooses and the float32 value it returns for it (about 0.2 s per channel and offset);
`tc_warp_products` repeats its fragment index arithmetic, which tests/test_ncc_tc_emulation.py
checks against a plain matrix product. `emulate_max_tiled_plane` repeats the opt-in tiled max
forward (`max_tiled_kernel`, MSPCNN_NCC_MAX_FWD=tiled) thread by thread, which
tests/test_bench_tools.py checks against `emulate_plane`, bit for bit; `emulate_max_backward_rows`
repeats the opt-in max backward by rows (`max_backward_rows`, MSPCNN_NCC_MAX_BWD=rows), which it
checks against the CPU operator's float64 gradients.
"""
import argparse
import json
import sys

import numpy as np
import torch

import mspcnn.ops  # noqa: F401  (registers torch.ops.mspcnn)
from mspcnn.cli import run

F32, F64 = np.float32, np.float64
H, W, PATCH, ROWS, EPS = 72, 28, 5, 5, 0.01


def fma(a, b, c):
    """float32 fused multiply-add: a * b + c with one rounding (exact product and sum in double,
    then rounded; double rounding differs from a true FMA only in rare ties)."""
    return (np.asarray(a, F64) * np.asarray(b, F64) + np.asarray(c, F64)).astype(F32)


def _stats(S, rows, is_a, P, eps, shift):
    """The kernel's statistics loop: per centre, the factors (ka, n mu ka) for `a` or (kb, mu kb) for
    `b` from the staged rows S, in float32; a flat patch gets 0 when the maps are shifted."""
    n = P * P
    k = np.zeros((rows, W), F32)
    m = np.zeros((rows, W), F32)
    for r in range(rows):
        for w in range(W):
            x = S[r:r + P, w:w + P].ravel()
            s = F32(0)
            for v in x:
                s = F32(s + v)
            mu = F32(s / F32(n))
            ss = F32(0)
            for v in x:
                d = F32(v - mu)
                ss = fma(d, d, ss)[()]
            sig = F32(F32(np.sqrt(F32(ss / F32(n - 1)))) + F32(eps))
            if shift and (x == x[0]).all():
                continue  # flat: both factors 0
            if is_a:
                kk = F32(F32(1) / F32(F32(n - 1) * sig))
                k[r, w], m[r, w] = kk, F32(F32(F32(n) * mu) * kk)
            else:
                kk = F32(F32(1) / sig)
                k[r, w], m[r, w] = kk, F32(mu * kk)
    return k, m


def _staged(A, B, P, R, shift):
    """The kernels' staged maps in float32: zero padded, or shifted by their plane means (rounded
    to float32; 0 when not finite, as the kernels) with the padding at -mean. Returns
    (ca, cb, As, Bs); Bs has R // 2 more rows of padding above and below, for the search rows."""
    h, R2 = P // 2, R // 2

    def mean(X):  # plane_means: 0 where the mean is not finite (a NaN or an infinity in the plane)
        m = X.astype(F64).mean()
        return F32(m) if shift and np.isfinite(m) else F32(0)

    ca, cb = mean(A), mean(B)
    As = np.full((H + 2 * h, W + 2 * h), -ca, F32)
    As[h:h + H, h:h + W] = A - ca
    Bs = np.full((H + 2 * R2 + 2 * h, W + 2 * h), -cb, F32)
    Bs[R2 + h:R2 + h + H, h:h + W] = B - cb
    return ca, cb, As, Bs


def emulate_plane(A, B, P=PATCH, R=ROWS, eps=EPS, shift=False, tile_rows=None):
    """ncc_max of one (n, c) plane as max_fast_kernel computes it: (values, index). tile_rows: the
    rows of the kernel's tiles (fast_tiling in ncc_tile.cuh), which decide the window's slots (None:
    one tile)."""
    _, _, As, Bs = _staged(A, B, P, R, shift)
    ka, nmaka = _stats(As, H, True, P, eps, shift)
    kb, mbkb = _stats(Bs, H + R - 1, False, P, eps, shift)
    # Hs[u, k, w, col] = sum_j a(u, w + j) b(u + k, col + j), P fused multiply-adds in order j
    U = H + P - 1
    Hs = np.zeros((U, R, W, W), F32)
    for j in range(P):
        av = np.broadcast_to(As[:U, j:j + W][:, None, :, None], Hs.shape)
        bv = np.broadcast_to(np.stack([Bs[k:k + U, j:j + W] for k in range(R)], 1)[:, :, None, :], Hs.shape)
        Hs = fma(av, bv, Hs)
    values = np.zeros((H, W), F32)
    index = np.zeros((H, W), np.int64)
    tile_rows = tile_rows or H
    for ri in range(H):
        # the window's P rows are added in the order of their register slots: staged row of the
        # tile (starting at r0) modulo P
        r0 = ri // tile_rows * tile_rows
        order = sorted(range(ri, ri + P), key=lambda q: (q - r0) % P)
        x = Hs[order[0]].copy()
        for q in order[1:]:
            x = (x + Hs[q]).astype(F32)
        t = (ka[ri][None, :, None] * kb[ri:ri + R][:, None, :]).astype(F32)       # k, w, col
        c = (nmaka[ri][None, :, None] * mbkb[ri:ri + R][:, None, :]).astype(F32)
        v = fma(x, t, -c).transpose(1, 0, 2).reshape(W, R * W)                   # w, k * W + col
        index[ri] = v.argmax(1)  # the first maximum (or NaN), as the kernel's strict comparison
        values[ri] = np.take_along_axis(v, index[ri][:, None], 1)[:, 0]  # its value (the sign of a 0 included)
    return values, index


def _better_np(v, k, best, best_k):
    """_better on arrays (one entry a thread)."""
    v_nan, b_nan = v != v, best != best
    return np.where(b_nan, v_nan & (k < best_k), v_nan | (v > best) | ((v == best) & (k < best_k)))


def emulate_max_tiled_plane(A, B, P=PATCH, R=ROWS, eps=EPS, tile_rows=None, ct=16):
    """ncc_max of one plane as `max_tiled_kernel` computes it (csrc/cuda/ncc_max_tiled.cu,
    MSPCNN_NCC_MAX_FWD=tiled; the plane-mean shift on), repeating its index arithmetic thread by thread
    (the threads of a block as NumPy arrays): the shared-memory layout with its 16-byte aligned
    arrays, the vector loads of b and of the factors, each thread's CT candidate columns at its row
    offset k, the window's slots, the shuffles between candidate groups, the double-buffered
    (value, index) table and the final combination over k. Checks on the way (AssertionError): every
    load inside its array and aligned for its width, every table entry written once a pass, every
    output stored once. Returns (values, index), to compare with emulate_plane(..., tile_rows)."""
    NCG = 32 // ct
    WPW, GROUP, SW = 32 // NCG, NCG * 32, 32 + P - 1
    NB, VB = ct + P - 1, (4 if SW % 4 == 0 else 2)
    tile_rows = tile_rows or H
    ca, cb, AsG, BsG = _staged(A, B, P, R, True)
    kaG, nmakaG = _stats(AsG, H, True, P, eps, True)
    kbG, mbkbG = _stats(BsG, H + R - 1, False, P, eps, True)

    def up4(n):
        return (n + 3) // 4 * 4

    lay = {"As": 0}
    lay["Bs"] = lay["As"] + up4((tile_rows + P - 1) * SW)
    lay["ka"] = lay["Bs"] + up4((tile_rows + P + R - 2) * SW)
    lay["nmaka"] = lay["ka"] + tile_rows * 32
    lay["kb"] = lay["nmaka"] + tile_rows * 32
    lay["mbkb"] = lay["kb"] + (tile_rows + R - 1) * 32
    lay["best"] = lay["mbkb"] + (tile_rows + R - 1) * 32
    end = {"As": lay["Bs"], "Bs": lay["ka"], "ka": lay["nmaka"], "nmaka": lay["kb"], "kb": lay["mbkb"],
           "mbkb": lay["best"]}
    values = np.zeros((H, W), F32)
    index = np.zeros((H, W), np.int64)
    stores = np.zeros((H, W), np.int64)
    tid = np.arange(R * GROUP)
    k, lane = tid // GROUP, tid % 32
    w = (tid % GROUP) // 32 * WPW + lane % WPW
    c0 = lane // WPW * ct
    first = np.where(c0 < W, k * W + c0, INT_MAX)

    def load(name, addr, n=1, vec=1):
        assert (addr % vec == 0).all() and (lay[name] % 4 == 0), name          # aligned for the vector width
        assert (addr >= lay[name]).all() and (addr + n <= end[name]).all(), name  # inside the array
        return np.stack([smem[addr + i] for i in range(n)])

    for r0 in range(0, H, tile_rows):
        TR = min(tile_rows, H - r0)
        smem = np.full(lay["best"], np.nan, F32)  # unstaged entries NaN: reading one would show
        # stage_tile: rows r0 - h .. of a and r0 - R2 - h .. of b (rows r0 .. of the staged maps),
        # columns -h .. 31 + h, the columns past the staged maps' padding at -mean as well
        for name, G, fill, n in (("As", AsG, -ca, TR + P - 1), ("Bs", BsG, -cb, TR + P + R - 2)):
            block = np.full((n, SW), fill, F32)
            block[:, :G.shape[1]] = G[r0:r0 + n]
            smem[lay[name]:lay[name] + n * SW] = block.ravel()
        for name, G, n in (("ka", kaG, TR), ("nmaka", nmakaG, TR), ("kb", kbG, TR + R - 1), ("mbkb", mbkbG, TR + R - 1)):
            block = np.zeros((n, 32), F32)  # lanes past W: factors 0
            block[:, :W] = G[r0:r0 + n]
            smem[lay[name]:lay[name] + n * 32] = block.ravel()
        table_v = np.full(2 * P * R * 32, np.nan, F32)
        table_k = np.full(2 * P * R * 32, -1, np.int64)
        win = np.zeros((P, ct, tid.size), F32)
        for base in range(0, TR + P - 1, P):
            buf = (base // P) & 1
            written = np.zeros(table_v.size, np.int64)
            for s in range(P):
                uu = base + s
                if uu >= TR + P - 1:
                    break
                av = load("As", lay["As"] + uu * SW + w, P)
                bv = load("Bs", lay["Bs"] + (uu + k) * SW + c0, NB, VB)
                hs = np.zeros((ct, tid.size), F32)
                for j in range(P):
                    hs = fma(av[j][None, :], bv[j:j + ct], hs)
                win[s] = hs
                if uu < P - 1:
                    continue
                ri = uu - (P - 1)
                c2 = load("ka", lay["ka"] + ri * 32 + w)[0]
                c1 = load("nmaka", lay["nmaka"] + ri * 32 + w)[0]
                kbq = load("kb", lay["kb"] + (ri + k) * 32 + c0, ct, 4)
                mq = load("mbkb", lay["mbkb"] + (ri + k) * 32 + c0, ct, 4)
                best = np.full(tid.size, -np.inf, F32)
                bk = first.copy()
                for c in range(ct):
                    x = win[0][c]
                    for i in range(1, P):
                        x = (x + win[i][c]).astype(F32)
                    v = fma(x, (c2 * kbq[c]).astype(F32), -(c1 * mq[c]).astype(F32))
                    take = (c0 + c < W) & ~(v <= best) & (best == best)
                    best, bk = np.where(take, v, best), np.where(take, k * W + c0 + c, bk)
                off = WPW
                while off < 32:  # __shfl_xor_sync: each lane reads its partner's values first
                    ov, ok = best[tid ^ off], bk[tid ^ off]
                    take = _better_np(ov, ok, best, bk)
                    best, bk = np.where(take, ov, best), np.where(take, ok, bk)
                    off <<= 1
                wr = c0 == 0
                e = ((buf * P + s) * R + k[wr]) * 32 + w[wr]
                np.add.at(written, e, 1)
                table_v[e], table_k[e] = best[wr], bk[wr]
            assert written.max() <= 1
            for e in range(P * 32):  # the combination over k, one thread per (row, w)
                s, wo = divmod(e, 32)
                ri = base + s - (P - 1)
                if ri < 0 or ri >= TR or wo >= W:
                    continue
                e0 = (buf * P + s) * R * 32 + wo
                assert written[e0:e0 + R * 32:32].min() == 1
                bv_, bk_ = table_v[e0], table_k[e0]
                for kk in range(1, R):
                    v, i = table_v[e0 + kk * 32], table_k[e0 + kk * 32]
                    if _better(v, i, bv_, bk_):
                        bv_, bk_ = v, i
                values[r0 + ri, wo], index[r0 + ri, wo] = bv_, bk_
                stores[r0 + ri, wo] += 1
    assert (stores == 1).all()
    return values, index


# ---------------------------------------------------------------------------
# The tensor-core forward (max_tc_kernel, csrc/cuda/ncc_max_tc.cu)
# ---------------------------------------------------------------------------
def tf32(x):
    """float32 -> TF32 as cvt.rna.tf32.f32: 10 explicit mantissa bits, round to nearest, ties away
    from zero (add half a unit of the 13 dropped bits to the magnitude, then drop them). NaN and
    infinities pass unchanged. Returns float32."""
    x = np.asarray(x, F32)
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(F32)
    return np.where(np.isfinite(x), rounded, x).astype(F32)


def tc_split(x, passes):
    """The kernel's split of an operand: hi = tf32(x), and with 3 passes lo = tf32(x - hi)."""
    hi = tf32(x)
    return hi, (tf32((np.asarray(x, F32) - hi).astype(F32)) if passes == 3 else None)


W_TILE = 32  # the staged width of ncc_tile.cuh is 32 + P - 1


def _tc_offsets(P, tq):
    """The kernel's koff / kin of lane group position tq: per k-step s and e in (0, 1), the staged-row
    offset of patch entry kk = 8 s + tq + 4 e, and whether kk < P * P (else K's zero padding)."""
    SW, PP = W_TILE + P - 1, P * P
    steps = (PP + 7) // 8
    kin = [[8 * s + tq + 4 * e < PP for e in range(2)] for s in range(steps)]
    koff = [[((8 * s + tq + 4 * e) // P) * SW + (8 * s + tq + 4 * e) % P if kin[s][e] else 0
             for e in range(2)] for s in range(steps)]
    return koff, kin


def tc_warp_products(As, Bs, ri, k, P):
    """One warp's patch products X[w][col] (32 x 32) for output row ri and offset k, formed exactly as
    max_tc_kernel forms them: each lane reads its fragment elements at the kernel's offsets from the
    flattened staged rows (As, Bs: rows x (32 + P - 1)), the m16n8k8 tiles are multiplied with the
    PTX fragment layouts, and each accumulator register is mapped back to the (w, col) of the
    kernel's epilogue. Exact arithmetic (float64), to check the index arithmetic, not the rounding."""
    SW = W_TILE + P - 1
    a = np.asarray(As, F64).ravel()
    b = np.asarray(Bs, F64).ravel()
    steps = (P * P + 7) // 8
    offsets = [_tc_offsets(P, t) for t in range(4)]     # (koff, kin) of each lane group position
    acc = np.zeros((2, 4, 32, 4))                       # mt, nt, lane, register
    for s in range(steps):
        for mt in range(2):
            A_tile = np.zeros((16, 8))
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                koff, kin = offsets[t]
                base = ri * SW + 16 * mt + g
                frag = [a[base + koff[s][0]] if kin[s][0] else 0.0, a[base + koff[s][0] + 8] if kin[s][0] else 0.0,
                        a[base + koff[s][1]] if kin[s][1] else 0.0, a[base + koff[s][1] + 8] if kin[s][1] else 0.0]
                for r in range(4):                       # A (16 x 8): a_r at (g + 8 (r % 2), t + 4 (r // 2))
                    A_tile[g + 8 * (r % 2), t + 4 * (r // 2)] = frag[r]
            for nt in range(4):
                B_tile = np.zeros((8, 8))
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    koff, kin = offsets[t]
                    base = (ri + k) * SW + 8 * nt + g
                    for r in range(2):                   # B (8 x 8): b_r at (k = t + 4 r, n = g)
                        B_tile[t + 4 * r, g] = b[base + koff[s][r]] if kin[s][r] else 0.0
                D = A_tile @ B_tile
                for lane in range(32):                   # C (16 x 8): c_r at (g + 8 (r // 2), 2 t + r % 2)
                    g, t = lane >> 2, lane & 3
                    for r in range(4):
                        acc[mt, nt, lane, r] += D[g + 8 * (r // 2), 2 * t + r % 2]
    X = np.full((32, 32), np.nan)
    for lane in range(32):                               # the epilogue's slots: w = 16 mt + 8 half + g
        g, t = lane >> 2, lane & 3
        for mt in range(2):
            for nt in range(4):
                for half in range(2):
                    for e in range(2):
                        X[16 * mt + 8 * half + g, 8 * nt + 2 * t + e] = acc[mt, nt, lane, 2 * half + e]
    return X


def _better(v, k, best, best_k):
    """ncc_device.cuh's better(): larger first, NaN above every number, ties to the smaller index."""
    if best != best:
        return v != v and k < best_k
    if v != v:
        return True
    return v > best or (v == best and k < best_k)


INT_MAX = 2**31 - 1


def tc_warp_epilogue(Xk, ka, nmaka, kb, mbkb, W):
    """max_tc_kernel's epilogue and reduction for one output row, lane by lane: for each offset k the
    32 x 32 products Xk[k] (w, col) are normalised as each lane's registers hold them (slots
    q = 2 mt + half, columns 8 nt + 2 t + e), the lane keeps its first maximum per slot with the
    kernel's strict comparison, the four lanes of a group reduce with two xor shuffles in the order
    of better(), and lane t of group g writes slot t (w = 16 (t >> 1) + 8 (t & 1) + g), index 0 when
    no candidate was taken. ka, nmaka: the row's factors (32); kb, mbkb: (R, 32), the candidate
    centres' factors. Returns {w: index} for w < W: the kernel's choice, to compare with a plain
    argmax of the same values."""
    R = len(Xk)
    best = np.full((32, 4), -np.inf, F32)
    bk = np.full((32, 4), INT_MAX, np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c2 = [ka[16 * (q >> 1) + 8 * (q & 1) + g] for q in range(4)]
        c1 = [nmaka[16 * (q >> 1) + 8 * (q & 1) + g] for q in range(4)]
        for k in range(R):
            for nt in range(4):
                for e in range(2):
                    col = 8 * nt + 2 * t + e
                    if col >= W:
                        continue
                    for mt in range(2):
                        for half in range(2):
                            q = 2 * mt + half
                            w = 16 * mt + 8 * half + g
                            v = fma(Xk[k][w, col], F32(c2[q] * kb[k][col]), -F32(c1[q] * mbkb[k][col]))[()]
                            if not (v <= best[lane, q]) and best[lane, q] == best[lane, q]:
                                best[lane, q], bk[lane, q] = v, k * W + col
    for off in (1, 2):  # __shfl_xor_sync: every lane reads its partner's values before any update
        ob, ok = best.copy(), bk.copy()
        for lane in range(32):
            for q in range(4):
                if _better(ob[lane ^ off, q], ok[lane ^ off, q], best[lane, q], bk[lane, q]):
                    best[lane, q], bk[lane, q] = ob[lane ^ off, q], ok[lane ^ off, q]
    out = {}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        w = 16 * (t >> 1) + 8 * (t & 1) + g
        if w < W:
            out[w] = 0 if bk[lane, t] == INT_MAX else int(bk[lane, t])
    return out


def _round_toward_zero_f32(x):
    """float64 -> float32, rounded toward zero."""
    y = np.asarray(x, F64).astype(F32)
    over = np.abs(y.astype(F64)) > np.abs(x)
    return np.where(over, np.nextafter(y, F32(0)), y).astype(F32)


def mma_truncating(c, a, b, extra_bits=3):
    """One m16n8k8 step's D = C + sum_k A_k B_k as a truncating tensor core may compute it (a model
    after Fasi et al., "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021, for earlier
    generations): the products exact; the products and C aligned to the largest of their exponents
    with ``extra_bits`` bits below float32's 24, the bits beyond cut off (toward zero); the sum
    exact; the result cut to float32 (toward zero). a, b: (..., 8) TF32 values; c: (...,) float32."""
    terms = np.concatenate([np.asarray(c, F64)[..., None], np.asarray(a, F64) * np.asarray(b, F64)], -1)
    big = np.abs(terms).max(-1, keepdims=True)
    _, e = np.frexp(np.where(big > 0, big, 1.0))            # big in [2^(e-1), 2^e)
    q = np.ldexp(1.0, (e - 24 - extra_bits).astype(np.int64))
    cut = np.trunc(terms / q) * q
    return _round_toward_zero_f32(cut.sum(-1))


def emulate_tc_plane(A, B, passes, P=PATCH, R=ROWS, eps=EPS, accumulate="ieee", extra_bits=3):
    """ncc_max of one plane as max_tc_kernel computes it: (values, index, tc_values).

    The staged, shifted rows and their factors are the float32 kernel's (ncc_tile.cuh). Tensor-core
    arithmetic, as modelled here: operands rounded by tf32(), products exact, each m16n8k8 step's
    eight products summed in double and added to the float32 accumulator with one rounding (the
    hardware's internal order and width are not specified; this is the model the GPU run checks).
    ``accumulate="truncate"``: each step as :func:`mma_truncating` instead (alignment to the
    largest term with ``extra_bits`` guard bits, bits beyond cut off, the result cut to float32).
    The maximum is taken on those values (`tc_values`: the maximum as the tensor cores saw it);
    the returned value is the selected candidate's float32 NCC, recomputed as the kernel does: P
    rows of P fused multiply-adds, the row sums added in order."""
    h, n = P // 2, P * P
    _, _, As, Bs = _staged(A, B, P, R, True)
    ka, nmaka = _stats(As, H, True, P, eps, True)
    kb, mbkb = _stats(Bs, H + R - 1, False, P, eps, True)
    KP = (n + 7) // 8 * 8

    def im2col(S, rows):                                 # rows x W x KP: entry i P + j = S[r + i, w + j]
        out = np.zeros((rows, W, KP), F32)
        for i in range(P):
            for j in range(P):
                out[:, :, i * P + j] = S[i:i + rows, j:j + W]
        return out

    Am, Bm = im2col(As, H), im2col(Bs, H + R - 1)
    a_parts, b_parts = tc_split(Am, passes), tc_split(Bm, passes)
    order = ([(1, 0), (0, 1)] if passes == 3 else []) + [(0, 0)]   # (lo, hi), (hi, lo), (hi, hi)
    cand = np.zeros((H, W, R, W), F32)                   # ri, w, k, col
    for k in range(R):
        acc = np.zeros((H, W, W), F32)
        for s in range(KP // 8):
            ks = slice(8 * s, 8 * s + 8)
            for ia, ib in order:
                if accumulate == "truncate":
                    acc = mma_truncating(acc, a_parts[ia][:, :, None, ks], b_parts[ib][k:k + H, None, :, ks],
                                         extra_bits)
                    continue
                prod = np.einsum("rwk,rck->rwc", a_parts[ia][:, :, ks].astype(F64),
                                 b_parts[ib][k:k + H, :, ks].astype(F64))
                acc = (acc.astype(F64) + prod.astype(F32).astype(F64)).astype(F32)
        t = (ka[:, :, None] * kb[k:k + H][:, None, :]).astype(F32)
        c = (nmaka[:, :, None] * mbkb[k:k + H][:, None, :]).astype(F32)
        cand[:, :, k, :] = fma(acc, t, -c)
    flat = cand.reshape(H, W, R * W)
    index = flat.argmax(2)
    tc_values = flat.max(2)
    kr, col = index // W, index % W
    rr = np.arange(H)[:, None]
    ww = np.arange(W)[None, :]
    x = np.zeros((H, W), F32)
    for i in range(P):                                   # row sums of P fused multiply-adds, then the rows
        hs = np.zeros((H, W), F32)
        for j in range(P):
            hs = fma(As[rr + i, ww + j], Bs[rr + kr + i, col + j], hs)
        x = (x + hs).astype(F32)
    t = (ka * kb[rr + kr, col]).astype(F32)
    c = (nmaka * mbkb[rr + kr, col]).astype(F32)
    values = fma(x, t, -c)
    return values, index.astype(np.int64), tc_values


def _pool1_pair(pairs, channels, offset, seed):
    """The maps of every comparison here: ReLU of a normal draw plus `offset`, pool1's 72 x 28; with
    float64's ncc_max (values, index) and volume (pairs, channels, R W, H, W) on them."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(pairs, channels, H, W, generator=gen).relu() + offset
    b = torch.randn(pairs, channels, H, W, generator=gen).relu() + offset
    op = torch.ops.mspcnn
    v64, i64 = op.ncc_max(a.double(), b.double(), PATCH, ROWS, EPS)
    vol = op.ncc_volume(a.double(), b.double(), PATCH, ROWS, EPS).view(pairs, channels, ROWS * W, H, W)
    return a, b, v64, i64, vol


def _max_row(name, offset, v, i, v64, i64, vol):
    """One row: the largest error of the values against float64's maximum and against float64 at the
    variant's own index, its argmax changes and their largest float64 gap."""
    v, i = torch.as_tensor(v).double(), torch.as_tensor(i)
    at_index = vol.gather(2, i.unsqueeze(2)).squeeze(2)
    changed = i != i64
    gaps = (vol.gather(2, i64.unsqueeze(2)).squeeze(2) - at_index)[changed]
    return {"variant": name, "offset": offset, "outputs": int(v.numel()),
            "value_max_abs_error": float((v - v64).abs().max()),
            "value_at_index_max_abs_error": float((v - at_index).abs().max()),
            "argmax_changes": int(changed.sum()),
            "argmax_change_max_gap": float(gaps.abs().max()) if gaps.numel() else 0.0}


def _per_plane(fn, a, b):
    """(values, index) of fn(A, B) -> (values, index, ...) over every (pair, channel) plane."""
    v = np.zeros(a.shape, F32)
    i = np.zeros(a.shape, np.int64)
    for p in range(a.shape[0]):
        for c in range(a.shape[1]):
            v[p, c], i[p, c] = fn(a[p, c].numpy(), b[p, c].numpy())[:2]
    return v, i


def compare_tc(pairs, channels, offset, seed, accumulate=("ieee",)):
    """Rows for the tensor-core forward (TF32 and 3xTF32, emulated) on compare()'s maps, for each
    accumulation model of ``accumulate`` ("ieee", "truncate": see emulate_tc_plane)."""
    a, b, v64, i64, vol = _pool1_pair(pairs, channels, offset, seed)
    rows = []
    for model in accumulate:
        suffix = "" if model == "ieee" else ", truncating"
        for passes, name in ((1, "TF32"), (3, "3xTF32")):
            def plane(A, B, passes=passes, model=model):
                return emulate_tc_plane(A, B, passes, accumulate=model)
            rows.append(_max_row(f"tensor cores, {name}{suffix} (emulated)", offset, *_per_plane(plane, a, b),
                                 v64, i64, vol))
    return rows


def compare(pairs, channels, offset, seed):
    """Rows for the float32 fast kernel (emulated, as it was and with the shift) and the CPU kernel."""
    a, b, v64, i64, vol = _pool1_pair(pairs, channels, offset, seed)
    rows = []
    for shift in (False, True):
        v, i = _per_plane(lambda A, B: emulate_plane(A, B, shift=shift), a, b)
        rows.append(_max_row("CUDA fast kernel, shifted (emulated)" if shift else "CUDA fast kernel, as before (emulated)",
                             offset, v, i, v64, i64, vol))
    vc, ic = torch.ops.mspcnn.ncc_max(a, b, PATCH, ROWS, EPS)
    rows.append(_max_row("CPU kernel (measured)", offset, vc, ic, v64, i64, vol))
    return rows


def _patch_stats(X, rows0, rows, P, eps):
    """stats_kernel's mean and standard deviation (double, two passes, zero padding) of the P x P
    patches centred on rows rows0 .. rows0 + rows - 1 (may lie outside the map) and every column."""
    h = P // 2
    Hm, Wm = X.shape
    pad = np.zeros((Hm + 2 * (h + abs(rows0) + rows), Wm + 2 * h), F64)
    off = h + abs(rows0) + rows
    pad[off:off + Hm, h:h + Wm] = X
    win = np.lib.stride_tricks.sliding_window_view(pad, (P, P))          # centre (u - off + h, v)
    sel = win[off + rows0 - h:off + rows0 - h + rows, :Wm]
    mu = sel.mean(axis=(2, 3))
    sd = np.sqrt(((sel - mu[..., None, None]) ** 2).sum(axis=(2, 3)) / (P * P - 1))
    return mu, sd


def _volume_staging(A, B, P, R, eps, shift):
    """What the CUDA volume kernels stage for one plane (stage_row): the patch means of `a` and `b`
    (double, stats_kernel's), the staged maps (ca, cb, As, Bs as _staged) and the factors ka, kb in
    double (0 for a flat patch with the shift)."""
    R2, n = R // 2, P * P
    ma, sa = _patch_stats(A.astype(F64), 0, H, P, eps)
    mb, sb = _patch_stats(B.astype(F64), -R2, H + R - 1, P, eps)
    ca, cb, As, Bs = _staged(A, B, P, R, shift)
    ka64 = 1.0 / ((n - 1) * (sa + eps))
    kb64 = 1.0 / (sb + eps)
    if shift:
        ka64 = np.where(sa == 0, 0.0, ka64)
        kb64 = np.where(sb == 0, 0.0, kb64)
    return ma, mb, ca, cb, As, Bs, ka64, kb64


def emulate_volume_plane(A, B, form, P=PATCH, R=ROWS, eps=EPS):
    """ncc_volume of one (n, c) plane as the CUDA volume kernel computes it, (R W, H, W):
    form "box" (before 2026-11-30), "box-shifted" (the same with the plane-mean shift) or
    "centred" (now). The statistics are stats_kernel's (double)."""
    n = P * P
    ma, mb, ca, cb, As, Bs, ka64, kb64 = _volume_staging(A, B, P, R, eps, form == "box-shifted")
    ka, kb = ka64.astype(F32), kb64.astype(F32)
    out = np.zeros((R, W, H, W), F32)                                        # k, col, r, w
    for k in range(R):
        x = np.zeros((H, W, W), F32)                                         # r, w, col
        for i in range(P):
            for j in range(P):
                av = As[i:i + H, j:j + W][:, :, None]
                bv = Bs[k + i:k + i + H, j:j + W][:, None, :]
                if form == "centred":
                    x = fma((av - ma.astype(F32)[:, :, None]).astype(F32),
                            (bv - mb.astype(F32)[k:k + H][:, None, :]).astype(F32), x)
                else:
                    x = fma(av, bv, x)
        t = (ka[:, :, None] * kb[k:k + H][:, None, :]).astype(F32)
        if form == "centred":
            v = (x * t).astype(F32)
        else:
            nmaka = (n * (ma - F64(ca)) * ka64).astype(F32)
            mbkb = ((mb - F64(cb)) * kb64).astype(F32)
            c = (nmaka[:, :, None] * mbkb[k:k + H][:, None, :]).astype(F32)
            v = fma(x, t, -c)
        out[k] = v.transpose(2, 0, 1)                                        # col, r, w
    return out.reshape(R * W, H, W)


def emulate_volume_tiled_plane(A, B, P=PATCH, R=ROWS, eps=EPS):
    """ncc_volume of one plane as `volume_tiled_kernel` computes it (MSPCNN_NCC_VOLUME_FWD=tiled), with
    its index arithmetic: the centred operands staged as Ac[kk][w] (w < W4) and Bc[kk][c] (c < C4), W
    and R W rounded up to 4 with zeros; the thread of cell `cell` (the block's threads take the cells in
    turn; which thread takes a cell changes nothing) owns output columns w0 .. w0 + 3 and candidates
    c0 .. c0 + 3, w0 = 4 (cell % (W4 / 4)), c0 = 4 (cell // (W4 / 4)); each of its 16 accumulators is a
    chain of fused multiply-adds in kk, then x (ka kb). Returns (volume (R W, H, W), writes): ``writes``
    counts the stores of each output (each must be stored once)."""
    PP = P * P
    ma, mb, _, _, As, Bs, ka64, kb64 = _volume_staging(A, B, P, R, eps, False)
    ka, kb = ka64.astype(F32), kb64.astype(F32)
    RW = R * W
    W4, C4 = (W + 3) // 4 * 4, (RW + 3) // 4 * 4
    fa, fb = ma.astype(F32), mb.astype(F32)                                  # (H, W), (H + R - 1, W)
    # The staging loops, for every output row r at once: entry e -> (kk, w) or (kk, c).
    Ac = np.zeros((H, PP, W4), F32)
    for e in range(PP * W4):
        kk, w = divmod(e, W4)
        i, j = divmod(kk, P)
        if w < W:
            Ac[:, kk, w] = As[i:i + H, w + j] - fa[:, w]
    Bc = np.zeros((H, PP, C4), F32)
    for e in range(PP * C4):
        kk, c = divmod(e, C4)
        i, j = divmod(kk, P)
        k, col = divmod(c, W)
        if c < RW:
            Bc[:, kk, c] = Bs[k + i:k + i + H, col + j] - fb[k:k + H, col]
    kbc = np.zeros((H, RW), F32)                                             # kb of candidate c of row r
    for c in range(RW):
        k, col = divmod(c, W)
        kbc[:, c] = kb[k:k + H, col]
    out = np.zeros((RW, H, W), F32)
    writes = np.zeros((RW, H, W), np.int64)
    wg = W4 // 4
    cells = wg * (C4 // 4)
    for cell in range(cells):
        w0, c0 = 4 * (cell % wg), 4 * (cell // wg)
        x = np.zeros((H, 4, 4), F32)
        for kk in range(PP):
            av = Ac[:, kk, w0:w0 + 4]
            bv = Bc[:, kk, c0:c0 + 4]
            x = fma(av[:, :, None], bv[:, None, :], x)
        for q in range(4):
            c = c0 + q
            if c >= RW:
                break
            for p_ in range(4):
                w = w0 + p_
                if w < W:
                    out[c, :, w] = x[:, p_, q] * (ka[:, w] * kbc[:, c])
                    writes[c, :, w] += 1
    return out, writes


V_CHUNK = 8  # kVChunk of ncc_volume_backward.cu


def emulate_volume_grad_tiled_v(G, ka, kb, P, R, grad_b):
    """The loop of `volume_grad_tiled` that builds V for every block (row u) of one plane, in float64,
    once as the kernel reads its operands since 2026-12-01 (ka and kb rows staged in shared memory:
    kas rows pa0 .. pa0 + S - 1, kbs rows qb0 .. qb0 + S - 1, S = P + R - 1, rows outside the maps
    staged as 0; the gradient volume read V_CHUNK terms at a time from rows clamped into the plane,
    then summed) and once from the global arrays, term by term, as before. G: the gradient volume
    (R, W, H, W) [k][candidate column][output row][output column]; ka (H, W); kb (H + R - 1, W).
    Returns (staged, direct, bad): V of every row both ways (H, R, W, W) and the count of reads that
    fell outside the staged rows or on a row staged as 0 (the kernel must make none)."""
    _, Wm, Hm, _ = G.shape
    h, R2, S = P // 2, R // 2, P + R - 1
    BR = Hm + R - 1
    staged = np.zeros((Hm, R, Wm, Wm))
    direct = np.zeros((Hm, R, Wm, Wm))
    bad = 0
    for u in range(Hm):
        pa0 = u - h - R + 1 + R2 if grad_b else u - h
        qb0 = u - h + R2 if grad_b else u - h
        kas = np.zeros((S, Wm))
        kbs = np.zeros((S, Wm))
        for t in range(S):
            if 0 <= pa0 + t < Hm:
                kas[t] = ka[pa0 + t]
            if 0 <= qb0 + t < BR:
                kbs[t] = kb[qb0 + t]
        for k in range(R):
            for c in range(Wm):
                s1 = np.zeros(Wm)
                s2 = np.zeros(Wm)
                for i0 in range(-h, h + 1, V_CHUNK):
                    # the chunk's loads first, from rows clamped into the plane (no branch)
                    gv = []
                    for t in range(V_CHUNK):
                        i = min(i0 + t, h)
                        pr = u - i - k + R2 if grad_b else u - i
                        gv.append(G[k, c, min(max(pr, 0), Hm - 1)])
                    for t in range(V_CHUNK):
                        i = i0 + t
                        pr = u - i - k + R2 if grad_b else u - i
                        if i > h or pr < 0 or pr >= Hm:
                            continue
                        qe = u - i + R2 if grad_b else pr + k
                        ta, tb = pr - pa0, qe - qb0
                        if not (0 <= ta < S and 0 <= tb < S and 0 <= qe < BR):
                            bad += 1
                            continue
                        s1 = s1 + gv[t] * kas[ta] * kbs[tb, c]
                        s2 = s2 + G[k, c, pr] * ka[pr] * kb[qe, c]
                staged[u, k, c] = s1
                direct[u, k, c] = s2
    return staged, direct, bad


CENTRE_WARPS = 8  # kCentreWarps of ncc_volume_backward.cu


def volume_centre_sums(G, V, ma, sa, mb, sb, P, R, eps):
    """volume_centre_a and volume_centre_b of one plane, as written (a sum per output over its
    candidates, a sum per candidate centre over its outputs, a division per term), in float64.
    G, V: (R, W, H, W) [k][candidate column][output row][output column]; ma, sa: (H, W); mb, sb:
    (H + R - 1, W). Returns (ka, t3a, Ha, kb, t3b, Hb)."""
    _, Wm, Hm, _ = G.shape
    nm1 = P * P - 1
    BR = Hm + R - 1
    ka = 1.0 / (nm1 * (sa + eps))
    t3a, gna = np.zeros((Hm, Wm)), np.zeros((Hm, Wm))
    for r in range(Hm):
        for w in range(Wm):
            for k in range(R):
                for c in range(Wm):
                    gv = G[k, c, r, w]
                    gna[r, w] += gv * V[k, c, r, w]
                    t3a[r, w] += gv * ka[r, w] / (sb[r + k, c] + eps) * mb[r + k, c]
    Ha = np.where(sa > 0, gna * ka / np.where(sa > 0, sa, 1), 0.0)
    kb = 1.0 / (sb + eps)
    t3b, gnb = np.zeros((BR, Wm)), np.zeros((BR, Wm))
    for qe in range(BR):
        for c in range(Wm):
            for k in range(R):
                r = qe - k
                if not 0 <= r < Hm:
                    continue
                for w in range(Wm):
                    gv = G[k, c, r, w]
                    gnb[qe, c] += gv * V[k, c, r, w]
                    t3b[qe, c] += gv * kb[qe, c] / (nm1 * (sa[r, w] + eps)) * ma[r, w]
    Hb = np.where(sb > 0, gnb * kb / (np.where(sb > 0, sb, 1) * nm1), 0.0)
    return ka, t3a, Ha, kb, t3b, Hb


def emulate_volume_centre_fused(G, V, ma, sa, mb, sb, P, R, eps):
    """volume_centre_fused and volume_centre_b_sum (MSPCNN_NCC_VOLUME_CENTRE=fused) on one plane,
    with their index arithmetic: block = output row r, warp y takes the candidates kc = y,
    y + CENTRE_WARPS, ..., lane = output column; each warp's candidate sums written to the partial
    table (checked: each entry once), then per candidate centre the R rows r = qe - k added.
    Arguments as volume_centre_sums; returns the same six arrays, to compare with it (the order of
    the sums differs: equal to rounding)."""
    _, Wm, Hm, _ = G.shape
    nm1 = P * P - 1
    BR = Hm + R - 1
    Gf, Vf = G.ravel(), V.ravel()  # the plane's gradient volume and volume, flat as in memory
    HW = Hm * Wm
    part = np.full(2 * Hm * R * Wm, np.nan)
    writes = np.zeros(Hm * R * Wm, np.int64)
    ka, t3a, Ha = np.zeros((Hm, Wm)), np.zeros((Hm, Wm)), np.zeros((Hm, Wm))
    lane = np.arange(32)
    on = lane < Wm
    for r in range(Hm):
        e = np.where(on, lane, 0)
        k_a = np.where(on, 1.0 / (nm1 * (sa[r, e] + eps)), 0.0)
        m_a = np.where(on, ma[r, e], 0.0)
        red = np.zeros((CENTRE_WARPS, 2, 32))
        for warp in range(CENTRE_WARPS):
            gn_a, t3_a = np.zeros(32), np.zeros(32)
            for kc in range(warp, R * Wm, CENTRE_WARPS):
                k, col = divmod(kc, Wm)
                o = (k * Wm + col) * HW + r * Wm + lane
                gv = np.where(on, Gf[np.where(on, o, 0)], 0.0)
                vv = np.where(on, Vf[np.where(on, o, 0)], 0.0)
                k_b = 1.0 / (sb[r + k, col] + eps)
                gk = gv * k_a * k_b
                gn, t3 = gv * vv, gk * m_a
                gn_a, t3_a = gn_a + gn, t3_a + gk * mb[r + k, col]
                i = r * R * Wm + kc
                part[2 * i], part[2 * i + 1] = gn.sum(), t3.sum()
                writes[i] += 1
            red[warp] = gn_a, t3_a
        gn, t3 = red[:, 0].sum(0), red[:, 1].sum(0)
        ka[r], t3a[r] = k_a[:Wm], t3[:Wm]
        Ha[r] = np.where(sa[r] > 0, gn[:Wm] * k_a[:Wm] / np.where(sa[r] > 0, sa[r], 1), 0.0)
    assert (writes == 1).all()
    kb, t3b, Hb = np.zeros((BR, Wm)), np.zeros((BR, Wm)), np.zeros((BR, Wm))
    for qe in range(BR):
        for col in range(Wm):
            gn = t3 = 0.0
            for k in range(R):
                r = qe - k
                if 0 <= r < Hm:
                    i = r * R * Wm + k * Wm + col
                    gn, t3 = gn + part[2 * i], t3 + part[2 * i + 1]
            kb[qe, col] = 1.0 / (sb[qe, col] + eps)
            t3b[qe, col] = t3
            Hb[qe, col] = gn * kb[qe, col] / (sb[qe, col] * nm1) if sb[qe, col] > 0 else 0.0
    return ka, t3a, Ha, kb, t3b, Hb


ROW_WARPS = 8  # kRowWarps of ncc_max_backward.cu


def _row_bands(Hm):
    """max_backward_rows' bands: warp y's output rows r0 .. r1 - 1 (empty past the plane), as (r0, r1)."""
    band = -(-Hm // ROW_WARPS)
    return [(warp * band, min(Hm, warp * band + band)) for warp in range(ROW_WARPS)]


def _band_owns_row(u, h, r0, r1, Hm):
    """Whether row u of grad_a gets contributions from the band r0 .. r1 - 1 only (max_backward_rows
    stores it plainly; elsewhere every band that reaches it adds atomically)."""
    return max(u - h, 0) >= r0 and min(u + h, Hm - 1) < r1


def grad_coef(g, cov, mu_a, s_a, mu_b, s_b, nm1, eps):
    """ncc_grad_coef (csrc/ncc_grad_coef.h) on arrays: (al_a, be_a, c_a, al_b, be_b, c_b)."""
    siga, sigb = s_a + eps, s_b + eps
    ncc = cov / (nm1 * siga * sigb)
    inv_sa = np.where(s_a > 0, 1.0 / np.where(s_a > 0, s_a, 1.0), 0.0)
    inv_sb = np.where(s_b > 0, 1.0 / np.where(s_b > 0, s_b, 1.0), 0.0)
    fa, fb = g / (nm1 * siga), g / (nm1 * sigb)
    al_a, be_a = fa / sigb, -fa * ncc * inv_sa
    al_b, be_b = fb / siga, -fb * ncc * inv_sb
    return al_a, be_a, -al_a * mu_b - be_a * mu_a, al_b, be_b, -al_b * mu_a - be_b * mu_b


def _shfl(v, d):
    """__shfl_down_sync (d > 0) or __shfl_up_sync (d < 0) of a warp's 32 values: lane L reads lane
    L + d, or keeps its own value where L + d is outside the warp."""
    src = np.arange(32) + d
    return np.where((src >= 0) & (src < 32), v[np.clip(src, 0, 31)], v)


def emulate_max_backward_rows(A, B, G, I, P=PATCH, R=ROWS, eps=EPS, global_b=False):
    """max_backward_rows (MSPCNN_NCC_MAX_BWD=rows or, global_b, rows_global; 2026-12-01) on one plane,
    in float64, with its index arithmetic: warp y owns output rows r0 = y * band .. r1 - 1, lane w
    output column w; each output's contributions to a go into a window of P rows x P columns (padded
    row r0 + t in slot t mod P), and after output row r the window's padded row r goes to its owners
    by shuffles (_shfl, whose lanes past the warp keep their own value: the kernel masks them), a
    plain store where no other band reaches the row, an atomic add elsewhere; b's contributions go
    to the padded shared accumulator or, global_b, straight to the plane where inside it.
    A, B, G: (H, W) maps and incoming gradient; I: (H, W) selected candidate indices.
    Returns (grad_a, grad_b, stores, atomics), the last two counting per pixel of grad_a the plain
    stores and the atomic adds the kernel makes (the test checks each pixel is stored once or only
    added to)."""
    Hm, Wm = A.shape
    h, R2 = P // 2, R // 2
    Wp, rows_a, rows_b = Wm + 2 * h, Hm + 2 * h, Hm + 2 * R2 + 2 * h
    Ap, Bp = np.zeros((rows_a, Wp)), np.zeros((rows_b, Wp))
    Ap[h:h + Hm, h:h + Wm] = A
    Bp[R2 + h:R2 + h + Hm, h:h + Wm] = B
    GA, GBp, gB = np.zeros((Hm, Wm)), np.zeros((rows_b, Wp)), np.zeros((Hm, Wm))
    stores, atomics = np.zeros((Hm, Wm), np.int64), np.zeros((Hm, Wm), np.int64)
    n, nm1 = float(P * P), float(P * P - 1)
    lane = np.arange(32)
    on = lane < Wm
    ii, jj = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    for r0, r1 in _row_bands(Hm):
        n_out = r1 - r0
        steps = n_out + P - 1 if n_out > 0 else 0
        win = np.zeros((P, P, 32))  # [slot][column j][lane]
        for t in range(steps):
            s, r = t % P, r0 + t
            if t < n_out:
                gv = np.where(on, G[r, np.where(on, lane, 0)], 0.0)
                for w in np.flatnonzero(gv != 0):
                    idx = int(I[r, w])
                    qr, qc = r + idx // Wm - R2, idx % Wm
                    x = Ap[r:r + P, w:w + P]
                    y = Bp[qr + R2:qr + R2 + P, qc:qc + P]
                    mua, mub = x.sum() / n, y.sum() / n
                    dx, dy = x - mua, y - mub
                    s_a, s_b = np.sqrt((dx * dx).sum() / nm1), np.sqrt((dy * dy).sum() / nm1)
                    al_a, be_a, c_a, al_b, be_b, c_b = grad_coef(gv[w], (dx * dy).sum(), mua, s_a,
                                                                 mub, s_b, nm1, eps)
                    win[(s + ii) % P, jj, w] += al_a * y + be_a * x + c_a
                    vb = al_b * x + be_b * y + c_b
                    if global_b:
                        vr, vc = qr + ii - h, qc + jj - h
                        inside = (vr >= 0) & (vr < Hm) & (vc >= 0) & (vc < Wm)
                        np.add.at(gB, (vr[inside], vc[inside]), vb[inside])
                    else:
                        np.add.at(GBp, (qr + R2 + ii, qc + jj), vb)
            total = np.zeros(32)
            for j in range(P):
                d = h - j
                v = _shfl(win[s, j], d)
                total += np.where((lane + d >= 0) & (lane + d < 32), v, 0.0)
                win[s, j] = 0.0
            u = r - h
            if 0 <= u < Hm:
                if _band_owns_row(u, h, r0, r1, Hm):
                    GA[u] = total[:Wm]
                    stores[u] += 1
                else:
                    GA[u] += total[:Wm]
                    atomics[u] += 1
    grad_b = gB if global_b else GBp[R2 + h:R2 + h + Hm, h:h + Wm]
    return GA, grad_b.copy(), stores, atomics


def shared_atomic_rounds(G, I, P, R, kernel, W=None, threads=256):
    """How many rounds the shared-memory float atomics of the max backward take on one plane, in a model
    of the compare-and-swap loop a float atomicAdd on shared memory compiles to: in each round one lane
    per shared-memory bank (32 banks of 4 bytes) stores, and the other lanes of that bank fail and go
    round again, so one warp-wide atomic takes as many rounds as the most lanes that address one bank
    (distinct addresses in one bank included). Failures caused by other warps are not modelled.
    G: (H, W) incoming gradient (lanes with 0 skip the output); I: (H, W) selected candidates;
    kernel "fused" (max_backward_fused<float, P>: 256 consecutive outputs a block pass, a's and b's
    atomics) or "rows" (max_backward_rows<float, P, false>: a warp a row of outputs, b's atomics and
    the flushes at the bands' edges). Returns (warp-wide atomics the code makes, rounds)."""
    Hm, Wm = I.shape
    h, R2 = P // 2, R // 2
    Wp, rows_a, rows_b = Wm + 2 * h, Hm + 2 * h, Hm + 2 * R2 + 2 * h
    made = rounds = 0

    def warp_atomic(words):
        nonlocal made, rounds
        if len(words):
            made += 1
            rounds += int(np.bincount(np.asarray(words) % 32, minlength=32).max())

    if kernel == "fused":
        ga0, gb0 = (rows_a + rows_b) * Wp, (2 * rows_a + rows_b) * Wp  # word offsets of GA and GB
        for start in range(0, Hm * Wm, 32):
            e = np.arange(start, min(start + 32, Hm * Wm))
            e = e[G.ravel()[e] != 0]
            r, w = e // Wm, e % Wm
            idx = I.ravel()[e]
            qr, qc = r + idx // Wm - R2, idx % Wm
            for i in range(P):
                for j in range(P):
                    warp_atomic(ga0 + (r + i) * Wp + w + j)
                    warp_atomic(gb0 + (qr + R2 + i) * Wp + qc + j)
    elif kernel == "rows":
        gb0 = (rows_a + rows_b) * Wp + Hm * Wm
        for r in range(Hm):
            w = np.flatnonzero(G[r] != 0)
            idx = I[r, w]
            qr, qc = r + idx // Wm - R2, idx % Wm
            for i in range(P):
                for j in range(P):
                    warp_atomic(gb0 + (qr + R2 + i) * Wp + qc + j)
        for r0, r1 in _row_bands(Hm):  # the flushes added atomically: rows other bands reach too
            for u in range(max(r0 - h, 0), min(r1 + h, Hm)):
                if not _band_owns_row(u, h, r0, r1, Hm):
                    warp_atomic(u * Wm + np.arange(Wm))
    else:
        raise ValueError(f"shared_atomic_rounds: kernel must be 'fused' or 'rows', got {kernel!r}")
    return made, rounds


def compare_volume(pairs, channels, offset, seed):
    """Rows of the volume's largest error against float64 for each emulated form and the CPU kernel,
    on the maps compare() uses."""
    a, b, _, _, vol64 = _pool1_pair(pairs, channels, offset, seed)
    rows = []
    for form, name in (("box", "CUDA volume, box-sum form (emulated)"),
                       ("box-shifted", "CUDA volume, box-sum shifted (emulated)"),
                       ("centred", "CUDA volume, centred (emulated)")):
        err = 0.0
        for p in range(pairs):
            for c in range(channels):
                v = emulate_volume_plane(a[p, c].numpy(), b[p, c].numpy(), form)
                err = max(err, float(np.abs(v.astype(F64) - vol64[p, c].numpy()).max()))
        rows.append({"variant": name, "offset": offset, "outputs": int(vol64.numel()), "volume_max_abs_error": err})
    vc = torch.ops.mspcnn.ncc_volume(a, b, PATCH, ROWS, EPS).view_as(vol64)
    rows.append({"variant": "CPU kernel (measured)", "offset": offset, "outputs": int(vol64.numel()),
                 "volume_max_abs_error": float((vc.double() - vol64).abs().max())})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=1, help="pairs of maps (default 1)")
    p.add_argument("--channels", type=int, default=8, help="channels per map, of pool1's 32 (default 8)")
    p.add_argument("--offsets", type=float, nargs="+", default=[0.0, 10.0], help="added to the ReLU maps (default 0 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the maps (default 0)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--volume", action="store_true", help="also emulate the CUDA ncc_volume forward's forms")
    p.add_argument("--tc", action="store_true",
                   help="also emulate the tensor-core ncc_max forward (TF32 and 3xTF32, ncc_max_tc.cu)")
    p.add_argument("--tc-accumulate", nargs="+", choices=("ieee", "truncate"), default=["ieee"],
                   help="with --tc: the tensor cores' accumulation models (ieee: one rounding a step, the default; "
                   "truncate: alignment to the largest term with 3 guard bits, bits beyond cut off, as measured "
                   "on earlier NVIDIA generations)")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.channels < 1:
        p.error("--pairs and --channels must be positive")
    rows = []
    for offset in args.offsets:
        rows += compare(args.pairs, args.channels, offset, args.seed)
    print(f"ncc_max float32 against float64, pool1 shape {H} x {W}, {args.pairs} pair(s) x {args.channels} channels, "
          f"patch {PATCH}, {ROWS} search rows, seed {args.seed}")
    print(f"{'variant':<40} {'offset':>6} {'max |error|':>12} {'argmax changes':>15} {'largest gap':>12}")
    for r in rows:
        print(f"{r['variant']:<40} {r['offset']:>6g} {r['value_max_abs_error']:>12.2e} "
              f"{r['argmax_changes']:>8} / {r['outputs']:<6}{r['argmax_change_max_gap']:>11.1e}")
    tc_rows = []
    if args.tc:
        for offset in args.offsets:
            tc_rows += compare_tc(args.pairs, args.channels, offset, args.seed, args.tc_accumulate)
        print("\nncc_max on tensor cores (emulated) against float64, same maps; the value returned is the float32 NCC "
              "of the index chosen")
        print(f"{'variant':<44} {'offset':>6} {'max |error|':>12} {'at its index':>12} {'argmax changes':>15} "
              f"{'largest gap':>12}")
        for r in tc_rows:
            print(f"{r['variant']:<44} {r['offset']:>6g} {r['value_max_abs_error']:>12.2e} "
                  f"{r['value_at_index_max_abs_error']:>12.2e} {r['argmax_changes']:>8} / {r['outputs']:<6}"
                  f"{r['argmax_change_max_gap']:>11.1e}")
    volume_rows = []
    if args.volume:
        for offset in args.offsets:
            volume_rows += compare_volume(args.pairs, args.channels, offset, args.seed)
        print("\nncc_volume float32 against float64, same maps")
        print(f"{'variant':<40} {'offset':>6} {'max |error|':>12} {'outputs':>10}")
        for r in volume_rows:
            print(f"{r['variant']:<40} {r['offset']:>6g} {r['volume_max_abs_error']:>12.2e} {r['outputs']:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "volume_rows": volume_rows, "tc_rows": tc_rows, "pairs": args.pairs, "channels": args.channels,
                       "seed": args.seed}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
