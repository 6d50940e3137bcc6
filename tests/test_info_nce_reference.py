"""The reference itself: against a plain per-row float64 loop, and the masking / reduction semantics."""
import math

import pytest
import torch

from effir.reference.info_nce import info_nce_reference
from tests._info_nce_util import make_inputs


def _loop_loss(q, p, neg, t, qg, dg, symmetric):
    """The issue's definition, written out row by row (float64)."""
    docs = p if neg is None else torch.cat([p, neg])
    B, N = q.shape[0], docs.shape[0]
    per = []
    for i in range(B):
        cols = [j for j in range(N) if j == i or qg is None or dg[j] != qg[i]]
        row = math.log(sum(math.exp(float(q[i] @ docs[j]) / t) for j in cols)) - float(q[i] @ p[i]) / t
        if symmetric:
            qs = [j for j in range(B) if j == i or qg is None or qg[j] != dg[i]]
            col = math.log(sum(math.exp(float(p[i] @ q[j]) / t) for j in qs)) - float(q[i] @ p[i]) / t
            row = (row + col) / 2
        per.append(row)
    return torch.tensor(per, dtype=torch.float64)


@pytest.mark.parametrize("M", [0, 5])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("groups", [False, True])
def test_reference_matches_loop(M, symmetric, groups):
    q, p, neg, qg, dg = make_inputs(7, M, 9, torch.float64, groups=groups, seed=M + 2 * symmetric)
    want = _loop_loss(q, p, neg, 0.2, qg, dg, symmetric)
    got = info_nce_reference(q, p, neg, temperature=0.2, symmetric=symmetric, query_groups=qg, doc_groups=dg,
                             reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mean = info_nce_reference(q, p, neg, temperature=0.2, symmetric=symmetric, query_groups=qg, doc_groups=dg)
    total = info_nce_reference(q, p, neg, temperature=0.2, symmetric=symmetric, query_groups=qg, doc_groups=dg,
                               reduction="sum")
    torch.testing.assert_close(mean, want.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(total, want.sum(), rtol=1e-12, atol=0)


def test_masked_translation_changes_nothing_unmasked_matters():
    """A translation of the positive: with groups it leaves the loss exactly as if it were absent;
    without groups it is a (hard) negative and raises the loss."""
    q, p, _, _, _ = make_inputs(5, 0, 16, torch.float64, seed=3)
    q[2] = p[2]  # query 2 retrieves its positive well, so a near-duplicate column is a strong competitor
    translation = (p[2] + 0.01 * torch.randn(16, dtype=torch.float64))[None]  # near-duplicate of positive 2
    qg = torch.arange(5)
    dg = torch.cat([torch.arange(5), torch.tensor([2])])
    masked = info_nce_reference(q, p, translation, temperature=0.05, query_groups=qg, doc_groups=dg,
                                reduction="none")
    absent = info_nce_reference(q, p, None, temperature=0.05, reduction="none")
    unmasked = info_nce_reference(q, p, translation, temperature=0.05, reduction="none")
    torch.testing.assert_close(masked[2], absent[2], rtol=1e-14, atol=0)
    assert unmasked[2] > absent[2] + 0.2  # the near-copy competes with the positive (~log 1.5)
    # rows of other groups still see the translation as a negative
    torch.testing.assert_close(masked[[0, 1, 3, 4]], unmasked[[0, 1, 3, 4]], rtol=1e-14, atol=0)


def test_symmetric_mask_is_transposed():
    """Symmetric direction: query j != i leaves positive i's row when query_groups[j] == doc_groups[i]."""
    q, p, _, _, _ = make_inputs(4, 0, 8, torch.float64, seed=4)
    qg = torch.tensor([0, 1, 2, 2])  # queries 2 and 3 are translations of each other
    dg = torch.tensor([0, 1, 2, 2])
    both = info_nce_reference(q, p, temperature=0.1, symmetric=True, query_groups=qg, doc_groups=dg,
                              reduction="none")
    # by hand: positive 2's row excludes query 3 and query-direction row 2 excludes positive 3
    s = q @ p.T / 0.1
    row2 = torch.logsumexp(s[2, [0, 1, 2]], 0) - s[2, 2]
    col2 = torch.logsumexp(s[[0, 1, 2], 2], 0) - s[2, 2]
    torch.testing.assert_close(both[2], (row2 + col2) / 2, rtol=1e-14, atol=0)


def test_b1_loss_is_zero_without_negatives():
    q, p, _, _, _ = make_inputs(1, 0, 3, torch.float64, seed=5)
    assert float(info_nce_reference(q, p, temperature=0.05)) == 0.0
