"""tools/evaluate.py on the tiny synthetic Market-style database: both protocols, its outputs
against the library functions, and bad input."""
import json

import torch

from mspcnn.metrics import market1501_noninterp, market1501_official, single_shot_cmc


def test_evaluate_market_and_single_shot(run_tool, tiny_market_db, unit_bn_backbone, tmp_path):
    weights = tmp_path / "w.caffemodel"
    unit_bn_backbone.save_caffemodel(weights)
    out = run_tool("evaluate.py", "--weights", weights, "--data", tiny_market_db, "--device", "cpu", "--json", tmp_path / "m.json",
                   "--cmc", tmp_path / "cmc.png", "--features", tmp_path / "f.pt")
    assert out.returncode == 0, out.stderr
    assert "protocol market1501" in out.stdout and "mAP (non-interp.)" in out.stdout
    assert "probe: " in out.stderr and "gallery: " in out.stderr  # progress
    result = json.loads((tmp_path / "m.json").read_text())["result"]
    feats = torch.load(tmp_path / "f.pt", weights_only=True)
    q, g = feats["probe"], feats["gallery"]
    assert q["features"].shape == (len(q["ids"]), 256) == (len(q["keys"]), 256)
    assert torch.allclose(q["features"].norm(dim=1), torch.ones(len(q["ids"])))
    # the saved features give the printed metrics through the library functions
    dist = torch.cdist(q["features"], g["features"])
    official = market1501_official(dist, q["ids"], q["cameras"], g["ids"], g["cameras"])
    assert abs(official["rank1"] - result["rank1"]) < 1e-6 and abs(official["mAP"] - result["mAP"]) < 1e-6
    noninterp = market1501_noninterp(dist, q["ids"], q["cameras"], g["ids"], g["cameras"])
    assert abs(noninterp["mAP"] - result["mAP_noninterp"]) < 1e-6
    assert f"{100 * result['rank1']:.2f}%" in out.stdout
    assert (tmp_path / "cmc.png").stat().st_size > 1000

    out = run_tool("evaluate.py", "--weights", weights, "--data", tiny_market_db, "--device", "cpu", "--protocol", "single-shot",
                   "--repeats", "7", "--seed", "3", "--json", tmp_path / "s.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "s.json").read_text())["result"]
    assert result["repeats"] == 7 and "mAP" not in result and "7 gallery draws" in out.stdout
    expected = single_shot_cmc(dist, q["ids"], g["ids"], repeats=7, seed=3)
    assert abs(expected["rank1"] - result["rank1"]) < 1e-6


def test_evaluate_bad_input(run_tool, tiny_market_db, tmp_path):
    cases = [(["--weights", tmp_path / "none.caffemodel", "--data", tiny_market_db], "none.caffemodel"),
             (["--weights", tmp_path / "none.caffemodel", "--data", tmp_path / "nothing"], "no such folder"),
             (["--weights", tmp_path / "none.caffemodel", "--data", tmp_path, "--repeats", "0"], "at least 1")]
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(b"\x00garbage")
    cases.append((["--weights", weights, "--data", tiny_market_db], "w.caffemodel"))
    for args, message in cases:
        out = run_tool("evaluate.py", *args, "--device", "cpu")
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_evaluate_folder_without_test_split(run_tool, unit_bn_backbone, tmp_path):
    weights = tmp_path / "w.caffemodel"
    unit_bn_backbone.save_caffemodel(weights)
    (tmp_path / "empty").mkdir()
    out = run_tool("evaluate.py", "--weights", weights, "--data", tmp_path / "empty", "--device", "cpu")
    assert out.returncode == 2 and "no probe.json" in out.stderr and "convert_dataset.py" in out.stderr
    for text, message in (("{not json", "not valid JSON"), ('{"dataset": "market1501"}', "no records")):
        (tmp_path / "empty" / "probe.json").write_text(text)
        out = run_tool("evaluate.py", "--weights", weights, "--data", tmp_path / "empty", "--device", "cpu")
        assert out.returncode == 2 and "probe.json" in out.stderr and message in out.stderr, out.stderr
