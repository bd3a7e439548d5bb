"""tools/reproduce.py end to end on a fabricated CUHK01 (two seeded splits,
single-shot CMC) with minimal training."""
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest


def fabricate_cuhk01(root):
    campus = root / "campus"
    campus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for pid in range(1, 131):  # 130 ids: 100 test + 30 train
        base = rng.integers(0, 256, 3)
        for k in range(1, 5):
            img = np.clip(base + rng.normal(0, 10, (160, 60, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(campus / f"{pid:04d}{k:03d}.png"), img)


def test_cpu_recipes_scale_the_papers_schedule():
    """The CPU recipes' solvers follow [1]'s CUHK01 solvers by the rules their files state: stage 1's
    stepdecr stepsize is [1]'s 200 scaled by max_iter / 5500 (the rate reaches its floor at the same
    share of the run), min_lr is [1]'s 0.0005 scaled with base_lr, stage 2 keeps [1]'s poly policy and
    power, and each recipe's BatchNorm window is 9% of stage 1's forward passes, as [1]'s (1000 of
    11,000); cpu64 is cpu with five times the iterations of both stages."""
    from conftest import load_tool
    from mspcnn.caffe import io as cio
    from mspcnn.caffe import proto

    def read(path):
        return cio.read_prototxt(path, proto.SolverParameter)

    reproduce = load_tool("reproduce")
    paper1, paper2 = map(read, reproduce.solver_files("cuhk01-100", "paper"))
    solvers = {}
    for recipe in ("cpu", "cpu64"):
        s1, s2 = solvers[recipe] = tuple(map(read, reproduce.solver_files("cuhk01-486", recipe)))
        assert (s1.lr_policy, s1.gamma, s2.lr_policy, s2.power) == (paper1.lr_policy, paper1.gamma,
                                                                    paper2.lr_policy, paper2.power)
        assert s1.stepsize == round(paper1.stepsize * s1.max_iter / paper1.max_iter), recipe
        assert s1.min_lr == pytest.approx(paper1.min_lr * s1.base_lr / paper1.base_lr), recipe
        window = 1 / (1 - reproduce.RECIPES[recipe]["bn_maf"])
        assert window == pytest.approx(0.09 * s1.max_iter * s1.iter_size, rel=0.02), recipe
        assert reproduce.RECIPES[recipe]["batch"] == 16
    (c1, c2), (f1, f2) = solvers["cpu"], solvers["cpu64"]
    assert (f1.max_iter, f2.max_iter) == (5 * c1.max_iter, 5 * c2.max_iter)
    assert (f1.base_lr, f2.base_lr) == (c1.base_lr, c2.base_lr)
    assert reproduce.RECIPES["cpu64"]["input_size"] == (64, 24) and "input_size" not in reproduce.RECIPES["cpu"]


def test_stage1_scale_stretches_the_schedule():
    """--stage1-scale K: stage 1's max_iter (and final snapshot) and stepsize times K, rounded, at
    least 1; a poly solver (no stepsize) gets only its length; nothing else changes."""
    from conftest import load_tool

    reproduce = load_tool("reproduce")
    s1, s2 = reproduce.solver_files("cuhk01-486", "cpu64")
    assert reproduce.stretched_schedule(s1, 2) == {"max_iter": 8000, "snapshot": 8000, "stepsize": 290}
    assert reproduce.stretched_schedule(s1, 1.5) == {"max_iter": 6000, "snapshot": 6000, "stepsize": 218}
    assert reproduce.stretched_schedule(s1, 1e-6) == {"max_iter": 1, "snapshot": 1, "stepsize": 1}
    assert reproduce.stretched_schedule(s2, 0.5) == {"max_iter": 625, "snapshot": 625}


def test_cpu64_recipe_converts_at_its_input_size(tmp_path, run_tool):
    """--recipe cpu64 converts the images for its 64 x 24 input (stored at 71 x 27) unless --input-size
    says otherwise; the paper's datasets other than CUHK01 are refused."""
    from mspcnn.data.lmdb_io import DatumDB

    fabricate_cuhk01(tmp_path / "raw")
    for extra, shape in (([], (3, 71, 27)), (["--input-size", "144x56"], (3, 160, 64))):
        out = tmp_path / f"out{shape[1]}"
        proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--recipe", "cpu64", "--out", out,
                        "--splits", "1", "--val-ids", "2", "--convert-only", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        assert DatumDB(str(out / "split00" / "db" / "probe.lmdb"))[0][0].shape == shape
    bad = run_tool("reproduce.py", "market1501", tmp_path / "raw", "--recipe", "cpu64", "--out", tmp_path / "m")
    assert bad.returncode == 2 and "--recipe cpu64: only for cuhk01" in bad.stderr


def test_a_split_converted_again_with_other_options_is_announced(tmp_path, run_tool):
    """Converting a split into an --out folder that holds it converted with other options (here
    another --val-ids) says what changed, since the stages trained there are then not reused; the
    same options again say nothing."""
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"

    def convert(val_ids):
        proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "1",
                        "--val-ids", str(val_ids), "--convert-only", "--input-size", "64x24")
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        return proc.stdout

    assert "note:" not in convert(4)
    note = convert(6)
    assert "converted with other options" in note and "val images 16 -> 24" in note
    assert "train images 104 -> 96" in note and "probe" not in note
    assert "note:" not in convert(6)


def test_manifests_hash_what_the_prototxt_files_say(tmp_path):
    """A stage's manifest (the record that lets a later invocation reuse or resume it) hashes the
    solver and the net by their parsed content: an edit of comments or layout keeps it, a changed
    value (the solver's base_lr, a layer's parameter) does not."""
    from argparse import Namespace

    from conftest import load_tool
    from mspcnn.caffe import io as cio
    from mspcnn.caffe import proto

    reproduce = load_tool("reproduce")
    stage1, _ = reproduce.solver_files("cuhk01-100", "cpu64")
    net = reproduce.resolve_net_path(cio.read_prototxt(stage1, proto.SolverParameter).net, str(stage1))
    args = Namespace(input_size=reproduce.CROP, batch_pairs=16, device="cpu", tf32=False)
    db = tmp_path / "db"
    db.mkdir()
    (db / "train.json").write_text("{}")

    def inputs(solver, net_path):
        return reproduce.stage_inputs(args, solver, net_path, db, {"random_seed": 0}, [1, 1])

    solver_text, net_text = stage1.read_text(), Path(net).read_text()
    reworded = tmp_path / "reworded_solver.prototxt"
    reworded.write_text("# another header\n" + re.sub(r"#.*", "", solver_text).replace(":", " :"))
    renet = tmp_path / "reworded_net.prototxt"
    renet.write_text("# a comment\n" + net_text.replace("\n", "\n\n"))
    assert inputs(reworded, renet) == inputs(stage1, net)
    changed = tmp_path / "changed_solver.prototxt"
    changed.write_text(re.sub(r"base_lr: *[0-9.e-]+", "base_lr: 0.049", solver_text))
    assert changed.read_text() != solver_text and inputs(changed, net)["solver"] != inputs(stage1, net)["solver"]
    renet.write_text(net_text.replace("num_output: 32", "num_output: 31", 1))
    assert renet.read_text() != net_text and inputs(stage1, renet)["net"] != inputs(stage1, net)["net"]


@pytest.mark.slow
def test_reproduce_cuhk01_two_splits(tmp_path, run_tool):
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "2", "--iters1", "2",
                    "--iters2", "1", "--batch-pairs", "2", "--device", "cpu", "--val-ids", "2", "--repeats", "5")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "cuhk01-100, recipe paper, 2 split(s)" in proc.stdout and "paper: all" in proc.stdout
    assert re.search(r"^chance +1\.0 +5\.0 +10\.0 +20\.0$", proc.stdout, re.M)  # 100 gallery identities
    result = json.loads((out / "results.json").read_text())
    assert result["paper"] == {"rank1": 79.3} and result["splits"] == 2 and result["chance"]["rank5"] == 5.0
    ours = result["ours"]["all"]
    assert len(ours["runs"]) == 2 and 0 <= ours["mean"]["rank1"] <= 100
    assert ours["mean"]["rank20"] >= ours["mean"]["rank1"]
    assert result["split_ids"] == [0, 1] and [r["split"] for r in ours["runs"]] == [0, 1]

    # --split-ids: the second split alone, in another folder, is the same split trained the same way
    alone = tmp_path / "alone"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", alone, "--split-ids", "1", "--iters1",
                    "2", "--iters2", "1", "--batch-pairs", "2", "--device", "cpu", "--val-ids", "2", "--repeats", "5")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "== split 2 (--split-ids 1; 1/1): converting" in proc.stdout
    assert (alone / "split01").is_dir() and not (alone / "split00").exists()
    second = json.loads((alone / "results.json").read_text())
    assert second["splits"] == 1 and second["split_ids"] == [1]
    (run,) = second["ours"]["all"]["runs"]
    assert run["split"] == 1
    assert {k: run[k] for k in ("rank1", "rank5", "rank10", "rank20")} == \
        {k: ours["runs"][1][k] for k in ("rank1", "rank5", "rank10", "rank20")}


