"""All-gather with gradients and the cross-rank layout of the InfoNCE loss.

Layout after `gather=True` (asserted by tests/test_info_nce_distributed.py):
    docs = [p_rank0; p_rank1; ...; p_rank{W-1}; neg_rank0; ...; neg_rank{W-1}]   (W*B + W*M, d)
and the positive of local query i on rank r sits at docs[r*B + i] (`pos_offset = r*B`). doc_groups are
gathered in the same layout, so group ids must be global (e.g. the dataset's translation-group id).
Symmetric: positive i of rank r competes against the W*B gathered queries, target r*B + i.

Gradients follow DDP's convention: the backward of a gather all-reduces (sums) the incoming gradient over
ranks and keeps the local slice, so each rank's gradient, once DDP averages it over the W ranks, equals the
gradient of the global mean loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # every rank's loss touched our rows
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        n = grad.shape[0] // world
        return grad[rank * n:(rank + 1) * n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(n, ...) per rank -> (W*n, ...) in rank order; gradients flow back to every rank's slice.

    Integer tensors (group ids) are gathered without autograd. All ranks must pass the same shape.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    if not x.is_floating_point():
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out, dim=0)
    return _AllGather.apply(x, group)


def _check_equal_sizes(q, negatives, group) -> None:
    """Every rank must hold the same B and M (all_gather needs equal shapes): a ValueError otherwise."""
    _, world = rank_and_world(group)
    local = torch.tensor([q.shape[0], 0 if negatives is None else negatives.shape[0]], dtype=torch.int64,
                         device=q.device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    sizes = torch.stack(sizes).tolist()
    if any(s[0] != sizes[0][0] for s in sizes):
        raise ValueError(f"q must have the same batch size on every rank for gather=True, got {[s[0] for s in sizes]}")
    if any(s[1] != sizes[0][1] for s in sizes):
        raise ValueError("negatives must have the same number of rows on every rank (or be None everywhere) "
                         f"for gather=True, got {[s[1] for s in sizes]}")


def gather_docs(p, negatives, doc_groups=None, group=None):
    """Global docs [all positives; all negatives] (+ their groups) and this rank's positive offset."""
    rank, _ = rank_and_world(group)
    B = p.shape[0]
    parts = [all_gather_with_grad(p, group)]
    if negatives is not None:
        parts.append(all_gather_with_grad(negatives, group))
    docs = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    dg = None
    if doc_groups is not None:
        gparts = [all_gather_with_grad(doc_groups[:B], group)]
        if negatives is not None:
            gparts.append(all_gather_with_grad(doc_groups[B:], group))
        dg = torch.cat(gparts) if len(gparts) > 1 else gparts[0]
    return docs, dg, rank * B


def gathered_rows(q, p, negatives, temperature, query_groups, doc_groups, symmetric, backend, group=None):
    """(1 + symmetric, B) local row losses against the global batch (see module docstring)."""
    from effir.ops.info_nce import info_nce_rows

    _, world = rank_and_world(group)
    if world == 1:
        docs = p if negatives is None else torch.cat([p, negatives], dim=0)
        return info_nce_rows(q, docs, temperature, query_groups, doc_groups, 0, symmetric, backend)
    _check_equal_sizes(q, negatives, group)
    docs, dg, offset = gather_docs(p, negatives, doc_groups, group)
    rows = [info_nce_rows(q, docs, temperature, query_groups, dg, offset, False, backend)[0]]
    if symmetric:
        # positive i against all gathered queries; the mask transposes: its "query" group is doc_groups[i]
        qs = all_gather_with_grad(q, group)
        qg = None if query_groups is None else all_gather_with_grad(query_groups, group)
        pg = None if doc_groups is None else doc_groups[:p.shape[0]].contiguous()
        rows.append(info_nce_rows(p, qs, temperature, pg, qg, offset, False, backend)[0])
    return torch.stack(rows)
