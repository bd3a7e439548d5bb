"""k-reciprocal re-ranking (Z. Zhong, L. Zheng, D. Cao, S. Li, "Re-ranking Person Re-identification
with k-reciprocal Encoding", CVPR 2017), written from the paper's definitions, with memory bounded
by the number of images times k (never an images x images matrix).

Definitions (P = the probes and gallery images together; d the squared Euclidean distance of
L2-normalised features, in [0, 4]):

* N(p, k): the k images nearest to p in P, p itself included (it is nearest, at distance 0;
  ties by position).
* R(p, k) = {g in N(p, k) : p in N(g, k)}, the k-reciprocal neighbours of p.
* R*(p, k) = R(p, k) united with R(q, k/2) (k/2 rounded) for every q in R(p, k) such that
  |R(p, k) & R(q, k/2)| >= 2/3 |R(q, k/2)|: the robust expansion.
* V_p: a vector over P with V_p[g] = exp(-d(p, g)) for g in R*(p, k1), 0 elsewhere, normalised to
  sum 1.
* Local query expansion: V_p <- the mean of V_g over g in N(p, k2).
* Jaccard distance: d_J(p, g) = 1 - sum_j min(V_p[j], V_g[j]) / sum_j max(V_p[j], V_g[j]); with
  vectors summing to 1, sum max = 2 - sum min.
* Final distance: d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g).

:func:`k_reciprocal_distances` computes d* for the probe x gallery pairs: neighbours from chunked
distance blocks (top-k only), V as sparse rows, sum-min through an inverted index of V's columns.
:func:`k_reciprocal_dense` is the same definitions written directly with full matrices: the
reference of the tests. Defaults k1 = 20, k2 = 6, lambda = 0.3 (the paper's, for Market-1501).
"""
import numpy as np
import torch

__all__ = ["k_reciprocal_distances", "k_reciprocal_dense", "squared_distances"]


