"""AP / R@k / rank distance: hand-computed cases, and AP against sklearn on random pools (ties included)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from effir.evaluation import metrics as M
from effir.evaluation.search import rank_relevant


def _ap(scores, labels):
    """AP of one query through the search + count path (torch), from a full score vector."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    rel = torch.nonzero(torch.as_tensor(labels)).flatten()
    # queries (1, C) = one-hot rows so that the pool's dot products are exactly `scores`
    q = scores.unsqueeze(0)
    pool = torch.eye(len(scores))
    ranked = rank_relevant(q, pool, rel.unsqueeze(0), search="torch")
    return M.average_precision(ranked.scores, ranked.count_ge, ranked.mask).item(), ranked


@pytest.mark.parametrize("scores,labels,expected", [
    ([0.9, 0.8, 0.7, 0.6], [0, 0, 1, 0], 1 / 3),                       # one relevant at rank 3
    ([0.9, 0.8, 0.7, 0.6], [1, 0, 0, 0], 1.0),                         # one relevant at rank 1
    ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1], (1 + 2 / 3 + 3 / 5) / 3),  # many relevant
    ([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1], 0.5 * (1 / 3) + 0.5 * (2 / 4)),  # relevant tied with a negative
    ([0.7, 0.7, 0.7, 0.2], [1, 1, 0, 0], 2 / 3),                       # two relevant tied with a negative
    ([0.3, 0.3, 0.3], [0, 0, 1], 1 / 3),                               # everything tied
])
def test_ap_hand_computed(scores, labels, expected):
    got, _ = _ap(scores, labels)
    assert got == pytest.approx(expected, abs=1e-12)
    assert average_precision_score(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert M.average_precision_dense(np.array(scores), np.array(labels)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_pool,n_rel,tied", [(1, 1, False), (7, 1, False), (7, 3, True), (129, 5, True),
                                               (129, 11, False), (300, 4, True)])
def test_ap_matches_sklearn_random(n_pool, n_rel, tied):
    g = torch.Generator().manual_seed(n_pool * 31 + n_rel)
    n_q, dim = 23, 13
    if tied:  # small integers: exact float32 dot products, many exact ties
        q = torch.randint(-2, 3, (n_q, dim), generator=g).float()
        pool = torch.randint(-2, 3, (n_pool, dim), generator=g).float()
    else:
        q, pool = torch.randn(n_q, dim, generator=g), torch.randn(n_pool, dim, generator=g)
    rel = torch.stack([torch.randperm(n_pool, generator=g)[:n_rel] for _ in range(n_q)])
    rel[1::2, n_rel // 2 + 1:] = -1  # ragged relevant sets
    ranked = rank_relevant(q, pool, rel, search="torch", block_size=5)
    ap = M.average_precision(ranked.scores, ranked.count_ge, ranked.mask)
    dense = (q.double() @ pool.double().T).numpy()
    for i in range(n_q):
        labels = np.zeros(n_pool, dtype=int)
        labels[rel[i][rel[i] >= 0].numpy()] = 1
        want = average_precision_score(labels, dense[i]) if n_pool > 1 else 1.0
        assert ap[i].item() == pytest.approx(want, abs=1e-12)
        assert M.average_precision_dense(dense[i], labels) == pytest.approx(want, abs=1e-12)


def test_recall_and_ranks_hand_computed():
    # query 0: relevant ranks 3 and 12; query 1: relevant rank 1; query 2: relevant tied for rank 2 (2 above)
    count_gt = torch.tensor([[2, 11], [0, 0], [1, 0]])
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    assert M.ranks(count_gt)[0].tolist() == [3, 12]
    assert M.recall_at_k(count_gt, mask, 1).tolist() == [0.0, 1.0, 0.0]
    assert M.recall_at_k(count_gt, mask, 2).tolist() == [0.0, 1.0, 1.0]
    assert M.recall_at_k(count_gt, mask, 3).tolist() == [1.0, 1.0, 1.0]
    # padded slot (count_gt 0 = rank 1) of query 1 must not count: check with a masked-out top hit
    assert M.recall_at_k(torch.tensor([[5, 0]]), torch.tensor([[True, False]]), 1).tolist() == [0.0]


def test_rank_distance_hand_built():
    # one query, three languages: relevant candidates at ranks 1, 5 and 9 -> distance 8
    scores = torch.tensor([[10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1]])
    pool = torch.eye(10)
    rel = torch.tensor([[0, 4, 8]])
    r = rank_relevant(scores, pool, rel, search="torch")
    assert M.ranks(r.count_gt).tolist() == [[1, 5, 9]]
    assert M.rank_distance(r.count_gt, r.mask).tolist() == [8.0]
    # ties share the best rank; a single relevant has distance 0; padding is ignored
    count_gt = torch.tensor([[3, 3, 0], [7, 0, 0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert M.rank_distance(count_gt, mask).tolist() == [0.0, 0.0]


def test_bad_inputs():
    s = torch.rand(2, 3)
    ge = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="mask"):
        M.average_precision(s, ge, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="count_ge"):
        M.average_precision(s, ge[:, :2], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must"):
        M.recall_at_k(ge, torch.ones(2, 3, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="labels"):
        M.average_precision_dense(np.ones(3), np.zeros(3))
