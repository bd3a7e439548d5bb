"""Reading and writing Caffe's files with the protobuf library.

* prototxt (text format) -> ``NetParameter`` (or any message of
  :mod:`mspcnn.caffe.proto`), with errors that name the file, the line and the
  unknown field or value;
* ``.caffemodel`` (binary ``NetParameter`` with layer blobs), read and written;
* ``.binaryproto`` (a ``BlobProto``, e.g. an image mean), read and written;
* ``.solverstate`` (a ``SolverState``), read (:mod:`mspcnn.solver` writes it);
* ``BlobProto`` <-> numpy, for both the ``shape`` field and the legacy
  num/channels/height/width dimensions.

Writes go to a temporary file in the same folder that is renamed into place
when complete, so an interrupted write never leaves a truncated file.
"""
import os
import re
import tempfile

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from . import proto

__all__ = [
    "CaffeFormatError", "read_prototxt", "parse_prototxt", "write_prototxt", "read_net",
    "upgrade_net_batchnorm",
    "read_caffemodel", "write_caffemodel", "read_binaryproto", "write_binaryproto", "read_solverstate",
    "blob_to_array", "array_to_blob", "atomic_write", "remove_stale_temporaries", "process_alive",
    "writable_folder",
]


class CaffeFormatError(ValueError):
    """A Caffe file that cannot be read: names the file, and the line where known."""


def _read_bytes(path, what):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        return f.read()


def parse_prototxt(text, message_type=proto.NetParameter, source="<string>"):
    """Parse Caffe text format into a new ``message_type`` message.

    Raises CaffeFormatError naming ``source`` and the line of an unknown field,
    unknown enum value or syntax error."""
    msg = message_type()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line = getattr(exc, "GetLine", lambda: None)()
        detail = str(exc)
        m = re.match(r"^(\d+):(\d+) : (.*)$", detail, re.S)
        if m:
            line, detail = int(m.group(1)), m.group(3)
        where = f"{source}, line {line}" if line else source
        raise CaffeFormatError(f"{where}: {detail}") from None
    return msg


