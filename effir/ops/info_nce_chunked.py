"""Pure-PyTorch InfoNCE backend that never holds more than a (B, chunk) block of scores.

Forward: one pass over column chunks of `docs` with an online log-sum-exp per row (and, for the symmetric
direction, the exact column log-sum-exp of the B x B block, whose chunks hold whole columns). Backward
recomputes each block from the saved per-row log-sum-exp and accumulates dq in fp32. Runs on CPU and GPU;
fp16/bf16 inputs are computed in float32, float64 inputs in float64. Signatures: /work/notes contract, i.e.
`forward(q, docs, temperature, query_groups, doc_groups, pos_offset, symmetric) -> (loss, lse, dloss_dt)`
and `backward(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, pos_offset) -> (dq, ddocs)`.
"""
from __future__ import annotations

import torch

# Scores held at once (B * chunk elements). 2**21 fp32 = 8 MiB: small next to the (B, d) inputs at
# realistic sizes, large enough that each block matmul still runs near the BLAS rate.
BLOCK_ELEMS = 1 << 21
_FLOOR = -1e30  # finite start of the running max: a fully masked block gives exp(-inf) = 0, never nan


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk(B: int, N: int, chunk: int | None) -> int:
    if chunk is None:
        # at most BLOCK_ELEMS scores, and at most ~1/16 of the columns once N is large (so the saving over
        # the full matrix holds at every size), but never narrower than 128 columns (BLAS efficiency)
        chunk = min(BLOCK_ELEMS // max(B, 1), max(128, N // 16))
    return max(1, min(N, chunk))


def _block(qc, docs, c0, c1, cdt, inv_t, query_groups, doc_groups, pos_offset):
    """Raw scores S (B, c), scaled+masked logits X (B, c), and the rows whose positive lies in [c0, c1)."""
    B = qc.shape[0]
    s = qc @ docs[c0:c1].to(cdt).transpose(0, 1)
    x = s * inv_t
    lo = max(0, c0 - pos_offset)
    rows = torch.arange(lo, max(lo, min(B, c1 - pos_offset)), device=qc.device)
    if query_groups is not None:
        mask = query_groups[:, None] == doc_groups[None, c0:c1]
        mask[rows, rows + pos_offset - c0] = False  # the positive is never masked
        x = x.masked_fill(mask, float("-inf"))
    return s, x, rows


def forward(q, docs, temperature, query_groups, doc_groups, pos_offset: int, symmetric: bool, chunk=None):
    """See module docstring. Returns loss, lse, dloss_dt, each (R, B), R = 1 + symmetric, fp32 (fp64)."""
    B, N = q.shape[0], docs.shape[0]
    cdt = _compute_dtype(q)
    qc = q.to(cdt)
    inv_t = 1.0 / temperature.to(cdt)
    c = _chunk(B, N, chunk)
    m = torch.full((B,), _FLOOR, dtype=cdt, device=q.device)
    l = torch.zeros(B, dtype=cdt, device=q.device)
    w = torch.zeros(B, dtype=cdt, device=q.device)  # running sum of exp * score -> softmax-weighted mean score
    diag = torch.zeros(B, dtype=cdt, device=q.device)
    if symmetric:
        lse_c = torch.empty(B, dtype=cdt, device=q.device)
        msc_c = torch.empty(B, dtype=cdt, device=q.device)
    for c0 in range(0, N, c):
        c1 = min(N, c0 + c)
        s, x, rows = _block(qc, docs, c0, c1, cdt, inv_t, query_groups, doc_groups, pos_offset)
        m_new = torch.maximum(m, x.amax(dim=1))
        alpha = torch.exp(m - m_new)
        e = torch.exp(x - m_new[:, None])
        l = l * alpha + e.sum(dim=1)
        w = w * alpha + (e * s).sum(dim=1)
        m = m_new
        diag[rows] = s[rows, rows + pos_offset - c0]
        if symmetric and c0 < B:  # whole columns of the B x B block are in this chunk
            cb = min(c1, B) - c0
            xc = x[:, :cb]
            lc = torch.logsumexp(xc, dim=0)
            lse_c[c0:c0 + cb] = lc
            msc_c[c0:c0 + cb] = (torch.exp(xc - lc[None, :]) * s[:, :cb]).sum(dim=0)
        del s, x, e
    lse = m + torch.log(l)
    pos = diag * inv_t
    loss = [lse - pos]
    lses = [lse]
    dldt = [(diag - w / l) * inv_t * inv_t]
    if symmetric:
        loss.append(lse_c - pos)
        lses.append(lse_c)
        dldt.append((diag - msc_c) * inv_t * inv_t)
    return torch.stack(loss), torch.stack(lses), torch.stack(dldt)


def backward(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, pos_offset: int, chunk=None):
    """See module docstring. Returns dq (B, d) in q.dtype and ddocs (N, d) in docs.dtype."""
    B, N = q.shape[0], docs.shape[0]
    cdt = _compute_dtype(q)
    qc = q.to(cdt)
    inv_t = 1.0 / temperature.to(cdt)
    lse = lse.to(cdt)
    g = grad_loss.to(cdt)
    g_r = g[0]
    g_diag = g.sum(dim=0)  # the positive's logit gets -(g_r + g_c)
    symmetric = lse.shape[0] == 2
    c = _chunk(B, N, chunk)
    dq = torch.zeros(B, q.shape[1], dtype=cdt, device=q.device)
    ddocs = torch.empty_like(docs)
    for c0 in range(0, N, c):
        c1 = min(N, c0 + c)
        dc = docs[c0:c1].to(cdt)
        _, x, rows = _block(qc, docs, c0, c1, cdt, inv_t, query_groups, doc_groups, pos_offset)
        ds = torch.exp(x - lse[0][:, None]) * g_r[:, None]
        if symmetric and c0 < B:
            cb = min(c1, B) - c0
            ds[:, :cb] += torch.exp(x[:, :cb] - lse[1][None, c0:c0 + cb]) * g[1][None, c0:c0 + cb]
        del x
        ds[rows, rows + pos_offset - c0] -= g_diag[rows]
        ds *= inv_t
        dq.addmm_(ds, dc)
        ddocs[c0:c1] = (ds.transpose(0, 1) @ qc).to(docs.dtype)
        del ds, dc
    return dq.to(q.dtype), ddocs
