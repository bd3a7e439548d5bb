"""Gallery search: brute force (the reference) and FAISS (optional package faiss-cpu): the exact FAISS
index ranks as brute force does; the approximate ones return mostly the same neighbours."""
import numpy as np
import pytest
import torch

from mspcnn.index import build_search, load_index, search, write_index


def random_index(tmp_path, n=2000, d=32, kind=None):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    path = str(tmp_path / "g.index")
    write_index(path, feats, [f"k{i}" for i in range(n)], tmp_path, tmp_path / "w", search_kind=kind)
    return load_index(path), rng.normal(size=(50, d)).astype(np.float32)


def test_brute_force_is_a_stable_sort(tmp_path):
    index, queries = random_index(tmp_path)
    dist, pos = search(index, queries, 10)
    q = torch.nn.functional.normalize(torch.from_numpy(queries))
    full = torch.cdist(q, index["features"])
    np.testing.assert_array_equal(pos, torch.argsort(full, dim=1, stable=True)[:, :10].numpy())
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_faiss_flat_ranks_as_brute_force_and_approximate_recall(tmp_path):
    pytest.importorskip("faiss")
    exact, queries = random_index(tmp_path, kind="flat")
    brute = dict(exact)
    brute.pop("faiss")
    d1, p1 = search(exact, queries, 10)
    d2, p2 = search(brute, queries, 10)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_allclose(d1, d2, atol=1e-5)
    for kind, effort in (("hnsw", 64), ("ivf", 16)):
        (tmp_path / kind).mkdir()
        approx, _ = random_index(tmp_path / kind, kind=kind)
        _, p3 = search(approx, queries, 10, effort=effort)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(p3, p2)])
        assert recall > 0.8, (kind, recall)


def test_faiss_file_problems(tmp_path):
    pytest.importorskip("faiss")
    from mspcnn.caffe.io import CaffeFormatError

    random_index(tmp_path, kind="flat")
    (tmp_path / "g.index.faiss").write_bytes(b"garbage")
    with pytest.raises(CaffeFormatError, match="not a FAISS index"):
        load_index(str(tmp_path / "g.index"))
    (tmp_path / "g.index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="FAISS index .* is missing"):
        load_index(str(tmp_path / "g.index"))
    with pytest.raises(ValueError, match="search kind must be one of"):
        build_search(np.zeros((3, 4), np.float32), "lsh")
