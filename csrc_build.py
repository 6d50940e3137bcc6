"""How effir's CUDA extension (`effir._C`, sources in csrc/) is compiled: one list of sources and flags for
setup.py (`extension_kwargs()`), the CI compile check (.ci/build_cuda) and the JIT build of the GPU script
(`jit_kwargs()`, torch.utils.cpp_extension.load).

Targets: sm_90a (H100/H200: the `a` suffix enables Hopper-only instructions) and sm_80 (A100); override
with EFFIR_CUDA_GENCODE="90a,80" style lists. No --use_fast_math: the log-sum-exp uses the accurate
expf/logf, and the tests hold every backend to the float64 reference.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ("bindings.cpp", "info_nce.cu", "bottleneck_adapter.cu")
DEFAULT_ARCHS = ("90a", "80")


def sources(absolute: bool = False) -> list[str]:
    """The extension's source files (relative to the repo root, as setuptools wants, unless `absolute`)."""
    return [str(CSRC / s) if absolute else f"csrc/{s}" for s in SOURCES]


def archs() -> list[str]:
    env = os.environ.get("EFFIR_CUDA_GENCODE", "").replace(";", ",").strip()
    return [a.strip() for a in env.split(",") if a.strip()] if env else list(DEFAULT_ARCHS)


def gencode_flags() -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs()]


def cxx_std() -> str:
    """torch >= 2.14's headers need C++20; older torch builds with C++17 (what its own wheels use)."""
    try:
        import torch

        major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    except Exception:
        return "c++20"
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _nvcc_flags() -> list[str]:
    return [
        "-O3",
        f"-std={cxx_std()}",
        "--expt-relaxed-constexpr",
        "-lineinfo",  # source lines in SASS / Nsight Compute; no effect on speed
        "-Xptxas=-warn-spills",
        *gencode_flags(),
    ]


def _cxx_flags() -> list[str]:
    return ["-O3", f"-std={cxx_std()}"]


def extension_kwargs() -> dict:
    """Keyword arguments for torch.utils.cpp_extension.CUDAExtension (setup.py)."""
    return {
        "name": "effir._C",
        "sources": sources(),
        "include_dirs": [str(CSRC)],
        "extra_compile_args": {"cxx": _cxx_flags(), "nvcc": _nvcc_flags()},
    }


def jit_kwargs(build_directory: str | None = None, verbose: bool = False) -> dict:
    """Keyword arguments for torch.utils.cpp_extension.load: the same sources and flags, built in place."""
    kw = {
        "name": "effir_C_jit",
        "sources": sources(absolute=True),
        "extra_include_paths": [str(CSRC)],
        "extra_cflags": _cxx_flags(),
        "extra_cuda_cflags": _nvcc_flags(),
        "verbose": verbose,
    }
    if build_directory is not None:
        kw["build_directory"] = build_directory
    return kw
