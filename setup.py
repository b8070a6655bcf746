"""Build fastkd and its fused-op extension ``fastkd._C`` (sources in kernels/).

Install into an environment that already has PyTorch:

    pip install --no-build-isolation -e .        # development (editable)
    pip install --no-build-isolation .           # regular install

``--no-build-isolation`` matters: the extension must compile against the torch that will import
it, not a fresh copy pip would download into an isolated build environment.

Environment variables:

* ``FASTKD_BUILD_CUDA``: unset builds the CUDA kernels when a CUDA toolkit (nvcc) is found and
  torch is a CUDA build; ``0`` builds the CPU kernels only; ``1`` requires CUDA and fails clearly
  without a toolkit.
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for. Unset, fastkd picks
  ``8.0;9.0+PTX`` (plus ``7.0`` when nvcc is older than 13, which dropped sm_70) instead of
  torch's default of probing a local GPU, so that builds on GPU-less CI machines are predictable.
* ``MAX_JOBS``: parallel compile jobs for ninja (default: all cores).
* ``FASTKD_DEBUG=1``: ``-O0 -g``; ``FASTKD_PTXAS_VERBOSE=1``: print ptxas register/spill reports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def locate_cuda_home() -> None:
    """Point CUDA_HOME at a complete toolkit when the environment does not name one.

    torch guesses the toolkit root as the grandparent of the first `nvcc` on PATH, which is wrong
    when that nvcc is a wrapper script or symlink outside the toolkit (/usr/local/bin/nvcc
    forwarding to /usr/local/cuda-13.0): the headers and libcudart are then not found. Must run
    before torch.utils.cpp_extension is imported, which reads CUDA_HOME once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates += [
        Path("/usr/local/cuda"),
        *sorted(Path("/usr/local").glob("cuda-*"), reverse=True),
    ]
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(root)
            return


locate_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only in a torch-less environment
    sys.exit(
        "fastkd builds a PyTorch extension, so PyTorch must be installed first:\n"
        "    pip install torch torchvision\n"
        "    pip install --no-build-isolation -e .\n"
    )


def read_version() -> str:
    """The package version, defined once as ``__version__`` in fastkd/__init__.py."""
    text = (ROOT / "fastkd" / "__init__.py").read_text()
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("fastkd/__init__.py does not define __version__")
    return match.group(1)


def cuda_request() -> str:
    """``auto``, ``off`` or ``on`` from FASTKD_BUILD_CUDA."""
    value = os.environ.get("FASTKD_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    sys.exit(f"FASTKD_BUILD_CUDA must be 0, 1 or unset, got {value!r}")


def find_nvcc() -> str | None:
    """The nvcc torch's extension builder will use (under CUDA_HOME), if any."""
    if CUDA_HOME is not None:
        nvcc = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
        if nvcc.exists():
            return str(nvcc)
    return None


def nvcc_version(nvcc: str) -> tuple[int, int]:
    """(major, minor) of the CUDA toolkit behind ``nvcc``."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def nvidia_include_dirs() -> list[str]:
    """Headers from NVIDIA's pip wheels that torch's CUDA headers include (cusparse.h).

    A CUDA toolkit without the math libraries (as on some CI images) lacks cusparse.h, which
    torch's CUDA headers pull in; the nvidia-* wheels torch depends on ship it.
    """
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13/include", "cusparse/include"):
            include = Path(base) / sub
            if (include / "cusparse.h").exists():
                found.append(str(include))
    return found


def default_arch_list(cuda_major: int) -> str:
    """sm_80 (A100) and sm_90 (H100) with PTX for newer GPUs; sm_70 (V100) where nvcc allows."""
    archs = ["8.0", "9.0+PTX"]
    if cuda_major < 13:
        archs.insert(0, "7.0")
    return ";".join(archs)


def extensions() -> list:
    """The fastkd._C extension: CPU kernels always, CUDA kernels when requested and possible."""
    request = cuda_request()
    nvcc = find_nvcc()
    toolkit_found = nvcc is not None
    with_cuda = False
    if request != "off":
        if nvcc is not None and torch.version.cuda is not None:
            with_cuda = True
        elif request == "on":
            reason = (
                "no CUDA toolkit (nvcc) was found; set CUDA_HOME to one"
                if nvcc is None
                else f"torch {torch.__version__} is a CPU-only build"
            )
            sys.exit(f"FASTKD_BUILD_CUDA=1 but {reason}.")

    debug = os.environ.get("FASTKD_DEBUG", "") == "1"
    # -g0 overrides the -g of Python's default CFLAGS: debug info only slows the build down.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    defines = [
        f"-DFASTKD_WITH_CUDA={int(with_cuda)}",
        f"-DFASTKD_CUDA_TOOLKIT_FOUND={int(toolkit_found)}",
    ]
    # at::parallel_for is implemented inline with OpenMP pragmas: without -fopenmp it silently
    # runs on one thread. The process shares torch's libgomp (same soname).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # ATen's vectorization headers are full of `#pragma unroll` (unknown to g++) and pass
    # 32-byte vectors by value (an ABI note, harmless inside one library): silence both.
    cxx_flags = [*opt, *openmp, *defines, "-Wno-unknown-pragmas", "-Wno-psabi"]
    sources = ["kernels/wsld.cpp", "kernels/wsld_cpu_avx2.cpp"]  # portable copy first: see there
    kwargs: dict = {
        "include_dirs": [str(ROOT / "kernels")],
        "extra_link_args": openmp,
    }

    if with_cuda:
        major, minor = nvcc_version(nvcc)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(major)
        nvcc_opt = ["-O0", "-g"] if debug else ["-O3"]
        # Spills or local memory in a kernel are performance bugs: make ptxas say so.
        nvcc_flags = [*nvcc_opt, *defines, "-Xptxas=-warn-spills", "-Xptxas=-warn-lmem-usage"]
        if os.environ.get("FASTKD_PTXAS_VERBOSE", "") == "1":
            nvcc_flags.append("-Xptxas=-v")
        if debug:
            nvcc_flags.append("-lineinfo")
        kwargs["include_dirs"] += nvidia_include_dirs()
        print(
            f"fastkd: building CPU + CUDA kernels with nvcc {major}.{minor} ({nvcc}) for "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        return [
            CUDAExtension(
                "fastkd._C",
                [*sources, "kernels/wsld_cuda.cu"],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                **kwargs,
            )
        ]

    why = "FASTKD_BUILD_CUDA=0" if request == "off" else "no usable CUDA toolkit"
    print(f"fastkd: building CPU kernels only ({why})")
    return [CppExtension("fastkd._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)]


setup(
    name="fastkd",
    version=read_version(),
    description="Throughput-first knowledge distillation (WSLD) trainer for PyTorch",
    packages=find_packages(include=["fastkd", "fastkd.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5,<2.15",
        "torchvision>=0.20",
        "numpy>=1.24",
        "pyyaml>=6.0",
    ],
    extras_require={
        "dali-cuda13": ["nvidia-dali-cuda130"],
        "dali-cuda12": ["nvidia-dali-cuda120"],
        "plot": ["matplotlib"],
        "export": ["onnx", "onnxscript"],  # python -m fastkd.export --format onnx
        "dev": [
            "pytest",
            "hypothesis",
            "ruff",
            "ninja",
            "safetensors",
            "matplotlib",
            "tensorboard",
            "onnx",
            "onnxscript",
            "onnxruntime",
        ],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
