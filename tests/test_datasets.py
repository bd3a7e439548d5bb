"""Synthetic dataset, Market-1501 conversion and the 2:1 pair sampler."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mspcnn.data.datasets import convert_market1501, parse_market_name, read_market1501
from mspcnn.data.lmdb_io import DatumDB
from mspcnn.data.pairs import PairLoader, PairSampler
from mspcnn.data.synthetic import make_synthetic_market
from mspcnn.data.transformer import DataTransformer

# Real Market-1501 crops stay out of the repository: MSPCNN_REALDATA, else ../shared/realdata.
REALDATA = Path(os.environ.get("MSPCNN_REALDATA", Path(__file__).resolve().parents[2] / "shared"
                               / "realdata")) / "mini_market1501"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    summary = make_synthetic_market(raw, train_ids=12, test_ids=8, cameras=4, distractors=5,
                                    junk=3, seed=1, progress=False)
    return raw, summary


def test_synthetic_layout_is_market_and_seeded(synthetic, tmp_path):
    raw, summary = synthetic
    tree = read_market1501(raw)
    assert len(tree["bounding_box_train"]) == summary["train_images"]
    assert {pid for _, pid, _ in tree["bounding_box_train"]} == set(range(1, 13))
    gallery_ids = {pid for _, pid, _ in tree["bounding_box_test"]}
    assert {0, -1} <= gallery_ids and set(range(13, 21)) <= gallery_ids
    assert {pid for _, pid, _ in tree["query"]} == set(range(13, 21))
    again = tmp_path / "again"
    make_synthetic_market(again, train_ids=12, test_ids=8, cameras=4, distractors=5, junk=3, seed=1,
                          progress=False)
    a = sorted(os.listdir(raw / "query"))
    assert a == sorted(os.listdir(again / "query"))
    assert (raw / "query" / a[0]).read_bytes() == (again / "query" / a[0]).read_bytes()


def test_market_names():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c3s2_000100_01.jpg") == (-1, 3)
    assert parse_market_name("Thumbs.db") is None


def test_convert_market_layout(synthetic, tmp_path):
    raw, _ = synthetic
    out = tmp_path / "db"
    summary = convert_market1501(raw, out, val_ids=3, seed=0, progress=False)
    assert set(summary) == {"train", "val", "probe", "gallery"}
    meta = {s: json.loads((out / f"{s}.json").read_text()) for s in summary}
    train_ids = {r["id"] for r in meta["train"]["records"]}
    val_ids = {r["id"] for r in meta["val"]["records"]}
    assert len(val_ids) == 3 and not train_ids & val_ids and len(train_ids) == 9
    assert sorted({r["label"] for r in meta["train"]["records"]}) == list(range(9))
    assert -1 not in train_ids
    assert {0, -1} <= {r["id"] for r in meta["gallery"]["records"]}
    for split, m in meta.items():
        db = DatumDB(out / f"{split}.lmdb")
        assert [k.decode() for k in db.keys] == [r["key"] for r in m["records"]]
        image, label = db[0]
        assert image.shape == (3, 160, 64) and label == m["records"][0]["label"]


def test_a_conversion_at_another_size_replaces_the_one_read_before(synthetic, tmp_path):
    """--input-size: images stored at the input scaled as [1]'s (71 x 27 for 64 x 24), recorded in
    the metadata. A database converted again at the same path, in the same process (a notebook, a
    job that converts twice), is read anew, not from the environment of the one it replaced."""
    raw, _ = synthetic
    out = tmp_path / "db"
    convert_market1501(raw, out, val_ids=3, seed=0, progress=False)
    assert DatumDB(out / "gallery.lmdb")[0][0].shape == (3, 160, 64)
    assert "image_size" not in json.loads((out / "manifest.json").read_text())["options"]
    convert_market1501(raw, out, val_ids=3, seed=0, progress=False, image_size=(71, 27))
    assert DatumDB(out / "gallery.lmdb")[0][0].shape == (3, 71, 27)
    assert json.loads((out / "gallery.json").read_text())["image_size"] == [71, 27]
    assert json.loads((out / "manifest.json").read_text())["options"]["image_size"] == [71, 27]
    with pytest.raises(ValueError, match="image size"):
        convert_market1501(raw, tmp_path / "bad", val_ids=3, progress=False, image_size=(0, 27))


def test_convert_rejects_a_non_market_folder(tmp_path):
    (tmp_path / "query").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a Market-1501 folder, missing "
                                                r"bounding_box_train, bounding_box_test/"):
        convert_market1501(tmp_path, tmp_path / "out", progress=False)


@pytest.mark.skipif(not REALDATA.is_dir(), reason="shared real Market-1501 crops not present")
def test_real_market_crops_convert(tmp_path):
    summary = convert_market1501(REALDATA, tmp_path / "db", val_ids=1, progress=False)
    assert summary["probe"][0] > 0 and summary["gallery"][0] > 0
    image, _ = DatumDB(tmp_path / "db" / "gallery.lmdb")[0]
    assert image.shape == (3, 160, 64) and image.std() > 10  # a real picture, not blank


def test_pair_sampler_two_negatives_per_positive():
    labels = np.repeat(np.arange(30), 4)
    cameras = np.tile([1, 2, 1, 3], 30)
    sampler = PairSampler(labels, cameras, seed=5)
    anchors, partners, sim = sampler.epoch(0)
    assert sorted(anchors.tolist()) == list(range(120))  # anchors cover the set
    assert sim.sum() == 40 and (sim == 0).sum() == 80
    same = labels[anchors] == labels[partners]
    assert np.array_equal(same, sim == 1)
    assert np.all(anchors[sim == 1] != partners[sim == 1])
    assert np.all(cameras[anchors[sim == 1]] != cameras[partners[sim == 1]])
    again = PairSampler(labels, cameras, seed=5).epoch(0)
    assert all(np.array_equal(x, y) for x, y in zip((anchors, partners, sim), again))
    assert not np.array_equal(sampler.epoch(1)[0], anchors)


def test_pair_loader_batches_are_reproducible(synthetic, tmp_path):
    raw, _ = synthetic
    out = tmp_path / "db"
    convert_market1501(raw, out, val_ids=2, progress=False)
    rows = json.loads((out / "train.json").read_text())["records"]
    labels = [r["label"] for r in rows]
    sampler = PairSampler(labels, [r["camera"] for r in rows], seed=0)
    transformer = DataTransformer((144, 56), [102, 102, 101], mirror=True, phase="TRAIN")
    loader = PairLoader(DatumDB(out / "train.lmdb"), labels, sampler, 8, transformer, workers=2)
    first = [b for _, b in loader.epoch(0)]
    second = [b for _, b in loader.epoch(0)]
    assert len(first) == len(labels) // 8
    for a, b in zip(first, second):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a data-parallel worker's share (odd batches, from batch 3): the same batches, made alone
    share = list(loader.epoch(0, start=3, select=lambda k: k % 2 == 1))
    assert [k for k, _ in share] == [k for k in range(3, len(first)) if k % 2 == 1]
    for k, b in share:
        assert all(torch.equal(b[key], first[k][key]) for key in b)
    batch = first[0]
    assert batch["data"].shape == (8, 3, 144, 56) and batch["data_p"].shape == (8, 3, 144, 56)
    assert batch["label"].dtype == torch.float32 and set(batch["sim"].tolist()) <= {0.0, 1.0}
