"""Retrieval metrics: pure functions of distance matrices (or features) and labels, numpy and
torch only, no model. Each protocol is a named function whose docstring states exactly what it
computes, because different codes give different numbers for the same features
(docs/evaluation.md).

* :func:`market1501_official`: Market-1501's MATLAB evaluation (trapezoidal AP, junk rules), also
  used for CUHK03's 767/700 protocol;
* :func:`market1501_noninterp`: the same filtering with the non-interpolated AP of
  torchreid/fast-reid;
* :func:`single_shot_cmc`: the classic single-shot CMC of CUHK03 (1367/100) and CUHK01 papers,
  with repeated random gallery draws;
* :func:`cross_camera_retrieval`: the validation score used during training.

The Market functions are vectorised (torch, chunks of queries) and rank without sorting (a
histogram of distance bins, exact comparisons only inside the good matches' bins): a 3368 x 15913
distance matrix takes about a second on 2 cores (tools/bench_eval.py).
"""
import numpy as np
import torch

__all__ = ["market1501_official", "market1501_noninterp", "market_ranking_stats", "market_ranking_stats_chunked",
           "summarize",
           "single_shot_cmc", "cross_camera_retrieval", "euclidean_distances", "market1501_reference"]


def euclidean_distances(query, gallery):
    """Euclidean distances between the rows of two feature matrices (float32)."""
    q = torch.as_tensor(query, dtype=torch.float32)
    g = torch.as_tensor(gallery, dtype=torch.float32)
    return torch.cdist(q, g).numpy()


def _good_and_junk(q_ids, q_cams, ids_sorted, by_id, g_cams):
    """Sparse (row, column) lists of the good matches and of the same-camera junk of a block of
    queries, found through the gallery sorted by identity (a few images per identity)."""
    first = torch.searchsorted(ids_sorted, q_ids)
    count = torch.searchsorted(ids_sorted, q_ids, right=True) - first
    rows = torch.repeat_interleave(torch.arange(len(q_ids)), count)
    offset = torch.arange(len(rows)) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    cols = by_id[torch.repeat_interleave(first, count) + offset]
    junk = (g_cams[cols] == q_cams[rows]) | (q_ids[rows] == -1)
    return (rows[~junk], cols[~junk]), (rows[junk], cols[junk])


