"""Shared helpers of the InfoNCE tests: fresh random inputs and the float64 / same-dtype comparison."""
from __future__ import annotations

import torch

from effir.losses import info_nce
from effir.reference.info_nce import info_nce_reference
from tests._errors import assert_no_worse_than_torch


def make_inputs(B, M, d, dtype, *, groups=False, n_groups=3, seed=0, scale=1.0):
    """Unit-norm rows times `scale` (cosine-like scores), rounded to `dtype`; fp64 copies of the same values."""
    g = torch.Generator().manual_seed(seed)

    def emb(n):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        return (torch.nn.functional.normalize(x, dim=1) * scale).to(dtype)

    q, p = emb(B), emb(B)
    neg = emb(M) if M else None
    qg = torch.randint(0, n_groups, (B,), generator=g) if groups else None
    dg = torch.randint(0, n_groups, (B + M,), generator=g) if groups else None
    return q, p, neg, qg, dg


def loss_and_grads(fn, q, p, neg, t, weights, **kw):
    """Run fn (info_nce or the reference) on leaf copies; return loss and grads of sum(loss * weights)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, p) + ((neg,) if neg is not None else ())]
    tt = t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t
    n = leaves[2] if neg is not None else None
    out = fn(leaves[0], leaves[1], n, temperature=tt, **kw)
    w = weights.to(out.dtype) if out.dim() else weights.sum().to(out.dtype)
    inputs = leaves + ([tt] if isinstance(tt, torch.Tensor) else [])
    grads = torch.autograd.grad((out * w).sum(), inputs)
    return out.detach(), [gr.detach() for gr in grads]


def check_backend(backend, B, M, d, dtype, *, symmetric=False, groups=False, reduction="mean",
                  learnable_t=False, temperature=0.05, seed=0, scale=1.0):
    """The error rule for loss and every gradient: backend vs float64, no worse than torch's own in dtype."""
    q, p, neg, qg, dg = make_inputs(B, M, d, dtype, groups=groups, seed=seed, scale=scale)
    t = torch.tensor(temperature, dtype=torch.float32) if learnable_t else temperature
    kw = dict(symmetric=symmetric, query_groups=qg, doc_groups=dg, reduction=reduction)
    weights = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    as64 = lambda x: None if x is None else x.to(torch.float64)  # noqa: E731
    t64 = t.to(torch.float64) if isinstance(t, torch.Tensor) else t
    ref64 = loss_and_grads(info_nce_reference, as64(q), as64(p), as64(neg), t64, weights, **kw)
    same = loss_and_grads(info_nce_reference, q, p, neg, t, weights, **kw)
    out = loss_and_grads(lambda *a, **k: info_nce(*a, backend=backend, **k), q, p, neg, t, weights, **kw)
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    names = ["q", "p", "negatives"][: 2 + (neg is not None)] + (["temperature"] if learnable_t else [])
    assert_no_worse_than_torch(f"{backend} loss", out[0], ref64[0], same[0], dtype)
    for name, g, g64, gs in zip(names, out[1], ref64[1], same[1]):
        assert g.dtype == (torch.float32 if name == "temperature" else dtype), name
        cond = _dt_condition(as64(q), as64(p), as64(neg), t64, weights, g64, kw) if name == "temperature" else 1.0
        assert_no_worse_than_torch(f"{backend} d{name}", g, g64, gs, dtype, cond=cond)


def _dt_condition(q, p, neg, t, weights, dt, kw) -> float:
    """sum_i |c_i dL_i/dt| / |dL/dt| (float64): the temperature gradient sums one term per pair (c_i: the pair's
    weight in the reduced loss), and random weights can make those terms cancel to a small total."""
    tt = t.detach().clone().requires_grad_(True)
    rows = info_nce_reference(q, p, neg, temperature=tt, **{**kw, "reduction": "none"})
    per_row = torch.stack([torch.autograd.grad(r, tt, retain_graph=True)[0] for r in rows])
    c = {"none": weights, "sum": weights.sum().expand_as(weights),
         "mean": (weights.sum() / len(weights)).expand_as(weights)}[kw["reduction"]]
    return float((c * per_row).abs().sum() / dt.abs().clamp_min(torch.finfo(torch.float64).tiny))
