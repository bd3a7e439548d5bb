"""LMDB databases of Caffe ``Datum`` records, as Caffe's ``convert_imageset``
writes them and its Data layer reads them (docs/caffe_semantics.md).

* :func:`write_imageset`: a list of ``(relative path, label)`` -> an LMDB whose
  records are byte-identical to ``convert_imageset --resize_height=160
  --resize_width=64`` (keys ``%08d_<path>``, BGR, C x H x W, OpenCV bilinear
  resize, raw or PNG/JPEG-encoded, commits every 1000 records). Encoded
  without a resize, a file already in the requested encoding is stored as
  its own bytes, as convert_imageset does (no lossy re-encoding). The database is
  written under a temporary name and renamed when complete, so an interrupted
  conversion leaves nothing that looks finished. Unreadable images are
  skipped, counted and named in a warning (their line index is left as a gap
  in the keys, as convert_imageset does).
* :class:`DatumDB`: random access to the records of such a database (raw,
  encoded or float Datums) as C x H x W arrays and labels.
"""
import os
import shutil
import sys
import time
import warnings

import cv2
import lmdb
import numpy as np

from mspcnn.caffe import proto

__all__ = ["write_imageset", "write_records", "file_loader", "truncation", "DatabaseError", "DatumDB", "encode_datum", "decode_datum", "read_image_list",
           "matches_encoding", "file_datum"]

MAP_SIZE = 1 << 40  # LMDB reserves address space, not disk


def read_image_list(path):
    """Read a convert_imageset list file: one ``path label`` per line, split at
    the last space (paths may contain spaces). Returns [(path, label)]."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            head, sep, tail = line.rpartition(" ")
            if not sep or not head:
                raise ValueError(f"{path}, line {n}: expected 'path label', got {line!r}")
            try:
                items.append((head, int(tail)))
            except ValueError:
                raise ValueError(f"{path}, line {n}: label {tail!r} is not an integer") from None
    return items


def encode_datum(image_bgr, label, encode_type=None):
    """Serialize an H x W x 3 BGR uint8 image as a Datum. ``encode_type``
    None stores raw C x H x W bytes; 'png' or 'jpg' stores the encoded file."""
    datum = proto.Datum()
    h, w = image_bgr.shape[:2]
    c = 1 if image_bgr.ndim == 2 else image_bgr.shape[2]
    datum.channels, datum.height, datum.width = c, h, w
    if encode_type:
        ok, buf = cv2.imencode("." + encode_type, image_bgr)
        if not ok:
            raise ValueError(f"OpenCV could not encode the image as {encode_type}")
        datum.data = buf.tobytes()
    else:
        chw = image_bgr if image_bgr.ndim == 2 else image_bgr.transpose(2, 0, 1)
        datum.data = np.ascontiguousarray(chw).tobytes()
    datum.label = int(label)
    datum.encoded = bool(encode_type)
    return datum.SerializeToString()


def decode_datum(value):
    """(C x H x W array, label) from a serialized Datum: uint8 for raw or
    encoded images (encoded ones decoded to BGR), float32 for float_data.
    Raises ValueError for a record that is not a valid Datum."""
    if value is None:
        raise ValueError("the record is missing")
    datum = proto.Datum()
    try:
        datum.ParseFromString(value)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"not a Datum record ({type(exc).__name__})") from None
    if datum.encoded:
        img = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("an encoded Datum holds bytes OpenCV cannot decode")
        return img.transpose(2, 0, 1), datum.label
    shape = (datum.channels, datum.height, datum.width)
    count = int(np.prod(shape))
    if datum.data:
        if len(datum.data) != count or count == 0:
            raise ValueError(f"a Datum of {len(datum.data)} bytes for shape {list(shape)}")
        return np.frombuffer(datum.data, np.uint8).reshape(shape), datum.label
    if len(datum.float_data) != count or count == 0:
        raise ValueError(f"a Datum of {len(datum.float_data)} floats for shape {list(shape)}")
    return np.asarray(datum.float_data, np.float32).reshape(shape), datum.label


def truncation(data):
    """Why the bytes of a JPEG or PNG file are incomplete, or None: a JPEG must end with its EOI
    marker (FF D9; a few bytes of padding after it are tolerated), a PNG with its IEND chunk.
    OpenCV decodes a truncated JPEG without an error (the missing rows come out grey), so a
    truncated file would otherwise enter a database."""
    if data[:2] == b"\xff\xd8":
        return None if b"\xff\xd9" in data[-64:] else "truncated JPEG (no end marker)"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in data[-16:] else "truncated PNG (no IEND chunk)"
    return None


def file_loader(path):
    """A loader for :func:`write_records`: () -> (BGR image, None), or
    (None, reason) when the file is missing, truncated or cannot be decoded.
    The loader carries the file's ``path`` (for convert_imageset's
    pass-through of files already in the requested encoding)."""
    def load():
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, "missing"
        except OSError as exc:
            return None, f"unreadable ({exc.strerror})"
        reason = truncation(data)
        if reason:
            return None, reason
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            return None, "unreadable or corrupt"
        return img, None
    load.path = path
    return load


def matches_encoding(path, encode_type):
    """Caffe's ``matchExt``: the file's extension (lower case) is the encoding, or "jpeg" for
    "jpg"."""
    ext = path.rsplit(".", 1)[-1].lower()
    enc = encode_type.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def file_datum(path, label):
    """The Datum ``ReadFileToDatum`` writes: the file's own bytes, the label, encoded true;
    channels, height and width left unset."""
    datum = proto.Datum()
    with open(path, "rb") as f:
        datum.data = f.read()
    datum.label = int(label)
    datum.encoded = True
    return datum.SerializeToString()


def write_imageset(root, items, out_path, resize=(160, 64), encode_type=None, commit_every=1000,
                   overwrite=False, progress=True):
    """Write ``items`` [(relative path, label)] read from ``root`` into the LMDB
    ``out_path``, as convert_imageset does. ``resize`` (height, width) or None.

    Returns {"written": n, "skipped": [(line index, path, reason)]}."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    records = ((index, rel, file_loader(os.path.join(root, rel)), label)
               for index, (rel, label) in enumerate(items))
    return write_records(out_path, records, len(items), resize, encode_type, commit_every, overwrite,
                         progress)


