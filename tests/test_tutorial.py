"""docs/tutorial/: every step runs and checks itself (the C++ is compiled once, then cached)."""
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial"


@pytest.mark.slow
@pytest.mark.parametrize("step", ["step1_reference", "step2_cpp_forward", "step3_backward_gradcheck",
                                  "step4_custom_op", "step5_how_fast"])
def test_tutorial_step(step):
    proc = subprocess.run([sys.executable, str(TUTORIAL / f"{step}.py")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"OK step {step[4]}" in proc.stdout


def test_ncc_layer_page_checks_run():
    """docs/ncc_layer_demo.py: the claims of docs/ncc_layer.md, checked numerically."""
    proc = subprocess.run([sys.executable, str(TUTORIAL.parent / "ncc_layer_demo.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK: every check of docs/ncc_layer.md holds" in proc.stdout
