"""Public fused bottleneck-adapter ops: validation, backend dispatch, torch.library registration.

`bottleneck_adapter(x, ...)`            y = x + scaling * (act(x @ w_downᵀ + b_down) @ w_upᵀ + b_up)
`bottleneck_adapter_layernorm(h, t, ...)` the adapter plus the post-LN encoder's residual + LayerNorm:
    original_ln_before=False:  LN(h + scaling*f(h) + t)             (Houlsby / double_seq_bn; par_bn)
    original_ln_before=True:   z = h + t;  LN(z + scaling*f(LN(z)))  (Pfeiffer / seq_bn)

Backends ("auto" resolves through effir.backends): "reference" (plain autograd), "recompute" (pure torch),
"triton", "cuda". Every non-reference backend is one `effir::` custom op whose autograd saves only the
inputs and the parameters (Pfeiffer: their sum z = h + t instead of h and t; the Triton forward writes z itself,
`effir::bottleneck_adapter_ln_pre_fwd`); backward recomputes the r-wide intermediate.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from effir._validation import check_tensor
from effir.backends import resolve_backend
from effir.reference.bottleneck_adapter import (
    bottleneck_adapter_layernorm_reference,
    bottleneck_adapter_reference,
    canonical_activation,
)

_MODULES = {
    "recompute": "effir.ops.bottleneck_adapter_recompute",
    "triton": "effir.ops.bottleneck_adapter_triton",
    "cuda": "effir.ops.bottleneck_adapter_cuda",
}


def _impl(backend: str):
    return importlib.import_module(_MODULES[backend])


# What the built-in backends offer beyond the four required functions (docs/backends.md), known here without an
# import: torch.compile does not trace imports. Other backends are asked through their module's attributes.
_BUILTIN_EXTRAS = {
    "recompute": {"SUPPORTS_SUMMED_INPUT"},
    "triton": {"SUPPORTS_SUMMED_INPUT", "adapter_ln_pre_fwd", "SUPPORTS_MIXED"},
}


def _offers(backend: str, extra: str) -> bool:
    """Whether `backend` has `extra`: SUPPORTS_SUMMED_INPUT (the Pfeiffer variant may take z = h + t with
    res=None), adapter_ln_pre_fwd (its Pfeiffer forward writes z itself, so no add kernel reads h and t and
    writes z before the op reads z again) or SUPPORTS_MIXED (the adapter + LayerNorm op takes a 16-bit h and
    adapter weights with an fp32 residual and LayerNorm, see `bottleneck_adapter_layernorm`)."""
    if backend in _BUILTIN_EXTRAS:
        return extra in _BUILTIN_EXTRAS[backend]
    return bool(getattr(_impl(backend), extra, False))


# ---------------------------------------------------------------- plain adapter
@torch.library.custom_op("effir::bottleneck_adapter_fwd", mutates_args=())
def _fwd(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, activation: str,
         scaling: float, backend: str) -> Tensor:
    return _impl(backend).adapter_fwd(x, w_down, b_down, w_up, b_up, activation, scaling)


@_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, activation, scaling, backend):
    return torch.empty_like(x)


@torch.library.custom_op("effir::bottleneck_adapter_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, activation: str,
         scaling: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _impl(backend).adapter_bwd(dy, x, w_down, b_down, w_up, b_up, activation, scaling)
    return tuple(t.contiguous() for t in out)


@_bwd.register_fake
def _(dy, x, w_down, b_down, w_up, b_up, activation, scaling, backend):
    return tuple(torch.empty_like(t) for t in (x, w_down, b_down, w_up, b_up))


def _setup(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, activation, scaling, backend = inputs
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up)  # inputs only: the intermediate is recomputed
    ctx.args = (activation, scaling, backend)


def _backward(ctx, dy):
    grads = _bwd(dy.contiguous(), *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- adapter + residual + LayerNorm
@torch.library.custom_op("effir::bottleneck_adapter_ln_fwd", mutates_args=())
def _ln_fwd(x: Tensor, res: Optional[Tensor], w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
            ln_weight: Tensor, ln_bias: Tensor, activation: str, scaling: float, eps: float, original_ln_before: bool,
            backend: str) -> Tensor:
    return _impl(backend).adapter_ln_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation,
                                         scaling, eps, original_ln_before)


def _out_dtype(x: Tensor, res: Optional[Tensor]) -> torch.dtype:
    """The output dtype of the adapter + LayerNorm op: x's, or the wider of a mixed pair (16-bit x, fp32 res)."""
    return x.dtype if res is None else torch.promote_types(x.dtype, res.dtype)


@_ln_fwd.register_fake
def _(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation, scaling, eps, original_ln_before, backend):
    return x.new_empty(x.shape, dtype=_out_dtype(x, res))


