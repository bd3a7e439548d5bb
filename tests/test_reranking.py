"""k-reciprocal re-ranking: the memory-bounded implementation against a direct one of the paper's
formulas, and hand-worked cases."""
import numpy as np
import pytest

from mspcnn.reranking import k_reciprocal_dense, k_reciprocal_distances, squared_distances


@pytest.mark.parametrize("k1,k2,lam", [(4, 2, 0.3), (6, 1, 0.0), (3, 3, 0.5), (20, 6, 0.3)])
def test_bounded_equals_the_direct_formulas(k1, k2, lam):
    rng = np.random.default_rng(k1 * 10 + k2)
    centres = rng.normal(size=(6, 8))
    feats = centres[rng.integers(0, 6, 26)] + 0.4 * rng.normal(size=(26, 8))  # clustered, like identities
    q, g = feats[:7], feats[7:]
    fast = k_reciprocal_distances(q, g, k1, k2, lam, chunk=5)  # several blocks
    slow = k_reciprocal_dense(q, g, k1, k2, lam)
    assert fast.shape == (7, 19)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_hand_worked_two_groups():
    """Two tight groups of three on a circle far apart: every image's k-reciprocal neighbours (k1 3)
    are its own group, so the Jaccard distance is 0 within a group (identical encodings) and 1
    across; lambda 0 ranks by it alone, lambda 1 gives the original squared distance back."""
    a = np.array([[1.0, 0.0], [np.cos(0.05), np.sin(0.05)], [np.cos(0.1), np.sin(0.1)]])
    b = -a
    q = np.stack([a[0], b[0]])
    g = np.concatenate([a[1:], b[1:]])
    jac = k_reciprocal_distances(q, g, k1=3, k2=1, lambda_value=0.0)
    assert np.all(jac[0, :2] < 0.5) and np.all(jac[0, 2:] == 1.0)
    assert np.all(jac[1, 2:] < 0.5) and np.all(jac[1, :2] == 1.0)
    orig = k_reciprocal_distances(q, g, k1=3, k2=1, lambda_value=1.0)
    np.testing.assert_allclose(orig, squared_distances(q, g), atol=1e-12)


def test_hand_worked_reciprocity():
    """On a line, 0 -- 1 ---- 2 -- 3 (distances 1, 4, 1 before normalisation is undone by keeping
    the points on a short arc): with k1 = 2 each point's reciprocal neighbour is its partner only,
    so probe 0 shares its encoding with 1 alone."""
    angles = np.array([0.0, 0.01, 0.05, 0.06])
    pts = np.stack([np.cos(angles), np.sin(angles)], 1)
    d = k_reciprocal_distances(pts[:1], pts[1:], k1=2, k2=1, lambda_value=0.0)
    assert d[0, 0] < 1.0 and d[0, 1] == 1.0 and d[0, 2] == 1.0


def test_bad_input():
    f = np.zeros((3, 4))
    f[:, 0] = 1
    with pytest.raises(ValueError, match="k1 and k2 must be integers >= 1"):
        k_reciprocal_distances(f, f, k1=0)
    with pytest.raises(ValueError, match="lambda must be in"):
        k_reciprocal_distances(f, f, lambda_value=2)
    with pytest.raises(ValueError, match="finite"):
        k_reciprocal_distances(np.full((2, 4), np.nan), f)
