"""CUHK03 and CUHK01 converters on small fabricated copies of the raw releases
(same structure as the real files: docs/evaluation.md)."""
import json

import cv2
import h5py
import numpy as np
import pytest
from scipy.io import savemat

from mspcnn.data.datasets import CUHK03Mat, convert_cuhk01, convert_cuhk03
from mspcnn.data.lmdb_io import DatumDB

PERSONS = (3, 2, 2, 1, 2)  # persons per camera pair (the real file: 843, 440, 77, 58, 49)


def person_image(variant, pair, person, k):
    """An RGB image that encodes where it comes from (H x W x 3)."""
    h, w = 40 + 4 * pair, 20 + 2 * person
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 10 * pair + (100 if variant == "detected" else 0)
    img[..., 1] = 20 * person
    img[..., 2] = 20 * k
    return img


def make_cuhk03_mat(path):
    """cuhk-03.mat as MATLAB v7.3 stores it: cell arrays as HDF5 object
    references, every matrix transposed; one empty cell per variant."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        for variant in ("labeled", "detected"):
            pair_refs = []
            for pair, n in enumerate(PERSONS, 1):
                cells = np.empty((10, n), dtype=h5py.ref_dtype)
                for person in range(1, n + 1):
                    for k in range(10):
                        if pair == 1 and person == 1 and k == 9:
                            data = np.zeros(2, np.uint64)  # an empty cell
                        else:
                            data = person_image(variant, pair, person, k + 1).transpose(2, 1, 0)
                        cells[k, person - 1] = refs.create_dataset(
                            f"{variant}_{pair}_{person}_{k}", data=data).ref
                pair_refs.append(refs.create_dataset(f"{variant}_cells_{pair}", data=cells).ref)
            f.create_dataset(variant, data=np.array([pair_refs], dtype=h5py.ref_dtype))
        sets = []
        for s in range(20):
            test = [(1, 1 + s % 3), (2, 1 + s % 2), (5, 2)]
            sets.append(refs.create_dataset(f"testset_{s}", data=np.array(test, float).T).ref)
        f.create_dataset("testsets", data=np.array([sets], dtype=h5py.ref_dtype))


@pytest.fixture(scope="module")
def cuhk03(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuhk03") / "cuhk03_release"
    root.mkdir()
    make_cuhk03_mat(root / "cuhk-03.mat")
    return root


def test_reads_the_mat_structure(cuhk03):
    mat = CUHK03Mat(str(cuhk03 / "cuhk-03.mat"))
    images = mat.images("labeled")
    assert len(images) == 10 * sum(PERSONS) - 1  # the empty cell is skipped
    pair, person, view, k, load = images[3]
    img, _ = load()
    assert img.ndim == 3 and img.shape[2] == 3
    rgb = person_image("labeled", pair, person, k)
    assert np.array_equal(img, rgb[:, :, ::-1])  # stored RGB, returned BGR as OpenCV reads
    assert mat.testsets()[4] == [(1, 2), (2, 1), (5, 2)]


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_classic_split(cuhk03, tmp_path, variant):
    summary = convert_cuhk03(cuhk03.parent, tmp_path, variant=variant, split=4, val_ids=1, progress=False)
    meta = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in summary}
    test_ids = {1 + 1, 3 + 1, 3 + 2 + 2 + 1 + 2}  # (1,2) (2,1) (5,2) as global ids
    assert {r["id"] for r in meta["probe"]["records"]} == test_ids
    assert {r["camera"] for r in meta["probe"]["records"]} == {1}
    assert {r["camera"] for r in meta["gallery"]["records"]} == {2}
    train = {r["id"] for r in meta["train"]["records"]}
    assert not train & test_ids and len(train) == sum(PERSONS) - 3 - 1
    rec = meta["probe"]["records"][0]
    image, label = DatumDB(tmp_path / "probe.lmdb")[0]
    pair, person, k = rec["pair"], int(rec["key"].split("_")[2]), int(rec["key"].split("_")[4][:2])
    expected = cv2.resize(person_image(variant, pair, person, k)[:, :, ::-1], (64, 160),
                          interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    assert label == rec["id"] and np.array_equal(image, expected)


def test_new_protocol_config(cuhk03, tmp_path):
    names = [f"{p}_{q:03d}_{v}_{k:02d}.png" for p, n in enumerate(PERSONS, 1) for q in range(1, n + 1)
             for v, ks in ((1, range(1, 6)), (2, range(6, 11))) for k in ks
             if not (p == 1 and q == 1 and k == 10)]
    train = [i + 1 for i, n in enumerate(names) if n.startswith(("1_", "2_"))]
    query = [i + 1 for i, n in enumerate(names) if n.startswith(("3_", "4_", "5_")) and "_1_" in n[5:8]]
    gallery = [i + 1 for i, n in enumerate(names) if n.startswith(("3_", "4_", "5_")) and "_2_" in n[5:8]]
    savemat(cuhk03 / "cuhk03_new_protocol_config_labeled.mat",
            {"filelist": np.array(names, dtype=object).reshape(-1, 1),
             "labels": np.arange(len(names)).reshape(-1, 1), "train_idx": np.array(train).reshape(-1, 1),
             "query_idx": np.array(query).reshape(-1, 1), "gallery_idx": np.array(gallery).reshape(-1, 1)})
    summary = convert_cuhk03(cuhk03.parent, tmp_path, protocol="new", progress=False)
    assert summary["train"][0] == len(train) and summary["probe"][0] == len(query)
    assert summary["gallery"][0] == len(gallery)
    assert summary["train"][1] == PERSONS[0] + PERSONS[1]


def test_cuhk03_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUHK03 file not found: .*cuhk-03.mat"):
        convert_cuhk03(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "cuhk-03.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(ValueError, match=r"not a MATLAB v7.3 \(HDF5\) file"):
        convert_cuhk03(tmp_path, tmp_path / "out", progress=False)


@pytest.fixture(scope="module")
def campus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuhk01")
    folder = root / "campus"
    folder.mkdir()
    for pid in range(1, 13):
        for k in range(1, 5):
            img = np.full((160, 60, 3), (pid * 7) % 256, np.uint8)
            img[:, :, 1] = k * 40
            cv2.imwrite(str(folder / f"{pid:04d}{k:03d}.png"), img)
    (folder / "Thumbs.db").write_bytes(b"x")
    return root


def test_cuhk01_protocol_splits(campus, tmp_path):
    a = convert_cuhk01(campus, tmp_path / "a", test_ids=4, split=0, val_ids=2, progress=False)
    assert a["probe"] == (8, 4) and a["gallery"] == (8, 4) and a["train"] == (24, 6) and a["val"] == (8, 2)
    probe = json.loads((tmp_path / "a" / "probe.json").read_text())["records"]
    assert {r["camera"] for r in probe} == {1}
    same = convert_cuhk01(campus, tmp_path / "b", test_ids=4, split=0, val_ids=2, progress=False)
    other = convert_cuhk01(campus, tmp_path / "c", test_ids=4, split=1, val_ids=2, progress=False)
    ids = lambda d: {r["id"] for r in json.loads((tmp_path / d / "probe.json").read_text())["records"]}  # noqa
    assert same == a and ids("a") == ids("b") and ids("a") != ids("c")
    with pytest.raises(ValueError, match="12 identities, cannot take 12 for testing"):
        convert_cuhk01(campus, tmp_path / "d", test_ids=12, progress=False)
