"""Triton backend of the bottleneck adapter ops (kernels in kernels/bottleneck_adapter.py).

Same four functions and signatures as the other backends (docs/backends.md), plus the optional
`adapter_ln_pre_fwd`: 2-D (M, d) contiguous inputs of one dtype, or mixed (SUPPORTS_MIXED: 16-bit x and adapter
weights, fp32 res and LayerNorm); backward recomputes the intermediate, fp32 accumulation, no atomics.
"""
from __future__ import annotations

# original_ln_before=True may be called with res=None and x = h + input_tensor (the op then saves only z)
SUPPORTS_SUMMED_INPUT = True
# adapter_ln_bwd accepts ln_param_grads=False (frozen LayerNorm: its two gradients come back uninitialised)
SUPPORTS_LN_GRAD_MASK = True
# the adapter + LayerNorm ops take a 16-bit x and adapter weights with an fp32 res and LayerNorm (autocast's mix)
SUPPORTS_MIXED = True

import torch


def _k():
    # imported lazily: `import effir` never imports Triton by itself
    from kernels import bottleneck_adapter as k

    return k


def adapter_fwd(x, w_down, b_down, w_up, b_up, activation: str, scaling: float) -> torch.Tensor:
    return _k().fused_adapter_fwd(x, None, w_down, b_down, w_up, b_up, None, None, activation, scaling, 0.0,
                                  False, False)


def adapter_bwd(dy, x, w_down, b_down, w_up, b_up, activation: str, scaling: float):
    dx, _, dwd, dbd, dwu, dbu, _, _ = _k().fused_adapter_bwd(dy, x, None, w_down, b_down, w_up, b_up, None, None,
                                                             activation, scaling, 0.0, False, False)
    return dx, dwd, dbd, dwu, dbu


def adapter_ln_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool) -> torch.Tensor:
    return _k().fused_adapter_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation, scaling,
                                  eps, original_ln_before, True)


def adapter_ln_pre_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                       eps: float):
    """(y, z): the Pfeiffer forward of x + res that also writes z = x + res (in their wider dtype, as torch's add
    gives it) for the backward."""
    z = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype), device=x.device)
    y = _k().fused_adapter_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation, scaling, eps,
                               True, True, z_out=z)
    return y, z


def adapter_ln_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool, ln_param_grads: bool = True):
    return _k().fused_adapter_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation,
                                  scaling, eps, original_ln_before, True, ln_param_grads)
