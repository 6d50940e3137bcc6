"""Build script: the pure-Python package always; the CUDA extension (csrc/) when it can be built.

EFFIR_BUILD_CUDA=1 forces the extension (fails loudly if it cannot be built), =0 skips it, unset = build
only when a CUDA toolkit and a CUDA-enabled torch are both present. See csrc/README.md.
"""
import os
import sys

from setuptools import setup


def _cuda_extension():
    flag = os.environ.get("EFFIR_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        print("effir: EFFIR_BUILD_CUDA=0, installing the pure-Python package (no CUDA extension).")
        return None, {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch absent from the build environment
        if flag in ("1", "true", "yes", "on"):
            raise
        print(f"effir: torch not importable at build time ({exc}); installing without the CUDA extension.")
        return None, {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if flag in ("1", "true", "yes", "on"):
            sys.exit("effir: EFFIR_BUILD_CUDA=1 but torch has no CUDA or no CUDA toolkit was found (CUDA_HOME).")
        print("effir: no CUDA toolkit / CUDA torch found; installing without the CUDA extension (backend='cuda' unavailable).")
        return None, {}
    from csrc_build import extension_kwargs  # noqa: E402  (csrc_build.py sits next to this file)

    return CUDAExtension(**extension_kwargs()), {"build_ext": BuildExtension}


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ext, cmdclass = _cuda_extension()
setup(ext_modules=[ext] if ext is not None else [], cmdclass=cmdclass)
