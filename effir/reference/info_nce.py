"""The float64-capable torch reference of the in-batch contrastive (InfoNCE) loss.

It materialises the (B, N) score matrix (N = B + M), so it is the memory baseline and the ground truth that
every backend is tested and benchmarked against. Computation happens in the inputs' dtype (so the same
function also gives "torch's own error" in fp16/bf16/fp32); pass float64 inputs for the ground truth.
"""
from __future__ import annotations

import torch


def reference_rows(q, docs, temperature, query_groups=None, doc_groups=None, pos_offset: int = 0,
                   symmetric: bool = False) -> torch.Tensor:
    """Per-row losses of each direction, (R, B) with R = 1 + symmetric, in the backends' contract layout.

    q (B, d), docs (N, d); the positive of row i is docs[pos_offset + i]; column j != pos_offset + i is left
    out of row i when doc_groups[j] == query_groups[i]. Direction 1 (symmetric): positive i against the B
    queries with the transposed mask (needs pos_offset == 0). Loss dtype: float32 (float64 for fp64 inputs).
    """
    B = q.shape[0]
    scores = q @ docs.transpose(0, 1)  # (B, N): the buffer the fused backends never build
    logits = scores / temperature
    rows = torch.arange(B, device=q.device)
    target = rows + pos_offset
    if query_groups is not None:
        mask = query_groups[:, None] == doc_groups[None, :]
        mask[rows, target] = False  # the positive itself is never masked
        logits = logits.masked_fill(mask, float("-inf"))
    pos = logits[rows, target]
    out = [torch.logsumexp(logits, dim=1) - pos]
    if symmetric:
        if pos_offset != 0:
            raise ValueError("symmetric reference rows need pos_offset == 0 (docs[:B] are the positives)")
        out.append(torch.logsumexp(logits[:, :B], dim=0) - pos)  # column j of the B x B block = positive j
    loss_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.stack(out).to(loss_dtype)


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """(R, B) per-direction losses -> the public reduction: directions averaged per pair, then mean/sum/none."""
    per_pair = rows.mean(dim=0)
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def info_nce_reference(q, p, negatives=None, *, temperature=0.05, symmetric=False, query_groups=None,
                       doc_groups=None, reduction="mean") -> torch.Tensor:
    """InfoNCE with the full score matrix, in the inputs' dtype (loss returned as float32, float64 for fp64).

    q (B, d), p (B, d) aligned positives, negatives (M, d) or None; temperature: float or 0-dim tensor
    (gradients flow to it); query_groups (B,) / doc_groups (B + M,) integer ids (both or neither);
    reduction "mean" | "sum" | "none" -> scalar or (B,). No validation here: the public `effir.info_nce`
    validates; this function is also called on purpose with unusual inputs by tests.
    """
    docs = p if negatives is None else torch.cat([p, negatives], dim=0)
    rows = reference_rows(q, docs, temperature, query_groups, doc_groups, 0, symmetric)
    return reduce_rows(rows, reduction)