@pytest.mark.slow
def test_reproduce_at_another_input_size(tmp_path, run_tool):
    """--input-size (a study, not the paper's setting): the splits converted at the size scaled as
    [1]'s, training and evaluation at it, the size in the table's title and the JSON."""
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "1", "--iters1", "2",
                    "--iters2", "1", "--batch-pairs", "2", "--device", "cpu", "--val-ids", "2", "--repeats", "5",
                    "--input-size", "64x24")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "cuhk01-100, recipe paper, input 64 x 24, 1 split(s)" in proc.stdout and "warning" not in proc.stderr
    from mspcnn.data.lmdb_io import DatumDB
    assert DatumDB(str(out / "split00" / "db" / "probe.lmdb"))[0][0].shape == (3, 71, 27)
    result = json.loads((out / "results.json").read_text())
    assert result["args"]["input_size"] == [64, 24] and len(result["ours"]["all"]["runs"]) == 1
    manifest = json.loads((out / "split00" / "stage1_cls+high" / "stage1.manifest.json").read_text())
    assert manifest["inputs"]["input_size"] == [64, 24]


@pytest.mark.slow
def test_ablation_over_seeds(tmp_path, run_tool):
    """--ablation --seeds: four loss sets x two seeds, stage 1 trained once per (cls, high) weights and
    seed and reused (by its manifest) by the loss set that adds the NCC loss."""
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "1", "--ablation",
                    "--seeds", "3", "4", "--iters1", "1", "--iters2", "2", "--batch-pairs", "2", "--device", "cpu",
                    "--val-ids", "2", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "1 split(s) x 2 seed(s)" in proc.stdout and "sample standard deviation" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [3, 4] and list(result["ours"]) == ["cls", "cls+high", "cls+low", "all"]
    for entry in result["ours"].values():
        assert sorted(run["seed"] for run in entry["runs"]) == [3, 4]
    for seed in (3, 4):
        runs = out / "split00" / f"seed{seed}"
        assert (runs / "stage1_cls" / "stage1_iter_1.caffemodel").exists()
        assert (runs / "stage1_cls+high" / "stage1_iter_1.caffemodel").exists()
        # the NCC loss is the only difference between cls and cls + low: their weights differ
        assert (runs / "cls" / "stage2_iter_2.caffemodel").read_bytes() != \
            (runs / "cls+low" / "stage2_iter_2.caffemodel").read_bytes()
    assert proc.stdout.count("stage1 reused from") == 4 and proc.stdout.count(": stage1\n") == 4
    paired = result["paired"]
    assert list(paired) == ["cls+low - cls", "all - cls+high"] and "the NCC loss, paired" in proc.stdout
    high = result["paired_high"]
    assert list(high) == ["cls+high - cls", "all - cls+low"] and "the high-level loss, paired" in proc.stdout
    for name, (a, b) in {"cls+low - cls": ("cls+low", "cls"), "all - cls+high": ("all", "cls+high"),
                         "cls+high - cls": ("cls+high", "cls"), "all - cls+low": ("all", "cls+low")}.items():
        diffs = [100 * (x["rank1"] - y["rank1"]) for x, y in zip(result["ours"][a]["runs"], result["ours"][b]["runs"])]
        entry = (paired if name in paired else high)[name]["rank1"]
        assert entry["mean"] == pytest.approx(sum(diffs) / 2)
        assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
        assert entry["signed_rank_p"] in (0.5, 1.0) or entry["signed_rank_p"] is None  # 2 pairs: 2 values
    inter = result["interaction"]["(all - cls+high) - (cls+low - cls)"]
    ours = {name: {(r["split"], r["seed"]): r["rank1"] for r in entry["runs"]} for name, entry in result["ours"].items()}
    expected = [100 * ((ours["all"][key] - ours["cls+high"][key]) - (ours["cls+low"][key] - ours["cls"][key]))
                for key in ((0, 3), (0, 4))]
    assert [(r["split"], r["seed"]) for r in inter["runs"]] == [(0, 3), (0, 4)]
    assert [r["rank1"] for r in inter["runs"]] == pytest.approx(expected)
    assert inter["rank1"]["mean"] == pytest.approx(sum(expected) / 2) and "the two losses' interaction" in proc.stdout
    assert proc.stdout.count("signed-rank p") == 5  # the rank-1 tests of the four pairs and the interaction
    seeds3 = (out / "split00" / "seed3" / "stage1_cls" / "stage1_iter_1.caffemodel").read_bytes()
    assert seeds3 != (out / "split00" / "seed4" / "stage1_cls" / "stage1_iter_1.caffemodel").read_bytes()


