"""Pure-PyTorch backend of the bottleneck adapter ops: the memory-lean CPU path.

Forward computes the output without keeping anything; backward recomputes the r-wide intermediate (and
the LayerNorm statistics) from the saved inputs, so the op saves only its inputs. Math in fp32 (fp64 for
fp64 inputs); outputs in the input dtype. Signatures: docs/backends.md (same as the
Triton and CUDA backends). All tensors 2-D (M, d) / parameter shapes, contiguous, one dtype.

Every (M, d)-wide pass costs about as much as the r-wide matmuls on a CPU, so the code counts them:
the up-projection, its bias, the scaling and the residual are one `addmm` (the bias rides along as an
extra column of ones in the (M, r) activation); backward recomputes only the LayerNorm statistics of the
post-adapter sum (never its output), folds the scaling into the r-wide tensors and skips the LayerNorm
parameter gradients when they are frozen (`ln_param_grads=False`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effir.reference.bottleneck_adapter import activate

# original_ln_before=True may be called with res=None and x = h + input_tensor (the op then saves only z)
SUPPORTS_SUMMED_INPUT = True
# adapter_ln_bwd accepts ln_param_grads=False (frozen LayerNorm: its two gradients come back as zeros)
SUPPORTS_LN_GRAD_MASK = True


def _cdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _act_grad(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return (a > 0).to(a.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
        return cdf + a * torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    s = torch.sigmoid(a)
    return s * (1.0 + a * (1.0 - s))


def _stats(v: torch.Tensor, eps: float):
    """(mean, rstd) of LayerNorm over the last dim, (M, 1). aten's fused layer norm (its output is thrown away)
    is several times faster on CPU than torch.var_mean."""
    _, mean, rstd = torch.native_layer_norm(v, (v.shape[-1],), None, None, eps)
    return mean, rstd


def _up_residual(base, h, w_up, b_up, scaling):
    """base + scaling * (h @ w_upᵀ + b_up) in one (M, d) pass: [h, 1] @ [w_up, b_up]ᵀ accumulated onto base."""
    h1 = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
    w1 = torch.cat([w_up, b_up[:, None]], dim=1)
    return torch.addmm(base, h1, w1.t(), alpha=scaling)


def _bottleneck(u, w_down, b_down, activation):
    a = F.linear(u, w_down, b_down)
    return a, activate(a, activation)


def _cast(c, *ts):
    return [t.to(c) if t is not None else None for t in ts]


def adapter_fwd(x, w_down, b_down, w_up, b_up, activation: str, scaling: float) -> torch.Tensor:
    """y = x + scaling * f(x); x (M, d) -> (M, d), same dtype."""
    x_, wd, bd, wu, bu = _cast(_cdt(x), x, w_down, b_down, w_up, b_up)
    _, h = _bottleneck(x_, wd, bd, activation)
    return _up_residual(x_, h, wu, bu, scaling).to(x.dtype)


def _bottleneck_bwd(dv, u, a, h, w_down, w_up, scaling, activation):
    """Gradients of scaling * f(u) given dv (M, d): (du, dw_down, db_down, dw_up, db_up); scaling stays r-wide."""
    dh = torch.mm(dv, w_up).mul_(scaling)                       # (M, r)
    da = dh.mul_(_act_grad(a, activation))
    dw_up = torch.mm(dv.t(), h).mul_(scaling)                   # (d, r)
    db_up = dv.sum(0).mul_(scaling)
    return torch.mm(da, w_down), torch.mm(da.t(), u), da.sum(0), dw_up, db_up


def adapter_bwd(dy, x, w_down, b_down, w_up, b_up, activation: str, scaling: float):
    """(dx, dw_down, db_down, dw_up, db_up). Only the r-wide activation is recomputed: y itself is not needed."""
    c = _cdt(x)
    dy_, x_, wd, bd, wu = _cast(c, dy, x, w_down, b_down, w_up)
    a, h = _bottleneck(x_, wd, bd, activation)
    du, dwd, dbd, dwu, dbu = _bottleneck_bwd(dy_, x_, a, h, wd, wu, scaling, activation)
    dx = du.add_(dy_)
    return (dx.to(x.dtype), dwd.to(w_down.dtype), dbd.to(b_down.dtype), dwu.to(w_up.dtype), dbu.to(b_up.dtype))


def adapter_ln_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool) -> torch.Tensor:
    """LN(x + s*f(x) + res), or with original_ln_before LN(z + s*f(LN(z))), z = x (+ res); (M, d)."""
    x_, res_, wd, bd, wu, bu, lw, lb = _cast(_cdt(x), x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias)
    d = x.shape[-1]
    if original_ln_before:
        z = x_ if res is None else (x + res).to(x_.dtype)  # the sum in the input dtype, as torch's add gives it
        u, base = F.layer_norm(z, (d,), lw, lb, eps), z
    else:
        u, base = x_, x_ + res_
    _, h = _bottleneck(u, wd, bd, activation)
    v = _up_residual(base, h, wu, bu, scaling)
    return F.layer_norm(v, (d,), lw, lb, eps).to(x.dtype)


def adapter_ln_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool, ln_param_grads: bool = True):
    """(dx, dres, dw_down, db_down, dw_up, db_up, dln_weight, dln_bias); dres None when res is None.
    ln_param_grads=False: dln_weight, dln_bias come back as zeros (frozen LayerNorm), the reductions skipped."""
    c = _cdt(x)
    dy_, x_, res_, wd, bd, wu, bu, lw, lb = _cast(c, dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias)
    d = x.shape[-1]
    mask = [True, ln_param_grads, ln_param_grads]
    # recompute: the pre-LN statistics and output (original_ln_before), the r-wide activation, the post-adapter
    # sum v and only its statistics
    if original_ln_before:
        z = x_ if res is None else (x + res).to(x_.dtype)
        u, mean1, rstd1 = torch.native_layer_norm(z, (d,), lw, lb, eps)
        base = z
    else:
        u, base = x_, x_ + res_
    a, h = _bottleneck(u, wd, bd, activation)
    v = _up_residual(base, h, wu, bu, scaling)
    mean2, rstd2 = _stats(v, eps)
    dv, dlw, dlb = torch.ops.aten.native_layer_norm_backward(dy_, v, (d,), mean2, rstd2, lw, lb, mask)
    del v
    du, dwd, dbd, dwu, dbu = _bottleneck_bwd(dv, u, a, h, wd, wu, scaling, activation)
    if original_ln_before:
        dz1, dlw1, dlb1 = torch.ops.aten.native_layer_norm_backward(du, z, (d,), mean1, rstd1, lw, lb, mask)
        dx = dz1.add_(dv)
        dres = None if res is None else dx
        if ln_param_grads:
            dlw, dlb = dlw + dlw1, dlb + dlb1
    else:
        dx, dres = du.add_(dv), dv
    if not ln_param_grads:
        dlw, dlb = torch.zeros_like(lw), torch.zeros_like(lb)
    return (dx.to(x.dtype), dres.to(x.dtype) if dres is not None else None, dwd.to(w_down.dtype),
            dbd.to(b_down.dtype), dwu.to(w_up.dtype), dbu.to(b_up.dtype), dlw.to(ln_weight.dtype),
            dlb.to(ln_bias.dtype))
