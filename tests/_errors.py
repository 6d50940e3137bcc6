"""The relative-error rule shared by every kernel test.

A backend's error against a float64 reference must be no worse than torch's own error in the same dtype
(the reference op evaluated in that dtype) times a small factor. The floor keeps the rule meaningful when
torch happens to be exact (e.g. fp32 on tiny sizes): it is a few units in the last place of the dtype.
"""
from __future__ import annotations

import torch

FACTOR = 4.0  # headroom for a different (but equally valid) summation order
_ULPS = 8.0
# 16-bit: torch's own error is rarely below an ulp there, and 8 ulps of bf16 (6%, so a 25% error passed) hid
# real mistakes: a seq_bn dW_down with its mean term 5% off passed. The whole suite passes at 1 ulp (session 8)
_ULPS_16BIT = 2.0


def rel_err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (Frobenius over all elements)."""
    x = x.detach().to(torch.float64)
    ref64 = ref64.detach().to(torch.float64)
    denom = ref64.norm().clamp_min(torch.finfo(torch.float64).tiny)
    return float((x - ref64).norm() / denom)


def error_bound(err_torch: float, dtype: torch.dtype, cond: float = 1.0, factor: float = FACTOR) -> float:
    """The largest relative error the rule allows: factor * max(torch's own error, a few ulps of dtype * cond)."""
    ulps = _ULPS_16BIT if dtype in (torch.float16, torch.bfloat16) else _ULPS
    return factor * max(err_torch, ulps * torch.finfo(dtype).eps * max(1.0, cond))


def assert_no_worse_than_torch(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    dtype: torch.dtype,
    factor: float = FACTOR,
    cond: float = 1.0,
) -> None:
    """Assert rel_err(out) <= factor * max(rel_err(torch_same_dtype), floor(dtype) * cond).

    cond (>= 1): the condition number of a quantity that is a sum of terms, sum |terms| / |sum|. No order of
    summation gets such a sum closer than a few eps * cond, so one output of it (a scalar: torch's own error is
    then one draw, and can be small by luck) is held to that floor; well-conditioned outputs keep cond = 1."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out.detach().to(torch.float64)).all(), f"{name}: non-finite values"
    err = rel_err(out, ref64)
    err_torch = rel_err(torch_same_dtype, ref64)
    bound = error_bound(err_torch, dtype, cond, factor)
    assert err <= bound, (
        f"{name}: rel. error {err:.3e} vs float64 exceeds {bound:.3e} = {factor} x max(torch's own {dtype} error "
        f"{err_torch:.3e}, a few ulps)"
    )
