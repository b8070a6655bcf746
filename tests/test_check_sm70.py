"""kernels/check_sm70.sh: the CUDA code still builds for V100 (sm_70), checked from CUDA 13.

The full check compiles wsld_cuda.cu to PTX (about 45 s on 2 cores) and fetches CUDA 12.8's
ptxas from PyPI; it is skipped where there is no nvcc 13 or no way to get that ptxas.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "kernels" / "check_sm70.sh"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def run_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHON": sys.executable, "FASTKD_SM70_DIR": str(tmp_path), **env}
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900
    )


def nvcc_major() -> int | None:
    nvcc = CUDA_HOME / "bin" / "nvcc"
    if not nvcc.exists():
        return None
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def test_missing_toolkit_is_one_clear_error(tmp_path):
    result = run_check(tmp_path, CUDA_HOME=str(tmp_path / "no-cuda"))
    assert result.returncode == 2
    assert f"no nvcc at {tmp_path / 'no-cuda'}/bin/nvcc; set CUDA_HOME" in result.stderr


# A kernel using a conversion that only sm_80 has (bf16 <- f32 in hardware), as nvcc 13 writes
# PTX for compute_75: the retarget must reject it rather than pass anything that assembles.
SM80_ONLY_PTX = """\
.version 9.0
.target sm_75
.address_size 64
.visible .entry to_bf16(.param .u64 p)
{
  .reg .f32 %f<2>;
  .reg .b16 %h<2>;
  .reg .b64 %rd<2>;
  ld.param.u64 %rd1, [p];
  ld.global.f32 %f1, [%rd1];
  cvt.rn.bf16.f32 %h1, %f1;
  st.global.b16 [%rd1], %h1;
  ret;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(
    (nvcc_major() or 0) < 13, reason="needs nvcc 13 (older nvcc builds sm_70 natively)"
)
def test_cuda_kernels_assemble_for_sm70_and_sm80_only_code_does_not(tmp_path):
    result = run_check(tmp_path, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    if result.returncode == 2 and "could not download" in result.stderr:
        pytest.skip(f"CUDA 12.8's ptxas is not reachable: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"OK: (\d+) kernels assembled for sm_70", result.stdout)
    assert match, result.stdout
    # Every kernel instantiation of wsld_cuda.cu: forward, backward, reduce over 3 dtypes.
    assert int(match.group(1)) >= 10
    assert (tmp_path / "sm70.cubin").stat().st_size > 0

    bad = tmp_path / "sm80_only.ptx"
    bad.write_text(SM80_ONLY_PTX)
    result = run_check(tmp_path, FASTKD_SM70_PTX=str(bad), PTXAS=str(tmp_path / "ptxas"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "requires .target sm_80" in result.stderr
    assert "FAILED: ptxas for sm_70 rejected the device code" in result.stderr
