"""The data path against real Caffe (tests/data/caffe_golden): LMDB records
byte-identical to convert_imageset, DataTransformer outputs bit-identical to
Caffe's TEST batches; and the behaviour Caffe's RNG hides (TRAIN crops,
mirroring), atomic writes and bad input."""
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from mspcnn.caffe import io as cio
from mspcnn.caffe import proto
from mspcnn.data import lmdb_io
from mspcnn.data.lmdb_io import DatumDB, read_image_list, write_imageset
from mspcnn.data.transformer import DataTransformer, SequentialDataLayer

GOLDEN = Path(__file__).parent / "data" / "caffe_golden"
LMDB = GOLDEN / "lmdb"
TRANSFORMER = GOLDEN / "transformer"


@pytest.mark.parametrize("encode_type,reference", [(None, "lmdb_raw"), ("png", "lmdb_png")])
def test_records_byte_identical_to_convert_imageset(tmp_path, encode_type, reference):
    out = tmp_path / "db"
    stats = write_imageset(LMDB / "images", read_image_list(LMDB / "list.txt"), out,
                           encode_type=encode_type, progress=False)
    assert stats == {"written": 8, "skipped": []}
    ours, theirs = DatumDB(out), DatumDB(LMDB / reference)
    assert ours.keys == theirs.keys
    assert ours.keys[0] == b"00000000_cam1/0007_c1s1_000151_00.png"
    for i in range(len(theirs)):
        assert ours.raw(i) == theirs.raw(i), ours.keys[i]
    assert not (out / "lock.mdb").exists()


@pytest.mark.parametrize("encode_type", ["png", "jpg"])
def test_encoded_without_resize_stores_files_already_in_that_encoding(tmp_path, encode_type):
    """convert_imageset --encoded --encode_type=E without a resize: a file whose extension is E
    is stored as its own bytes (ReadFileToDatum: data, label, encoded; no channels/height/width),
    other files are decoded and encoded as E. No lossy JPEG round trip."""
    items = read_image_list(LMDB / "list.txt")
    out = tmp_path / "db"
    write_imageset(LMDB / "images", items, out, resize=None, encode_type=encode_type, progress=False)
    db = DatumDB(out)
    passed = 0
    for i, (path, label) in enumerate(items):
        datum = proto.Datum()
        datum.ParseFromString(db.raw(i))
        data = (LMDB / "images" / path).read_bytes()
        assert datum.encoded and datum.label == label
        if path.endswith("." + encode_type):
            expected = proto.Datum(data=data, label=label, encoded=True)
            assert db.raw(i) == expected.SerializeToString() and not datum.HasField("height"), path
            passed += 1
        else:
            assert datum.data != data and datum.height > 0, path  # decoded and re-encoded
    assert passed == 4  # four PNG and four JPEG files in the list
    # With a resize every file is decoded, resized and encoded, as Caffe does.
    write_imageset(LMDB / "images", items, tmp_path / "resized", encode_type=encode_type, progress=False)
    resized = DatumDB(tmp_path / "resized")
    assert all(resized[i][0].shape == (3, 160, 64) for i in range(len(items)))


def test_decoded_records_and_labels():
    raw, png = DatumDB(LMDB / "lmdb_raw"), DatumDB(LMDB / "lmdb_png")
    images, labels = raw.read_batch(range(8))
    assert images.shape == (8, 3, 160, 64) and images.dtype == np.uint8
    assert labels.tolist() == [3, 3, 0, 0, 5, 5, 2, 2]
    assert np.array_equal(png.read_batch(range(8))[0], images)
    mean = cio.read_binaryproto(LMDB / "mean.binaryproto")
    assert np.allclose(images.astype(np.float64).mean(0), mean, atol=1e-5)


@pytest.mark.parametrize("case", ["crop56_meanvalue", "nocrop_meanvalue", "crop56_meanvalue_scale",
                                  "crop56_meanfile", "encoded_crop56_meanvalue", "wrap_batch5"])
def test_transformer_test_batches_bit_identical(case):
    ref = np.load(TRANSFORMER / "batches.npz")
    lp = cio.read_prototxt(TRANSFORMER / f"{case}.prototxt").layer[0]
    transformer = (DataTransformer.from_param(lp.transform_param, "TEST", root=TRANSFORMER)
                   if lp.HasField("transform_param") else None)
    layer = SequentialDataLayer(DatumDB(TRANSFORMER / lp.data_param.source),
                                lp.data_param.batch_size, transformer)
    data, label = layer.next()
    if case == "wrap_batch5":  # two forwards: datums 0-4, then 5, 6, 7, 0, 1
        more = layer.next()
        data, label = np.concatenate([data, more[0]]), np.concatenate([label, more[1]])
    assert data.dtype == np.float32
    assert np.array_equal(data, ref[f"{case}/data"])
    assert np.array_equal(label, ref[f"{case}/label"])


