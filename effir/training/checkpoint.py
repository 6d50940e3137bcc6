"""Atomic training checkpoints: everything `--resume` needs to continue a run exactly.

One file, `<output_dir>/checkpoint/state.pt`, written to a temporary file in the same folder and moved into
place with `os.replace`, so a crash or Ctrl-C during the write leaves the previous checkpoint intact.
It holds: the trainable weights (only the adapters when training adapters; the whole model otherwise),
the loss module's state (a learnable temperature), optimizer, LR scheduler, GradScaler, sampler position,
the step count and the RNG states (python, numpy, torch CPU and CUDA) of every rank.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "state.pt"
FORMAT_VERSION = 1


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(module: torch.nn.Module, *, only_trainable: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must carry: the trainable parameters only (adapters) or everything."""
    if not only_trainable:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, weights: dict[str, torch.Tensor], *, only_trainable: bool):
    if not only_trainable:
        module.load_state_dict(weights)
        return
    params = dict(module.named_parameters())
    missing = [k for k, p in params.items() if p.requires_grad and k not in weights]
    unknown = [k for k in weights if k not in params]
    if missing or unknown:
        raise ValueError(
            "checkpoint does not match the model being resumed: "
            f"missing trainable weights {missing[:5]}, unknown weights {unknown[:5]} "
            "(was it written with other --model/--adapters/--reduction-factor?)"
        )
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoint" / CHECKPOINT_NAME


def save_checkpoint(output_dir: str | Path, state: dict) -> Path:
    """Write `state` (see module docstring) atomically; returns the checkpoint path."""
    path = checkpoint_path(output_dir)
    atomic_torch_save({"format": FORMAT_VERSION, **state}, path)
    return path


def load_checkpoint(output_dir: str | Path) -> dict:
    path = checkpoint_path(output_dir)
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path}")
    # weights_only=False: the state holds python/numpy RNG tuples, written by us.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"--resume: {path} has checkpoint format {state.get('format')}, expected {FORMAT_VERSION}")
    return state
