#!/usr/bin/env bash
# Check that kernels/wsld_cuda.cu still builds for V100 (sm_70), on a machine without CUDA 12.
#
# V100 users build fastkd with CUDA 12 (CUDA 13 dropped sm_70). This script checks the device code
# for them wherever the CUDA toolkit is newer:
#
#   * nvcc >= 13: compile wsld_cuda.cu with setup.py's exact flags for compute_75 (the oldest
#     target nvcc 13 has), keep the PTX, retarget it to `.target sm_70` / PTX ISA 8.7, and assemble
#     it with CUDA 12.8's ptxas (from PyPI's nvidia-cuda-nvcc-cu12 wheel: 40 MB, ptxas only) for
#     sm_70, with spills and local memory treated as errors. An instruction that sm_70 or PTX 8.7
#     lacks fails the assembly.
#   * nvcc 12 (or older): build the extension for TORCH_CUDA_ARCH_LIST=7.0 directly; that is the
#     complete check.
#
# What the first mode does not cover: code under `#if __CUDA_ARCH__ >= 750` guards (the PTX is
# preprocessed for 7.5; kernels/ has no such guards) and the CUDA 12 headers on the host side (the
# host code uses c10's Half/BFloat16 and the plain runtime API, nothing added in CUDA 13).
#
#   CUDA_HOME=/usr/local/cuda bash kernels/check_sm70.sh       # needs torch, pip and nvcc
#   PTXAS=/path/to/cuda-12/bin/ptxas bash kernels/check_sm70.sh  # use a local CUDA 12 ptxas
#
# FASTKD_SM70_PTX=FILE skips the build and checks that compute_75 PTX file instead.
# Work files go to $FASTKD_SM70_DIR (default: a temporary directory, removed at exit). Exit 0 when
# the sm_70 build succeeds, 1 when it fails, 2 when a prerequisite is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
PTXAS_WHEEL="nvidia-cuda-nvcc-cu12==12.8.93"
PTX_ISA="8.7"  # the newest PTX ISA that CUDA 12.8's ptxas reads

die() { echo "check_sm70: $*" >&2; exit 2; }

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CUDA_HOME
NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || die "no nvcc at $NVCC; set CUDA_HOME to a CUDA toolkit"
"$PYTHON" -c "import torch" 2>/dev/null || die "'$PYTHON' cannot import torch; activate the fastkd environment"
cuda_major=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
[ -n "$cuda_major" ] || die "cannot read the CUDA version from '$NVCC --version'"

if [ -n "${FASTKD_SM70_DIR:-}" ]; then
  work=$FASTKD_SM70_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

build() {  # build() ARCH [extra nvcc flags]: setup.py's CUDA build into $work, output in $work/build.log
  local arch=$1
  shift
  rm -rf "$work/tmp" "$work/lib"
  if ! NVCC_APPEND_FLAGS="$*" TORCH_CUDA_ARCH_LIST="$arch" FASTKD_BUILD_CUDA=1 \
      "$PYTHON" setup.py build_ext --build-temp "$work/tmp" --build-lib "$work/lib" \
      >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    echo "check_sm70: FAILED: the CUDA build for $arch failed (log above; full log: $work/build.log)" >&2
    exit 1
  fi
}

if [ "$cuda_major" -lt 13 ]; then
  echo "check_sm70: nvcc $cuda_major.x targets sm_70 itself: building the extension for 7.0"
  build 7.0
  echo "check_sm70: OK: fastkd._C built for sm_70 with nvcc $cuda_major.x"
  exit 0
fi

if [ -n "${FASTKD_SM70_PTX:-}" ]; then  # check a given compute_75 PTX file instead (tests use it)
  ptx=$FASTKD_SM70_PTX
  [ -s "$ptx" ] || die "FASTKD_SM70_PTX=$ptx is not a non-empty file"
else
  echo "check_sm70: nvcc $cuda_major.x has no sm_70: compiling PTX for compute_75 to retarget"
  mkdir -p "$work/keep"
  build 7.5 --keep --keep-dir "$work/keep"
  ptx="$work/keep/wsld_cuda.ptx"
  [ -s "$ptx" ] || die "nvcc kept no $ptx; see $work/build.log"
fi

if [ -z "${PTXAS:-}" ]; then
  echo "check_sm70: fetching CUDA 12.8's ptxas ($PTXAS_WHEEL, ptxas only)"
  "$PYTHON" -m pip download --quiet --no-deps --dest "$work/wheel" "$PTXAS_WHEEL" \
    || die "could not download $PTXAS_WHEEL; set PTXAS to a CUDA 12 ptxas instead"
  "$PYTHON" - "$work/wheel" "$work/ptxas" <<'EOF'
import sys, zipfile
from pathlib import Path
wheel = next(Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    Path(sys.argv[2]).write_bytes(archive.read("nvidia/cuda_nvcc/bin/ptxas"))
EOF
  chmod +x "$work/ptxas"
  PTXAS="$work/ptxas"
fi
[ -x "$PTXAS" ] || die "PTXAS=$PTXAS is not an executable"
echo "check_sm70: ptxas: $("$PTXAS" --version | tail -n 1)"

entries=$(grep -c '^\(\.visible \|\.weak \)\?\.entry' "$ptx" || true)
[ "$entries" -gt 0 ] || die "no kernel entries in $ptx"
grep -q '^\.target sm_75' "$ptx" || die "$ptx does not target sm_75 as expected"
sed -e "s/^\.version .*/.version $PTX_ISA/" -e 's/^\.target sm_75/.target sm_70/' "$ptx" >"$work/sm70.ptx"
if ! "$PTXAS" -arch=sm_70 -O3 --warn-on-spills --warn-on-local-memory-usage --warning-as-error \
    "$work/sm70.ptx" -o "$work/sm70.cubin"; then
  echo "check_sm70: FAILED: ptxas for sm_70 rejected the device code (errors above)" >&2
  exit 1
fi
echo "check_sm70: OK: $entries kernels assembled for sm_70 (PTX ISA $PTX_ISA) with no spills or local memory"