@torch.library.custom_op("effir::bottleneck_adapter_ln_bwd", mutates_args=())
def _ln_bwd(dy: Tensor, x: Tensor, res: Optional[Tensor], w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
            ln_weight: Tensor, ln_bias: Tensor, activation: str, scaling: float, eps: float,
            original_ln_before: bool, backend: str, ln_param_grads: bool = True
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(backend)
    # a frozen LayerNorm (the usual case: adapters train, the backbone does not) needs no weight/bias gradient;
    # backends that can skip those reductions say so (docs/backends.md, SUPPORTS_LN_GRAD_MASK)
    kw = {"ln_param_grads": ln_param_grads} if getattr(impl, "SUPPORTS_LN_GRAD_MASK", False) else {}
    out = impl.adapter_ln_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation,
                              scaling, eps, original_ln_before, **kw)
    dx, dres = out[0], out[1]
    if res is None:  # Pfeiffer variant: x is z = h + t; an empty placeholder keeps the output schema fixed
        dres = x.new_empty(0)
    elif dres is dx or dres.data_ptr() == dx.data_ptr():
        dres = dx.clone()  # outputs of a custom op must not alias each other
    return (dx.contiguous(), dres.contiguous(), *(t.contiguous() for t in out[2:]))


@_ln_bwd.register_fake
def _(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation, scaling, eps, original_ln_before,
      backend, ln_param_grads=True):
    dres = torch.empty_like(res) if res is not None else x.new_empty(0)
    return (torch.empty_like(x), dres, *(torch.empty_like(t) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias)))


def _ln_setup(ctx, inputs, output):
    x, res, *params = inputs[:8]
    ctx.has_res = res is not None
    ctx.save_for_backward(x, res, *params)  # inputs only
    ctx.args = tuple(inputs[8:])


def _ln_backward(ctx, dy):
    x, res, *params = ctx.saved_tensors
    ln_grads = any(ctx.needs_input_grad[6:8])
    grads = _ln_bwd(dy.contiguous(), x, res if ctx.has_res else None, *params, *ctx.args, ln_grads)
    dres = grads[1] if ctx.has_res else None
    dln = grads[6:8] if ln_grads else (None, None)
    return (grads[0], dres, *grads[2:6], *dln, None, None, None, None, None)


_ln_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


# ---------------------------------------------------------------- Pfeiffer: the forward also writes z = h + t
@torch.library.custom_op("effir::bottleneck_adapter_ln_pre_fwd", mutates_args=())
def _ln_pre_fwd(h: Tensor, t: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                ln_weight: Tensor, ln_bias: Tensor, activation: str, scaling: float, eps: float,
                backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).adapter_ln_pre_fwd(h, t, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation,
                                             scaling, eps)


@_ln_pre_fwd.register_fake
def _(h, t, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation, scaling, eps, backend):
    dt = _out_dtype(h, t)
    return h.new_empty(h.shape, dtype=dt), h.new_empty(h.shape, dtype=dt)


def _ln_pre_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], *inputs[2:8])  # z and the parameters: one activation, as with the add
    ctx.args = tuple(inputs[8:])
    ctx.mark_non_differentiable(output[1])
    # z has no gradient: without this, autograd would fill a zero (M, d) tensor for it on every backward (a
    # 100 MB memset at 65536 x 768 in bf16, 33 us of the third H100 run's step)
    ctx.set_materialize_grads(False)


def _ln_pre_backward(ctx, dy, _dz):
    z, *params = ctx.saved_tensors
    activation, scaling, eps, backend = ctx.args
    ln_grads = any(ctx.needs_input_grad[6:8])
    grads = _ln_bwd(dy.contiguous(), z, None, *params, activation, scaling, eps, True, backend, ln_grads)
    dln = grads[6:8] if ln_grads else (None, None)
    return (grads[0], grads[0], *grads[2:6], *dln, None, None, None, None)  # dh = dt = dz (autograd casts dh)


_ln_pre_fwd.register_autograd(_ln_pre_backward, setup_context=_ln_pre_setup)


# ---------------------------------------------------------------- public API
def _check(x, w_down, b_down, w_up, b_up, x_name="x"):
    check_tensor(x_name, x)
    if x.dim() < 1:
        raise ValueError(f"{x_name} must have shape (..., d), got a 0-dim tensor")
    d = x.shape[-1]
    kw = dict(dtypes=(x.dtype,), device=x.device)
    check_tensor("w_down", w_down, ndim=2, shape=(None, d), **kw)
    r = w_down.shape[0]
    check_tensor("b_down", b_down, shape=(r,), **kw)
    check_tensor("w_up", w_up, shape=(d, r), **kw)
    check_tensor("b_up", b_up, shape=(d,), **kw)
    return d


def _scaling(scaling) -> float:
    if isinstance(scaling, Tensor) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling must be a python float, got {type(scaling).__name__}")
    return float(scaling)