def write_records(out_path, records, total=None, resize=(160, 64), encode_type=None,
                  commit_every=1000, overwrite=False, progress=True):
    """Write records (index, name, load, label) to the LMDB ``out_path``: key
    ``%08d_<name>``, ``load()`` -> (BGR image or None, reason). Images are
    resized with OpenCV's bilinear filter; unloadable ones are skipped, counted
    and named in a warning. Written under a temporary name, renamed when
    complete."""
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True to replace it")
    tmp = f"{out_path}.partial-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    env = lmdb.open(tmp, map_size=MAP_SIZE, subdir=True, lock=True)
    skipped, written = [], 0
    start = time.time()
    try:
        txn = env.begin(write=True)
        for index, name, load, label in records:
            img, reason = load()
            if img is None:
                skipped.append((index, name, reason))
                continue
            path = getattr(load, "path", None)
            if encode_type and resize is None and path and matches_encoding(path, encode_type):
                # convert_imageset stores a file already in the requested encoding as it is
                # (ReadImageToDatum -> ReadFileToDatum), once OpenCV has decoded it.
                value = file_datum(path, label)
            else:
                if resize is not None and img.shape[:2] != tuple(resize):
                    img = cv2.resize(img, (resize[1], resize[0]), interpolation=cv2.INTER_LINEAR)
                value = encode_datum(img, label, encode_type)
            txn.put(f"{index:08d}_{name}".encode(), value)
            written += 1
            if written % commit_every == 0:
                txn.commit()
                txn = env.begin(write=True)
                if progress:
                    rate = written / max(time.time() - start, 1e-9)
                    of = f"/{total}" if total else ""
                    eta = f", ETA {max(0, total - written) / max(rate, 1e-9):.0f} s" if total else ""
                    print(f"  {os.path.basename(out_path)}: {written}{of} images ({rate:.0f}/s{eta})",
                          file=sys.stderr, flush=True)
        txn.commit()
    except BaseException:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.close()
    lock = os.path.join(tmp, "lock.mdb")
    if os.path.exists(lock):
        os.remove(lock)
    if os.path.exists(out_path):
        shutil.rmtree(out_path)
    os.replace(tmp, out_path)
    if skipped:
        names = ", ".join(f"{p} ({r})" for _, p, r in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(f"{out_path}: skipped {len(skipped)} image(s): {names}{more}", stacklevel=3)
    return {"written": written, "skipped": skipped}


_ENVS = {}


def forget_inherited_environments():
    """In a forked child: close the environments opened by the parent. LMDB forbids using an
    environment across a fork, and refuses to open the same path twice in a process (the parent's
    open environments are inherited); closing the child's copy leaves the parent's untouched (the
    databases are opened read-only, without a lock table)."""
    pid = os.getpid()
    for key in [k for k in _ENVS if k[0] != pid]:
        _ENVS.pop(key).close()


class DatabaseError(ValueError):
    """A database that cannot be read: names the database (and the record)."""


def _open_readonly(path):
    """One read-only environment per database and process (LMDB refuses to
    open the same environment twice in a process). A data.mdb shorter than the
    pages its header says it holds (a copy cut short, a full disk) is refused
    here: LMDB maps the file, and reading a page past its end would kill the
    process with SIGBUS. The key includes the data file's identity: a database
    written again at the same path (a new conversion swaps in a new folder)
    is opened anew, not read from the environment of the one it replaced."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError as exc:
        raise DatabaseError(f"{path}: not a readable LMDB database ({exc.strerror})") from None
    key = (os.getpid(), os.path.realpath(path), st.st_dev, st.st_ino)
    env = _ENVS.get(key)
    if env is None:
        try:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512)
            need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        except lmdb.Error as exc:
            raise DatabaseError(f"{path}: not a readable LMDB database ({exc})") from None
        size = os.path.getsize(os.path.join(path, "data.mdb"))
        if size < need:
            env.close()
            raise DatabaseError(f"{path}: data.mdb is truncated ({size} bytes, its pages need {need}); "
                                "convert the dataset again")
        _ENVS[key] = env
    return env


class DatumDB:
    """Read access to an LMDB of Datums, in key order (the order Caffe's Data
    layer reads). ``db[i]`` -> (C x H x W array, label); ``len(db)``."""

    def __init__(self, path):
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            raise FileNotFoundError(f"no LMDB database at {path} (expected {path}/data.mdb)")
        self.path = path
        self.env = _open_readonly(path)
        with self.env.begin() as txn:
            self.keys = [k for k, _ in txn.cursor()]

    def __len__(self):
        return len(self.keys)

    def raw(self, i):
        with self.env.begin() as txn:
            return txn.get(self.keys[i])

    def _decode(self, i, value):
        try:
            return decode_datum(value)
        except ValueError as exc:
            raise DatabaseError(f"{self.path}: record {i} ({self.keys[i].decode(errors='replace')}): {exc}") from None

    def __getitem__(self, i):
        return self._decode(i, self.raw(i))

    def read_list(self, indices):
        """[C x H x W arrays], labels: the records decoded, not stacked."""
        with self.env.begin() as txn:
            decoded = [self._decode(i, txn.get(self.keys[i])) for i in indices]
        return [d[0] for d in decoded], np.array([d[1] for d in decoded], np.int64)

    def read_batch(self, indices):
        """Arrays stacked N x C x H x W (all records must have one shape) and labels."""
        with self.env.begin() as txn:
            decoded = [self._decode(i, txn.get(self.keys[i])) for i in indices]
        shapes = {d[0].shape for d in decoded}
        if len(shapes) > 1:
            raise DatabaseError(f"{self.path}: records of different shapes {sorted(shapes)} in one batch")
        return np.stack([d[0] for d in decoded]), np.array([d[1] for d in decoded], np.int64)

    def __getstate__(self):  # reopen in worker processes
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])
