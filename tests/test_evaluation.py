"""Retrieval metrics: the check values of docs/evaluation.md, hand-worked rankings
with junk and distractors, and agreement with the per-query reference (market1501_reference)."""
import numpy as np
import pytest

from mspcnn.metrics import (cross_camera_retrieval, market1501_noninterp, market1501_official,
                            market1501_reference, market_ranking_stats, single_shot_cmc)


def ranking(hits):
    """One query (id 1, camera 1) and a gallery ranked in the given order:
    1 = a good match (id 1, camera 2), 0 = another identity."""
    n = len(hits)
    return (np.arange(n, dtype=float)[None], [1], [1],
            np.array([1 if h else 2 for h in hits]), np.full(n, 2))


@pytest.mark.parametrize("hits,noninterp,trapezoid", [
    ([1, 0, 1, 0], 0.8333, 0.7917), ([0, 1, 0, 1], 0.5, 0.3333),
    ([0, 0, 1], 0.3333, 0.1667), ([0, 1, 1, 0, 0, 1], 0.5556, 0.4278)])
def test_check_values_of_evaluation_md(hits, noninterp, trapezoid):
    args = ranking(hits)
    assert market1501_noninterp(*args)["mAP"] == pytest.approx(noninterp, abs=5e-5)
    assert market1501_official(*args)["mAP"] == pytest.approx(trapezoid, abs=5e-5)


def test_junk_and_distractors_by_hand():
    # Gallery in ranked order (distances 0..6) for query id 7 from camera 1:
    #   0: id 7 cam 1  -> junk (same camera), removed
    #   1: id -1       -> junk, removed
    #   2: id 0        -> distractor: an ordinary miss
    #   3: id 7 cam 3  -> good, rank 2 among non-junk
    #   4: id 5        -> miss
    #   5: id 7 cam 2  -> good, rank 4
    #   6: id 7 cam 1  -> junk
    g_ids = np.array([7, -1, 0, 7, 5, 7, 7])
    g_cams = np.array([1, 4, 2, 3, 2, 2, 1])
    dist = np.arange(7, dtype=float)[None]
    stats = market_ranking_stats(dist, [7], [1], g_ids, g_cams)
    assert stats["first_hit"][0] == 1  # second non-junk position
    # precisions at the hits: 1/2, 2/4; trapezoid: 0.5*(1/1 -> prev 0/1=0 ... ) computed by hand:
    # position 1 (miss): old_p 1 -> p 0, recall 0: +0; position 2 (hit): recall .5, p .5, old 0 -> +.125
    # position 3 (miss): p 1/3; position 4 (hit): recall 1, p .5, old 1/3 -> +.5*(1/3+.5)/2 = .2083
    assert stats["ap_noninterp"][0] == pytest.approx((0.5 + 0.5) / 2)
    assert stats["ap_trapezoid"][0] == pytest.approx(0.125 + 0.5 * (1 / 3 + 0.5) / 2)
    result = market1501_official(dist, [7], [1], g_ids, g_cams, ranks=(1, 2, 5))
    assert result["rank1"] == 0 and result["rank2"] == 1 and result["rank5"] == 1


def test_queries_without_a_good_match_are_skipped_and_counted():
    dist = np.array([[0.1, 0.2], [0.3, 0.1]])
    result = market1501_official(dist, [1, 2], [1, 1], np.array([1, 1]), np.array([2, 1]), ranks=(1,))
    assert result["queries"] == 1 and result["skipped_queries"] == 1 and result["rank1"] == 1


def test_vectorised_equals_the_market1501_reference():
    rng = np.random.default_rng(3)
    q_ids, g_ids = rng.integers(1, 40, 300), rng.integers(-1, 40, 2000)
    q_cams, g_cams = rng.integers(1, 4, 300), rng.integers(1, 4, 2000)
    dist = rng.random((300, 2000)).astype(np.float32)
    dist[q_ids[:, None] == g_ids[None]] -= 0.25
    dist[:, :50] = 0.5  # exact ties: broken by gallery order in both
    ours = market1501_official(dist, q_ids, q_cams, g_ids, g_cams)
    base = market1501_reference(dist, q_ids, q_cams, g_ids, g_cams)
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "queries"):
        assert ours[key] == pytest.approx(base[key], abs=1e-12), key


