"""Inject bottleneck adapters into BERT-family encoders (BERT, RoBERTa, XLM-R, ... and sentence-transformers).

Each encoder layer of that family ends its attention block and its feed-forward block with an output module
`forward(hidden_states, input_tensor) = LayerNorm(dropout(dense(hidden_states)) + input_tensor)`
(BertSelfOutput / BertOutput and their copies). `add_adapters` gives those modules an `effir_adapters`
ModuleDict and an instance-level forward that, when a named adapter is active there, runs
`dense -> dropout` and then the fused adapter + residual + LayerNorm op (effir.bottleneck_adapter_layernorm),
so the layer saves only the adapter's inputs for backward. Parameter names of the backbone do not change.
"""
from __future__ import annotations

import logging
import types

from torch import nn

from effir.adapters.config import AdapterConfig, resolve_config
from effir.adapters.modules import BottleneckAdapter

log = logging.getLogger(__name__)
SUPPORTED = ("BertModel", "RobertaModel", "XLMRobertaModel", "CamembertModel", "ElectraModel",
             "any *ForXxx head model or SentenceTransformer around one of them")
_LOCATIONS = ("mh_adapter", "output_adapter")


class _AdapterState:
    """Shared by the model and every patched module: which adapter is active and each one's config."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.active: str | None = None
        self.configs: dict[str, AdapterConfig] = {}


def _is_output_block(m) -> bool:
    return (isinstance(getattr(m, "dense", None), nn.Linear) and isinstance(getattr(m, "LayerNorm", None), nn.LayerNorm)
            and hasattr(m, "dropout"))


def find_adapter_sites(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """[(layer index, "mh_adapter" | "output_adapter", output module)] in layer order."""
    sites = []
    layers = [m for m in model.modules()
              if hasattr(m, "attention") and _is_output_block(getattr(m, "output", None))
              and _is_output_block(getattr(m.attention, "output", None))]
    for i, layer in enumerate(layers):
        sites.append((i, "mh_adapter", layer.attention.output))
        sites.append((i, "output_adapter", layer.output))
    return sites


def _adapted_forward(self, hidden_states, input_tensor):
    h = self.dropout(self.dense(hidden_states))
    state: _AdapterState = self._effir_state
    name = state.active
    if name is None or name not in self.effir_adapters:
        return self.LayerNorm(h + input_tensor)
    cfg = state.configs[name]
    adapter = self.effir_adapters[name]
    if cfg.is_parallel:  # the adapter reads the sub-block input; its output joins the residual sum
        return adapter.forward_layernorm(input_tensor, h, self.LayerNorm, original_ln_before=False)
    return adapter.forward_layernorm(h, input_tensor, self.LayerNorm, original_ln_before=cfg.original_ln_before)


def _hidden_size(model, sites) -> int:
    sizes = {m.LayerNorm.normalized_shape[-1] for _, _, m in sites}
    if len(sizes) != 1:
        raise ValueError(f"unsupported model: encoder layers have different hidden sizes {sorted(sizes)}")
    return sizes.pop()


def add_adapters(model: nn.Module, config="seq_bn", name: str = "default", *, backend: str = "auto",
                 hidden_size: int | None = None, **overrides) -> nn.Module:
    """Add a named bottleneck adapter to every layer of a BERT-family encoder, make it the active one, freeze
    everything else (only this adapter trains) and log trainable / total parameters. Returns `model`.

    config: "seq_bn" | "double_seq_bn" | "par_bn" (also "pfeiffer", "houlsby"), an AdapterConfig or a dict;
    overrides replace config fields (e.g. reduction_factor=8). hidden_size, when given, must match the model's.
    """
    cfg = resolve_config(config, **overrides)
    sites = find_adapter_sites(model)
    if not sites:
        raise ValueError(f"unsupported model {type(model).__name__}: no BERT-family encoder layers found "
                         "(modules with .attention.output and .output each holding dense, dropout, LayerNorm, "
                         f"post-LayerNorm). Supported: {', '.join(SUPPORTED)}")
    d = _hidden_size(model, sites)
    n_layers = sites[-1][0] + 1
    if any(i >= n_layers for i in cfg.leave_out):
        raise ValueError(f"leave_out {list(cfg.leave_out)} names layers this model does not have (it has "
                         f"{n_layers}: 0..{n_layers - 1})")
    if hidden_size is not None and hidden_size != d:
        raise ValueError(f"hidden size mismatch: the adapter expects hidden_size={hidden_size}, the model's "
                         f"layers have {d}")
    state = getattr(model, "_effir_state", None)
    if state is None:
        state = _AdapterState(d)
        model._effir_state = state
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"name must be a non-empty string without '.', got {name!r}")
    if name in state.configs:
        raise ValueError(f"an adapter named {name!r} already exists; existing: {sorted(state.configs)}")
    state.configs[name] = cfg
    for layer, loc, module in sites:
        if not hasattr(module, "effir_adapters"):
            module.effir_adapters = nn.ModuleDict()
            module._effir_state = state
            module.forward = types.MethodType(_adapted_forward, module)
        if getattr(cfg, loc) and layer not in cfg.leave_out:
            ref = module.LayerNorm.weight
            module.effir_adapters[name] = BottleneckAdapter(
                d, cfg.reduction_factor, cfg.non_linearity, cfg.scaling, backend=backend,
                init_weights=cfg.init_weights).to(device=ref.device, dtype=ref.dtype)
    set_active_adapter(model, name)
    s = adapter_summary(model)
    log.info("effir: added adapter %r (%s): %d trainable of %d parameters (%.3f%%)", name, cfg.to_dict()["name"],
             s["trainable"], s["total"], s["trainable_percent"])
    return model


def _state(model) -> _AdapterState:
    state = getattr(model, "_effir_state", None)
    if state is None:
        raise ValueError("model has no effir adapters; call effir.add_adapters(model, ...) first")
    return state


def set_active_adapter(model: nn.Module, name: str | None, *, train: bool = True) -> None:
    """Make adapter `name` the one that runs (None: plain backbone). With train=True only its parameters
    require grad; every other parameter (backbone, other adapters) is frozen."""
    state = _state(model)
    if name is not None and name not in state.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    state.active = name
    if train:
        for p in model.parameters():
            p.requires_grad_(False)
        for pname, p in model.named_parameters():
            if name is not None and f"effir_adapters.{name}." in pname:
                p.requires_grad_(True)


def adapter_names(model: nn.Module) -> list[str]:
    return sorted(_state(model).configs)


def adapter_summary(model: nn.Module) -> dict:
    """{'trainable', 'total', 'trainable_percent', 'adapter_params': {name: count}, 'active'}."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per = {}
    for pname, p in model.named_parameters():
        if "effir_adapters." in pname:
            key = pname.split("effir_adapters.", 1)[1].split(".", 1)[0]
            per[key] = per.get(key, 0) + p.numel()
    state = getattr(model, "_effir_state", None)
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1),
            "adapter_params": per, "active": state.active if state else None}
