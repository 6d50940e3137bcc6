"""Bottleneck-adapter backend "cuda": thin calls into the compiled extension (`torch.ops.effir_C.adapter_*`).

The four functions of the adapter backend contract (see effir/ops/bottleneck_adapter.py):
x, res, dy (M, d) contiguous; w_down (r, d), b_down (r,), w_up (d, r), b_up (d,), ln_weight / ln_bias (d,),
all one dtype (fp32 / fp16 / bf16 / fp64) on one CUDA device; outputs in that dtype, fp32 (fp64) accumulation.
Kernels: csrc/bottleneck_adapter.cu; design: csrc/README.md.
"""
from __future__ import annotations

from effir.ops._cuda_ext import ops


def adapter_fwd(x, w_down, b_down, w_up, b_up, activation: str, scaling: float):
    """y (M, d) = x + scaling * (act(x w_downᵀ + b_down) w_upᵀ + b_up)."""
    return ops().adapter_fwd(x, w_down, b_down, w_up, b_up, _act(activation), float(scaling))


def adapter_bwd(dy, x, w_down, b_down, w_up, b_up, activation: str, scaling: float):
    """(dx (M, d), dw_down (r, d), db_down (r,), dw_up (d, r), db_up (d,)); recomputes the intermediate."""
    return tuple(ops().adapter_bwd(dy, x, w_down, b_down, w_up, b_up, _act(activation), float(scaling)))


def adapter_ln_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool):
    """y (M, d): LN(x + s f(x) + res), or with original_ln_before z = x + res, LN(z + s f(LN(z)))."""
    return ops().adapter_ln_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, _act(activation),
                                float(scaling), float(eps), bool(original_ln_before))


def adapter_ln_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool):
    """(dx, dres, dw_down, db_down, dw_up, db_up, dln_weight, dln_bias); recomputes everything from x, res."""
    return tuple(ops().adapter_ln_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, _act(activation),
                                      float(scaling), float(eps), bool(original_ln_before)))


def _act(activation: str) -> str:
    return "silu" if activation == "swish" else activation
