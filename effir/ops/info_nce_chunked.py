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

# Scores held at once (B * chunk elements). 2**22 fp32 = 16 MiB: small next to the (B, d) inputs at
# realistic sizes, large enough that each block matmul still runs near the BLAS rate.
BLOCK_ELEMS = 1 << 22
_FLOOR = -1e30  # finite start of the running max: a fully masked block gives exp(-inf) = 0, never nan


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk(B: int, N: int, chunk: int | None) -> int:
    if chunk is None:
        # at most BLOCK_ELEMS scores, and at most ~1/16 of the columns once N is large (so the saving over
        # the full matrix holds at every size), but never narrower than 256 columns (BLAS efficiency)
        chunk = min(BLOCK_ELEMS // max(B, 1), max(256, N // 16))
    return max(1, min(N, chunk))


def _block(qc, docs, c0, c1, cdt, inv_t, query_groups, doc_groups, pos_offset):
    """Logits X = q . (docs[c0:c1] / t)^T (B, c), masked to -inf; and the rows whose positive is in the block.

    The temperature is folded into the (c, d) chunk of docs: no (B, c) pass and no (B, d) copy for scaling.
    """
    B = qc.shape[0]
    x = qc @ (docs[c0:c1].to(cdt) * inv_t).transpose(0, 1)
    lo = max(0, c0 - pos_offset)
    rows = torch.arange(lo, max(lo, min(B, c1 - pos_offset)), device=qc.device)
    if query_groups is not None:
        mask = query_groups[:, None] == doc_groups[None, c0:c1]
        mask[rows, rows + pos_offset - c0] = False  # the positive is never masked
        x.masked_fill_(mask, float("-inf"))
    return x, rows


def forward(q, docs, temperature, query_groups, doc_groups, pos_offset: int, symmetric: bool, chunk=None):
    """See module docstring. Returns loss, lse, dloss_dt, each (R, B), R = 1 + symmetric, fp32 (fp64)."""
    B, N = q.shape[0], docs.shape[0]
    cdt = _compute_dtype(q)
    t = temperature.to(cdt)
    inv_t = 1.0 / t
    qc = q.to(cdt)
    c = _chunk(B, N, chunk)
    m = torch.full((B,), _FLOOR, dtype=cdt, device=q.device)
    l = torch.zeros(B, dtype=cdt, device=q.device)
    # running sum of exp(x - m) * (m - x) over the row: E_P[m - x] = w / l, a sum of non-negative terms, so
    # pos - E_P[x] = (pos - m) + w / l does not cancel when the positive holds the max (a confident row, whose
    # gradient is tiny): the form pos - E_P[x] would lose it to the rounding of E_P[x] near pos
    w = torch.zeros(B, dtype=cdt, device=q.device)
    pos = torch.zeros(B, dtype=cdt, device=q.device)  # the positive's logit
    if symmetric:
        lse_c = torch.empty(B, dtype=cdt, device=q.device)
        max_c = torch.empty(B, dtype=cdt, device=q.device)
        gap_c = torch.empty(B, dtype=cdt, device=q.device)  # E_P[max_c - x] per column, as w / l per row
    for c0 in range(0, N, c):
        c1 = min(N, c0 + c)
        x, rows = _block(qc, docs, c0, c1, cdt, inv_t, query_groups, doc_groups, pos_offset)
        pos[rows] = x[rows, rows + pos_offset - c0]
        if symmetric and c0 < B:  # whole columns of the B x B block are in this chunk
            cb = min(c1, B) - c0
            xc = x[:, :cb]
            lc = torch.logsumexp(xc, dim=0)
            lse_c[c0:c0 + cb] = lc
            mc = xc.amax(dim=0)  # finite: the positive is never masked
            max_c[c0:c0 + cb] = mc
            ec = torch.exp(xc - lc[None, :])
            gap_c[c0:c0 + cb] = torch.einsum("ij,ij->j", ec, torch.nan_to_num(mc[None, :] - xc, posinf=0.0))
            del ec, xc
        m_new = torch.maximum(m, x.amax(dim=1))
        alpha = torch.exp(m - m_new)
        e = torch.sub(x, m_new[:, None]).exp_()
        gap = torch.sub(m_new[:, None], x)
        if query_groups is not None:
            gap = torch.nan_to_num(gap, posinf=0.0)  # masked: e = 0, 0 * 0
        # w moves to the new max: sum e (m_new - x) = alpha (w + (m_new - m) l) + this block's terms
        w = alpha * (w + (m_new - m) * l) + torch.einsum("ij,ij->i", e, gap)
        l = l * alpha + e.sum(dim=1)
        m = m_new
        del x, e, gap
    lse = m + torch.log(l)
    # d loss / d t = (s_pos - E_P[s]) / t^2 = (pos - E_P[x]) / t in logit units
    loss, lses, dldt = [lse - pos], [lse], [((pos - m) + w / l) / t]
    if symmetric:
        loss.append(lse_c - pos)
        lses.append(lse_c)
        dldt.append(((pos - max_c) + gap_c) / t)
    return torch.stack(loss), torch.stack(lses), torch.stack(dldt)


def backward(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, pos_offset: int, chunk=None):
    """See module docstring. Returns dq (B, d) in q.dtype and ddocs (N, d) in docs.dtype."""
    B, N = q.shape[0], docs.shape[0]
    cdt = _compute_dtype(q)
    t = temperature.to(cdt)
    inv_t = 1.0 / t
    qc = q.to(cdt)
    lse = lse.to(cdt)
    g = grad_loss.to(cdt)
    g_r = g[0][:, None]
    g_diag = g.sum(dim=0)  # the positive's logit gets -(g_r + g_c)
    symmetric = lse.shape[0] == 2
    c = _chunk(B, N, chunk)
    dq = torch.zeros(B, q.shape[1], dtype=cdt, device=q.device)  # sum of dX . docs; scaled by 1/t at the end
    ddocs = torch.empty(N, q.shape[1], dtype=cdt, device=q.device) if docs.dtype != cdt else torch.empty_like(docs)
    for c0 in range(0, N, c):
        c1 = min(N, c0 + c)
        dc = docs[c0:c1].to(cdt)
        x, rows = _block(qc, docs, c0, c1, cdt, inv_t, query_groups, doc_groups, pos_offset)
        if symmetric and c0 < B:
            cb = min(c1, B) - c0
            xc = (x[:, :cb] - lse[1][None, c0:c0 + cb]).exp_().mul_(g[1][None, c0:c0 + cb])
        dx = x.sub_(lse[0][:, None]).exp_().mul_(g_r)  # dL/dX, in place over the logits
        if symmetric and c0 < B:
            dx[:, :cb] += xc
            del xc
        dx[rows, rows + pos_offset - c0] -= g_diag[rows]
        dq.addmm_(dx, dc)
        torch.mm(dx.transpose(0, 1), qc, out=ddocs[c0:c1])
        ddocs[c0:c1].mul_(inv_t)  # dX^T q / t = dS^T q
        del x, dx, dc
    dq.mul_(inv_t)
    return dq.to(q.dtype), ddocs.to(docs.dtype)
