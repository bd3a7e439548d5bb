"""Features of a trained network and the evaluation of a converted dataset folder.

* :func:`extract_features`: fc7_bn features of every record of a database;
* :func:`folder_features`: L2-normalised features of the probe and gallery of a folder written by
  tools/convert_dataset.py;
* :func:`protocol_of` and :func:`evaluate_features`: that folder evaluated with its dataset's
  protocol, through the pure metrics of :mod:`mspcnn.metrics`;
* :func:`run_summary`: a loss set's figures over its runs; :data:`NCC_PAIRS`, :data:`HIGH_PAIRS`,
  :func:`loss_set_groups`, :func:`matched_pairs`, :func:`figure_differences`,
  :func:`interaction_pairs` and :func:`paired_summary` (with :func:`signed_rank_p`): the paired
  comparison of the NCC loss, and of the high-level loss, over runs, and the two losses'
  interaction (tools/reproduce.py and tools/results_tables.py both pair runs with these).
"""
import json
import os
import sys
import time

import numpy as np
import torch

from mspcnn.cli import format_duration
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.transformer import feature_transformer, size_mismatch
from mspcnn.metrics import (euclidean_distances, market_ranking_stats, market_ranking_stats_chunked,
                            single_shot_cmc, summarize)
from mspcnn.reranking import k_reciprocal_distances

__all__ = ["extract_features", "folder_features", "db_size_note", "protocol_of", "evaluate_features", "PROTOCOLS",
           "NCC_PAIRS", "HIGH_PAIRS", "paired_summary", "signed_rank_p", "p_values_text",
           "run_summary", "loss_set_groups", "matched_pairs", "figure_differences", "interaction_pairs"]

PROTOCOLS = ("market1501", "single-shot")

# The loss sets of the paper's Table 5 that differ by the NCC loss alone: (with it, without it). Each
# pair starts stage 2 from the same stage-1 weights (same split and seed).
NCC_PAIRS = (("cls+low", "cls"), ("all", "cls+high"))
# The loss sets that differ by the high-level (contrastive) loss alone: (with it, without it). That
# loss trains in both stages, so a pair shares the split, the seed and the order of the training
# pairs, but not the stage-1 weights.
HIGH_PAIRS = (("cls+high", "cls"), ("all", "cls+low"))


def run_summary(runs, keys):
    """A loss set's figures over its runs (each a dict of fractions), as the results JSON keeps
    them: {"mean", "std" (sample; 0 for a single run), "n", "runs"}, the figures of ``keys`` in %."""
    values = {k: [r[k] for r in runs] for k in keys}
    ddof = 1 if len(runs) > 1 else 0
    return {"mean": {k: 100 * float(np.mean(v)) for k, v in values.items()},
            "std": {k: 100 * float(np.std(v, ddof=ddof)) for k, v in values.items()}, "n": len(runs), "runs": runs}


def loss_set_groups(runs, key):
    """The runs ``runs`` [(loss set, run)] grouped by ``key(run)`` (the run's split and seed, say:
    what one training of each loss set shares): {key: {loss set: run}}, the groups in the order
    their key first comes, a later run of a loss set in a group replacing an earlier one. Its
    values are the groups :func:`matched_pairs` and :func:`interaction_pairs` take."""
    groups = {}
    for loss_set, run in runs:
        groups.setdefault(key(run), {})[loss_set] = run
    return groups


def matched_pairs(groups, with_it, without):
    """[(run, partner)]: the run of loss set ``with_it`` and that of ``without`` in each group of
    :func:`loss_set_groups` that has both (in the groups' order); the pairs of a paired comparison."""
    return [(g[with_it], g[without]) for g in groups if with_it in g and without in g]


def figure_differences(a, b, keys):
    """The figures of run ``a`` less those of run ``b``, for each of ``keys`` both have (as the runs
    give them): one run's paired effect, a loss's (a with it, b without) or a setting's."""
    return {k: a[k] - b[k] for k in keys if k in a and k in b}


def interaction_pairs(groups, keys):
    """Over the groups with all four loss sets of Table 5: [(the NCC loss's effect with the
    high-level loss, its effect without)], each effect a dict of the run's "split" and "seed" and,
    for each figure of ``keys`` both runs have, all − cls+high and cls+low − cls (as the runs
    give them). The paired difference of the two, (all − cls+high) − (cls+low − cls), is the two
    losses' interaction: 0 where their effects add up (it is also the high-level loss's effect
    with the NCC loss less its effect without)."""
    (low, plain), (both, high) = NCC_PAIRS

    def effect(a, b):
        return {"split": a.get("split"), "seed": a.get("seed"), **figure_differences(a, b, keys)}

    return [(effect(g[both], g[high]), effect(g[low], g[plain])) for g in groups
            if all(s in g for s in (both, high, low, plain))]


