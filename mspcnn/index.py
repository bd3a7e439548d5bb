"""The offline gallery index: its file format, written and read in one place.

An index is a ``torch.save`` file of a dict of plain data (tensors, lists, strings; it is read
with ``weights_only=True``, so loading it never runs code):

* ``features``: N x D float32, the L2-normalised fc7_bn features of the gallery;
* ``keys``: the N record keys of the gallery database, in order;
* ``db``: the absolute path of that database (the images a ranking shows);
* ``weights``: the absolute path of the weights the features were computed with;
* ``ids``, ``cameras`` (optional): identity and camera of each record, when the database's
  JSON metadata gives them;
* ``search`` (optional): "flat", "hnsw" or "ivf" when a FAISS index of the features was built;
  it is stored beside, in ``<index>.faiss`` (FAISS's own format, read with faiss.read_index).

tools/build_index.py writes it, tools/query.py ranks it.
"""
import io
import os

import numpy as np
import torch

from mspcnn.caffe.io import CaffeFormatError, atomic_write

__all__ = ["write_index", "load_index", "REQUIRED_KEYS", "build_search", "search", "brute_force_search",
           "SEARCH_KINDS"]

REQUIRED_KEYS = ("features", "keys", "db")


def write_index(path, features, keys, db, weights, ids=None, cameras=None, search_kind=None, input_size=None):
    """Write an index (atomically: an interrupted write leaves any previous file intact).
    ``features`` are normalised here; ``ids`` and ``cameras`` go in only when both are given;
    ``input_size``: the network's input (height, width) the features were computed at;
    ``search_kind`` ("flat", "hnsw", "ivf") also builds a FAISS index, written to ``<path>.faiss``."""
    features = torch.as_tensor(features, dtype=torch.float32)
    if features.dim() != 2 or features.shape[0] != len(keys):
        raise ValueError(f"write_index: features {list(features.shape)} do not match {len(keys)} keys")
    index = {"features": torch.nn.functional.normalize(features), "keys": list(keys),
             "db": os.path.abspath(db), "weights": os.path.abspath(weights)}
    if input_size is not None:
        index["input_size"] = [int(v) for v in input_size]
    if ids is not None and cameras is not None:
        if not len(ids) == len(cameras) == len(keys):
            raise ValueError(f"write_index: {len(ids)} ids and {len(cameras)} cameras for {len(keys)} keys")
        index.update(ids=[int(i) for i in ids], cameras=[int(c) for c in cameras])
    if search_kind:
        faiss = _faiss()
        engine = build_search(index["features"].numpy(), search_kind)
        atomic_write(path + ".faiss", faiss.serialize_index(engine).tobytes())
        index["search"] = search_kind
    buf = io.BytesIO()
    torch.save(index, buf)
    atomic_write(path, buf.getvalue())
    return index


def load_index(path):
    """Read an index written by :func:`write_index`. Raises FileNotFoundError, or CaffeFormatError
    for a file that is not such an index, with the path in the message."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--index {path}: no such file (write one with tools/build_index.py)")
    try:
        index = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or damaged files
        raise CaffeFormatError(f"--index {path}: not an index written by tools/build_index.py "
                               f"(torch.load failed: {type(exc).__name__})") from exc
    if not isinstance(index, dict) or not set(REQUIRED_KEYS) <= index.keys():
        raise CaffeFormatError(f"--index {path}: not an index written by tools/build_index.py "
                               f"(expected {', '.join(REQUIRED_KEYS)})")
    feats = index["features"]
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] != len(index["keys"]):
        shape = list(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise CaffeFormatError(f"--index {path}: features {shape} do not match {len(index['keys'])} keys")
    if index.get("search"):
        faiss = _faiss()
        if not os.path.isfile(path + ".faiss"):
            raise FileNotFoundError(f"--index {path}: its FAISS index {path}.faiss is missing")
        try:
            with open(path + ".faiss", "rb") as f:
                index["faiss"] = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
        except RuntimeError as exc:
            raise CaffeFormatError(f"--index {path}.faiss: not a FAISS index ({str(exc).splitlines()[0]})") from None
        if index["faiss"].ntotal != len(index["keys"]):
            raise CaffeFormatError(f"--index {path}.faiss holds {index['faiss'].ntotal} vectors, the index "
                                   f"{len(index['keys'])} keys (files of different builds?)")
    return index


# --------------------------------------------------------------------------- search
SEARCH_KINDS = ("brute", "flat", "hnsw", "ivf")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("FAISS search needs the optional package faiss-cpu (pip install faiss-cpu)") from None
    return faiss


def build_search(features, kind="flat", hnsw_m=32, ivf_lists=None):
    """A FAISS index of L2-normalised ``features`` (N x D float32): ``flat`` searches exhaustively
    (exact; the same ranking as brute force, up to float rounding of near-ties), ``hnsw`` (graph,
    ``hnsw_m`` links per node) and ``ivf`` (inverted lists, ``ivf_lists`` of them, default
    4 sqrt(N), at most N / 39) are approximate: faster on large galleries, their recall is measured by
    tools/bench_index.py."""
    faiss = _faiss()
    x = np.ascontiguousarray(np.asarray(features, np.float32))
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
    elif kind == "ivf":
        lists = ivf_lists or max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 points a list
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, lists)
        index.train(x)
    else:
        raise ValueError(f"search kind must be one of flat, hnsw, ivf, got {kind!r}")
    index.add(x)
    return index


def search(index, queries, k, effort=None):
    """The ``k`` nearest gallery images of each query: (distances, positions), Q x k, by increasing
    Euclidean distance. ``index`` is an index of :func:`load_index`: brute force on its features
    (exact, ties in gallery order), or its FAISS index when it has one (``effort``: HNSW's efSearch
    or IVF's nprobe)."""
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1)
    feats = index["features"]
    engine = index.get("faiss")
    if engine is None:
        return brute_force_search(q, feats, min(k, feats.shape[0]))
    k = min(k, engine.ntotal)
    faiss = _faiss()
    if effort is not None:
        if isinstance(engine, faiss.IndexHNSWFlat):
            engine.hnsw.efSearch = int(effort)
        elif isinstance(engine, faiss.IndexIVFFlat):
            engine.nprobe = int(effort)
    d2, pos = engine.search(np.ascontiguousarray(q.numpy()), k)
    return np.sqrt(np.maximum(d2, 0)), pos


def brute_force_search(queries, gallery, k, chunk=64):
    """Exact k nearest neighbours by Euclidean distance, ties in gallery order (as a stable sort of
    each row), computed on blocks of ``chunk`` queries: memory chunk x gallery distances, never the
    whole matrix. Returns (distances, positions) as numpy arrays, Q x k."""
    q = torch.as_tensor(queries, dtype=torch.float32)
    g = torch.as_tensor(gallery, dtype=torch.float32)
    k = min(k, g.shape[0])
    dists, positions = [], []
    margin = min(g.shape[0], k + 8)
    for s in range(0, q.shape[0], chunk):
        block = torch.cdist(q[s:s + chunk], g)
        vals, idx = torch.topk(block, margin, dim=1, largest=False, sorted=True)
        for r in range(block.shape[0]):
            v, i = vals[r].numpy(), idx[r].numpy()
            order = np.lexsort((i, v))
            v, i = v[order], i[order]
            if margin < g.shape[0] and v[-1] == v[k - 1]:  # a tie reaches past the margin: sort the row
                i = torch.argsort(block[r], stable=True)[:k].numpy()
                v = block[r][i].numpy()
            dists.append(v[:k])
            positions.append(i[:k])
    if not dists:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.stack(dists), np.stack(positions)
