"""AdapterHub's saved-adapter format (`adapters` 1.x and the older adapter-transformers), read and written
without importing `adapters`.

An adapter saved by AdapterHub's `model.save_adapter(dir, name)` (from the HF Hub or trained there) loads into
effir's fused ops with `effir.load_adapters(model, dir)`; `effir.save_adapters(model, dir, format="adapterhub")`
writes one that AdapterHub's `model.load_adapter(dir)` reads. The directory holds
  adapter_config.json           {"name", "config": BnConfig fields, "hidden_size", "model_type", "version", ...}
  pytorch_adapter.bin           (or adapter.safetensors) keys like
                                [<base prefix>.]encoder.layer.<i>.{attention.output|output}.adapters.<name>.
                                {adapter_down.0|adapter_up}.{weight|bias}
Only bottleneck adapters that effir computes exactly are accepted: the seq_bn / double_seq_bn / par_bn family
with any reduction factor, scaling, activation (relu, gelu, swish) and leave_out. A config that needs more
(an adapter-internal LayerNorm, gating, learned scaling, PHM, invertible adapters) is a ValueError naming the
field, never an adapter that silently computes something else.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from effir.adapters.config import AdapterConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter.safetensors", "pytorch_adapter.bin")  # AdapterHub's safetensors and torch.save names
_LOCATION_OF = {"attention.output": "mh_adapter", "output": "output_adapter"}
_MODULE_OF = {v: k for k, v in _LOCATION_OF.items()}
_PARAM_OF = {"adapter_down.0": "down", "adapter_up": "up"}
_HUB_PARAM_OF = {v: k for k, v in _PARAM_OF.items()}
_KEY = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\."
                  r"(adapter_down\.0|adapter_up)\.(weight|bias)$")
# adapters 1.3's BnConfig fields that effir does not model, at the values effir computes (written on export;
# on import every one must hold these values, except those in _IGNORED_ON_IMPORT)
_HUB_DEFAULTS = {
    "original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False,
    "ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "stochastic_depth": 0.0, "dropout": 0.0,
    "init_weights_seed": None, "hypercomplex_nonlinearity": "glorot-uniform", "phm_c_init": "normal",
    "phm_dim": 4, "phm_bias": True, "phm_rank": 1, "phm_init_range": 0.0001, "learn_phm": True,
    "shared_W_phm": False, "shared_phm_rule": True, "factorized_phm_W": True, "factorized_phm_rule": False,
}
# only change training (dropout), only exist without a PHM layer, or are read otherwise below
_IGNORED_ON_IMPORT = {"init_weights_seed", "hypercomplex_nonlinearity", "phm_c_init", "phm_dim", "phm_bias",
                      "phm_rank", "phm_init_range", "learn_phm", "shared_W_phm", "shared_phm_rule",
                      "factorized_phm_W", "factorized_phm_rule", "inv_adapter_reduction_factor",
                      "residual_before_ln", "dropout", "stochastic_depth", "inv_adapter"}
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish"}
_LEGACY_ACTIVATIONS = {"gelu_orig": "gelu", "relu": "relu", "swish": "swish"}  # adapter-transformers 2/3 names


def is_adapterhub_dir(directory) -> bool:
    """True when `directory` holds an adapter saved by AdapterHub (its config has a "config" block and one of
    AdapterHub's weight files is there)."""
    directory = Path(directory)
    cfg = directory / CONFIG_FILE
    if not cfg.exists() or not any((directory / f).exists() for f in WEIGHTS_FILES):
        return False
    meta = json.loads(cfg.read_text())
    return isinstance(meta.get("config"), dict) and meta.get("format") is None


def config_from_adapterhub(hub: dict, *, legacy: bool = False) -> AdapterConfig:
    """effir's AdapterConfig for an AdapterHub bottleneck config dict (the "config" block of its
    adapter_config.json); ValueError naming the first field effir cannot compute. legacy: a config written by
    adapter-transformers (no "version"), where "gelu" meant the tanh approximation."""
    arch = hub.get("architecture") or "bottleneck"
    if arch != "bottleneck":
        raise ValueError(f"AdapterHub adapter architecture {arch!r} is not supported: effir runs bottleneck "
                         "adapters (seq_bn, double_seq_bn, par_bn and their variants)")
    for field, want in _HUB_DEFAULTS.items():
        if field in _IGNORED_ON_IMPORT or field not in hub:
            continue
        if hub[field] != want:
            raise ValueError(f"AdapterHub config field {field}={hub[field]!r} is not supported by effir's fused "
                             f"adapter (it computes {field}={want!r})")
    if hub.get("original_ln_before") and not hub.get("is_parallel") and hub.get("residual_before_ln", True) is not True:
        raise ValueError(f"AdapterHub config field residual_before_ln={hub['residual_before_ln']!r} with "
                         "original_ln_before=True is not supported (effir takes the residual before the LayerNorm)")
    for field in ("dropout", "stochastic_depth"):
        if hub.get(field):
            warnings.warn(f"AdapterHub config {field}={hub[field]}: effir's adapters have no {field}, so they run "
                          "without it (inference is unchanged; training is not regularised by it)", stacklevel=3)
    scaling = hub.get("scaling", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"AdapterHub config field scaling={scaling!r} is not supported (effir: a fixed number)")
    rf = hub.get("reduction_factor")
    if isinstance(rf, bool) or not isinstance(rf, (int, float)):
        raise ValueError(f"AdapterHub config field reduction_factor={rf!r} is not supported (effir: one number for "
                         "every layer)")
    act = str(hub.get("non_linearity", "relu")).lower()
    names = _LEGACY_ACTIVATIONS if legacy else _ACTIVATIONS
    if act not in names:
        raise ValueError(f"AdapterHub config field non_linearity={act!r} is not supported; effir computes "
                         f"{sorted(names)}" + (" (adapter-transformers' 'gelu' is the tanh approximation)"
                                              if legacy and act == "gelu" else ""))
    init = hub.get("init_weights", "bert")
    if init not in ("bert", "mam_adapter"):
        warnings.warn(f"AdapterHub config init_weights={init!r}: effir initialises new adapters with 'bert' "
                      "instead (loaded weights are unaffected)", stacklevel=3)
        init = "bert"
    return AdapterConfig(mh_adapter=bool(hub.get("mh_adapter", False)),
                         output_adapter=bool(hub.get("output_adapter", True)), reduction_factor=rf,
                         non_linearity=names[act], scaling=float(scaling),
                         original_ln_before=bool(hub.get("original_ln_before", False)),
                         is_parallel=bool(hub.get("is_parallel", False)), init_weights=init,
                         leave_out=tuple(hub.get("leave_out") or ()))


def config_to_adapterhub(cfg: AdapterConfig) -> dict:
    """The "config" block AdapterHub's BnConfig loads (adapters 1.3 fields) for effir's config."""
    return {**_HUB_DEFAULTS, "mh_adapter": cfg.mh_adapter, "output_adapter": cfg.output_adapter,
            "reduction_factor": cfg.reduction_factor, "non_linearity": cfg.non_linearity, "scaling": cfg.scaling,
            "original_ln_before": cfg.original_ln_before, "is_parallel": cfg.is_parallel,
            "init_weights": cfg.init_weights, "leave_out": list(cfg.leave_out)}


def read_adapterhub(directory) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """(metadata, effir config, {effir site key "layer.<i>.<location>.<down|up>.<weight|bias>": tensor}) of an
    AdapterHub adapter directory."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    cfg = config_from_adapterhub(meta["config"], legacy="version" not in meta)
    state = _read_weights(directory)
    name = meta.get("name")
    tensors, other = {}, []
    for key, t in state.items():
        m = _KEY.search(key)
        if m is None or (name is not None and m.group(3) != name):
            other.append(key)
            continue
        layer, module, _, param, kind = m.groups()
        tensors[f"layer.{int(layer)}.{_LOCATION_OF[module]}.{_PARAM_OF[param]}.{kind}"] = t
    if other:
        raise ValueError(f"AdapterHub weights in {str(directory)!r} hold tensors effir does not compute "
                         f"(first: {other[:3]}): only the bottleneck's adapter_down / adapter_up are supported")
    return meta, cfg, tensors


def write_adapterhub(directory, name: str, cfg: AdapterConfig, tensors: dict[str, torch.Tensor], hidden_size: int,
                     model_type: str | None, model_class: str | None) -> None:
    """Write effir's site tensors ("layer.<i>.<location>.<down|up>.<weight|bias>") as AdapterHub does from a
    base model: adapter_config.json + pytorch_adapter.bin."""
    directory = Path(directory)
    state = {}
    for key, t in tensors.items():
        _, layer, loc, param, kind = key.split(".")
        state[f"encoder.layer.{layer}.{_MODULE_OF[loc]}.adapters.{name}.{_HUB_PARAM_OF[param]}.{kind}"] = t
    torch.save(state, directory / WEIGHTS_FILES[1])
    meta = {"config": config_to_adapterhub(cfg), "hidden_size": hidden_size, "model_class": model_class,
            "model_name": None, "model_type": model_type, "name": name, "version": "adapters.1.3.0"}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safe, bin_ = (directory / f for f in WEIGHTS_FILES)
    if safe.exists():
        from safetensors.torch import load_file

        return load_file(str(safe))
    return torch.load(bin_, map_location="cpu", weights_only=True)  # tensors only: no code runs on load
