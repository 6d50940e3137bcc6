"""InfoNCE dispatch: validation, backend choice, and the `effir::info_nce_fwd/bwd` torch.library ops.

Every fused backend ("chunked", "triton", "cuda") is a module `effir.ops.info_nce_<name>` exposing
`forward(q, docs, temperature, query_groups, doc_groups, pos_offset, symmetric) -> (loss, lse, dloss_dt)` and
`backward(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, pos_offset) -> (dq, ddocs)`
(contract in docs/backends.md). They are wrapped here in custom ops with
register_fake + register_autograd, so `torch.compile(fullgraph=True)` sees one opaque node and no graph break.
The temperature gradient is computed here from the forward's per-row d loss / d t.
"""
from __future__ import annotations

import importlib

import torch

from effir._validation import check_choice, check_tensor
from effir.backends import resolve_backend
from effir.reference.info_nce import reduce_rows, reference_rows

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _backend_module(name: str):
    return importlib.import_module(f"effir.ops.info_nce_{name}")


def _stat_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("effir::info_nce_fwd", mutates_args=())
def info_nce_fwd(q: torch.Tensor, docs: torch.Tensor, temperature: torch.Tensor, query_groups: torch.Tensor | None,
                 doc_groups: torch.Tensor | None, pos_offset: int, symmetric: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-direction row losses, log-sum-exps and d loss / d t, each (1 + symmetric, B) float32 (fp64 in)."""
    return tuple(_backend_module(backend).forward(q, docs, temperature, query_groups, doc_groups, pos_offset,
                                                  symmetric))


@info_nce_fwd.register_fake
def _(q, docs, temperature, query_groups, doc_groups, pos_offset, symmetric, backend):
    shape = (2 if symmetric else 1, q.shape[0])
    dt = _stat_dtype(q)
    return q.new_empty(shape, dtype=dt), q.new_empty(shape, dtype=dt), q.new_empty(shape, dtype=dt)


@torch.library.custom_op("effir::info_nce_bwd", mutates_args=())
def info_nce_bwd(q: torch.Tensor, docs: torch.Tensor, temperature: torch.Tensor, lse: torch.Tensor,
                 grad_loss: torch.Tensor, query_groups: torch.Tensor | None, doc_groups: torch.Tensor | None,
                 pos_offset: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_loss * loss) with respect to q (B, d) and docs (N, d), in their dtypes."""
    return tuple(_backend_module(backend).backward(q, docs, temperature, lse, grad_loss, query_groups, doc_groups,
                                                   pos_offset))


@info_nce_bwd.register_fake
def _(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, pos_offset, backend):
    return torch.empty_like(q), torch.empty_like(docs)


def _setup_context(ctx, inputs, output):
    q, docs, temperature, query_groups, doc_groups, pos_offset, symmetric, backend = inputs
    _, lse, dldt = output
    ctx.save_for_backward(q, docs, temperature, query_groups, doc_groups, lse, dldt)
    ctx.pos_offset, ctx.backend = pos_offset, backend
    ctx.mark_non_differentiable(lse, dldt)


def _backward(ctx, grad_loss, _grad_lse, _grad_dldt):
    q, docs, temperature, query_groups, doc_groups, lse, dldt = ctx.saved_tensors
    grad_loss = grad_loss.to(lse.dtype).contiguous()
    dq = ddocs = dt = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dq, ddocs = info_nce_bwd(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, ctx.pos_offset,
                                 ctx.backend)
    if ctx.needs_input_grad[2]:
        dt = (grad_loss * dldt).sum().to(temperature.dtype)
    return dq, ddocs, dt, None, None, None, None, None


info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


def info_nce_rows(q, docs, temperature, query_groups, doc_groups, pos_offset: int, symmetric: bool,
                  backend: str) -> torch.Tensor:
    """(1 + symmetric, B) per-direction row losses with a resolved backend name (no validation here)."""
    if backend == "reference":
        return reference_rows(q, docs, temperature, query_groups, doc_groups, pos_offset, symmetric)
    loss, _, _ = info_nce_fwd(q.contiguous(), docs.contiguous(), temperature, query_groups, doc_groups,
                              pos_offset, symmetric, backend)
    return loss


def _as_temperature(temperature, like: torch.Tensor) -> torch.Tensor:
    """0-dim float32 tensor (float64 for fp64 inputs) on the inputs' device; keeps the autograd link."""
    dt = _stat_dtype(like)
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a float or a 1-element tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise ValueError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
        t = temperature.reshape(()).to(device=like.device, dtype=dt)
        if not torch.compiler.is_compiling() and not bool((t.detach() > 0) & torch.isfinite(t.detach())):
            raise ValueError(f"temperature must be positive and finite, got {float(t.detach())}")
        return t
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    # a fill kernel, not torch.tensor: a host-to-device copy from pageable memory synchronises the stream,
    # which would leave the GPU idle while the host queues the loss kernels
    return torch.full((), float(temperature), dtype=dt, device=like.device)


def _check_groups(name: str, g, length: int, device) -> torch.Tensor:
    check_tensor(name, g, shape=(length,), dtypes=_INT_DTYPES, device=device)
    return g.to(torch.int64).contiguous()


def _check_finite(named: list) -> None:
    """ValueError naming the first of [(name, tensor)] that holds a nan/inf. One reduction per tensor instead of
    torch.isfinite's (numel)-sized temporaries (a nan/inf anywhere makes the sum non-finite) and ONE host sync
    for all of them (each sync stalls the GPU queue; the H100 run timed two of them in every loss call); only on
    a non-finite sum (or an overflow of huge finite values) the exact elementwise check names the tensor."""
    if not named:
        return
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for _, t in named]
    if not bool(torch.isfinite(torch.stack(sums)).all()):  # one dtype: validate checked p / negatives first
        for name, t in named:
            check_tensor(name, t, dtypes=None, finite=True)


