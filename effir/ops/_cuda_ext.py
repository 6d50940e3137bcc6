"""Loads the compiled extension once and hands out its operator namespace `torch.ops.effir_C`.

`import effir._C` registers the ops (setup.py build). The GPU script's JIT build puts its module under the
same name in sys.modules first, so both paths meet here. A missing extension raises the same message as
`effir.backends.resolve_backend(..., "cuda", ...)`.
"""
from __future__ import annotations

import importlib

import torch

_LOADED = False


def ops():
    """`torch.ops.effir_C`, after importing `effir._C` (RuntimeError naming the cause if it cannot load)."""
    global _LOADED
    if not _LOADED:
        try:
            importlib.import_module("effir._C")
        except Exception as exc:
            raise RuntimeError(
                f"effir: backend='cuda' needs the compiled extension effir._C ({type(exc).__name__}: {exc}); "
                "reinstall with EFFIR_BUILD_CUDA=1 (see csrc/README.md)"
            ) from exc
        _LOADED = True
    return torch.ops.effir_C