def market_ranking_stats(dist, q_ids, q_cams, g_ids, g_cams, max_rank=50, chunk=512, bins=4096):
    """Per query, with Market-1501's rules: gallery images with id -1 (junk)
    and images of the query's identity from the query's camera are removed
    from the ranking; good matches are the query's identity from other
    cameras; distractors (id 0) are ordinary wrong matches. The gallery is
    ranked by increasing distance (ties in gallery order, as a stable sort).

    Returns a dict of per-query arrays: ``valid`` (has a good match),
    ``first_hit`` (0-based rank of the first good match among non-junk
    images), ``ap_trapezoid``, ``ap_noninterp``, and ``cmc`` (queries x
    max_rank booleans).

    No row is sorted. Both metrics only need the rank of each good match
    among the non-junk images, i.e. how many non-junk images come before it,
    and a query has few good matches. Every distance gets a bin (``bins``
    equal bins between the matrix's smallest and largest finite distance;
    monotone, so a lower bin means a smaller distance), a per-row histogram
    of the non-junk bins counts the images in lower bins, and only the images
    that share a bin with a good match are compared exactly (distance, then
    gallery position). That is a few linear passes over the matrix instead of
    a sort: 10x less time on one core for 1024 x 15913 (tools/bench_eval.py).
    NaN distances are rejected."""
    dist = torch.as_tensor(np.asarray(dist), dtype=torch.float32)
    q_ids, q_cams, g_ids, g_cams = (torch.as_tensor(np.asarray(v), dtype=torch.int64).reshape(-1)
                                    for v in (q_ids, q_cams, g_ids, g_cams))
    if dist.dim() != 2:
        raise ValueError(f"the distance matrix must be 2-D (queries x gallery), got shape {tuple(dist.shape)}")
    nq, ng = dist.shape
    if len(q_ids) != nq or len(g_ids) != ng or len(q_cams) != nq or len(g_cams) != ng:
        raise ValueError(f"distance matrix {nq} x {ng} does not match {len(q_ids)} query and "
                         f"{len(g_ids)} gallery labels")
    lo, hi = (float(v) for v in torch.aminmax(dist)) if dist.numel() else (0.0, 0.0)
    if np.isnan(lo) or np.isnan(hi):
        raise ValueError("the distance matrix contains NaN (features with NaN?)")
    if not (np.isfinite(lo) and np.isfinite(hi)):  # infinite distances go to the end bins
        finite = torch.where(torch.isfinite(dist), dist, 0.0)
        lo, hi = float(finite.min()), float(finite.max())
    scale = (bins - 1) / (hi - lo) if hi > lo else 0.0
    junk_cols = torch.nonzero(g_ids == -1).flatten()
    by_id = torch.argsort(g_ids, stable=True)
    ids_sorted = g_ids[by_id]
    ones = torch.ones(1, dtype=torch.int64)
    out = {k: [] for k in ("valid", "first_hit", "ap_trapezoid", "ap_noninterp", "cmc")}
    for s in range(0, nq, chunk):
        d = dist[s:s + chunk]
        n = d.shape[0]
        (rows, cols), (jr, jc) = _good_and_junk(q_ids[s:s + chunk], q_cams[s:s + chunk], ids_sorted, by_id,
                                                g_cams)
        # bins; junk goes to the extra bin `bins`, after every good match's bin
        b = (d - lo).mul_(scale).clamp_(0, bins - 1).to(torch.int64)
        b[:, junk_cols] = bins
        b[jr, jc] = bins
        hist = torch.zeros(n, bins + 1, dtype=torch.int64).scatter_add_(1, b, ones.expand_as(b))
        lower = torch.cumsum(hist, 1) - hist  # non-junk images in lower bins
        # the good matches of each row in ranking order: by distance, then by column
        gd = d[rows, cols]
        order = torch.argsort(gd, stable=True)  # nonzero order: columns ascending per row
        order = order[torch.argsort(rows[order], stable=True)]
        rows, cols, gd = rows[order], cols[order], gd[order]
        gb = b[rows, cols]
        n_good = torch.bincount(rows, minlength=n)
        hit = torch.arange(len(rows)) - (torch.cumsum(n_good, 0) - n_good)[rows]  # 0-based hit number
        before = lower[rows, gb]
        # exact comparisons with the images that share a bin with a good match (itself included)
        mark = torch.zeros(n, bins + 1, dtype=torch.bool)
        mark[rows, gb] = True
        cand_r, cand_c = torch.nonzero(mark.gather(1, b), as_tuple=True)
        width = max(int(n_good.max()) if len(rows) else 0, 1)
        tab_d = torch.zeros(n, width)
        tab_c = torch.zeros(n, width, dtype=torch.int64)
        tab_b = torch.full((n, width), -1, dtype=torch.int64)
        tab_d[rows, hit], tab_c[rows, hit], tab_b[rows, hit] = gd, cols, gb
        same_bin = torch.zeros(n * width, dtype=torch.int64)
        for c in range(0, len(cand_r), 1 << 20):  # bounded memory when many distances tie
            r, col = cand_r[c:c + (1 << 20)], cand_c[c:c + (1 << 20)]
            cd, cb = d[r, col][:, None], b[r, col][:, None]
            ahead = (tab_b[r] == cb) & ((cd < tab_d[r]) | ((cd == tab_d[r]) & (col[:, None] < tab_c[r])))
            same_bin += torch.bincount((r[:, None] * width + torch.arange(width))[ahead], minlength=n * width)
        k = (before + same_bin.view(n, width)[rows, hit] + 1).to(torch.float64)  # 1-based non-junk rank
        i = hit.to(torch.float64) + 1  # 1-based hit count
        precision = i / k
        old_precision = torch.where(k > 1, (i - 1) / (k - 1).clamp(min=1), torch.ones_like(k))
        ng_f = n_good.to(torch.float64).clamp(min=1)[rows]
        trapezoid = torch.zeros(n, dtype=torch.float64).index_add_(
            0, rows, (old_precision + precision) / 2 / ng_f)
        noninterp = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, precision / ng_f)
        first_rank = torch.full((n,), ng, dtype=torch.long)
        first_rank[rows[hit == 0]] = (k[hit == 0] - 1).to(torch.long)
        out["valid"].append(n_good > 0)
        out["first_hit"].append(first_rank)
        out["ap_trapezoid"].append(trapezoid)
        out["ap_noninterp"].append(noninterp)
        out["cmc"].append(first_rank[:, None] <= torch.arange(max_rank)[None])
    if not out["valid"]:
        return {"valid": np.zeros(0, bool), "first_hit": np.zeros(0, np.int64), "ap_trapezoid": np.zeros(0),
                "ap_noninterp": np.zeros(0), "cmc": np.zeros((0, max_rank), bool)}
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def market_ranking_stats_chunked(query, gallery, q_ids, q_cams, g_ids, g_cams, max_rank=50, chunk=1024,
                                 bins=4096):
    """:func:`market_ranking_stats` from features instead of a distance matrix: the Euclidean
    distances of ``chunk`` queries at a time to the whole gallery, so memory stays at chunk x
    gallery distances (a million-image gallery does not need a queries x gallery matrix). The
    results are identical to the matrix version's: every query is ranked on its own row, and the
    bins only speed the counting up (they never decide a rank)."""
    q = torch.as_tensor(np.asarray(query), dtype=torch.float32)
    g = torch.as_tensor(np.asarray(gallery), dtype=torch.float32)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"features must be Q x D and G x D, got {list(q.shape)} and {list(g.shape)}")
    q_ids, q_cams = np.asarray(q_ids).reshape(-1), np.asarray(q_cams).reshape(-1)
    parts = []
    for s in range(0, len(q), chunk):
        d = torch.cdist(q[s:s + chunk], g)
        parts.append(market_ranking_stats(d, q_ids[s:s + chunk], q_cams[s:s + chunk], g_ids, g_cams, max_rank,
                                          chunk=chunk, bins=bins))
    if not parts:
        return market_ranking_stats(np.zeros((0, len(g))), q_ids, q_cams, g_ids, g_cams, max_rank)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize(stats, ap_key, ranks):
    """CMC at ``ranks``, mAP (from the per-query ``ap_key`` of :func:`market_ranking_stats`), the
    CMC curve, and the counts of valid and skipped queries, over the queries with a good match."""
    valid = stats["valid"]
    if not valid.any():
        raise ValueError("no query has a good match in the gallery")
    cmc = stats["cmc"][valid].mean(0)
    result = {f"rank{r}": float(cmc[r - 1]) for r in ranks if r <= cmc.shape[0]}
    result["mAP"] = float(stats[ap_key][valid].mean())
    result["cmc"] = [float(v) for v in cmc]
    result["queries"] = int(valid.sum())
    result["skipped_queries"] = int((~valid).sum())
    return result


