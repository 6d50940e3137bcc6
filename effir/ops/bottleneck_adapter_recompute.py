"""Pure-PyTorch backend of the bottleneck adapter ops: the memory-lean CPU path.

Forward computes the output without keeping anything; backward recomputes the r-wide intermediate (and
the LayerNorm statistics) from the saved inputs, so the op saves only its inputs. Math in fp32 (fp64 for
fp64 inputs); outputs in the input dtype. Signatures: /work/notes/contract_adapter.md (same as the
Triton and CUDA backends). All tensors 2-D (M, d) / parameter shapes, contiguous, one dtype.
"""
from __future__ import annotations

# original_ln_before=True may be called with res=None and x = h + input_tensor (the op then saves only z)
SUPPORTS_SUMMED_INPUT = True

import math

import torch
import torch.nn.functional as F

from effir.reference.bottleneck_adapter import activate


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


def _ln(v, w, b, eps):
    """(out, saved) of a LayerNorm over the last dim; aten's fused kernels (one pass each way on CPU)."""
    out, mean, rstd = torch.native_layer_norm(v, (v.shape[-1],), w, b, eps)
    return out, (v, mean, rstd)


def _ln_bwd(dout, saved, w, b):
    """(dv, dw, db) of out = LayerNorm(v) * w + b."""
    v, mean, rstd = saved
    dv, dw, db = torch.ops.aten.native_layer_norm_backward(dout, v, (v.shape[-1],), mean, rstd, w, b,
                                                           [True, True, True])
    return dv, dw, db


def _forward(x, res, w_down, b_down, w_up, b_up, lnw, lnb, activation, scaling, eps, pre_ln, post_ln):
    z = x if res is None else x + res
    u, ln1 = _ln(z, lnw, lnb, eps) if pre_ln else (x, None)
    a = F.linear(u, w_down, b_down)
    h = activate(a, activation)
    v = z + scaling * F.linear(h, w_up, b_up)
    out, ln2 = _ln(v, lnw, lnb, eps) if post_ln else (v, None)
    return out, dict(u=u, ln1=ln1, a=a, h=h, ln2=ln2)


def _backward(dy, x, res, w_down, b_down, w_up, b_up, lnw, lnb, activation, scaling, eps, pre_ln, post_ln):
    c = _cdt(x)
    cast = [t.to(c) if t is not None else None for t in (x, res, w_down, b_down, w_up, b_up, lnw, lnb)]
    x_, res_, wd, bd, wu, bu, lw, lb = cast
    _, s = _forward(x_, res_, wd, bd, wu, bu, lw, lb, activation, scaling, eps, pre_ln, post_ln)
    dy = dy.to(c)
    dlnw = dlnb = None
    if post_ln:
        dv, dlnw, dlnb = _ln_bwd(dy, s["ln2"], lw, lb)
    else:
        dv = dy
    dp = scaling * dv
    dw_up, db_up = dp.t() @ s["h"], dp.sum(0)
    da = (dp @ wu) * _act_grad(s["a"], activation)
    dw_down, db_down = da.t() @ s["u"], da.sum(0)
    du = da @ wd
    if pre_ln:
        dz1, dw1, db1 = _ln_bwd(du, s["ln1"], lw, lb)
        dlnw, dlnb = dlnw + dw1, dlnb + db1
        dx = dres = dv + dz1
    else:
        dx, dres = dv + du, dv
    out = (dx.to(x.dtype), dres.to(x.dtype) if res is not None else None,
           dw_down.to(w_down.dtype), db_down.to(b_down.dtype), dw_up.to(w_up.dtype), db_up.to(b_up.dtype))
    if lnw is not None:
        out += (dlnw.to(lnw.dtype), dlnb.to(lnb.dtype))
    return out


def adapter_fwd(x, w_down, b_down, w_up, b_up, activation: str, scaling: float) -> torch.Tensor:
    """y = x + scaling * f(x); x (M, d) -> (M, d), same dtype."""
    c = _cdt(x)
    args = [t.to(c) for t in (x, w_down, b_down, w_up, b_up)]
    return _forward(*args[:1], None, *args[1:], None, None, activation, scaling, 0.0, False, False)[0].to(x.dtype)


def adapter_bwd(dy, x, w_down, b_down, w_up, b_up, activation: str, scaling: float):
    """(dx, dw_down, db_down, dw_up, db_up)."""
    dx, _, *rest = _backward(dy, x, None, w_down, b_down, w_up, b_up, None, None, activation, scaling, 0.0,
                             False, False)
    return (dx, *rest)


def adapter_ln_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool) -> torch.Tensor:
    """LN(x + s*f(x) + res), or with original_ln_before LN(z + s*f(LN(z))), z = x + res; (M, d)."""
    c = _cdt(x)
    args = [t.to(c) if t is not None else None for t in (x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias)]
    return _forward(*args, activation, scaling, eps, original_ln_before, True)[0].to(x.dtype)


def adapter_ln_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                   eps: float, original_ln_before: bool):
    """(dx, dres, dw_down, db_down, dw_up, db_up, dln_weight, dln_bias)."""
    return _backward(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation, scaling, eps,
                     original_ln_before, True)