def validate(q, p, negatives, query_groups, doc_groups, reduction, symmetric):
    """Raise ValueError naming the argument; return int64 groups (or None)."""
    check_tensor("q", q, ndim=2, dtypes=_INPUT_DTYPES, nonempty=False)
    B, d = q.shape
    if B == 0:
        raise ValueError(f"q must not be empty: need at least one query (B >= 1), got shape {tuple(q.shape)}")
    if d == 0:
        raise ValueError(f"q must not be empty: need an embedding dim d >= 1, got shape {tuple(q.shape)}")
    check_tensor("p", p, shape=(B, d), dtypes=(q.dtype,), device=q.device)
    if negatives is not None:
        check_tensor("negatives", negatives, shape=(None, d), dtypes=(q.dtype,), device=q.device)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not torch.compiler.is_compiling():  # a data-dependent check would break the graph
        _check_finite([(name, t) for name, t in (("q", q), ("p", p), ("negatives", negatives)) if t is not None])
    if (query_groups is None) != (doc_groups is None):
        missing = "doc_groups" if doc_groups is None else "query_groups"
        raise ValueError(f"{missing} must be given together with "
                         f"{'query_groups' if missing == 'doc_groups' else 'doc_groups'} (both or neither)")
    if query_groups is None:
        return None, None
    M = 0 if negatives is None else negatives.shape[0]
    return (_check_groups("query_groups", query_groups, B, q.device),
            _check_groups("doc_groups", doc_groups, B + M, q.device))


def info_nce(q, p, negatives=None, *, temperature=0.05, symmetric=False, query_groups=None, doc_groups=None,
             reduction="mean", backend="auto", gather=False, process_group=None) -> torch.Tensor:
    """The public loss (documented in effir.losses.info_nce); returns float32 (float64 for fp64 inputs)."""
    qg, dg = validate(q, p, negatives, query_groups, doc_groups, reduction, symmetric)
    name = resolve_backend("loss", backend, q.device)
    if name == "triton" and q.dtype == torch.float64:
        raise ValueError("q has dtype float64, which backend 'triton' does not take; use fp32/fp16/bf16 or "
                         "backend='chunked'/'reference'")
    t = _as_temperature(temperature, q)
    if gather or process_group is not None:
        from effir.distributed import gathered_rows

        rows = gathered_rows(q, p, negatives, t, qg, dg, symmetric, name, process_group)
    else:
        docs = p if negatives is None else torch.cat([p, negatives], dim=0)
        rows = info_nce_rows(q, docs, t, qg, dg, 0, symmetric, name)
    return reduce_rows(rows, reduction)