@pytest.mark.parametrize("case", ["integer distances", "signed zeros and infinities", "all equal", "two bins"])
def test_histogram_ranking_equals_a_stable_sort(case):
    """market_ranking_stats ranks through distance bins, not a sort: check it against the per-query
    stable-sort loop where bins hold many entries and ties need the gallery order."""
    rng = np.random.default_rng(len(case))
    q_ids, g_ids = rng.integers(1, 15, 60), rng.integers(-1, 15, 400)
    q_cams, g_cams = rng.integers(1, 4, 60), rng.integers(1, 4, 400)
    bins = 4096
    if case == "integer distances":
        dist = rng.integers(-3, 4, (60, 400)).astype(np.float32)
    elif case == "signed zeros and infinities":
        dist = rng.integers(-1, 2, (60, 400)).astype(np.float32)
        zero = dist == 0
        dist[zero] = np.where(rng.random(zero.sum()) < 0.5, -0.0, 0.0)
        dist[rng.random(dist.shape) < 0.1] = np.inf
        dist[rng.random(dist.shape) < 0.05] = -np.inf
    elif case == "all equal":
        dist = np.full((60, 400), 0.7, np.float32)
    else:
        dist, bins = rng.standard_normal((60, 400)).astype(np.float32), 2
    stats = market_ranking_stats(dist, q_ids, q_cams, g_ids, g_cams, chunk=16, bins=bins)
    valid = stats["valid"]
    base = market1501_reference(dist, q_ids, q_cams, g_ids, g_cams)
    assert valid.sum() == base["queries"]
    assert stats["cmc"][valid][:, 0].mean() == pytest.approx(base["rank1"], abs=1e-12)
    assert stats["cmc"][valid][:, 19].mean() == pytest.approx(base["rank20"], abs=1e-12)
    assert stats["ap_trapezoid"][valid].mean() == pytest.approx(base["mAP"], abs=1e-12)


def test_nan_distances_rejected():
    with pytest.raises(ValueError, match="contains NaN"):
        market1501_official(np.array([[0.1, np.nan]]), [1], [1], [1, 2], [2, 1])


def test_single_shot_cmc_by_hand():
    # 3 test identities, gallery: two images each (one drawn per repeat).
    g_ids = np.array([1, 1, 2, 2, 3, 3])
    q_ids = np.array([1, 2, 3])
    # probe 1 is closest to both images of id 1 -> rank 0 always;
    # probe 2: its id-2 images are farther than id 1's -> rank 1 always;
    # probe 3: one id-3 image is the closest, the other the farthest -> rank 0 or 2.
    dist = np.array([[0.0, 0.1, 0.5, 0.6, 0.7, 0.8],
                     [0.1, 0.1, 0.5, 0.5, 0.9, 0.9],
                     [0.5, 0.5, 0.6, 0.6, 0.0, 0.9]])
    out = single_shot_cmc(dist, q_ids, g_ids, repeats=4000, seed=1, max_rank=3)
    # rank-1: probe 1 always, probe 3 half the draws -> (1 + 0 + 0.5) / 3
    assert out["rank1"] == pytest.approx(0.5, abs=0.02)
    assert out["cmc"][1] == pytest.approx((1 + 1 + 0.5) / 3, abs=0.02)
    assert out["cmc"][2] == 1.0
    again = single_shot_cmc(dist, q_ids, g_ids, repeats=4000, seed=1, max_rank=3)
    assert np.array_equal(out["cmc"], again["cmc"])


def test_cross_camera_retrieval():
    f = np.eye(4) + 0.01 * np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert cross_camera_retrieval(f, [1, 1, 2, 2], [1, 2, 1, 2]) == (1.0, 1.0, 4)


def test_bad_shapes_named():
    with pytest.raises(ValueError, match=r"distance matrix 2 x 3 does not match 2 query and 4 gallery"):
        market1501_official(np.zeros((2, 3)), [1, 2], [1, 1], [1, 2, 3, 4], [1, 1, 1, 1])


def test_chunked_features_equal_the_matrix_version():
    """market_ranking_stats_chunked (distances of a block of queries at a time) gives exactly the
    statistics of the matrix version, ties and junk included."""
    import torch

    from mspcnn.metrics import market_ranking_stats_chunked

    rng = np.random.default_rng(5)
    q = rng.normal(size=(37, 16)).astype(np.float32)
    g = np.concatenate([rng.normal(size=(150, 16)), q[:10]]).astype(np.float32)  # exact duplicates: ties
    q_ids, q_cams = rng.integers(1, 20, 37), rng.integers(1, 7, 37)
    g_ids = np.concatenate([rng.integers(-1, 20, 150), q_ids[:10]])
    g_cams = rng.integers(1, 7, 160)
    full = market_ranking_stats(torch.cdist(torch.from_numpy(q), torch.from_numpy(g)).numpy(), q_ids, q_cams,
                                g_ids, g_cams, 20)
    chunked = market_ranking_stats_chunked(q, g, q_ids, q_cams, g_ids, g_cams, 20, chunk=8)
    for key in full:
        np.testing.assert_array_equal(full[key], chunked[key], err_msg=key)


