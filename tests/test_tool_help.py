"""Every command-line program answers --help with exit status 0 and a usage line (argparse
formats each option's help text only then, so a stray '%' in one is found here, not by a user), and
refuses a bad --device or training setting while it parses its arguments, before any work."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = sorted(p for p in (ROOT / "tools").glob("*.py"))


@pytest.mark.parametrize("tool", TOOLS, ids=[p.name for p in TOOLS])
def test_help(tool):
    r = subprocess.run([sys.executable, str(tool), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def tool_env():
    """The environment of a tool run outside the repository: the package importable from it."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


DEVICE_TOOLS = ("train.py", "evaluate.py", "build_index.py", "query.py", "reproduce.py", "run_pipeline.py",
                "sweep_stage2.py")


@pytest.mark.parametrize("name", DEVICE_TOOLS)
def test_a_device_that_is_not_there_is_refused_before_any_work(name, tmp_path):
    """Every tool that takes --device checks it while parsing its arguments (mspcnn.cli.add_device_argument):
    one line naming the value, exit status 2, nothing read or written. (run_pipeline.py used to generate
    and convert its dataset first, minutes of work, then stop at stage 1 on PyTorch's message.)"""
    import torch

    cases = [("foo", "'foo' is not a device: give cpu, cuda or cuda:N")]
    # One tool for a missing GPU; the messages themselves: test_check_device_names_what_is_wrong.
    if name == "run_pipeline.py" and not torch.cuda.is_available():
        cases.append(("cuda:0", "cuda:0: no CUDA device is visible to PyTorch"))
    for device, message in cases:
        out = tmp_path / "out"  # run in an empty folder: any default output folder would show
        r = subprocess.run([sys.executable, str(ROOT / "tools" / name), "--device", device, "--out", str(out)],
                           cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not any(tmp_path.iterdir())


def test_check_device_names_what_is_wrong(monkeypatch):
    import torch

    from mspcnn.cli import check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"'cuda:x' is not a device"):
        check_device("cuda:x")
    with pytest.raises(ValueError, match=r"mps: only cpu and cuda devices are supported"):
        check_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda") == "cuda" and check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"cuda:2: PyTorch sees 2 CUDA devices \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"cuda:1: PyTorch sees 1 CUDA device \(cuda:0\)"):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"cuda: no CUDA device is visible to PyTorch"):
        check_device("cuda")


@pytest.mark.parametrize("name,args,message", [
    ("run_pipeline.py", ["--base-lr", "nan"], "--base-lr must be a finite number >= 0, got nan"),
    ("run_pipeline.py", ["--stage2-lr", "-0.1"], "--stage2-lr must be a finite number >= 0, got -0.1"),
    ("run_pipeline.py", ["--bn-maf", "1"], "--bn-maf must be in [0, 1), got 1.0"),
    ("reproduce.py", ["cuhk01-100", "{tmp}", "--lr2", "inf"], "--lr2 must be a finite number >= 0, got inf"),
    ("reproduce.py", ["cuhk01-100", "{tmp}", "--w-low", "-1"], "--w-low must be a finite number >= 0, got -1.0"),
    ("reproduce.py", ["cuhk01-100", "{tmp}", "--neg-ceiling", "nan"], "--neg-ceiling must be a finite number, got nan"),
    ("reproduce.py", ["cuhk01-100", "{tmp}", "--time-limit", "nan"], "--time-limit must be positive, got nan"),
    ("sweep_stage2.py", ["--set", "lr=0.01,nan"], "--set lr must be a finite number >= 0, got nan"),
    ("sweep_stage2.py", ["--set", "pos_floor=-inf"], "--set pos_floor must be a finite number, got -inf"),
])
def test_a_bad_learning_rate_or_loss_setting_is_refused_before_any_work(name, args, message, tmp_path):
    """Learning rates, the NCC loss's weight and thresholds, BatchNorm's averaging fraction and
    reproduce.py's time limit are checked before any data are generated, converted or trained on
    (stage 2's settings are used only after stage 1, which takes hours with the paper's recipe):
    exit 2, the option named."""
    raw = tmp_path / "raw"
    raw.mkdir()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / name), *(a.format(tmp=raw) for a in args),
                        "--out", str(out)], cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"] and not any(raw.iterdir())
