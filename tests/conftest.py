import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_ready():
    """True when a GPU is visible and mspcnn was built with the CUDA kernels."""
    if not torch.cuda.is_available():
        return False
    import mspcnn.ops  # noqa: F401

    return torch._C._dispatch_has_kernel_for_dispatch_key("mspcnn::ncc_max", "CUDA")


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and mspcnn built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _run_tool(name, *args):
    """Run tools/<name> with this Python from the repository root; output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def one_iteration_stage1(db, tmp_path, **kwargs):
    """Stage-1 weights to start stage 2 from: one iteration on DB (2 pairs), saved under TMP_PATH/s1;
    the SolveResult (``.weights``)."""
    from mspcnn.engine import solve
    from mspcnn.paths import PROTOTXT_DIR

    return solve(PROTOTXT_DIR / "solver_stage1.prototxt", db, batch_pairs=2, workers=1, log=lambda *a: None,
                 overrides={"max_iter": 1, "test_interval": 0, "snapshot_prefix": str(tmp_path / "s1")}, **kwargs)


@pytest.fixture
def run_tool():
    """``run_tool(name, *args)``: a command-line tool's CompletedProcess (see _run_tool)."""
    return _run_tool


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_market_db(tmp_path_factory):
    """A tiny synthetic Market-style dataset converted to LMDB (8 training identities, 3 of them
    held out for validation), made once per test session with the command-line tools."""
    base = tmp_path_factory.mktemp("tiny_market")
    for cmd in (["make_synthetic.py", base / "raw", "--train-ids", "8", "--test-ids", "2",
                 "--distractors", "0", "--junk", "0"],
                ["convert_dataset.py", "market1501", base / "raw", base / "db", "--val-ids", "3"]):
        _run_tool(*cmd).check_returncode()
    return base / "db"


@pytest.fixture
def unit_bn_backbone():
    """A seeded MSPCNNBackbone whose BatchNorm statistics are 1 (untrained accumulators are 0, which
    makes TEST-phase outputs blow up), for feature tests."""
    from mspcnn.model import MSPCNNBackbone

    model = MSPCNNBackbone(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, blobs in model.layer_blobs().items():
            if name.endswith("_bn"):
                blobs[1].fill_(1.0)
                blobs[2].fill_(1.0)
    return model


def session_members(sid):
    """Processes still alive in session `sid` (the training and any worker it forked)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive
