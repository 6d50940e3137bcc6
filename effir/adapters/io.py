"""Save / load only the adapter weights (safetensors) and their config (JSON): a few MB per adapter."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from effir.adapters.config import AdapterConfig
from effir.adapters.inject import _state, add_adapters, find_adapter_sites, set_active_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _adapter_tensors(model, name):
    out = {}
    for layer, loc, module in find_adapter_sites(model):
        ad = getattr(module, "effir_adapters", {})
        if name in ad:
            for pname, p in ad[name].named_parameters():
                out[f"layer.{layer}.{loc}.{pname}"] = p
    return out


def save_adapters(model, directory, name: str | None = None) -> Path:
    """Write adapter `name` (default: the active one) to `directory`: adapter_config.json + weights."""
    state = _state(model)
    name = name if name is not None else state.active
    if name not in state.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _adapter_tensors(model, name).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    meta = {"name": name, "hidden_size": state.hidden_size, "config": state.configs[name].to_dict(),
            "format": "effir-adapter-1"}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_adapters(model, directory, *, name: str | None = None, backend: str = "auto") -> str:
    """Add the adapter saved in `directory` to `model` (under its saved name, or `name`), load its weights,
    make it active and trainable; returns the name. Raises ValueError on a hidden-size mismatch."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.exists():
        raise ValueError(f"directory {str(directory)!r} holds no {CONFIG_FILE} (written by effir.save_adapters)")
    meta = json.loads(cfg_path.read_text())
    name = name or meta["name"]
    cfg = AdapterConfig.from_dict(meta["config"])
    add_adapters(model, cfg, name, backend=backend, hidden_size=int(meta["hidden_size"]))
    tensors = load_file(str(directory / WEIGHTS_FILE))
    params = _adapter_tensors(model, name)
    missing, unexpected = set(params) - set(tensors), set(tensors) - set(params)
    if missing or unexpected:
        raise ValueError(f"adapter weights in {str(directory)!r} do not fit this model: missing "
                         f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]} (layer count differs?)")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != tensors[k].shape:
                raise ValueError(f"adapter weight {k}: saved shape {tuple(tensors[k].shape)} != {tuple(p.shape)}")
            p.copy_(tensors[k].to(p.dtype))
    set_active_adapter(model, name)
    return name