def test_train_crops_are_seeded_and_uniform():
    images = np.arange(2000 * 3 * 10 * 8, dtype=np.float32).reshape(2000, 3, 10, 8) % 251
    t1 = DataTransformer(crop=(6, 5), phase="TRAIN", seed=7)
    t2 = DataTransformer(crop=(6, 5), phase="TRAIN", seed=7)
    assert np.array_equal(t1(images), t2(images))
    rows, cols = DataTransformer(crop=(6, 5), phase="TRAIN", seed=1).offsets(50000, 10, 8)
    assert set(rows.tolist()) == set(range(5)) and set(cols.tolist()) == set(range(4))
    for values, k in ((rows, 5), (cols, 4)):  # each offset drawn with probability 1/k
        freq = np.bincount(values, minlength=k) / len(values)
        assert np.abs(freq - 1 / k).max() < 0.01


def test_mirror_flips_about_half_and_maps_the_mean_correctly():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 3, 8, 6)).astype(np.uint8)
    mean = rng.random((3, 8, 6)).astype(np.float32)
    out = DataTransformer(crop=(4, 4), mean_image=mean, mirror=True, phase="TEST", seed=3)(images)
    plain = DataTransformer(crop=(4, 4), mean_image=mean, phase="TEST")(images)
    flipped = np.array([np.array_equal(o, p[..., ::-1]) and not np.array_equal(o, p)
                        for o, p in zip(out, plain)])
    same = np.array([np.array_equal(o, p) for o, p in zip(out, plain)])
    assert np.all(flipped | same) and 0.4 < flipped.mean() < 0.6


def test_interrupted_conversion_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = lmdb_io.cv2.imdecode

    def flaky(data, flags):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(data, flags)

    monkeypatch.setattr(lmdb_io.cv2, "imdecode", flaky)
    out = tmp_path / "db"
    with pytest.raises(KeyboardInterrupt):
        write_imageset(LMDB / "images", read_image_list(LMDB / "list.txt"), out, progress=False)
    assert os.listdir(tmp_path) == []


def test_corrupt_and_missing_images_are_skipped_counted_and_named(tmp_path):
    root = tmp_path / "images"
    shutil.copytree(LMDB / "images", root)
    (root / "cam1" / "0007_c1s1_000151_00.png").write_bytes(b"not an image")
    items = read_image_list(LMDB / "list.txt") + [("cam9/missing.jpg", 1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = write_imageset(root, items, tmp_path / "db", progress=False)
    assert stats["written"] == 7 and len(stats["skipped"]) == 2
    message = str(caught[0].message)
    assert "skipped 2 image(s)" in message and "0007_c1s1_000151_00.png (unreadable or corrupt)" in message
    assert "cam9/missing.jpg (missing)" in message
    assert DatumDB(tmp_path / "db").keys[0].startswith(b"00000001_")  # the gap Caffe leaves


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere"):
        write_imageset(tmp_path / "nowhere", [], tmp_path / "db")
    with pytest.raises(FileNotFoundError, match=r"no LMDB database at .*nodb \(expected .*data.mdb\)"):
        DatumDB(tmp_path / "nodb")
    bad = tmp_path / "list.txt"
    bad.write_text("a.jpg 1\nb.jpg x\n")
    with pytest.raises(ValueError, match=r"list.txt, line 2: label 'x' is not an integer"):
        read_image_list(bad)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        write_imageset(LMDB / "images", [], tmp_path / "exists")
    with pytest.raises(ValueError, match="mean_values and mean_image .* are exclusive"):
        DataTransformer(mean_values=[1, 2, 3], mean_image=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="crop 20x5 is larger than the image 10x8"):
        DataTransformer(crop=(20, 5))(np.zeros((1, 3, 10, 8), np.uint8))


def test_float_and_encoded_datums_decode():
    datum = lmdb_io.proto.Datum(channels=2, height=1, width=3, label=7)
    datum.float_data.extend([0.5, 1.5, 2.5, -1.0, 0.0, 3.25])
    array, label = lmdb_io.decode_datum(datum.SerializeToString())
    assert array.dtype == np.float32 and array.shape == (2, 1, 3) and label == 7
    assert array.ravel().tolist() == [0.5, 1.5, 2.5, -1.0, 0.0, 3.25]
    image = np.random.default_rng(0).integers(0, 256, (5, 4, 3)).astype(np.uint8)
    for kind in ("png", None):
        decoded, _ = lmdb_io.decode_datum(lmdb_io.encode_datum(image, 1, kind))
        assert np.array_equal(decoded, image.transpose(2, 0, 1))