@pytest.mark.slow
def test_stage1_scale_trains_a_stretched_stage1(tmp_path, run_tool):
    """--stage1-scale 0.0025 on the cpu recipe: stage 1 trains 800 x 0.0025 = 2 iterations with
    stepsize 1 (29 x 0.0025 rounded up to 1), recorded in its manifest; stage 2 keeps --iters2; the
    run and its stage-1 folder are tagged _s1x0.0025 (a stage 1 of the recipe's length in the same
    folder is not overwritten) and the JSON records the scale."""
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--recipe", "cpu", "--splits",
                    "1", "--stage1-scale", "0.0025", "--iters2", "1", "--batch-pairs", "2", "--input-size",
                    "64x24", "--device", "cpu", "--val-ids", "2", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "recipe cpu, input 64 x 24, stage 1 x 0.0025" in proc.stdout
    manifest = json.loads((out / "split00" / "stage1_cls+high_s1x0.0025" / "stage1.manifest.json").read_text())
    assert manifest["iterations"] == 2
    assert {k: manifest["inputs"]["overrides"][k] for k in ("max_iter", "snapshot", "stepsize")} == {
        "max_iter": 2, "snapshot": 2, "stepsize": 1}
    assert not (out / "split00" / "stage1_cls+high").exists()  # the recipe-length stage 1's folder
    assert (out / "split00" / "all_s1x0.0025" / "stage2_iter_1.caffemodel").is_file()
    result = json.loads((out / "results.json").read_text())
    assert result["args"]["stage1_scale"] == 0.0025 and len(result["ours"]["all"]["runs"]) == 1


