#!/usr/bin/env python
"""Pack an image folder as lossless WebP, to move a dataset to a machine without network; unpack it
there into the same files, pixel for pixel.

    python tools/pack_images.py pack SRC_DIR PACK_DIR       every .png/.jpg/.jpeg/.bmp under SRC_DIR
    python tools/pack_images.py unpack PACK_DIR OUT_DIR     the same relative paths and names under OUT_DIR

Why: a GPU machine that is lent for a few minutes often has no network and a limit on what can be
sent with a job (64 MiB on ours); CUHK01 as released is 75 MB of PNG, and 45 MB as lossless WebP.
WebP's lossless mode keeps every pixel, so the unpacked images decode to the very arrays the
originals decode to; `unpack` checks that against the SHA-256 of each image's pixels recorded by
`pack` (manifest.json) and stops with exit status 2 at the first mismatch; it unpacks only into an
empty or new folder. PNG and BMP files come
back in their own format (the bytes may differ, the pixels do not). A JPEG is lossy already: it is
kept as it is (copied, not re-encoded), so its bytes come back too. Files of other kinds are listed
and left out. 8-bit images with 1, 3 or 4 channels only (anything else: exit status 2, naming the
file). Used by tools/gpu_cuhk01.sh, which unpacks a packed folder given as RAW_DIR.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import cv2
import numpy as np

from mspcnn.cli import format_duration, run

MANIFEST = "manifest.json"
LOSSLESS = (".png", ".bmp")
AS_IS = (".jpg", ".jpeg")
WEBP_LOSSLESS = [cv2.IMWRITE_WEBP_QUALITY, 101]  # quality above 100: OpenCV's lossless WebP


def pixel_hash(img):
    """SHA-256 of an image's shape, dtype and pixels, as cv2.imread(..., IMREAD_UNCHANGED) gives them."""
    h = hashlib.sha256(f"{img.shape}{img.dtype}".encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def read_image(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not an image OpenCV can read (corrupt or of another kind)")
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ValueError(f"{path}: {img.dtype} with shape {img.shape}; only 8-bit images with 1, 3 or 4 "
                         "channels can be packed")
    return img


def _progress(done, total, start, verb):
    if done == total or done % 500 == 0:
        el = time.time() - start
        eta = el / done * (total - done) if done else 0
        print(f"  {verb} {done} / {total} files, {format_duration(el)} elapsed, ETA {format_duration(eta)}",
              flush=True)


def pack(src, dest):
    if not os.path.isdir(src):
        raise FileNotFoundError(2, "no such folder", src)
    if os.path.exists(os.path.join(dest, MANIFEST)):
        raise ValueError(f"{dest}: already holds a pack ({MANIFEST}); give an empty or new folder")
    files, skipped = [], []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), src)
            (files if name.lower().endswith(LOSSLESS + AS_IS) else skipped).append(rel)
    if not files:
        raise ValueError(f"{src}: no .png, .bmp, .jpg or .jpeg file under it")
    os.makedirs(dest, exist_ok=True)
    entries, bytes_in, bytes_out, start = [], 0, 0, time.time()
    for i, rel in enumerate(files, 1):
        path = os.path.join(src, rel)
        img = read_image(path)
        stored = rel if rel.lower().endswith(AS_IS) else rel + ".webp"
        os.makedirs(os.path.dirname(os.path.join(dest, stored)) or dest, exist_ok=True)
        if stored == rel:
            shutil.copyfile(path, os.path.join(dest, stored))
        else:
            # WebP holds 3 or 4 channels: a grey image is stored as 3 equal channels
            ok = cv2.imwrite(os.path.join(dest, stored), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2
                             else img, WEBP_LOSSLESS)
            if not ok:
                raise OSError(f"{os.path.join(dest, stored)}: could not be written")
        entries.append({"path": rel, "stored": stored, "sha256": pixel_hash(img), "channels":
                        1 if img.ndim == 2 else img.shape[2]})
        bytes_in += os.path.getsize(path)
        bytes_out += os.path.getsize(os.path.join(dest, stored))
        _progress(i, len(files), start, "packed")
    with open(os.path.join(dest, MANIFEST), "w") as f:
        json.dump({"format": "mspcnn-pack-1", "source": os.path.abspath(src), "files": entries,
                   "skipped": skipped}, f, indent=0)
    print(f"packed {len(entries)} images from {src} into {dest}: {bytes_in / 1e6:.1f} MB -> {bytes_out / 1e6:.1f} MB")
    if skipped:
        print(f"left out {len(skipped)} other files, listed in {MANIFEST} (first: {skipped[0]})")
    return 0


def load_manifest(pack_dir):
    path = os.path.join(pack_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, f"no {MANIFEST}: not a folder made by `pack_images.py pack`", path)
    try:
        with open(path) as f:
            man = json.load(f)
        if man.get("format") != "mspcnn-pack-1" or not isinstance(man.get("files"), list):
            raise ValueError("not an mspcnn pack manifest")
    except (json.JSONDecodeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    return man


def unpack(pack_dir, out):
    man = load_manifest(pack_dir)
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out}: not empty; give an empty or new folder (the pack's files would mix with "
                         "what is there)")
    start = time.time()
    for i, e in enumerate(man["files"], 1):
        rel, stored = e["path"], os.path.join(pack_dir, e["stored"])
        if os.path.isabs(rel) or ".." in rel.split(os.sep):
            raise ValueError(f"{os.path.join(pack_dir, MANIFEST)}: refuses the path {rel!r} (outside the output)")
        target = os.path.join(out, rel)
        os.makedirs(os.path.dirname(target) or out, exist_ok=True)
        if not os.path.isfile(stored):
            raise FileNotFoundError(2, "missing from the pack", stored)
        if e["stored"] == rel:  # kept as it was (JPEG)
            shutil.copyfile(stored, target)
            img = read_image(target)
        else:
            img = cv2.imread(stored, cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError(f"{stored}: not a readable WebP image (corrupt pack)")
            if e["channels"] == 1:
                img = img[:, :, 0].copy()
            tmp = target + ".part" + os.path.splitext(rel)[1]
            if not cv2.imwrite(tmp, img):
                raise OSError(f"{target}: could not be written")
            os.replace(tmp, target)
        if pixel_hash(img) != e["sha256"]:
            raise ValueError(f"{stored}: its pixels differ from the packed image {rel} (corrupt pack)")
        _progress(i, len(man["files"]), start, "unpacked")
    print(f"unpacked {len(man['files'])} images into {out}, every one checked against its pixels' SHA-256")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="SRC_DIR -> PACK_DIR (lossless WebP and a manifest)")
    a.add_argument("src")
    a.add_argument("dest")
    b = sub.add_parser("unpack", help="PACK_DIR -> OUT_DIR (the original files' pixels, checked)")
    b.add_argument("pack")
    b.add_argument("out")
    args = p.parse_args(argv)
    return pack(args.src, args.dest) if args.cmd == "pack" else unpack(args.pack, args.out)


if __name__ == "__main__":
    sys.exit(run(main))
