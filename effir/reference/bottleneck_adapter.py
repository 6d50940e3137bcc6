"""float64-capable torch references of the bottleneck adapter and its fused LayerNorm variant.

Plain autograd, no fusion: tests compare every backend against these evaluated in float64, and
`backend="reference"` of the public ops runs them as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu")
_ALIASES = {"swish": "silu", "gelu_exact": "gelu"}


def canonical_activation(name: str) -> str:
    """'relu' | 'gelu' (exact erf) | 'silu' ('swish' is an alias). Raises ValueError otherwise."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS + tuple(_ALIASES)}, got {name!r}")
    return key


def activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    act = canonical_activation(activation)
    if act == "relu":
        return F.relu(a)
    if act == "gelu":
        return F.gelu(a)  # exact erf form, as transformers' "gelu"
    return F.silu(a)


def adapter_delta(x, w_down, b_down, w_up, b_up, *, activation: str, scaling: float) -> torch.Tensor:
    """scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up); x (..., d), w_down (r, d), w_up (d, r).
    In the weights' dtype: a wider x (the fp32 LayerNorm output of a mixed-precision layer) is cast to it first,
    as autocast casts a linear layer's input."""
    return scaling * F.linear(activate(F.linear(x.to(w_down.dtype), w_down, b_down), activation), w_up, b_up)


def bottleneck_adapter_reference(x, w_down, b_down, w_up, b_up, *, activation: str = "relu",
                                 scaling: float = 1.0) -> torch.Tensor:
    """y = x + scaling * (act(x @ w_downᵀ + b_down) @ w_upᵀ + b_up).

    x (..., d); w_down (r, d); b_down (r,); w_up (d, r); b_up (d,); all one float dtype. Returns (..., d).
    """
    return x + adapter_delta(x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling)


def bottleneck_adapter_layernorm_reference(h, input_tensor, w_down, b_down, w_up, b_up, ln_weight, ln_bias, *,
                                           activation: str = "relu", scaling: float = 1.0, eps: float = 1e-5,
                                           original_ln_before: bool = False) -> torch.Tensor:
    """The adapter followed by the post-LN encoder's residual + LayerNorm, as AdapterHub places it.

    original_ln_before=False (double_seq_bn / Houlsby; par_bn with h = sub-block input and
    input_tensor = sub-block output):   LN(h + scaling * f(h) + input_tensor)
    original_ln_before=True (seq_bn / Pfeiffer: the layer's LayerNorm runs before the adapter too, and
    the adapter's residual is the un-normalised sum):   z = h + input_tensor;  LN(z + scaling * f(LN(z)))
    Both LayerNorms share ln_weight / ln_bias, as AdapterHub reuses the layer's module.
    h, input_tensor (..., d); ln_weight, ln_bias (d,). Returns (..., d). Mixed precision (as bf16 autocast hands
    a layer's tensors: h and the adapter weights 16-bit, input_tensor and the LayerNorm fp32): sums and LayerNorms
    in fp32, the adapter's products in h's dtype (`adapter_delta`); returns fp32.
    """
    d = h.shape[-1]
    kw = dict(activation=activation, scaling=scaling)
    if original_ln_before:
        z = h + input_tensor
        u = F.layer_norm(z, (d,), ln_weight, ln_bias, eps)
        v = z + adapter_delta(u, w_down, b_down, w_up, b_up, **kw)
    else:
        v = h + adapter_delta(h, w_down, b_down, w_up, b_up, **kw) + input_tensor
    return F.layer_norm(v, (d,), ln_weight, ln_bias, eps)