def signed_rank_p(differences):
    """Two-sided p-value of the Wilcoxon signed-rank test that paired differences are centred on 0.

    Zero differences are dropped (Wilcoxon's convention); tied absolute values share their mean rank.
    The statistic is the sum of the ranks of the positive differences. The p-value is exact: the
    share of the 2^m equally likely ways of signing the m ranks whose statistic lies at least as far
    from its mean m(m + 1)/4 as the one observed, counted by building the statistic's distribution
    one rank at a time (with ties this is the exact test given the tied ranks, where tables made for
    untied ranks would be wrong). None when every difference is 0.

    The test asks less of the data than the t-test (no normal differences) and cannot go below
    2/2^m: with 5 pairs all of one sign it gives 0.0625, the smallest possible."""
    # Rounded to 1e-9 first, so that equal differences computed from different values (e.g.
    # 100 * (0.6 - 0.5) and 100 * (0.7 - 0.6)) stay tied, and a zero stays a zero.
    d = np.round(np.asarray(differences, dtype=np.float64), 9)
    d = d[d != 0]
    m = len(d)
    if m == 0:
        return None
    from scipy import stats

    doubled = np.rint(2 * stats.rankdata(np.abs(d))).astype(np.int64)  # mean ranks are halves
    dist = np.zeros(int(doubled.sum()) + 1)  # dist[t]: probability that twice the statistic is t
    dist[0] = 1.0
    for r in doubled:  # each rank counts or not with probability 1/2
        dist[r:] = 0.5 * dist[r:] + 0.5 * dist[:-r]  # (r >= 2; the right side is built first)
        dist[:r] *= 0.5
    observed = int(doubled[d > 0].sum())
    centre = doubled.sum() / 2
    far = np.abs(np.arange(len(dist)) - centre) >= abs(observed - centre)
    return float(min(1.0, dist[far].sum()))


def paired_summary(differences, level=0.95):
    """Paired differences summarised: {"mean", "std" (sample), "ci95" (the two-sided Student's t
    interval at ``level``), "t_p" (two-sided p of the one-sample t-test against 0), "signed_rank_p"
    (two-sided p of the Wilcoxon signed-rank test, see :func:`signed_rank_p`)}. std, the interval
    and t_p are None with fewer than 2 differences, and t_p also when they do not vary."""
    d = np.asarray(differences, dtype=np.float64)
    rank_p = signed_rank_p(d)  # (None for no difference)
    if len(d) < 2:
        return {"mean": float(d.mean()), "std": None, "ci95": None, "t_p": None, "signed_rank_p": rank_p}
    from scipy import stats

    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * sd / np.sqrt(len(d)))
    t_p = float(2 * stats.t.sf(abs(d.mean()) / (sd / np.sqrt(len(d))), len(d) - 1)) if sd > 0 else None
    return {"mean": float(d.mean()), "std": sd, "ci95": [float(d.mean()) - half, float(d.mean()) + half],
            "t_p": t_p, "signed_rank_p": rank_p}


def p_values_text(summary):
    """The two-sided p-values of a :func:`paired_summary` as the tools print them: "t-test p P,
    signed-rank p Q" (two significant digits; "–" where there is none: no spread, or every
    difference 0)."""
    t, w = ("–" if summary[k] is None else f"{summary[k]:.2g}" for k in ("t_p", "signed_rank_p"))
    return f"t-test p {t}, signed-rank p {w}"


def _report(label, before, done, total, start):
    """Progress of a feature extraction on stderr: done/total, the rate and an ETA (a counter in a
    terminal, a line at every tenth of the way in a log)."""
    label = label if isinstance(label, str) else "features"
    elapsed = time.time() - start
    rate = done / max(elapsed, 1e-9)
    text = f"  {label}: {done}/{total} images ({rate:.0f}/s, ETA {format_duration((total - done) / max(rate, 1e-9))})"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text + ("\n" if done == total else ""))
    elif done == total or done * 10 // total > before * 10 // total:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