def market1501_official(dist, q_ids, q_cams, g_ids, g_cams, ranks=(1, 5, 10, 20)):
    """Market-1501's official evaluation (evaluation.m / compute_AP.m).

    Per query: junk (id -1, and the query's identity seen by the query's own
    camera) is removed from the ranking; good = the query's identity from
    another camera. AP is trapezoidal: walking down the non-junk ranking,
    ap += (recall - old_recall) * (old_precision + precision) / 2 at every
    position, old_precision starting at 1. CMC rank-k: the first good match is
    within the first k non-junk images. mAP and CMC average the queries that
    have a good match (every query of the real Market-1501 does; others are
    counted in ``skipped_queries``). Also the protocol of CUHK03 767/700."""
    return summarize(market_ranking_stats(dist, q_ids, q_cams, g_ids, g_cams, max(ranks)),
                    "ap_trapezoid", ranks)


def market1501_noninterp(dist, q_ids, q_cams, g_ids, g_cams, ranks=(1, 5, 10, 20)):
    """The torchreid/fast-reid variant: Market-1501's filtering, AP = mean of
    the precision at each good match (non-interpolated), averaged over the
    queries that have a good match. Reads 0.5-1.0 mAP higher than the
    official code on Market-1501."""
    return summarize(market_ranking_stats(dist, q_ids, q_cams, g_ids, g_cams, max(ranks)),
                    "ap_noninterp", ranks)