@pytest.mark.slow
def test_stage1_seed_shares_stage1_across_seeds(tmp_path, run_tool):
    """--stage1-seed: stage 1 is trained once (with that seed) and every --seeds run starts stage 2
    from it; the seeds still change stage 2, and the rows record both seeds."""
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "1", "--loss-sets",
                    "cls+high", "all", "--seeds", "5", "6", "--stage1-seed", "5", "--iters1", "1", "--iters2", "2",
                    "--batch-pairs", "2", "--device", "cpu", "--val-ids", "2", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert proc.stdout.count(": stage1\n") == 1 and proc.stdout.count("stage1 reused from") == 3
    assert not (out / "split00" / "seed6" / "stage1_cls+high").exists()
    result = json.loads((out / "results.json").read_text())
    for entry in result["ours"].values():
        assert [(r["seed"], r["stage1_seed"]) for r in entry["runs"]] == [(5, 5), (6, 5)]
    a = (out / "split00" / "seed5" / "all_stage1seed5" / "stage2_iter_2.caffemodel").read_bytes()
    assert a != (out / "split00" / "seed6" / "all_stage1seed5" / "stage2_iter_2.caffemodel").read_bytes()
    bad = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--stage1-seed", "5")
    assert bad.returncode == 2 and "--stage1-seed needs --seeds" in bad.stderr
    bad = run_tool("reproduce.py", "cuhk01-100", tmp_path / "raw", "--out", out, "--cuda-graphs")  # on the CPU
    assert bad.returncode == 2 and "--cuda-graphs needs a GPU" in bad.stderr