def bottleneck_adapter(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, *,
                       activation: str = "relu", scaling: float = 1.0, backend: str = "auto") -> Tensor:
    """Fused bottleneck adapter y = x + scaling * (act(x @ w_downᵀ + b_down) @ w_upᵀ + b_up).

    x: (..., d) float tensor (fp32 / fp16 / bf16 / fp64; padding rows are fine, any strides);
    w_down (r, d), b_down (r,), w_up (d, r), b_up (d,) in nn.Linear layout, same dtype and device as x.
    activation: "relu" | "gelu" (exact erf) | "silu" / "swish". Returns (..., d) in x's dtype.
    Only x and the parameters are saved for backward.
    """
    d = _check(x, w_down, b_down, w_up, b_up)
    act = canonical_activation(activation)
    scaling = _scaling(scaling)
    backend = resolve_backend("adapter", backend, x.device)
    if backend == "reference":
        return bottleneck_adapter_reference(x, w_down, b_down, w_up, b_up, activation=act, scaling=scaling)
    x2 = x.reshape(-1, d).contiguous()
    params = [t.contiguous() for t in (w_down, b_down, w_up, b_up)]
    return _fwd(x2, *params, act, scaling, backend).view(x.shape)


def bottleneck_adapter_layernorm(h: Tensor, input_tensor: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor,
                                 b_up: Tensor, ln_weight: Tensor, ln_bias: Tensor, *, activation: str = "relu",
                                 scaling: float = 1.0, eps: float = 1e-5, original_ln_before: bool = False,
                                 backend: str = "auto") -> Tensor:
    """Adapter fused with the residual + LayerNorm that follows it in post-LN encoders (BERT, XLM-R).

    original_ln_before=False: LN(h + scaling*f(h) + input_tensor)  (Houlsby / double_seq_bn: h is the
    sub-block output, input_tensor its input; par_bn: h is the sub-block input, input_tensor its output).
    original_ln_before=True (Pfeiffer / seq_bn): z = h + input_tensor; LN(z + scaling*f(LN(z))), one
    LayerNorm (ln_weight, ln_bias) for both, as AdapterHub reuses the layer's module.
    h, input_tensor: (..., d), same shape; ln_weight, ln_bias: (d,) (frozen or trainable); parameters as in
    `bottleneck_adapter`. Returns (..., d) in input_tensor's dtype. Saves only h and input_tensor
    (original_ln_before=True: only their sum) and the parameters.
    Mixed precision, as bf16 autocast hands a BERT layer's tensors: h and the adapter parameters 16-bit,
    input_tensor (the residual stream) and the LayerNorm parameters fp32. Then the sums and both LayerNorms are
    fp32 and the adapter's products take 16-bit operands (as autocast runs a linear layer), the output is fp32.
    Backends without SUPPORTS_MIXED (e.g. "recompute") get h and the adapter parameters widened to fp32.
    """
    d = _check(h, w_down, b_down, w_up, b_up, x_name="h")
    mixed_ok = (h.dtype,) + ((torch.float32,) if h.dtype in (torch.float16, torch.bfloat16) else ())
    check_tensor("input_tensor", input_tensor, shape=tuple(h.shape), dtypes=mixed_ok, device=h.device)
    dt = input_tensor.dtype  # the computation's dtype: h's, or fp32 for a mixed pair
    check_tensor("ln_weight", ln_weight, shape=(d,), dtypes=(dt,), device=h.device)
    check_tensor("ln_bias", ln_bias, shape=(d,), dtypes=(dt,), device=h.device)
    act = canonical_activation(activation)
    scaling = _scaling(scaling)
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    backend = resolve_backend("adapter_ln", backend, h.device, dt)
    if dt != h.dtype and backend != "reference" and not _offers(backend, "SUPPORTS_MIXED"):
        h, w_down, b_down, w_up, b_up = (t.to(dt) for t in (h, w_down, b_down, w_up, b_up))
    if backend == "reference":
        return bottleneck_adapter_layernorm_reference(
            h, input_tensor, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation=act, scaling=scaling,
            eps=float(eps), original_ln_before=bool(original_ln_before))
    x2 = h.reshape(-1, d)
    r2 = input_tensor.reshape(-1, d)
    params = [t.contiguous() for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias)]
    # The Pfeiffer output depends on z = h + t only, so with gradients the op saves z alone: written by the
    # forward kernel itself where the backend can, else by one add here (contiguous whatever h and t are).
    # Without gradients nothing is saved and the backend sums h + t on the fly.
    grad = torch.is_grad_enabled() and any(a.requires_grad for a in (h, input_tensor, *params))
    if original_ln_before and grad and _offers(backend, "adapter_ln_pre_fwd"):
        y = _ln_pre_fwd(x2.contiguous(), r2.contiguous(), *params, act, scaling, float(eps), backend)[0]
    else:
        if original_ln_before and grad and _offers(backend, "SUPPORTS_SUMMED_INPUT"):
            x2, r2 = x2 + r2, None
        else:
            r2 = r2.contiguous()
        y = _ln_fwd(x2.contiguous(), r2, *params, act, scaling, float(eps), bool(original_ln_before), backend)
    return y.view(h.shape)