def squared_distances(x, y):
    """Squared Euclidean distances of the rows of x and y (float64 for the ranking's sake)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    return (torch.cdist(x, y) ** 2).numpy()


def _normalised(features):
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if f.dim() != 2:
        raise ValueError(f"features must be N x D, got shape {list(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError("features must be finite")
    return torch.nn.functional.normalize(f, dim=1)


def _check(k1, k2, lambda_value, n):
    if not (isinstance(k1, int) and isinstance(k2, int) and k1 >= 1 and k2 >= 1):
        raise ValueError(f"k1 and k2 must be integers >= 1, got {k1} and {k2}")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda must be in [0, 1], got {lambda_value}")
    if n < 2:
        raise ValueError("re-ranking needs at least two images")


def _reciprocal(p, k, nearest):
    """R(p, k) from the neighbour lists: ``nearest[i]`` holds N(i, K) for some K >= k."""
    forward = nearest[p][:k]
    return [int(g) for g in forward if p in nearest[g][:k]]


def _expanded(p, k1, nearest):
    """R*(p, k1) as a sorted array."""
    base = _reciprocal(p, k1, nearest)
    half = int(np.around(k1 / 2))
    members = set(base)
    out = set(base)
    for q in base:
        rq = _reciprocal(q, half, nearest)
        if len(members.intersection(rq)) >= 2 / 3 * len(rq):
            out.update(rq)
    return np.array(sorted(out), dtype=np.int64)


def _nearest_lists(f, k, chunk):
    """N(i, k) for every row of f (k nearest, self first), from blocks of ``chunk`` rows: memory
    chunk x N distances at a time."""
    n = f.shape[0]
    out = np.empty((n, k), np.int64)
    for start in range(0, n, chunk):
        block = torch.cdist(f[start:start + chunk], f) ** 2
        rows = torch.arange(start, min(start + chunk, n))
        block[torch.arange(len(rows)), rows] = -1.0  # itself first, whatever the rounding
        # stable order: distance, then position (topk is not stable; sort the k + margin candidates)
        kk = min(n, k + 8)
        vals, idx = torch.topk(block, kk, dim=1, largest=False)
        for r in range(len(rows)):
            v, i = vals[r].numpy(), idx[r].numpy()
            order = np.lexsort((i, v))
            cand = i[order]
            # ties at the k-th distance beyond the margin are rare; resolve exactly when they occur
            if kk < n and v[order][-1] == v[order][k - 1]:
                full = block[r].numpy()
                cand = np.lexsort((np.arange(n), full))
            out[start + r] = cand[:k]
    return out


def k_reciprocal_distances(query, gallery, k1=20, k2=6, lambda_value=0.3, chunk=1024):
    """Re-ranked distances d* (module docstring) of ``query`` (Q x D) to ``gallery`` (G x D), a
    Q x G float64 array. Memory: the output, plus O((Q + G) x k1) for the neighbourhoods, plus one
    ``chunk`` x (Q + G) block of distances at a time."""
    q = _normalised(query)
    g = _normalised(gallery)
    f = torch.cat([q, g])
    n, nq = f.shape[0], q.shape[0]
    _check(k1, k2, lambda_value, n)
    k = min(n, max(k1, k2))
    nearest = _nearest_lists(f, k, chunk)
    # V as sparse rows: (columns, weights), weights exp(-d) normalised
    rows = []
    for p in range(n):
        cols = _expanded(p, min(k1, n), nearest)
        d = (torch.cdist(f[p:p + 1], f[torch.from_numpy(cols)]) ** 2).numpy()[0]
        w = np.exp(-d)
        rows.append((cols, w / w.sum()))
    # local query expansion: mean of the rows of N(p, k2)
    if k2 > 1:
        expanded = []
        for p in range(n):
            acc = {}
            for nb in nearest[p][:min(k2, n)]:
                for c, w in zip(*rows[nb]):
                    acc[c] = acc.get(c, 0.0) + w
            cols = np.array(sorted(acc), np.int64)
            expanded.append((cols, np.array([acc[c] for c in cols]) / min(k2, n)))
        rows = expanded
    # inverted index: column j -> (images i, V_i[j])
    inverted = {}
    for i, (cols, w) in enumerate(rows):
        for c, v in zip(cols, w):
            inverted.setdefault(int(c), []).append((i, v))
    out = np.empty((nq, g.shape[0]), np.float64)
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        d = (torch.cdist(f[start:stop], f[nq:]) ** 2).numpy()
        for p in range(start, stop):
            sum_min = np.zeros(n)
            for c, v in zip(*rows[p]):
                for i, u in inverted[int(c)]:
                    sum_min[i] += min(v, u)
            m = sum_min[nq:]
            jaccard = 1 - m / (2 - m)
            out[p] = (1 - lambda_value) * jaccard + lambda_value * d[p - start]
    return out


def k_reciprocal_dense(query, gallery, k1=20, k2=6, lambda_value=0.3):
    """The same d*, written directly from the definitions with full (Q + G) x (Q + G) matrices and
    Python sets: slow and memory-hungry, the reference of the tests."""
    f = torch.cat([_normalised(query), _normalised(gallery)]).numpy()
    n, nq = f.shape[0], len(np.asarray(query))
    _check(k1, k2, lambda_value, n)
    d = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, -1.0)  # itself first
    order = np.array([np.lexsort((np.arange(n), d[i])) for i in range(n)])
    np.fill_diagonal(d, 0.0)

    def N(p, k):
        return set(order[p][:k].tolist())

    def R(p, k):
        return {x for x in N(p, k) if p in N(x, k)}

    half = int(np.around(k1 / 2))
    V = np.zeros((n, n))
    for p in range(n):
        r = R(p, k1)
        star = set(r)
        for q in r:
            rq = R(q, half)
            if len(r & rq) >= 2 / 3 * len(rq):
                star |= rq
        idx = sorted(star)
        V[p, idx] = np.exp(-d[p, idx])
        V[p] /= V[p].sum()
    if k2 > 1:
        V = np.stack([V[sorted(N(p, k2))].mean(0) for p in range(n)])
    out = np.empty((nq, n - nq))
    for p in range(nq):
        for j in range(nq, n):
            mins, maxs = np.minimum(V[p], V[j]).sum(), np.maximum(V[p], V[j]).sum()
            out[p, j - nq] = (1 - lambda_value) * (1 - mins / maxs) + lambda_value * d[p, j]
    return out
