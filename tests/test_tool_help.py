"""Every command-line program answers --help with exit status 0 and a usage line (argparse
formats each option's help text only then, so a stray '%' in one is found here, not by a user)."""
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