@pytest.mark.slow
def test_stage2_settings_curves_and_stage1_reuse(tmp_path, run_tool):
    """--w-low/--pos-floor/--lr2 edit a copy of the net (kept in the run's folder) for the loss set with
    the NCC loss, name the runs, and leave cls+high's NCC-free stage 2 unaffected but for the rate; a
    second invocation reuses stage 1 when its manifest matches and retrains it when an input differs;
    --test-interval records the validation curve and draws it."""
    fabricate_cuhk01(tmp_path / "raw")
    out = tmp_path / "out"
    common = ["cuhk01-100", tmp_path / "raw", "--out", out, "--splits", "1", "--loss-sets", "cls+high", "all",
              "--iters2", "2", "--batch-pairs", "2", "--device", "cpu", "--val-ids", "4", "--repeats", "2",
              "--test-interval", "1"]
    first = run_tool("reproduce.py", *common, "--iters1", "2", "--name", "defaults")
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    second = run_tool("reproduce.py", *common, "--iters1", "2", "--name", "edited", "--w-low", "2",
                      "--pos-floor", "0.3", "--balance-pairs", "--lr2", "0.005")
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    assert "stage1 reused from" in second.stdout and ": stage1\n" not in second.stdout
    assert "+-" not in second.stdout.split("recipe paper")[1]  # one run per loss set: no spread column
    net = (out / "split00" / "all_wlow2_pf0.3_bal1_lr0.005" / "stage2_net.prototxt").read_text()
    assert re.search(r'name: "loss_low".*?loss_weight: 2\b.*?pos_floor: 0\.3.*?balance_pairs: true', net, re.S)
    assert (out / "split00" / "cls+high_lr0.005" / "stage2_iter_2.caffemodel").exists()
    assert not (out / "split00" / "cls+high_lr0.005" / "stage2_net.prototxt").exists()
    result = json.loads((out / "edited.json").read_text())
    curves = result["learning_curves"]
    assert len(curves) == 2 and all(any(h["kind"] == "test" and h["stage"] == 2 for h in c) for c in curves.values())
    assert (out / "edited_curves.png").stat().st_size > 1000 and (out / "defaults.json").exists()
    again = run_tool("reproduce.py", *common, "--iters1", "2", "--name", "again")
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    # both stages of both runs finished before with these inputs: reused by their manifests, not trained,
    # and evaluated again from the same weights to the same figures
    assert again.stdout.count("stage2 reused from") == 2 and ": stage2\n" not in again.stdout
    # each reused stage names the machine that trained it; the results name where the command ran
    assert again.stdout.count("(manifest matches; trained on ") == 4, again.stdout[-3000:]
    assert set(json.loads((out / "again.json").read_text())["machine"]) >= {"cpu", "cpu_capability", "torch",
                                                                            "threads"}
    assert "machine: " in again.stderr
    # and each run names the machines that trained its two stages: one part each, by the first command
    trainer = json.loads((out / "defaults.json").read_text())["machine"]
    for entry in json.loads((out / "again.json").read_text())["ours"].values():
        for run in entry["runs"]:
            assert run["trained_on"] == {"stage1": [trainer], "stage2": [trainer]}, run
    assert ": stage1\n" not in again.stdout
    before, now = (json.loads((out / f"{name}.json").read_text())["ours"] for name in ("defaults", "again"))
    assert now == before
    third = run_tool("reproduce.py", *common, "--iters1", "3", "--name", "longer", "--bn-maf", "0.99")
    assert third.returncode == 0 and third.stdout.count(": stage1\n") == 1  # retrained once, then reused
    # stage 2 in the same folders, but from other stage-1 weights with another net: trained anew
    assert third.stdout.count(": stage2\n") == 2 and "stage2 reused" not in third.stdout
    edited = (out / "split00" / "stage1_cls+high" / "stage1_net.prototxt").read_text()
    assert edited.count("moving_average_fraction: 0.99") == 80  # every BatchNorm of both branches


def _run_gpu_recipe_script(tmp_path, packed=False, **env):
    """tools/gpu_cuhk01.sh on a fabricated CUHK01 folder (packed by tools/pack_images.py first when
    ``packed``), on the CPU (no build, 2 workers unless ``env`` says WORKERS), with ``env`` added to
    the environment; its output in tmp_path/out."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fabricate_cuhk01(tmp_path / "raw")
    raw = tmp_path / "raw"
    if packed:
        raw = tmp_path / "packed"
        subprocess.run([sys.executable, str(root / "tools" / "pack_images.py"), "pack", str(tmp_path / "raw" / "campus"),
                        str(raw)], check=True, capture_output=True)
    return subprocess.run(["bash", str(root / "tools" / "gpu_cuhk01.sh"), str(raw), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, **{"SKIP_BUILD": "1", "DEVICE": "cpu", "WORKERS": "2", **env}))


@pytest.mark.slow
def test_gpu_recipe_script_with_a_tiny_schedule(tmp_path):
    """tools/gpu_cuhk01.sh, the one call that runs the full CUHK01-100 recipe of split 0 on a GPU,
    run here on the CPU with a tiny schedule (the same script, the same reproduce.py invocation)."""
    proc = _run_gpu_recipe_script(tmp_path, BENCH_PAIRS="4", BENCH_BATCHES="3", WORKERS="3",
                                  EXTRA="--iters1 2 --iters2 1 --batch-pairs 2 --val-ids 4 --repeats 2")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "exit status 0" in proc.stdout and "ours: all" in proc.stdout and "paper: all" in proc.stdout
    result = json.loads((tmp_path / "out" / "gpu_split0.json").read_text())
    assert result["recipe"] == "paper" and result["splits"] == 1
    assert result["args"]["tf32"] is True  # the script's default on a GPU (ignored on the CPU)
    bench = json.loads((tmp_path / "out" / "bench_data.json").read_text())
    assert bench["images_per_s"]["ours"] > 0
    # the loader's scaling at 1, 2, 4, 8 and WORKERS (3: training ran with worker processes), both kinds
    assert [(r["ran_as"], r["workers"]) for r in bench["scaling"]] == [
        (kind, w) for kind in ("threads", "processes") for w in (1, 2, 3, 4, 8)]


@pytest.mark.slow
def test_gpu_recipe_script_takes_a_packed_folder(tmp_path):
    """RAW_DIR packed by tools/pack_images.py (lossless WebP, how the images travel to a GPU machine):
    the script unpacks it into a temporary folder outside OUT, runs the recipe on it, and removes
    the folder; OUT holds no image."""
    import os

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _run_gpu_recipe_script(tmp_path, packed=True, SKIP_BENCH="1", TMPDIR=str(tmp),
                                  EXTRA="--iters1 2 --iters2 1 --batch-pairs 2 --val-ids 4 --repeats 2")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "unpacked 520 images" in proc.stdout and "ours: all" in proc.stdout
    assert json.loads((tmp_path / "out" / "gpu_split0.json").read_text())["splits"] == 1
    assert not any(tmp.iterdir())  # the unpacked images removed
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix == ".webp" or re.fullmatch(r"\d{7}\.png", p.name)]
    assert os.listdir(tmp_path / "packed")  # the pack itself untouched


@pytest.mark.slow
def test_gpu_recipe_script_stops_at_its_deadline_with_status_130(tmp_path):
    """DEADLINE (an epoch second) already past: training stops after its first iteration with a
    snapshot, and the script exits with reproduce.py's status 130, not 0 (a pipeline's `|| true`
    once hid it), so that a caller can tell a stopped recipe from a finished one. SKIP_BENCH=1
    leaves out the loader benchmark, as a resumed call does."""
    import time

    proc = _run_gpu_recipe_script(tmp_path, SKIP_BENCH="1", DEADLINE=str(int(time.time())),
                                  EXTRA="--iters1 50 --iters2 1 --batch-pairs 2 --val-ids 4 --repeats 2 --test-interval 0")
    assert proc.returncode == 130, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "exit status 130" in proc.stdout and "stopped by time limit" in proc.stdout
    assert not (tmp_path / "out" / "bench_data.json").exists()
    assert list((tmp_path / "out" / "split00").glob("stage1_*/stage1_iter_*.caffemodel"))


@pytest.mark.slow
def test_a_stopped_run_is_not_a_result_and_resumes(tmp_path, run_tool):
    """SIGTERM during stage 1: reproduce.py stops with status 130 and a message, the unfinished
    stage 1 gets no manifest (it is never reused as finished) and no result row. The same command
    then resumes stage 1 from the snapshot the stop wrote and finishes, with the weights of an
    uninterrupted run, bit for bit (on the CPU). --time-limit stops and resumes the same way."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    fabricate_cuhk01(tmp_path / "raw")

    def command(out):
        return [sys.executable, str(ROOT / "tools" / "reproduce.py"), "cuhk01-100", str(tmp_path / "raw"),
                "--out", str(out), "--splits", "1", "--loss-sets", "cls+high", "--iters1", "50", "--iters2", "2",
                "--batch-pairs", "2", "--device", "cpu", "--val-ids", "2", "--repeats", "2", "--threads", "1"]

    out = tmp_path / "out"
    proc = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = out / "split00" / "stage1_cls+high"
    # The signal is sent once the solver has said it is solving (its handlers are installed by
    # then), not after a fixed wait: a slow machine may take longer than any fixed wait to start.
    head = []
    for line in proc.stdout:
        head.append(line)
        if "Solving MSP-CNN" in line:
            break
    assert list(folder.glob(".*.lock")), "".join(head)[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stdout = "".join(head) + stdout
    assert proc.returncode == 130, stderr[-3000:]
    assert "stage 1 stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert "the same command resumes it" in stderr
    assert not (folder / "stage1.manifest.json").exists() and not (out / "results.json").exists()
    assert (folder / "stage1.partial.json").exists()

    # --time-limit stops it the same way (here at once: after the first iteration it runs).
    limited = subprocess.run(command(out) + ["--time-limit", "0.5"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert limited.returncode == 130, limited.stderr[-3000:]
    assert "stage1 resumed from" in limited.stdout and "stage 1 stopped by time limit" in limited.stderr

    resumed = subprocess.run(command(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage1 resumed from" in resumed.stdout
    assert (folder / "stage1.manifest.json").exists() and not (folder / "stage1.partial.json").exists()
    # The manifest names the machine of each part; all three parts ran here, so no note.
    manifest = json.loads((folder / "stage1.manifest.json").read_text())
    parts = manifest["earlier_parts"]
    assert [p["machine"] for p in parts] == [manifest["machine"]] * 2, parts
    assert 0 <= parts[0]["iterations"] < parts[1]["iterations"] < 50, parts
    assert "note: the earlier part" not in limited.stdout + resumed.stdout
    straight = subprocess.run(command(tmp_path / "straight"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for stage in ("stage1_cls+high/stage1_iter_50.caffemodel", "cls+high/stage2_iter_2.caffemodel"):
        a = (out / "split00" / stage).read_bytes()
        b = (tmp_path / "straight" / "split00" / stage).read_bytes()
        assert a == b, stage