def test_signed_rank_p_is_the_exact_wilcoxon_test():
    """mspcnn.evaluation.signed_rank_p, the p-value tools/results_tables.py prints beside the
    t-interval: scipy's exact test where the ranks are untied; with ties and zeros, the share of
    every signing of the mean ranks (enumerated here) at least as far from the centre; its floor."""
    import itertools

    from scipy import stats

    from mspcnn.evaluation import paired_summary, signed_rank_p

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9, 14):
        d = rng.normal(0.4, 1, n)
        assert signed_rank_p(d) == pytest.approx(stats.wilcoxon(d, method="exact").pvalue, abs=1e-12)
    for _ in range(20):
        d = rng.integers(-3, 4, 9).astype(float)  # ties and zeros
        nz = d[d != 0]
        if not len(nz):
            continue
        ranks = stats.rankdata(np.abs(nz))
        observed, centre = ranks[nz > 0].sum(), ranks.sum() / 2
        totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(nz))]
        expected = np.mean([abs(t - centre) >= abs(observed - centre) - 1e-9 for t in totals])
        assert signed_rank_p(d) == pytest.approx(expected, abs=1e-12), d
    assert signed_rank_p([6.09, 13.345, 4.94, 9.52, 7.895]) == 2 / 2 ** 5  # all of one sign: the floor
    assert signed_rank_p([0.0, 0.0]) is None
    # differences equal but for float rounding are tied (and scipy's untied exact test then differs)
    noisy = [10.000000000001, -9.999999999999, 5.0, 7.0, 1.0]
    assert signed_rank_p(noisy) == signed_rank_p([10, -10, 5, 7, 1])
    assert signed_rank_p(noisy) != pytest.approx(stats.wilcoxon(noisy, method="exact").pvalue)
    assert signed_rank_p([1e-12, -1e-12]) is None
    e = paired_summary([6.09, 13.345, 4.94, 9.52, 7.895])
    assert e["t_p"] == pytest.approx(stats.ttest_1samp([6.09, 13.345, 4.94, 9.52, 7.895], 0).pvalue, rel=1e-9)
    assert paired_summary([1.0, 1.0])["t_p"] is None and paired_summary([1.0])["std"] is None


def test_runs_are_paired_by_their_group_and_the_interaction_is_the_difference_of_effects():
    """loss_set_groups, matched_pairs and interaction_pairs, which reproduce.py and
    results_tables.py both pair runs with: runs group by their key in the order keys first come;
    a pair needs both loss sets in one group (a group without a partner is left out); the
    interaction's two effects are all − cls+high and cls+low − cls of a group with all four, for
    the figures both runs have."""
    from mspcnn.evaluation import interaction_pairs, loss_set_groups, matched_pairs

    def run(split, seed, rank1, **more):
        return {"split": split, "seed": seed, "rank1": rank1, **more}

    runs = [("cls", run(1, 0, 0.50, rank5=0.8)), ("cls", run(0, 0, 0.40, rank5=0.7)),
            ("cls+high", run(1, 0, 0.58, rank5=0.85)), ("cls+high", run(0, 0, 0.49)),
            ("cls+low", run(1, 0, 0.51, rank5=0.8)), ("all", run(1, 0, 0.575, rank5=0.86)),
            ("all", run(2, 0, 0.6))]  # split 2 has no partner for anything
    by_key = loss_set_groups(runs, lambda r: (r["split"], r["seed"]))
    assert list(by_key) == [(1, 0), (0, 0), (2, 0)]
    groups = list(by_key.values())
    assert [sorted(g) for g in groups] == [["all", "cls", "cls+high", "cls+low"], ["cls", "cls+high"], ["all"]]
    pairs = matched_pairs(groups, "cls+high", "cls")
    assert [(a["split"], a["rank1"], b["rank1"]) for a, b in pairs] == [(1, 0.58, 0.50), (0, 0.49, 0.40)]
    assert matched_pairs(groups, "cls+low", "cls") == [(runs[4][1], runs[0][1])]
    assert matched_pairs(groups, "all", "cls+low") == [(runs[5][1], runs[4][1])]
    assert matched_pairs(groups, "cls+low", "missing") == []
    (with_high, without_high), = interaction_pairs(groups, ("rank1", "rank5", "mAP"))
    assert (with_high["split"], with_high["seed"]) == (1, 0) and "mAP" not in with_high
    assert with_high["rank1"] == pytest.approx(0.575 - 0.58) and without_high["rank1"] == pytest.approx(0.51 - 0.50)
    assert with_high["rank5"] == pytest.approx(0.86 - 0.85) and without_high["rank5"] == pytest.approx(0.0)
    assert interaction_pairs(groups[1:], ("rank1",)) == []
    # a later record of a loss set in a group replaces the earlier one
    again = loss_set_groups(runs + [("cls", run(0, 0, 0.41))], lambda r: (r["split"], r["seed"]))
    assert again[(0, 0)]["cls"]["rank1"] == 0.41
