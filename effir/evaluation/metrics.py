"""Retrieval metrics from the exact ranks of each query's relevant candidates.

Every function takes, per query q and relevant slot r (padded to R slots; `mask[q, r]` says the slot is
used), the candidate's score and two counts over the whole pool:

- count_ge[q, r]: candidates (relevant or not, itself included) scoring >= that candidate's score;
- count_gt[q, r]: candidates scoring strictly higher.

Definitions (the docs and the README repeat them):

- AP follows `sklearn.metrics.average_precision_score` over the whole pool, ties included: at each
  distinct score t held by a relevant candidate, precision = (#relevant with score >= t) /
  (#candidates with score >= t), weighted by the recall step (#relevant with score == t) / #relevant.
  Summing per relevant candidate gives the same value: AP = mean_r (#relevant >= s_r) / count_ge_r.
- rank of a candidate = 1 + #candidates scoring strictly higher (competition ranking: ties share
  the best rank).
- R@k of a query = 1 if at least one of its relevant candidates has rank <= k, else 0.
- rank distance of a query = max minus min rank of its relevant candidates (0 with one relevant).
"""
from __future__ import annotations

import numpy as np
import torch

from effir._validation import check_tensor


def _check(scores, count_ge, mask, count_gt=None):
    check_tensor("scores", scores, ndim=2, dtypes=(torch.float32, torch.float64))
    q, r = scores.shape
    check_tensor("count_ge", count_ge, shape=(q, r), dtypes=(torch.int64,))
    if count_gt is not None:
        check_tensor("count_gt", count_gt, shape=(q, r), dtypes=(torch.int64,))
    check_tensor("mask", mask, shape=(q, r), dtypes=(torch.bool,))
    if not bool(mask.any(dim=1).all()):
        raise ValueError("mask must mark at least one relevant candidate in every row (a query without "
                         "relevant candidates has no AP)")


def average_precision(scores: torch.Tensor, count_ge: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-query AP, float64 (Q,), from scores (Q, R) float, count_ge (Q, R) int64 and mask (Q, R) bool."""
    _check(scores, count_ge, mask)
    s = scores.double()
    # relevant_ge[q, i] = #relevant j of query q with s_j >= s_i (padded slots excluded).
    ge = (s.unsqueeze(1) >= s.unsqueeze(2)) & mask.unsqueeze(1)
    relevant_ge = ge.sum(dim=2).double()
    prec = torch.where(mask, relevant_ge / count_ge.clamp(min=1).double(), torch.zeros_like(s))
    return prec.sum(dim=1) / mask.sum(dim=1).double()


def ranks(count_gt: torch.Tensor) -> torch.Tensor:
    """Competition rank (1 = best) of each relevant candidate: (Q, R) int64."""
    return count_gt + 1


def recall_at_k(count_gt: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per-query R@k as float64 (Q,): 1.0 if some relevant candidate has rank <= k."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    check_tensor("mask", mask, shape=tuple(count_gt.shape), dtypes=(torch.bool,))
    return ((ranks(count_gt) <= k) & mask).any(dim=1).double()


def rank_distance(count_gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-query max minus min rank of the relevant candidates, float64 (Q,) (language bias in Mul.)."""
    check_tensor("mask", mask, shape=tuple(count_gt.shape), dtypes=(torch.bool,))
    r = ranks(count_gt)
    big = torch.iinfo(torch.int64).max
    hi = torch.where(mask, r, torch.zeros_like(r)).max(dim=1).values
    lo = torch.where(mask, r, torch.full_like(r, big)).min(dim=1).values
    return (hi - lo).double()


def average_precision_dense(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one query from its full score vector (C,) and 0/1 labels (C,): the plain definition.

    The float64 reference the tests hold the count-based code to (same semantics as sklearn).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.ndim != 1 or labels.shape != scores.shape or not labels.any():
        raise ValueError(f"scores and labels must be 1-D of one length with a positive label, got "
                         f"{scores.shape} and {labels.shape}")
    ap = 0.0
    for t in np.unique(scores[labels]):
        above = scores >= t
        ap += (labels & (scores == t)).sum() * (labels & above).sum() / above.sum()
    return float(ap / labels.sum())