@torch.no_grad()
def extract_features(backbone, db, transformer, batch_size=32, device="cpu", progress=False):
    """fc7_bn features (not normalised) of every record of a DatumDB, in order.

    ``progress``: report the count on stderr (a counter in a terminal, otherwise a line at every
    tenth of the way), e.g. ``progress="gallery"`` labels it; False is silent.

    The backbone is put in eval mode and run without autograd. On the CPU the images are handed
    over channels-last, which lets oneDNN run every convolution in that layout, and batches of 32
    beat 64 (cache); together 2.1x faster on 2 cores (1283 images: 59 s -> 28 s), features equal
    to float32 rounding. Raises ValueError when a feature is not finite (a NaN would otherwise
    reach the ranking and the metrics as a plausible-looking number)."""
    backbone.eval()
    feats = []
    began = time.time()
    for start in range(0, len(db), batch_size):
        images = db.read_list(range(start, min(start + batch_size, len(db))))[0]
        x = torch.from_numpy(transformer(images)).to(device)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(backbone(x, logits=False)["fc7_bn"].float().cpu())
        if progress:
            _report(progress, start, start + len(images), len(db), began)
    out = torch.cat(feats) if feats else torch.zeros(0, backbone.feature_dim)
    bad = int((~torch.isfinite(out)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{getattr(db, 'path', 'the database')}: the features of {bad} of {len(out)} images are "
                         "not finite (NaN or infinity): the network gives non-finite outputs with these weights "
                         "(weights with missing layers, or a diverged training?)")
    return out


def db_size_note(db, input_size):
    """:func:`mspcnn.data.transformer.size_mismatch` for the images of a DatumDB (its first record)
    and a net input of ``input_size``: a warning line, or None."""
    return size_mismatch(db[0][0].shape, input_size, f"the images of {db.path}") if len(db) else None


def folder_features(backbone, db_dir, device="cpu", batch_size=32, progress=True):
    """L2-normalised fc7_bn features of the probe and gallery of a database folder written by
    tools/convert_dataset.py (TEST-phase transform: the centre crop of the net's input size,
    ``backbone.input_size``, mean subtracted).

    Returns ``{"probe": split, "gallery": split, "meta": the probe JSON without its records}``,
    each split a dict of ``features`` (N x D tensor), ``ids``, ``cameras``, ``keys`` (lists) and
    ``db`` (the open DatumDB), and ``"warnings"``: lines about images whose size does not fit the
    net's input (:func:`mspcnn.data.transformer.size_mismatch`). Raises FileNotFoundError naming
    what is missing."""
    transformer = feature_transformer(backbone.input_size)
    out = {"warnings": []}
    for split in ("probe", "gallery"):
        meta_path = os.path.join(db_dir, f"{split}.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{db_dir}: no {split}.json (write the folder with tools/convert_dataset.py)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
        rows = meta.pop("records", None) if isinstance(meta, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"id", "camera", "key"} <= r.keys()
                                                  for r in rows):
            raise ValueError(f"{meta_path}: no records (not written by tools/convert_dataset.py)")
        db = DatumDB(os.path.join(db_dir, f"{split}.lmdb"))
        if len(db) != len(rows):
            raise ValueError(f"{db_dir}: {split}.lmdb has {len(db)} records but {split}.json {len(rows)}")
        note = db_size_note(db, backbone.input_size)
        if note:
            out["warnings"].append(note)
        feats = extract_features(backbone, db, transformer, batch_size=batch_size, device=device,
                                 progress=split if progress else False)
        out[split] = {"features": torch.nn.functional.normalize(feats), "ids": [r["id"] for r in rows],
                      "cameras": [r["camera"] for r in rows], "keys": [r["key"] for r in rows], "db": db}
        if split == "probe":
            out["meta"] = meta
    return out


def protocol_of(meta):
    """The protocol of a converted database, from its JSON metadata: ``"market1501"`` (the
    official Market-1501 evaluation) for Market-1501 and CUHK03 767/700, ``"single-shot"``
    (:func:`single_shot_cmc`) for the classic CUHK03 and CUHK01 splits."""
    if meta.get("dataset") == "market1501" or str(meta.get("protocol", "")).startswith("new"):
        return "market1501"
    return "single-shot"


def evaluate_features(probe, gallery, protocol, repeats=100, seed=0, rerank=None, return_dist=True):
    """Evaluate split dicts of :func:`folder_features` (or any dicts with ``features``, ``ids``
    and, for Market-1501, ``cameras``) with ``protocol``, one of :data:`PROTOCOLS`.

    "market1501": :func:`market1501_official`, plus ``mAP_noninterp`` (:func:`market1501_noninterp`,
    the same ranking). "single-shot": :func:`single_shot_cmc` with ``repeats`` gallery draws from
    ``seed``. ``rerank``: {"k1", "k2", "lambda_value"} ranks by the k-reciprocal re-ranked
    distances of :mod:`mspcnn.reranking` (computed over the probe and the whole gallery) instead of
    the Euclidean distances. Returns the metrics with ``cmc`` as a list, and the distance matrix
    (None with ``return_dist=False``: then the Market-1501 protocol runs on blocks of queries, in
    memory bounded by a block of distances, with identical results)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate_features: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "market1501" and not rerank and not return_dist:
        # bounded memory: distances of a block of queries at a time, never the whole matrix
        dist = None
        stats = market_ranking_stats_chunked(probe["features"], gallery["features"], probe["ids"], probe["cameras"],
                                             gallery["ids"], gallery["cameras"], 20)
    elif rerank:
        dist = k_reciprocal_distances(probe["features"], gallery["features"], **rerank)
    else:
        dist = euclidean_distances(probe["features"], gallery["features"])
    if protocol == "market1501":
        if dist is not None:
            stats = market_ranking_stats(dist, probe["ids"], probe["cameras"], gallery["ids"], gallery["cameras"],
                                         20)
        result = summarize(stats, "ap_trapezoid", (1, 5, 10, 20))
        result["mAP_noninterp"] = summarize(stats, "ap_noninterp", (1,))["mAP"]
    else:
        result = single_shot_cmc(dist, probe["ids"], gallery["ids"], repeats=repeats, seed=seed)
        result["cmc"] = [float(v) for v in result["cmc"]]
        result["repeats"] = repeats
    return result, dist
