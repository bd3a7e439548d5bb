"""Dataset converters: raw releases -> LMDBs of Datums plus a JSON file per split.

Implemented: Market-1501 (and anything in its layout, such as the synthetic
dataset of :mod:`mspcnn.data.synthetic`). Splits written:

* ``train``: bounding_box_train minus the validation identities, junk (-1)
  excluded, Datum label = training label 0..K-1;
* ``val``: the images of ``val_ids`` training identities drawn with ``seed``
  (label = identity), for evaluation during training (cameras are recorded, so
  a query/gallery split by camera is possible);
* ``probe``: query/; ``gallery``: bounding_box_test/ (distractors 0 and junk
  -1 kept: the official protocol needs them). Label = identity.

Each ``<split>.json`` lists, in database order, every record's key, source
path, identity, camera and label. Images are resized to 160 x 64 (bilinear,
as convert_imageset) and stored raw (or PNG-encoded with ``encode_type``).
"""
import json
import os
import re

import numpy as np

from .lmdb_io import write_imageset

__all__ = ["parse_market_name", "read_market1501", "convert_market1501"]

MARKET_FOLDERS = ("bounding_box_train", "bounding_box_test", "query")
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s\d+_\d+_\d+\.(jpg|jpeg|png)$", re.I)


def parse_market_name(name):
    """(identity, camera) of a Market-1501 file name, or None if it is not one."""
    m = _MARKET_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def read_market1501(raw_dir):
    """{folder: [(relative path, identity, camera)]} of a Market-1501 tree;
    files that do not follow the naming scheme are ignored (e.g. Thumbs.db)."""
    missing = [f for f in MARKET_FOLDERS if not os.path.isdir(os.path.join(raw_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"{raw_dir}: not a Market-1501 folder, missing {', '.join(missing)}/ (expected "
            "bounding_box_train/, bounding_box_test/ and query/ holding PPPP_cCsS_FFFFFF_BB.jpg files)")
    out = {}
    for folder in MARKET_FOLDERS:
        records = []
        for name in sorted(os.listdir(os.path.join(raw_dir, folder))):
            parsed = parse_market_name(name)
            if parsed:
                records.append((f"{folder}/{name}", parsed[0], parsed[1]))
        out[folder] = records
    return out


def _write_split(raw_dir, out_dir, split, records, labels, encode_type, progress, dataset):
    items = [(path, label) for (path, _, _), label in zip(records, labels)]
    stats = write_imageset(raw_dir, items, os.path.join(out_dir, f"{split}.lmdb"),
                           encode_type=encode_type, overwrite=True, progress=progress)
    skipped = {index for index, _, _ in stats["skipped"]}
    rows = [{"key": f"{i:08d}_{path}", "path": path, "id": pid, "camera": cam, "label": label}
            for i, ((path, pid, cam), label) in enumerate(zip(records, labels)) if i not in skipped]
    meta = {"dataset": dataset, "split": split, "images": len(rows),
            "ids": len({r["id"] for r in rows}), "skipped": [p for _, p, _ in stats["skipped"]],
            "records": rows}
    tmp = os.path.join(out_dir, f".{split}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, f"{split}.json"))
    return meta


def convert_market1501(raw_dir, out_dir, val_ids=50, seed=0, encode_type=None, progress=True,
                       dataset="market1501"):
    """Convert a Market-1501 tree; returns {split: (images, identities)}."""
    tree = read_market1501(raw_dir)
    os.makedirs(out_dir, exist_ok=True)
    train_all = [r for r in tree["bounding_box_train"] if r[1] > 0]
    ids = sorted({r[1] for r in train_all})
    if val_ids >= len(ids):
        raise ValueError(f"{raw_dir}: {len(ids)} training identities, cannot hold out {val_ids} "
                         "for validation")
    held = set(np.random.default_rng(seed).choice(ids, val_ids, replace=False).tolist()) if val_ids else set()
    train = [r for r in train_all if r[1] not in held]
    val = [r for r in train_all if r[1] in held]
    label_of = {pid: k for k, pid in enumerate(sorted({r[1] for r in train}))}
    splits = {
        "train": (train, [label_of[r[1]] for r in train]),
        "val": (val, [r[1] for r in val]),
        "probe": (tree["query"], [r[1] for r in tree["query"]]),
        "gallery": (tree["bounding_box_test"], [r[1] for r in tree["bounding_box_test"]]),
    }
    summary = {}
    for split, (records, labels) in splits.items():
        if not records:
            continue
        if progress:
            print(f"{dataset}: writing {split} ({len(records)} images)", flush=True)
        meta = _write_split(raw_dir, out_dir, split, records, labels, encode_type, progress, dataset)
        summary[split] = (meta["images"], meta["ids"])
    return summary
