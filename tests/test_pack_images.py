"""tools/pack_images.py: an image folder packed as lossless WebP and unpacked into the same files,
pixel for pixel; bad packs refused with exit status 2. On the real CUHK01 folder when present."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "pack_images.py"
CAMPUS = Path(os.environ.get("MSPCNN_REALDATA", ROOT.parent / "shared" / "realdata")) / "cuhk01" / "campus"


def tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def folder(tmp_path):
    """Images of every kind the tool takes (colour, grey and alpha PNG, BMP, JPEG, in a subfolder
    too), and a file it leaves out."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "cam2").mkdir(parents=True)
    images = {
        "0001001.png": rng.integers(0, 256, (160, 60, 3), np.uint8),
        "grey.png": rng.integers(0, 256, (16, 9), np.uint8),
        "alpha.png": rng.integers(0, 256, (7, 5, 4), np.uint8),
        "cam2/b.bmp": rng.integers(0, 256, (12, 10, 3), np.uint8),
        "cam2/c.jpg": rng.integers(0, 256, (32, 16, 3), np.uint8),
    }
    for rel, img in images.items():
        assert cv2.imwrite(str(src / rel), img)
    (src / "README.txt").write_text("not an image")
    return src


def pixels(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_pack_and_unpack_keep_every_pixel(folder, tmp_path):
    r = tool("pack", folder, tmp_path / "pack")
    assert r.returncode == 0, r.stderr
    assert "packed 5 images" in r.stdout and "left out 1 other files" in r.stdout
    man = json.loads((tmp_path / "pack" / "manifest.json").read_text())
    assert man["skipped"] == ["README.txt"]
    assert (tmp_path / "pack" / "0001001.png.webp").is_file() and (tmp_path / "pack" / "cam2" / "c.jpg").is_file()
    r = tool("unpack", tmp_path / "pack", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for rel in ("0001001.png", "grey.png", "alpha.png", "cam2/b.bmp", "cam2/c.jpg"):
        a, b = pixels(folder / rel), pixels(tmp_path / "out" / rel)
        assert a.shape == b.shape and np.array_equal(a, b), rel
    assert (folder / "cam2/c.jpg").read_bytes() == (tmp_path / "out" / "cam2/c.jpg").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == sorted(
        ["0001001.png", "grey.png", "alpha.png", "b.bmp", "c.jpg"])


def test_a_corrupt_or_foreign_pack_is_refused(folder, tmp_path):
    assert tool("pack", folder, tmp_path / "pack").returncode == 0
    r = tool("pack", folder, tmp_path / "pack")  # a pack is never overwritten
    assert r.returncode == 2 and "already holds a pack" in r.stderr
    man_path = tmp_path / "pack" / "manifest.json"
    man = json.loads(man_path.read_text())
    # pixels changed in one stored image: caught by the hash
    img = pixels(tmp_path / "pack" / "grey.png.webp")
    img[0, 0] ^= 1
    assert cv2.imwrite(str(tmp_path / "pack" / "grey.png.webp"), img, [cv2.IMWRITE_WEBP_QUALITY, 101])
    r = tool("unpack", tmp_path / "pack", tmp_path / "out1")
    assert r.returncode == 2 and "grey.png.webp: its pixels differ" in r.stderr and "Traceback" not in r.stderr
    # a stored file missing, or not an image
    (tmp_path / "pack" / "grey.png.webp").write_bytes(b"RIFF0000WEBP")
    r = tool("unpack", tmp_path / "pack", tmp_path / "out2")
    assert r.returncode == 2 and "grey.png.webp" in r.stderr
    (tmp_path / "pack" / "alpha.png.webp").unlink()
    man["files"] = [e for e in man["files"] if e["path"] != "grey.png"]
    man_path.write_text(json.dumps(man))
    r = tool("unpack", tmp_path / "pack", tmp_path / "out3")
    assert r.returncode == 2 and "alpha.png.webp: missing from the pack" in r.stderr
    # a path leading outside the output
    man["files"] = [dict(man["files"][0], path="../evil.png")]
    man_path.write_text(json.dumps(man))
    r = tool("unpack", tmp_path / "pack", tmp_path / "out4")
    assert r.returncode == 2 and "outside the output" in r.stderr and not (tmp_path / "evil.png").exists()
    # an output folder that holds files already: nothing mixed into it
    r = tool("unpack", tmp_path / "pack", folder)
    assert r.returncode == 2 and "not empty" in r.stderr
    # no manifest, or a foreign one
    r = tool("unpack", folder, tmp_path / "out5")
    assert r.returncode == 2 and "manifest.json" in r.stderr
    man_path.write_text("{not json")
    r = tool("unpack", tmp_path / "pack", tmp_path / "out6")
    assert r.returncode == 2 and "unreadable manifest" in r.stderr


def test_bad_sources_are_refused(tmp_path):
    r = tool("pack", tmp_path / "missing", tmp_path / "pack")
    assert r.returncode == 2 and "missing" in r.stderr
    (tmp_path / "empty").mkdir()
    r = tool("pack", tmp_path / "empty", tmp_path / "pack")
    assert r.returncode == 2 and "no .png" in r.stderr
    (tmp_path / "deep").mkdir()
    assert cv2.imwrite(str(tmp_path / "deep" / "x.png"), np.zeros((4, 4), np.uint16) + 300)
    r = tool("pack", tmp_path / "deep", tmp_path / "pack2")
    assert r.returncode == 2 and "x.png: uint16" in r.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = tool("pack", tmp_path / "broken", tmp_path / "pack3")
    assert r.returncode == 2 and "y.png: not an image" in r.stderr


@pytest.mark.skipif(not CAMPUS.is_dir(), reason=f"{CAMPUS} not present")
def test_real_cuhk01_images_round_trip(tmp_path):
    """Twenty real CUHK01 images (copied to a temporary folder only), packed and unpacked: the same
    pixels, and smaller."""
    src = tmp_path / "campus"
    src.mkdir()
    names = sorted(os.listdir(CAMPUS))[::194][:20]
    for n in names:
        (src / n).write_bytes((CAMPUS / n).read_bytes())
    assert tool("pack", src, tmp_path / "pack").returncode == 0
    assert tool("unpack", tmp_path / "pack", tmp_path / "out").returncode == 0
    for n in names:
        assert np.array_equal(pixels(src / n), pixels(tmp_path / "out" / n)), n
    packed = sum(p.stat().st_size for p in (tmp_path / "pack").glob("*.webp"))
    assert packed < sum((src / n).stat().st_size for n in names)