def single_shot_cmc(dist, q_ids, g_ids, repeats=100, seed=0, max_rank=20):
    """Classic single-shot CMC (CUHK03 1367/100 and CUHK01 papers, 2014-2017).

    The probes are the given query images (one camera view); for each of
    ``repeats`` draws, the gallery is ONE image per test identity drawn at
    random (seeded) from the given gallery images (the other view). Each probe
    ranks the drawn gallery (identities, by distance); CMC rank-k is the
    fraction of probes whose identity is within the first k. The CMC is
    averaged over probes and draws. Probes whose identity has no gallery image
    are skipped. Returns {"cmc": array(max_rank), "rank1", "rank5", ...}."""
    dist = np.asarray(dist, np.float64)
    q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
    ids = np.unique(g_ids)
    by_id = [np.flatnonzero(g_ids == i) for i in ids]
    keep = np.isin(q_ids, ids)
    if not keep.any():
        raise ValueError("no probe identity has a gallery image")
    target = np.searchsorted(ids, q_ids[keep])
    rng = np.random.default_rng(seed)
    cmc = np.zeros(min(max_rank, len(ids)))
    for _ in range(repeats):
        pick = np.array([members[rng.integers(len(members))] for members in by_id])
        d = dist[keep][:, pick]  # probes x identities
        true = d[np.arange(len(target)), target]
        rank = (d < true[:, None]).sum(1)  # 0-based; ties count in the probe's favour
        cmc += (rank[:, None] <= np.arange(len(cmc))[None]).mean(0)
    cmc /= repeats
    out = {"cmc": cmc}
    out.update({f"rank{r}": float(cmc[r - 1]) for r in (1, 5, 10, 20) if r <= len(cmc)})
    return out


def cross_camera_retrieval(features, ids, cameras):
    """The validation score used during training: every image queries all the
    others; images of the query's camera are removed from the ranking, and
    queries without a same-identity image from another camera are skipped.
    Euclidean distances between L2-normalised features. Returns (rank-1, mAP
    non-interpolated, number of valid queries)."""
    f = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    ids, cameras = np.asarray(ids), np.asarray(cameras)
    dist = torch.cdist(f, f).numpy()
    rank1, aps = [], []
    for q in range(len(ids)):
        keep = cameras != cameras[q]
        good = keep & (ids == ids[q])
        if not good.any():
            continue
        order = np.argsort(dist[q][keep], kind="stable")
        hits = good[keep][order]
        rank1.append(float(hits[0]))
        positions = np.flatnonzero(hits) + 1
        aps.append(float(np.mean(np.arange(1, len(positions) + 1) / positions)))
    if not rank1:
        return 0.0, 0.0, 0
    return float(np.mean(rank1)), float(np.mean(aps)), len(rank1)


def market1501_reference(dist, q_ids, q_cams, g_ids, g_cams, max_rank=20):
    """Reference of :func:`market1501_official`, one query at a time as the official MATLAB code
    does (a stable sort of each row, the junk removed, the trapezoidal AP walk): slow and plain, the
    baseline of the tests and of tools/bench_eval.py. Returns rank-1/5/10/20, mAP and the number of
    queries with a good match."""
    dist, q_ids, q_cams, g_ids, g_cams = (np.asarray(v) for v in (dist, q_ids, q_cams, g_ids, g_cams))
    cmc = np.zeros(max_rank)
    aps = []
    for q in range(len(q_ids)):
        order = np.argsort(dist[q], kind="stable")
        same = g_ids[order] == q_ids[q]
        junk = (g_ids[order] == -1) | (same & (g_cams[order] == q_cams[q]))
        good = (same & ~junk)[~junk]
        n_good = good.sum()
        if n_good == 0:
            continue
        ap, old_recall, old_precision, hits = 0.0, 0.0, 1.0, 0
        for j, hit in enumerate(good):
            hits += int(hit)
            recall, precision = hits / n_good, hits / (j + 1)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
            if hits == n_good:
                break
        aps.append(ap)
        first = int(np.argmax(good))
        if first < max_rank:
            cmc[first:] += 1
    return {"rank1": cmc[0] / len(aps), "rank5": cmc[4] / len(aps), "rank10": cmc[9] / len(aps),
            "rank20": cmc[19] / len(aps), "mAP": float(np.mean(aps)), "queries": len(aps)}
