"""Save / load only the adapter weights and their config (JSON): a few MB per adapter.

Two formats: effir's own (adapter_config.json + adapter_model.safetensors) and AdapterHub's
(`effir.adapters.adapterhub`: adapter_config.json + pytorch_adapter.bin / adapter.safetensors), so adapters
move both ways between effir's fused ops and the `adapters` library. `load_adapters` tells them apart."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from effir.adapters import adapterhub
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


def _hf_model(model):
    """The Hugging Face model in `model` (itself, or the transformers model inside a sentence-transformers one):
    the first module whose config has a model_type; None if there is none."""
    for m in model.modules():
        if isinstance(getattr(getattr(m, "config", None), "model_type", None), str):
            return m
    return None


def save_adapters(model, directory, name: str | None = None, *, format: str = "effir") -> Path:
    """Write adapter `name` (default: the active one) to `directory`. format="effir": adapter_config.json +
    adapter_model.safetensors; format="adapterhub": the files AdapterHub's `model.load_adapter(directory)` reads
    (adapter_config.json + pytorch_adapter.bin)."""
    _check_format(format)
    state = _state(model)
    name = name if name is not None else state.active
    if name not in state.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _adapter_tensors(model, name).items()}
    hf = _hf_model(model)
    model_type = hf.config.model_type if hf is not None else None
    model_class = type(hf).__name__ if hf is not None else None
    _write(directory, format, name, state.configs[name], tensors, state.hidden_size, model_type, model_class)
    return directory


def _check_format(format: str) -> None:
    if format not in ("effir", "adapterhub"):
        raise ValueError(f"format must be 'effir' or 'adapterhub', got {format!r}")


def _write(directory: Path, format: str, name: str, cfg: AdapterConfig, tensors: dict, hidden_size: int,
           model_type: str | None, model_class: str | None) -> None:
    if format == "adapterhub":
        adapterhub.write_adapterhub(directory, name, cfg, tensors, hidden_size, model_type, model_class)
        return
    save_file(tensors, str(directory / WEIGHTS_FILE))
    meta = {"name": name, "hidden_size": hidden_size, "config": cfg.to_dict(), "format": "effir-adapter-1",
            "model_type": model_type, "model_class": model_class}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def convert_adapters(src, dst, *, format: str) -> Path:
    """Rewrite the adapter saved in `src` (effir's or AdapterHub's format) into `dst` in `format` ("effir" or
    "adapterhub"), without loading a model: both formats hold the same tensors under names that map one to
    one. An AdapterHub config effir does not compute is refused as by `load_adapters`."""
    _check_format(format)
    meta, cfg, tensors = _read(Path(src))
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _write(dst, format, meta["name"], cfg, tensors, int(meta["hidden_size"]), meta.get("model_type"),
           meta.get("model_class"))
    return dst


def _read(directory: Path) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """(metadata with "name" and "hidden_size", config, site tensors) of an effir or AdapterHub directory."""
    if adapterhub.is_adapterhub_dir(directory):
        return adapterhub.read_adapterhub(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.exists():
        raise ValueError(f"directory {str(directory)!r} holds no {CONFIG_FILE} (written by effir.save_adapters or "
                         "AdapterHub's save_adapter)")
    meta = json.loads(cfg_path.read_text())
    return meta, AdapterConfig.from_dict(meta["config"]), load_file(str(directory / WEIGHTS_FILE))


def load_adapters(model, directory, *, name: str | None = None, backend: str = "auto") -> str:
    """Add the adapter saved in `directory` (by effir.save_adapters, or by AdapterHub's save_adapter) to `model`
    (under its saved name, or `name`), load its weights, make it active and trainable; returns the name.
    Raises ValueError on a hidden-size mismatch, on weights that do not fit the model's layers and on an
    AdapterHub config effir does not compute."""
    directory = Path(directory)
    meta, cfg, tensors = _read(directory)
    hf = _hf_model(model)
    saved_type, model_type = meta.get("model_type"), hf.config.model_type if hf is not None else None
    if saved_type and model_type and saved_type != model_type:
        warnings.warn(f"adapter in {str(directory)!r} was saved from a {saved_type!r} model, loading into a "
                      f"{model_type!r} one", stacklevel=2)
    name = name or meta["name"]
    add_adapters(model, cfg, name, backend=backend, hidden_size=int(meta["hidden_size"]))
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
