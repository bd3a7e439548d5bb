"""tools/sass_summary.py on a stand-in for `cuobjdump -sass` output (the development machines have no
cuobjdump; tools/gpu_check.sh runs it on the built extension)."""
import subprocess
import sys
from pathlib import Path

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
sass_summary = load_tool("sass_summary")

TILED = "_ZN6mspcnn4cuda49_GLOBAL__N__7fe04db8_16_ncc_max_tiled_cu_e0112ee116max_tiled_kernelILi5ELi5ELi16EEEvNS_11NccGeometryEiiPKfS5_PfPl"
BWD = "_ZN6mspcnn4cuda52_GLOBAL__N__0f075075_19_ncc_max_backward_cu_2ba5f7da18max_backward_fusedIfLi5EEEvNS_11NccGeometryEPKT_S6_S6_PKlPS4_S9_"
SASS = f"""
Fatbin elf code:
================
arch = sm_90
code version = [1,7]

	code for sm_90
		Function : {TILED}
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   LDS.128 R4, [R2+0x10] ;                         /* 0x0000100002047984 */
        /*0020*/                   FFMA R8, R4, R5, R8 ;                           /* 0x0000000504087223 */
        /*0030*/               @P0 FFMA R9, R4, R6, R9 ;                           /* 0x0000000604090223 */
        /*0040*/              @!P1 FSETP.GTU.AND P2, PT, R8, R9, PT ;              /* 0x000000090800720b */
        /*0050*/                   EXIT ;                                          /* 0x000000000000794d */
        .L_x_0:
		..........

		Function : {BWD}
        /*0000*/                   LDS R2, [R0] ;                                  /* 0x0000000000027984 */
        /*0010*/                   FADD R3, R2, R5 ;                               /* 0x0000000502037221 */
        /*0020*/                   ATOMS.CAST.SPIN R3, [R0], R2, R3 ;              /* 0x0000000200037f8d */
        /*0030*/                   ISETP.EQ.U32.AND P0, PT, R3, 0x1, PT ;          /* 0x0000000103007c0c */
        /*0040*/              @!P0 BRA `(.L_x_5) ;                                 /* 0xfffffffc00e08947 */

	code for sm_80
		Function : {TILED}
        /*0000*/                   FFMA R8, R4, R5, R8 ;                           /* 0x0000000504087223 */
"""


def run(tmp_path, *args):
    f = tmp_path / "sass.txt"
    f.write_text(SASS)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "sass_summary.py"), str(f), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_counts_each_kernels_opcodes(tmp_path):
    counts = sass_summary.parse(SASS.splitlines())
    assert counts[("sm_90", TILED)] == {"LDC": 1, "LDS.128": 1, "FFMA": 2, "FSETP.GTU.AND": 1, "EXIT": 1}
    assert counts[("sm_90", BWD)]["ATOMS.CAST.SPIN"] == 1 and counts[("sm_90", BWD)]["BRA"] == 1
    assert counts[("sm_80", TILED)] == {"FFMA": 1}
    r = run(tmp_path, "--arch", "sm_90")
    assert r.returncode == 0, r.stderr
    assert "max_tiled_kernel<5, 5, 16>  [sm_90]  6 instructions" in r.stdout
    assert "FFMA 2" in r.stdout and "families: FFMA 2" in r.stdout
    assert "max_backward_fused<float, 5>  [sm_90]  5 instructions" in r.stdout and "ATOMS.CAST.SPIN 1" in r.stdout
    assert "sm_80" not in r.stdout


def test_match_and_errors(tmp_path):
    r = run(tmp_path, "--match", "backward")
    assert r.returncode == 0 and "max_backward_fused" in r.stdout and "max_tiled" not in r.stdout
    r = run(tmp_path, "--match", "volume")
    assert r.returncode == 2 and "no kernel matching 'volume'" in r.stderr
    r = run(tmp_path, "--match", "(")
    assert r.returncode == 2 and "not a regular expression" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "sass_summary.py"), str(tmp_path / "absent.txt")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "absent.txt" in r.stderr and "Traceback" not in r.stderr
