"""Exact search: faiss and torch give identical counts; both match a float64 dense ranking."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from effir.evaluation import search as S
from effir.evaluation import metrics as M

sys.path.insert(0, str(Path(__file__).parent))
from _eval_stand_in import HashingEncoder  # noqa: E402

faiss = pytest.importorskip("faiss")


def _case(n_q, n_pool, dim, n_rel, integer, seed):
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact float32 dot products: exact ties, identical in every BLAS
        q = torch.randint(-2, 3, (n_q, dim), generator=g).float()
        pool = torch.randint(-2, 3, (n_pool, dim), generator=g).float()
        pool[n_pool // 2] = pool[0]  # duplicate candidates
    else:
        q, pool = torch.randn(n_q, dim, generator=g), torch.randn(n_pool, dim, generator=g)
    rel = torch.stack([torch.randperm(n_pool, generator=g)[:n_rel] for _ in range(n_q)])
    rel[::3, 1:] = -1
    return q, pool, rel


def _dense_counts(q, pool, rel):
    """float64 reference of count_ge / count_gt straight from the full score matrix."""
    s = q.double() @ pool.double().T
    rs = s.gather(1, rel.clamp(min=0))
    ge = (s.unsqueeze(1) >= rs.unsqueeze(2)).sum(-1)
    gt = (s.unsqueeze(1) > rs.unsqueeze(2)).sum(-1)
    return ge, gt


@pytest.mark.parametrize("n_q,n_pool,dim,n_rel,integer", [(1, 1, 7, 1, True), (7, 33, 7, 3, True),
                                                          (129, 257, 13, 11, True), (61, 300, 33, 4, False)])
@pytest.mark.parametrize("block_size", [None, 5])
def test_torch_and_faiss_identical(n_q, n_pool, dim, n_rel, integer, block_size):
    q, pool, rel = _case(n_q, n_pool, dim, n_rel, integer, seed=n_q + n_pool)
    rt = S.rank_relevant(q, pool, rel, search="torch", block_size=block_size)
    rf = S.rank_relevant(q, pool, rel, search="faiss", block_size=block_size)
    mask = rel >= 0
    assert torch.equal(rt.mask, mask) and torch.equal(rf.mask, mask)
    assert torch.equal(rt.count_ge[mask], rf.count_ge[mask])
    assert torch.equal(rt.count_gt[mask], rf.count_gt[mask])
    ge, gt = _dense_counts(q, pool, rel)
    assert torch.equal(rt.count_ge[mask], ge[mask]) and torch.equal(rt.count_gt[mask], gt[mask])
    ap_t = M.average_precision(rt.scores, rt.count_ge, rt.mask)
    ap_f = M.average_precision(rf.scores, rf.count_ge, rf.mask)
    assert torch.equal(ap_t, ap_f)


def test_duplicate_candidates_tie_exactly():
    # Two identical candidates must tie whatever order the BLAS sums in: both rank 1 -> AP 1 for either.
    g = torch.Generator().manual_seed(3)
    pool = torch.randn(50, 129, generator=g)
    pool[17] = pool[3]
    q = pool[3:4] * 1.0001
    for search in ("torch", "faiss"):
        r = S.rank_relevant(q, pool, torch.tensor([[17, 3]]), search=search)
        assert r.count_ge.tolist() == [[2, 2]] and r.count_gt.tolist() == [[0, 0]]


def test_metrics_identical_on_real_subset():
    """compute_metrics with faiss and with torch on a real LAReQA subset, exact integer embeddings."""
    from effir._paths import data_mirror
    from effir.evaluation.evaluate import compute_metrics
    from effir.evaluation.lareqa import load_lareqa

    if data_mirror() is None:
        pytest.skip("shared data mirror not found")
    data = load_lareqa("mlqa-r", max_paragraphs=25, seed=1)
    enc = HashingEncoder(dim=61, normalize=False)  # raw 3-gram counts: integer dot products, exact
    q, c = enc.encode_queries(data.q_text), enc.encode_passages(data.cand_text)
    rt = compute_metrics(data, q, c, search="torch")
    rf = compute_metrics(data, q, c, search="faiss")
    assert rt == rf


def test_auto_and_fallback(monkeypatch):
    assert S.resolve_search("auto") == "faiss"
    assert S.resolve_search("torch") == "torch"
    monkeypatch.setattr(S, "faiss_available", lambda: False)
    with pytest.warns(UserWarning, match="faiss is not installed"):
        assert S.resolve_search("auto") == "torch"
    with pytest.raises(ValueError, match="faiss"):
        S.resolve_search("faiss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert S.resolve_search("torch") == "torch"


def test_bad_inputs():
    q, pool = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="search"):
        S.rank_relevant(q, pool, torch.zeros(3, 1, dtype=torch.int64), search="annoy")
    with pytest.raises(ValueError, match="relevant"):
        S.rank_relevant(q, pool, torch.full((3, 1), 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="relevant"):
        S.rank_relevant(q, pool, torch.tensor([[0], [-1], [1]]))
    with pytest.raises(ValueError, match="pool"):
        S.rank_relevant(q, torch.randn(4, 6), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="queries"):
        S.rank_relevant(q.double(), pool, torch.zeros(3, 1, dtype=torch.int64))
