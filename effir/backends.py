"""Which implementation runs an op: one place decides, and says so when it falls back.

Backends per op:
- loss (`info_nce`):                "reference", "chunked", "triton", "cuda"
- adapter (`bottleneck_adapter*`):  "reference", "recompute", "triton", "cuda"

"auto" picks the fastest one measured for the inputs' device, from the first H100 runs
(bench/results/gpu_h100_2026-11-27*, bf16, forward+backward):
- loss on a GPU: "triton", then "cuda" (the compiled extension): 17.6 / 18.9 vs 354 ms at B = N = 32768,
  d = 768 (the extension's mma.sync kernels are unpipelined);
- adapter on a GPU: "reference" (plain autograd): 1.31 ms of GPU time at 65536 tokens, d = 768 with the Pfeiffer
  LayerNorm, against 2.51 (triton), 4.2 (cuda, Houlsby layout), 1.64 (torch.compile of it), 1.52 (AdapterHub).
  The fused kernels save only their input (less activation memory) but are slower for now: ask for them
  with backend="triton" / "cuda";
- on CPU the pure-PyTorch memory-lean path ("chunked" / "recompute"). A GPU run that has
to fall back warns and names the missing piece; an explicitly requested backend that cannot run raises.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache

import torch

LOSS_BACKENDS = ("reference", "chunked", "triton", "cuda")
ADAPTER_BACKENDS = ("reference", "recompute", "triton", "cuda")
_TORCH_FALLBACK = {"loss": "chunked", "adapter": "recompute"}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_installed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpret())


@lru_cache(maxsize=None)
def cuda_extension_error() -> str | None:
    """None when the compiled extension `effir._C` loads, else why it does not."""
    try:
        importlib.import_module("effir._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch-version mismatch
        return f"{type(exc).__name__}: {exc}"
    return None


def available_backends(op: str = "loss", device: torch.device | str = "cpu") -> list[str]:
    """Backends of `op` ("loss" or "adapter") that can run on `device` in this environment."""
    device = torch.device(device)
    names = LOSS_BACKENDS if op == "loss" else ADAPTER_BACKENDS
    out = [names[0], names[1]]
    if triton_runs_on(device):
        out.append("triton")
    if device.type == "cuda" and cuda_extension_error() is None:
        out.append("cuda")
    return out


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Turn `backend` (a name or "auto") into a backend that can run on `device`, or raise."""
    names = LOSS_BACKENDS if op == "loss" else ADAPTER_BACKENDS
    if backend not in names + ("auto",):
        raise ValueError(f"backend must be one of {names + ('auto',)}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if op == "adapter":  # measured fastest on an H100 (module docstring); a choice, not a fallback
                return "reference"
            if triton_runs_on(device):
                return "triton"
            if cuda_extension_error() is None:
                return "cuda"
            warnings.warn(
                f"effir: neither the CUDA extension ({cuda_extension_error()}) nor Triton is available on "
                f"{device}; {op} falls back to the pure-PyTorch '{_TORCH_FALLBACK[op]}' backend.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _TORCH_FALLBACK[op]
    if backend == "triton" and not triton_runs_on(device):
        why = "triton is not installed" if not triton_installed() else (
            f"inputs are on {device}; Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
        )
        raise RuntimeError(f"effir: backend='triton' cannot run: {why}")
    if backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"effir: backend='cuda' needs CUDA tensors, got inputs on {device}")
        if cuda_extension_error() is not None:
            raise RuntimeError(
                "effir: backend='cuda' needs the compiled extension effir._C "
                f"({cuda_extension_error()}); reinstall with EFFIR_BUILD_CUDA=1 (see csrc/README.md)"
            )
    return backend