def read_prototxt(path, message_type=proto.NetParameter):
    """Read a prototxt file (a net by default; pass another message type, e.g.
    ``proto.BlobProto``, for other files)."""
    data = _read_bytes(path, "prototxt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaffeFormatError(f"{path}: not a text file ({exc})") from None
    return parse_prototxt(text, message_type, source=os.fspath(path))


def upgrade_net_batchnorm(net):
    """Caffe 1.0's ``UpgradeNetBatchNorm`` (src/caffe/util/upgrade_proto.cpp), in place: a
    BatchNorm layer that declares exactly three ParamSpecs (the older way of freezing its
    statistics with lr_mult 0) loses all of them. Caffe's BatchNorm layer then freezes its blobs
    itself, and the blobs are no longer shared by name: two BatchNorm layers that shared their
    statistics through ParamSpec names keep separate statistics after the upgrade. Returns the
    names of the layers changed."""
    changed = []
    for lp in net.layer:
        if lp.type == "BatchNorm" and len(lp.param) == 3:
            del lp.param[:]
            changed.append(lp.name)
    return changed


def read_net(path):
    """Read a net prototxt as Caffe's ``ReadNetParamsFromTextFileOrDie`` does: parse it, then
    apply the upgrades Caffe 1.0 applies to files (here :func:`upgrade_net_batchnorm`, the only
    one that concerns current-format nets). A net given inline (a solver's ``net_param``) is not
    upgraded by Caffe, so use :func:`parse_prototxt` or the message itself for those."""
    net = read_prototxt(path)
    upgrade_net_batchnorm(net)
    return net


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data, mode="wb"):
    """Write ``data`` (bytes, or str with mode "w") to ``path`` through a temporary file in the same
    folder (created if needed), flushed to disk and renamed over ``path``: an interrupted write
    leaves the previous file intact and no partial one (its ``<name>.*.tmp`` is removed at once, or
    by :func:`remove_stale_temporaries` after a kill). The file gets the permissions of the user's
    umask, as ``open`` would give it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a file gets the user's umask
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder, prefix=""):
    """Remove the ``<prefix>*.<pid>.*.tmp`` files :func:`atomic_write` leaves in ``folder`` when its
    process is killed mid-write (those of a process still running are kept). Returns their paths."""
    import glob
    import re

    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        m = re.search(r"\.(\d+)\.[^./]+\.tmp$", path)
        if not m or process_alive(int(m.group(1))):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def process_alive(pid):
    """Whether process ``pid`` is running (this one counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writable_folder(folder, what):
    """Create ``folder`` if needed and check that files can be written in it; raise OSError whose
    message starts with ``what`` (the option or the file the folder is for) otherwise."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{what}: {folder} is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{what}: cannot create {folder} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: {folder} is not writable")
    return folder


def write_prototxt(msg, path):
    """Write a message in Caffe text format (atomically)."""
    atomic_write(path, text_format.MessageToString(msg), mode="w")


def _parse_binary(data, message_type, path, what):
    msg = message_type()
    try:
        msg.ParseFromString(data)
    except pb_message.DecodeError as exc:
        raise CaffeFormatError(f"{path}: not a valid {what} ({exc})") from None
    return msg


def read_caffemodel(path):
    """Read a ``.caffemodel`` (binary ``NetParameter``)."""
    data = _read_bytes(path, ".caffemodel")
    net = _parse_binary(data, proto.NetParameter, path, ".caffemodel (binary NetParameter)")
    if len(data) and not net.layer:
        raise CaffeFormatError(f"{path}: no layers found; is it a .caffemodel?")
    return net


def write_caffemodel(net, path):
    """Write a ``NetParameter`` as a ``.caffemodel`` (atomically)."""
    atomic_write(path, net.SerializeToString())


def read_solverstate(path):
    """Read a ``.solverstate`` (binary ``SolverState``)."""
    data = _read_bytes(path, ".solverstate")
    return _parse_binary(data, proto.SolverState, path, ".solverstate (SolverState)")


def blob_to_array(blob):
    """A ``BlobProto`` as a float32 (or float64 for double_data) numpy array,
    shaped by ``shape`` or else by the legacy num/channels/height/width."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    elif blob.num or blob.channels or blob.height or blob.width:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = (len(blob.data) or len(blob.double_data),)
    if len(blob.double_data):
        data = np.asarray(blob.double_data, dtype=np.float64)
    else:
        data = np.asarray(blob.data, dtype=np.float32)
    count = int(np.prod(shape)) if shape else 1
    if data.size != count:
        raise CaffeFormatError(
            f"BlobProto holds {data.size} values but its shape {list(shape)} needs {count}"
        )
    return data.reshape(shape)


def array_to_blob(array, legacy_dims=False):
    """A numpy array (or tensor) as a float32 ``BlobProto``. ``legacy_dims``
    writes num/channels/height/width (4-D only) instead of ``shape``, as
    compute_image_mean does."""
    arr = np.asarray(array, dtype=np.float32)
    blob = proto.BlobProto()
    if legacy_dims:
        if arr.ndim != 4:
            raise ValueError(f"legacy_dims needs a 4-D array, got shape {list(arr.shape)}")
        blob.num, blob.channels, blob.height, blob.width = (int(d) for d in arr.shape)
    else:
        blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.ravel().tolist())
    return blob


def read_binaryproto(path):
    """Read a ``.binaryproto`` mean file as a float array, without its leading
    num axis when that is 1 (so a mean image is C x H x W)."""
    data = _read_bytes(path, ".binaryproto")
    blob = _parse_binary(data, proto.BlobProto, path, ".binaryproto (BlobProto)")
    try:
        arr = blob_to_array(blob)
    except CaffeFormatError as exc:
        raise CaffeFormatError(f"{path}: {exc}") from None
    return arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr


def write_binaryproto(array, path):
    """Write a mean image (C x H x W, or 1 x C x H x W) as compute_image_mean
    does: legacy dims num 1, channels, height, width (atomically)."""
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    atomic_write(path, array_to_blob(arr, legacy_dims=True).SerializeToString())
