"""The offline gallery index: its file format, written and read in one place.

An index is a ``torch.save`` file of a dict of plain data (tensors, lists, strings; it is read
with ``weights_only=True``, so loading it never runs code):

* ``features``: N x D float32, the L2-normalised fc7_bn features of the gallery;
* ``keys``: the N record keys of the gallery database, in order;
* ``db``: the absolute path of that database (the images a ranking shows);
* ``weights``: the absolute path of the weights the features were computed with;
* ``ids``, ``cameras`` (optional): identity and camera of each record, when the database's
  JSON metadata gives them.

tools/build_index.py writes it, tools/query.py ranks it.
"""
import io
import os

import torch

from mspcnn.caffe.io import CaffeFormatError, atomic_write

__all__ = ["write_index", "load_index", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("features", "keys", "db")


def write_index(path, features, keys, db, weights, ids=None, cameras=None):
    """Write an index (atomically: an interrupted write leaves any previous file intact).
    ``features`` are normalised here; ``ids`` and ``cameras`` go in only when both are given."""
    features = torch.as_tensor(features, dtype=torch.float32)
    if features.dim() != 2 or features.shape[0] != len(keys):
        raise ValueError(f"write_index: features {list(features.shape)} do not match {len(keys)} keys")
    index = {"features": torch.nn.functional.normalize(features), "keys": list(keys),
             "db": os.path.abspath(db), "weights": os.path.abspath(weights)}
    if ids is not None and cameras is not None:
        if not len(ids) == len(cameras) == len(keys):
            raise ValueError(f"write_index: {len(ids)} ids and {len(cameras)} cameras for {len(keys)} keys")
        index.update(ids=[int(i) for i in ids], cameras=[int(c) for c in cameras])
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
    return index
