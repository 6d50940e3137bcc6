"""Argument checks shared by every public op: errors name the argument and what was expected."""
from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    shape: tuple | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    finite: bool = False,
    nonempty: bool = True,
) -> torch.Tensor:
    """Validate `t` and return it. `shape` entries may be None (any size). Raises ValueError."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        want = f"shape {shape_str(shape)}" if shape is not None else f"{ndim} dims"
        raise ValueError(f"{name} must have {want}, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name} must have shape {shape_str(shape)}, got {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device} (like the other inputs), got {t.device}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return t


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def shape_str(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
