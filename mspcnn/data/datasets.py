"""Dataset converters: raw releases -> LMDBs of Datums plus a JSON file per split.

Market-1501 (and anything in its layout, such as the synthetic dataset of
:mod:`mspcnn.data.synthetic`), CUHK03 (``cuhk-03.mat``, labeled or detected,
the 20 classic splits or the 767/700 protocol) and CUHK01 (``campus/``, the
100- and 486-identity protocols with seeded splits).

Market-1501 splits written:

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

A converted folder is all new or untouched: it is built beside its final place
(``<out>.partial-<pid>``) and swapped in when complete, replacing any previous
conversion as a whole (no split of an earlier run survives), and it carries a
``manifest.json`` naming the run that wrote it (dataset, source, options,
time, process, the SHA-256 of every split's JSON). The ``.partial-*`` folders
of conversions killed midway are removed at the next start.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings

import numpy as np

from mspcnn.caffe.io import process_alive, writable_folder

from .lmdb_io import file_loader, write_records
from .transformer import IMAGE_SIZE

__all__ = ["parse_market_name", "read_market1501", "convert_market1501", "read_cuhk01",
           "convert_cuhk01", "CUHK03Mat", "convert_cuhk03"]

MARKET_FOLDERS = ("bounding_box_train", "bounding_box_test", "query")
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d+)s\d+_\d+_\d+\.(jpg|jpeg|png)$", re.I)
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp")


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
    out, ignored = {}, []
    for folder in MARKET_FOLDERS:
        records = []
        for name in sorted(os.listdir(os.path.join(raw_dir, folder))):
            parsed = parse_market_name(name)
            if parsed:
                records.append((f"{folder}/{name}", parsed[0], parsed[1]))
            elif name.lower().endswith(_IMAGE_EXT):
                ignored.append(f"{folder}/{name}")
        out[folder] = records
    if ignored:
        more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        warnings.warn(f"{raw_dir}: {len(ignored)} image files do not follow Market-1501's naming "
                      f"(PPPP_cCsS_FFFFFF_BB.jpg) and are left out: {', '.join(ignored[:5])}{more}", stacklevel=2)
    return out


def _write_split(out_dir, split, rows, encode_type, progress, dataset, extra=None, image_size=IMAGE_SIZE):
    """rows: dicts with name, id, camera, label, load (-> (BGR image or None, reason))
    and any other JSON fields. Writes <split>.lmdb (images resized to ``image_size``) and
    <split>.json."""
    records = ((i, r["name"], r["load"], r["label"]) for i, r in enumerate(rows))
    stats = write_records(os.path.join(out_dir, f"{split}.lmdb"), records, len(rows), resize=image_size,
                          encode_type=encode_type, overwrite=True, progress=progress)
    skipped = {index for index, _, _ in stats["skipped"]}
    out_rows = []
    for i, r in enumerate(rows):
        if i in skipped:
            continue
        row = {"key": f"{i:08d}_{r['name']}"}
        row.update({k: v for k, v in r.items() if k not in ("load", "name")})
        out_rows.append(row)
    meta = {"dataset": dataset, "split": split, "images": len(out_rows),
            "ids": len({r["id"] for r in out_rows}), "skipped": [p for _, p, _ in stats["skipped"]]}
    meta.update(extra or {})
    meta["records"] = out_rows
    tmp = os.path.join(out_dir, f".{split}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, f"{split}.json"))
    return meta


def _remove_stale_builds(out_dir):
    """Remove ``<out>.partial-<pid>`` and ``<out>.old-<pid>`` folders of conversions whose process is
    gone (killed midway)."""
    for path in glob.glob(glob.escape(out_dir) + ".partial-*") + glob.glob(glob.escape(out_dir) + ".old-*"):
        m = re.search(r"\.(?:partial|old)-(\d+)$", path)
        if m and not process_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _write_splits(out_dir, splits, encode_type, progress, dataset, extra=None, source=None, image_size=IMAGE_SIZE):
    """Write every split into a new folder beside ``out_dir``, with manifest.json, then put it in
    place of ``out_dir`` (whose previous content, if any, is removed only then). An error or a kill
    leaves ``out_dir`` as it was. ``image_size``: (height, width) the images are resized to (recorded
    in the metadata when it is not [1]'s 160 x 64)."""
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image size: expected (height, width) >= 1, got {image_size}")
    if image_size != IMAGE_SIZE:
        extra = dict(extra or {}, image_size=list(image_size))
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    writable_folder(os.path.dirname(out_dir), out_dir)
    _remove_stale_builds(out_dir)
    build = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build)
    summary, files = {}, {}
    try:
        for split, rows in splits.items():
            if not rows:
                continue
            if progress:
                print(f"{dataset}: writing {split} ({len(rows)} images)", flush=True)
            meta = _write_split(build, split, rows, encode_type, progress, dataset, extra, image_size)
            summary[split] = (meta["images"], meta["ids"])
            with open(os.path.join(build, f"{split}.json"), "rb") as f:
                files[split] = {"images": meta["images"], "ids": meta["ids"],
                                "json_sha256": hashlib.sha256(f.read()).hexdigest()}
        manifest = {"writer": "mspcnn.data.datasets", "run_id": uuid.uuid4().hex, "dataset": dataset,
                    "source": os.path.abspath(source) if source else None, "options": extra or {},
                    "encode_type": encode_type, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host_pid": os.getpid(), "splits": files}
        with open(os.path.join(build, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        old = None
        if os.path.exists(out_dir):
            old = f"{out_dir}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return summary


def _hold_out(ids, val_ids, rng, where):
    ids = sorted(ids)
    if val_ids >= len(ids):
        raise ValueError(f"{where}: {len(ids)} training identities, cannot hold out {val_ids} "
                         "for validation")
    return set(rng.choice(ids, val_ids, replace=False).tolist()) if val_ids else set()


def convert_market1501(raw_dir, out_dir, val_ids=50, seed=0, encode_type=None, progress=True,
                       dataset="market1501", image_size=IMAGE_SIZE):
    """Convert a Market-1501 tree, images resized to ``image_size`` (height, width; [1]'s 160 x 64
    by default); returns {split: (images, identities)}."""
    tree = read_market1501(raw_dir)
    train_all = [r for r in tree["bounding_box_train"] if r[1] > 0]
    held = _hold_out({r[1] for r in train_all}, val_ids, np.random.default_rng(seed), raw_dir)
    train = [r for r in train_all if r[1] not in held]
    label_of = {pid: k for k, pid in enumerate(sorted({r[1] for r in train}))}

    def rows(records, label):
        return [{"name": path, "path": path, "id": pid, "camera": cam, "label": label(pid),
                 "load": file_loader(os.path.join(raw_dir, path))} for path, pid, cam in records]

    splits = {"train": rows(train, label_of.get),
              "val": rows([r for r in train_all if r[1] in held], int),
              "probe": rows(tree["query"], int),
              "gallery": rows(tree["bounding_box_test"], int)}
    return _write_splits(out_dir, splits, encode_type, progress, dataset, {"val_ids": val_ids, "seed": seed},
                         source=raw_dir, image_size=image_size)


# ---------------------------------------------------------------------------
# CUHK01
# ---------------------------------------------------------------------------
_CUHK01_NAME = re.compile(r"^(\d{4})(\d{3})\.png$", re.I)


def read_cuhk01(raw_dir):
    """[(path, identity, camera)] of CUHK01's ``campus/`` (or the folder itself):
    files PPPPIII.png, images 001-002 camera 1 (A), 003-004 camera 2 (B)."""
    folder = os.path.join(raw_dir, "campus") if os.path.isdir(os.path.join(raw_dir, "campus")) else raw_dir
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CUHK01 folder not found: {raw_dir} (expected campus/ with "
                                "PPPPIII.png files)")
    out = []
    for name in sorted(os.listdir(folder)):
        m = _CUHK01_NAME.match(name)
        if m:
            out.append((os.path.join(folder, name), int(m.group(1)), 1 if int(m.group(2)) <= 2 else 2))
    if not out:
        raise FileNotFoundError(f"{folder}: no CUHK01 images (PPPPIII.png) found")
    return out


def convert_cuhk01(raw_dir, out_dir, test_ids=100, split=0, val_ids=20, seed=0, encode_type=None,
                   progress=True, image_size=IMAGE_SIZE):
    """CUHK01 protocol with ``test_ids`` test identities (100: 871 train, or
    486: 485 train), random split number ``split`` drawn with ``seed``.
    probe = camera A images of the test ids, gallery = camera B images; images resized to
    ``image_size``."""
    records = read_cuhk01(raw_dir)
    ids = sorted({pid for _, pid, _ in records})
    if test_ids >= len(ids):
        raise ValueError(f"{raw_dir}: {len(ids)} identities, cannot take {test_ids} for testing")
    rng = np.random.default_rng([seed, split])
    test = set(rng.permutation(ids)[:test_ids].tolist())
    train_ids = [i for i in ids if i not in test]
    held = _hold_out(train_ids, val_ids, rng, raw_dir)
    label_of = {pid: k for k, pid in enumerate(i for i in train_ids if i not in held)}

    def rows(pred, label):
        return [{"name": os.path.basename(p), "path": p, "id": pid, "camera": cam, "label": label(pid),
                 "load": file_loader(p)} for p, pid, cam in records if pred(pid, cam)]

    splits = {"train": rows(lambda i, c: i in label_of, label_of.get),
              "val": rows(lambda i, c: i in held, int),
              "probe": rows(lambda i, c: i in test and c == 1, int),
              "gallery": rows(lambda i, c: i in test and c == 2, int)}
    return _write_splits(out_dir, splits, encode_type, progress, "cuhk01",
                         {"protocol": f"{test_ids} test ids", "split": split, "seed": seed}, source=raw_dir,
                         image_size=image_size)


# ---------------------------------------------------------------------------
# CUHK03
# ---------------------------------------------------------------------------
def _h5():
    try:
        import h5py
    except ImportError:  # pragma: no cover
        raise ImportError("reading cuhk-03.mat (MATLAB v7.3 = HDF5) needs h5py: pip install h5py") from None
    return h5py


class CUHK03Mat:
    """Lazy access to ``cuhk-03.mat``: ``images(variant)`` lists
    (pair, person, view, index, loader) for every non-empty cell, ``testsets()``
    the 20 classic splits as lists of (pair, person), 1-based as in the file."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CUHK03 file not found: {path} (expected cuhk03_release/cuhk-03.mat)")
        self.path = path
        try:
            self.f = _h5().File(path, "r")
        except OSError as exc:
            raise ValueError(f"{path}: not a MATLAB v7.3 (HDF5) file ({exc})") from None
        for key in ("labeled", "detected", "testsets"):
            if key not in self.f:
                raise ValueError(f"{path}: no '{key}' entry; is it cuhk-03.mat?")

    def images(self, variant):
        f = self.f
        out = []
        for pair, ref in enumerate(np.asarray(f[variant]).ravel(), 1):
            cells = f[ref]  # 10 x persons references (MATLAB persons x 10, transposed)
            for person in range(cells.shape[1]):
                for k in range(cells.shape[0]):
                    target = f[cells[k, person]]
                    if len(target.shape) != 3:  # empty cell
                        continue
                    out.append((pair, person + 1, 1 if k < 5 else 2, k + 1,
                                lambda t=target: (np.ascontiguousarray(
                                    np.asarray(t).transpose(2, 1, 0)[:, :, ::-1]), None)))
        return out

    def testsets(self):
        out = []
        for ref in np.asarray(self.f["testsets"]).ravel():
            arr = np.asarray(self.f[ref])  # 2 x 100, MATLAB 100 x 2 transposed
            out.append([(int(p), int(q)) for p, q in arr.T])
        return out


def convert_cuhk03(raw_dir, out_dir, variant="labeled", split=0, protocol="classic", val_ids=100,
                   seed=0, encode_type=None, progress=True, image_size=IMAGE_SIZE):
    """CUHK03 (labeled or detected). protocol "classic": the ``split``-th of
    the 20 official test sets (100 ids; the other 1367 train), probe = view 1,
    gallery = view 2. protocol "new": the 767/700 split of
    cuhk03_new_protocol_config_<variant>.mat (train / query / gallery as given)."""
    if variant not in ("labeled", "detected"):
        raise ValueError(f"variant must be 'labeled' or 'detected', got {variant!r}")
    mat_path = os.path.join(raw_dir, "cuhk-03.mat")
    if not os.path.isfile(mat_path) and os.path.isfile(os.path.join(raw_dir, "cuhk03_release", "cuhk-03.mat")):
        mat_path = os.path.join(raw_dir, "cuhk03_release", "cuhk-03.mat")
    mat = CUHK03Mat(mat_path)
    images = mat.images(variant)
    offsets, total = {}, 0
    for pair in sorted({p for p, *_ in images}):
        offsets[pair] = total
        total += max(q for p, q, *_ in images if p == pair)
    gid = lambda pair, person: offsets[pair] + person  # noqa: E731

    def row(pair, person, view, k, load, label):
        name = f"{pair}_{person:03d}_{view}_{k:02d}.png"
        return {"name": name, "id": gid(pair, person), "camera": view, "pair": pair, "label": label,
                "load": load}

    rng = np.random.default_rng(seed)
    if protocol == "classic":
        sets = mat.testsets()
        if not 0 <= split < len(sets):
            raise ValueError(f"{mat_path}: split must be in 0..{len(sets) - 1}, got {split}")
        test = {gid(p, q) for p, q in sets[split]}
        train_ids = sorted({gid(p, q) for p, q, *_ in images} - test)
        held = _hold_out(train_ids, val_ids, rng, mat_path)
        label_of = {i: k for k, i in enumerate(i for i in train_ids if i not in held)}
        splits = {"train": [], "val": [], "probe": [], "gallery": []}
        for pair, person, view, k, load in images:
            i = gid(pair, person)
            if i in label_of:
                splits["train"].append(row(pair, person, view, k, load, label_of[i]))
            elif i in held:
                splits["val"].append(row(pair, person, view, k, load, i))
            elif i in test:
                splits["probe" if view == 1 else "gallery"].append(row(pair, person, view, k, load, i))
        extra = {"variant": variant, "protocol": "classic 1367/100", "split": split}
    elif protocol == "new":
        cfg_path = os.path.join(os.path.dirname(mat_path), f"cuhk03_new_protocol_config_{variant}.mat")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"767/700 configuration not found: {cfg_path}")
        from scipy.io import loadmat

        cfg = loadmat(cfg_path)
        names = [str(np.asarray(x).ravel()[0]) for x in np.asarray(cfg["filelist"]).ravel()]
        by_name = {f"{p}_{q:03d}_{v}_{k:02d}.png": (p, q, v, k, load) for p, q, v, k, load in images}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"{cfg_path}: {len(missing)} files of filelist are not in {mat_path}, "
                             f"e.g. {missing[0]}")
        idx = {k: np.asarray(cfg[f"{k}_idx"]).ravel().astype(int) - 1 for k in ("train", "query", "gallery")}
        train_ids = sorted({gid(*by_name[names[i]][:2]) for i in idx["train"]})
        label_of = {i: k for k, i in enumerate(train_ids)}
        splits = {"train": [row(*by_name[names[i]], label_of[gid(*by_name[names[i]][:2])])
                            for i in idx["train"]],
                  "probe": [row(*by_name[names[i]], gid(*by_name[names[i]][:2])) for i in idx["query"]],
                  "gallery": [row(*by_name[names[i]], gid(*by_name[names[i]][:2])) for i in idx["gallery"]]}
        extra = {"variant": variant, "protocol": "new 767/700"}
    else:
        raise ValueError(f"protocol must be 'classic' or 'new', got {protocol!r}")
    return _write_splits(out_dir, splits, encode_type, progress, "cuhk03", extra, source=raw_dir,
                         image_size=image_size)
