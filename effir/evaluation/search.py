"""Exact inner-product search that returns, for each query, where its relevant candidates rank.

AP needs the rank of every relevant candidate in the whole pool, not only a top-k list, so both
backends score every (query, candidate) pair, one block of queries at a time (no Q x C matrix is kept):

- "torch": block = queries_b @ pool.T on `device`; the relevant scores are gathered from that same
  block (so ties are bitwise ties) and one bucketing pass over the row counts, per relevant
  candidate, the pool entries scoring >= and > it.
- "faiss": `IndexFlatIP` (a GPU index when faiss sees a GPU and the pool fits its k limit) searched with
  k = pool size; the counts are read off faiss's own sorted scores (cumulative sums).

Both backends score the distinct pool rows only and weight counts by multiplicity, so duplicate
candidates (MLQA-R repeats citation sentences across languages) tie exactly, as sklearn's AP expects.
Both return the same counts (the tests check it on exact inputs and on real data); their float32
scores may differ in the last bit between BLAS libraries, which matters only for near-exact ties.
Measured on 2 CPU cores, the torch backend is ~3x faster than faiss here: a full ranking (k = pool)
is faiss's worst case.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from effir._validation import check_choice, check_tensor

SEARCHES = ("auto", "faiss", "torch")
_FAISS_GPU_MAX_K = 2048  # faiss GPU k-selection limit
_BLOCK_ELEMENTS = 1 << 22  # scores per query block: 16 MiB of float32 (+ 32 MiB of bucket ids)


@dataclass
class RelevantRanks:
    """scores (Q, R) float32, count_ge / count_gt (Q, R) int64, mask (Q, R) bool; all on CPU."""

    scores: torch.Tensor
    count_ge: torch.Tensor
    count_gt: torch.Tensor
    mask: torch.Tensor


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_search(search: str, device=None) -> str:
    """'auto' -> 'faiss' when faiss imports, else 'torch' (with a warning); 'faiss' requires faiss.

    With a CUDA `device`, 'auto' takes torch on the GPU unless faiss has a GPU index (no warning).
    """
    check_choice("search", search, SEARCHES)
    if search == "torch":
        return "torch"
    if faiss_available():
        if search == "auto" and device is not None and torch.device(device).type == "cuda" and _faiss_gpus() == 0:
            return "torch"
        return "faiss"
    if search == "faiss":
        raise ValueError("search='faiss' needs the faiss package (pip install faiss-cpu); use search='torch'")
    if device is None or torch.device(device).type != "cuda":  # on a GPU, torch is the better choice anyway
        warnings.warn("faiss is not installed: exact search falls back to torch matmul", stacklevel=3)
    return "torch"


def rank_relevant(
    queries: torch.Tensor,
    pool: torch.Tensor,
    relevant: torch.Tensor,
    *,
    search: str = "auto",
    device=None,
    block_size: int | None = None,
) -> RelevantRanks:
    """Score queries (Q, H) against pool (C, H) by dot product; rank each query's relevant candidates.

    relevant: (Q, R) int64 indices into pool, -1 for unused slots (each row needs one valid index).
    device: where the torch backend multiplies (default: the inputs' device). Returns RelevantRanks.
    """
    check_tensor("queries", queries, ndim=2, dtypes=(torch.float32,))
    check_tensor("pool", pool, shape=(None, queries.shape[1]), dtypes=(torch.float32,))
    check_tensor("relevant", relevant, shape=(queries.shape[0], None), dtypes=(torch.int64,))
    n_pool = pool.shape[0]
    if bool((relevant >= n_pool).any()) or bool((relevant < -1).any()):
        raise ValueError(f"relevant must hold pool indices in [0, {n_pool}) or -1 for padding")
    mask = relevant >= 0
    if not bool(mask.any(dim=1).all()):
        raise ValueError("relevant must have at least one valid index in every row")
    backend = resolve_search(search, device if device is not None else queries.device)
    # Score against the distinct pool rows only, weighting counts by multiplicity: identical candidates
    # (duplicate sentences) then tie exactly, whatever order a BLAS kernel sums in.
    uniq, inverse, mult = torch.unique(pool, dim=0, return_inverse=True, return_counts=True)
    rel_u = inverse[relevant.clamp(min=0)]
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // max(1, uniq.shape[0]))
    if backend == "faiss":
        scores, ge, gt = _faiss_counts(queries, uniq, mult, rel_u, block_size)
    else:
        scores, ge, gt = _torch_counts(queries, uniq, mult, rel_u, block_size, device)
    return RelevantRanks(scores=scores, count_ge=ge, count_gt=gt, mask=mask)


def _counts(sorted_desc: torch.Tensor, order: torch.Tensor, mult: torch.Tensor, rel_scores: torch.Tensor):
    """count_ge / count_gt (B, R) int64 from each row's descending scores (B, U), the unique-row ids in
    that order (B, U) and the multiplicity (U,) of each unique row."""
    cum = mult[order].cumsum(dim=1)
    cum = torch.cat([torch.zeros_like(cum[:, :1]), cum], dim=1)  # cum[:, n] = candidates among the first n
    # Negate so the rows ascend: #(x >= s) = #(-x <= -s) = searchsorted(right=True).
    neg = -sorted_desc
    n_ge = torch.searchsorted(neg, -rel_scores, right=True)
    n_gt = torch.searchsorted(neg, -rel_scores, right=False)
    return cum.gather(1, n_ge), cum.gather(1, n_gt)


def _bucket_counts(block: torch.Tensor, rel_scores: torch.Tensor, mult: torch.Tensor):
    """count_ge / count_gt (B, R) int64 of each relevant score within its row of block (B, U).

    One pass over the block for any R: each pool score falls into a bucket between the row's sorted
    relevant scores (searchsorted), bucket sizes are summed with the rows' multiplicities, and suffix
    sums give the counts. Cheaper than sorting the row or comparing it R times.
    """
    b, r = rel_scores.shape
    srt, order = rel_scores.sort(dim=1)  # ascending
    weights = mult.unsqueeze(0).expand(b, -1)
    out = []
    for right in (True, False):
        # right=True: bucket = #relevant <= x, so x >= srt[k] iff bucket > k (count_ge);
        # right=False: bucket = #relevant < x, so x > srt[k] iff bucket > k (count_gt).
        bucket = torch.searchsorted(srt, block, right=right)
        hist = torch.zeros(b, r + 1, dtype=torch.int64, device=block.device).scatter_add_(1, bucket, weights)
        above = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # above[:, k] = sum of hist[:, k+1:]
        out.append(torch.empty_like(above).scatter_(1, order, above))  # back to the slots' order
    return out[0], out[1]


def _torch_counts(queries, uniq, mult, rel_u, block_size, device):
    device = torch.device(device) if device is not None else queries.device
    uniq_d, mult_d = uniq.to(device), mult.to(device)
    out_s, out_ge, out_gt = [], [], []
    for start in range(0, queries.shape[0], block_size):
        q = queries[start:start + block_size].to(device)
        rel = rel_u[start:start + block_size].to(device)
        block = q @ uniq_d.T
        rel_scores = block.gather(1, rel)  # the same floats the comparisons see: ties stay ties
        ge, gt = _bucket_counts(block, rel_scores, mult_d)
        out_s.append(rel_scores.cpu())
        out_ge.append(ge.cpu())
        out_gt.append(gt.cpu())
    return torch.cat(out_s), torch.cat(out_ge), torch.cat(out_gt)


def _faiss_index(pool_np: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(pool_np.shape[1])
    if _faiss_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        if pool_np.shape[0] <= _FAISS_GPU_MAX_K:
            index = faiss.index_cpu_to_all_gpus(index)
        else:
            warnings.warn(f"faiss GPU search returns at most {_FAISS_GPU_MAX_K} neighbours and AP needs the full "
                          f"ranking of {pool_np.shape[0]} candidates: using the CPU index", stacklevel=4)
    index.add(pool_np)
    return index


def _faiss_counts(queries, uniq, mult, rel_u, block_size):
    pool_np = np.ascontiguousarray(uniq.detach().cpu().numpy(), dtype=np.float32)
    index = _faiss_index(pool_np)
    n_pool = pool_np.shape[0]
    out_s, out_ge, out_gt = [], [], []
    for start in range(0, queries.shape[0], block_size):
        q = np.ascontiguousarray(queries[start:start + block_size].detach().cpu().numpy(), dtype=np.float32)
        rel = rel_u[start:start + block_size].cpu().numpy()
        dist, ids = index.search(q, n_pool)  # k = pool size: the full ranking
        if (ids < 0).any():
            raise RuntimeError("faiss returned fewer neighbours than the pool holds")
        # position of each pool entry in each query's ranking (the inverse permutation of ids)
        pos = np.empty_like(ids)
        np.put_along_axis(pos, ids, np.broadcast_to(np.arange(n_pool), ids.shape), axis=1)
        rel_scores = torch.from_numpy(np.take_along_axis(dist, np.take_along_axis(pos, rel, axis=1), axis=1))
        ge, gt = _counts(torch.from_numpy(dist), torch.from_numpy(ids), mult.cpu(), rel_scores)
        out_s.append(rel_scores)
        out_ge.append(ge)
        out_gt.append(gt)
    return torch.cat(out_s), torch.cat(out_ge), torch.cat(out_gt)
