"""Which implementation runs an op: one place decides, and says so when it falls back.

Backends per op:
- loss (`info_nce`):                "reference", "chunked", "triton", "cuda"
- adapter (`bottleneck_adapter*`):  "reference", "recompute", "triton", "cuda"

"auto" picks the fastest one measured for the inputs' device, from the H100 runs
(bench/results/gpu_h100_2026-11-27*, bf16, forward+backward, GPU time):
- loss on a GPU: "triton", then "cuda" (the compiled extension): 14.41 ms with cuBLAS GEMM steps (run 3) at
  B = N = 32768, d = 768, 59.9% of the card's measured bf16 matmul rate, against 354 ms for the extension
  (run 1; its mma.sync kernels are unpipelined);
- adapter followed by residual + LayerNorm on a GPU ("adapter_ln": the seq_bn / Pfeiffer and Houlsby / parallel
  placements), 16-bit inputs: "triton". Run 8, 65536 tokens, d = 768, r = 48, bf16: seq_bn 1.04 ms against 1.34
  (plain autograd), 1.57 (AdapterHub), 1.65 (torch.compile), with a third of the saved activations; post-LN 0.90
  against 1.07. The mix autocast training hands it (bf16 h and adapter weights, fp32 residual stream and
  LayerNorm, which the Triton kernels take as it is): "reference", measured faster there (runs 6-8: 2.45 ms
  against 2.85-3.11 for the fused op; the fused op saves ~13% of a train step's peak memory). fp32 inputs:
  "reference", untimed;
- plain adapter on a GPU ("adapter"): "reference" (plain autograd): the fused kernel has not been timed on a GPU
  since its tiles were retuned (run 1: slower than plain autograd);
- on CPU the pure-PyTorch memory-lean path ("chunked" / "recompute"). A GPU run that has to fall back warns and
  names the missing piece; an explicitly requested backend that cannot run raises.
The fused ops cost more host time per call than plain autograd (runs 5-8: ~2.1-2.5 ms of Python, launches and
allocations per seq_bn forward + backward in the lent VM, against ~1.1 ms): invisible when the GPU has
work queued, as in a training step of a large batch, visible at a few thousand tokens per call.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache

import torch

LOSS_BACKENDS = ("reference", "chunked", "triton", "cuda")
ADAPTER_BACKENDS = ("reference", "recompute", "triton", "cuda")
_TORCH_FALLBACK = {"loss": "chunked", "adapter": "recompute", "adapter_ln": "recompute"}


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


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn `backend` (a name or "auto") into a backend that can run on `device`, or raise. op: "loss",
    "adapter" (the plain adapter) or "adapter_ln" (adapter + residual + LayerNorm); dtype: the inputs' (the
    adapter's "auto" follows what was measured, 16-bit inputs)."""
    names = LOSS_BACKENDS if op == "loss" else ADAPTER_BACKENDS
    if backend not in names + ("auto",):
        raise ValueError(f"backend must be one of {names + ('auto',)}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if op == "adapter":  # measured fastest on an H100 (module docstring); a choice, not a fallback
                return "reference"
            if op == "adapter_ln" and dtype not in (torch.bfloat16, torch.float16):
                # Under autocast a BERT layer hands the op a bf16 sub-block output and an fp32 residual (dtype:
                # fp32, the computation's); the fused kernels take that mix as it is but measured slower than plain
                # autograd there (H100 runs 6-8); fp32 itself is untimed: a choice, not a fallback
                return "reference"
            if op == "adapter_ln" and not triton_runs_on(device):
                warnings.warn(f"effir: Triton is not installed; the fused adapter + LayerNorm on {device} falls "
                              "back to plain autograd ('reference'; the CUDA extension measured slower)",
                              RuntimeWarning, stacklevel=3)
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
