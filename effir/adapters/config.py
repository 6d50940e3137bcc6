"""Bottleneck-adapter configurations: frozen dataclasses with AdapterHub's meanings, and a registry.

Placement in a post-LayerNorm encoder layer (BERT, RoBERTa, XLM-R); f = down -> act -> up, s = scaling:
- seq_bn (Pfeiffer et al. 2020): after the feed-forward block; the layer's LayerNorm runs before the
  adapter too:  z = ffn_out + ffn_in;  out = LN(z + s*f(LN(z))).  Reduction 16, relu.
- double_seq_bn (Houlsby et al. 2019): after attention and after the feed-forward block:
  out = LN(h + s*f(h) + sub_in), h = sub-block output.  Reduction 16, swish.
- par_bn (He et al. 2021): parallel to the feed-forward block:  out = LN(h + ffn_in + s*f(ffn_in)).
  Reduction 2, scaling 4.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from effir.reference.bottleneck_adapter import canonical_activation


@dataclass(frozen=True)
class AdapterConfig:
    """A bottleneck adapter's architecture (AdapterHub field names where they exist).

    mh_adapter: adapter after the attention block; output_adapter: after the feed-forward block.
    reduction_factor: r = hidden_size // reduction_factor (at least 1). non_linearity: relu | gelu | swish/silu.
    original_ln_before: the layer's LayerNorm is applied to (sub-block output + residual) before the adapter.
    is_parallel: the adapter reads the sub-block input (parallel to it) instead of its output.
    init_weights: "bert" (down N(0, 0.02)) or "mam_adapter" (down Kaiming-uniform); the up-projection
    always starts at zero, so a new adapter is the identity.
    leave_out: encoder layer indices (0-based) that get no adapter.
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    original_ln_before: bool = False
    is_parallel: bool = False
    init_weights: str = "bert"
    architecture: str = "bottleneck"
    leave_out: tuple[int, ...] = ()

    def __post_init__(self):
        leave_out = self.leave_out
        if not isinstance(leave_out, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in leave_out):
            raise ValueError(f"leave_out must be a list of layer indices >= 0, got {leave_out!r}")
        # a tuple, whatever came in (a JSON list): the dataclass stays frozen and hashable
        object.__setattr__(self, "leave_out", tuple(sorted(set(leave_out))))
        canonical_activation(self.non_linearity)  # raises ValueError naming the choices
        if not (isinstance(self.reduction_factor, (int, float)) and self.reduction_factor > 0):
            raise ValueError(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling must be a float, got {self.scaling!r}")
        if self.init_weights not in ("bert", "mam_adapter"):
            raise ValueError(f"init_weights must be 'bert' or 'mam_adapter', got {self.init_weights!r}")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("at least one of mh_adapter / output_adapter must be True")
        if self.is_parallel and self.original_ln_before:
            raise ValueError("is_parallel and original_ln_before cannot both be True")

    def bottleneck_size(self, hidden_size: int) -> int:
        return max(1, int(hidden_size // self.reduction_factor))

    def to_dict(self) -> dict:
        """The fields, and "name": the preset this is (by class, or by equal fields: a config read from another
        library's file), else "custom"."""
        fields = dataclasses.asdict(self)
        name = _NAME_OF.get(type(self)) or next(
            (n for cls, n in _NAME_OF.items() if dataclasses.asdict(cls()) == fields), "custom")
        return {"name": name, **fields}

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        """The config `to_dict` wrote: a preset's class when "name" names one (its fields as given), else
        AdapterConfig."""
        data = dict(data)
        name = data.pop("name", None)
        fields = {f.name for f in dataclasses.fields(AdapterConfig)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown adapter config fields {sorted(unknown)}; known: {sorted(fields)}")
        preset = next((c for c, n in _NAME_OF.items() if n == name), AdapterConfig)
        return preset(**data)


@dataclass(frozen=True)
class SeqBnConfig(AdapterConfig):
    """Pfeiffer: after the feed-forward block, layer LayerNorm before and after, reduction 16, relu."""

    original_ln_before: bool = True
    non_linearity: str = "relu"
    reduction_factor: float = 16


@dataclass(frozen=True)
class DoubleSeqBnConfig(AdapterConfig):
    """Houlsby: after attention and after the feed-forward block, reduction 16, swish."""

    mh_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float = 16


@dataclass(frozen=True)
class ParBnConfig(AdapterConfig):
    """He et al.: parallel to the feed-forward block, reduction 2, scaling 4."""

    is_parallel: bool = True
    reduction_factor: float = 2
    scaling: float = 4.0
    init_weights: str = "mam_adapter"


ADAPTER_CONFIGS = {
    "seq_bn": SeqBnConfig,
    "pfeiffer": SeqBnConfig,
    "double_seq_bn": DoubleSeqBnConfig,
    "houlsby": DoubleSeqBnConfig,
    "par_bn": ParBnConfig,
}
_NAME_OF = {SeqBnConfig: "seq_bn", DoubleSeqBnConfig: "double_seq_bn", ParBnConfig: "par_bn"}


def resolve_config(config="seq_bn", **overrides) -> AdapterConfig:
    """A config object from a preset name, a dict or a config (then `overrides` replace fields)."""
    if isinstance(config, str):
        key = config.lower()
        if key not in ADAPTER_CONFIGS:
            raise ValueError(f"unknown adapter config {config!r}; supported: {sorted(ADAPTER_CONFIGS)} "
                             "(or an AdapterConfig / dict of its fields)")
        config = ADAPTER_CONFIGS[key]()
    elif isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    elif not isinstance(config, AdapterConfig):
        raise ValueError(f"config must be a preset name {sorted(ADAPTER_CONFIGS)}, a dict or an AdapterConfig, "
                         f"got {type(config).__name__}")
    if overrides:
        fields = {f.name for f in dataclasses.fields(AdapterConfig)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown adapter config overrides {sorted(unknown)}; known: {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    return config
