"""effir.losses.MultipleNegativesRankingLoss, the drop-in for sentence-transformers' loss: the same loss and
gradients as sentence-transformers 5.7 (peers env), the ST formula in float64 through a model's feature dicts,
label masking, every backend, bad input."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from effir.losses import (CachedMultipleNegativesRankingLoss, CachedMultipleNegativesSymmetricRankingLoss,
                          MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss)
from tests._errors import assert_no_worse_than_torch

REPO = Path(__file__).resolve().parent.parent


class _Encoder(nn.Module):
    """A stand-in SentenceTransformer: feature dict {"x": (B, k)} -> {"sentence_embedding": (B, d)}."""

    def __init__(self, k=11, d=19, dtype=torch.float64):
        super().__init__()
        self.proj = nn.Linear(k, d, dtype=dtype)

    def forward(self, features):
        return {"sentence_embedding": self.proj(features["x"])}


def _features(n_cols, b=9, k=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(b, k, generator=g, dtype=dtype)} for _ in range(n_cols)]


def _st_formula(embs, scale, cos, symmetric, labels=None):
    """sentence-transformers' definition, written out: cross-entropy of scale * sim(anchor, [positives; negs])
    with target = own positive (symmetric: averaged with positive -> anchors); labels mask same-label columns."""
    if cos:
        embs = [nn.functional.normalize(e, dim=-1) for e in embs]
    q, p, *negs = embs
    b = q.shape[0]
    scores = scale * q @ torch.cat([p, *negs]).T
    target = torch.arange(b)
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        same &= ~torch.eye(b, dtype=torch.bool)
        scores[:, :b] = scores[:, :b].masked_fill(same, float("-inf"))
    loss = nn.functional.cross_entropy(scores, target)
    if symmetric:
        back = scale * p @ q.T
        if labels is not None:
            back = back.masked_fill(same, float("-inf"))
        loss = (loss + nn.functional.cross_entropy(back, target)) / 2
    return loss


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n_neg", [0, 2])
@pytest.mark.parametrize("sim", ["cos_sim", "dot_score"])
def test_matches_the_st_formula_through_the_model(backend, symmetric, n_neg, sim):
    """forward(sentence_features, labels) runs the model on every column; loss and the model's parameter
    gradients equal the formula's in float64."""
    torch.manual_seed(3)
    model = _Encoder()
    feats = _features(2 + n_neg, seed=n_neg)
    loss = MultipleNegativesRankingLoss(model, scale=20.0, similarity_fct=sim, symmetric=symmetric, backend=backend)
    got = loss(feats, torch.zeros(9))
    g_got = torch.autograd.grad(got, list(model.parameters()))
    ref = _st_formula([model(f)["sentence_embedding"] for f in feats], 20.0, sim == "cos_sim", symmetric)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mask_same_label(symmetric):
    """Anchors with the same label (translations) are not each other's negatives; hard negatives never masked."""
    g = torch.Generator().manual_seed(5)
    embs = [torch.randn(8, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    loss = MultipleNegativesRankingLoss(nn.Identity(), scale=10.0, symmetric=symmetric, mask_same_label=True,
                                        backend="reference")
    got = loss.compute_loss_from_embeddings(embs, labels)
    ref = _st_formula(embs, 10.0, True, symmetric, labels=labels)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    unmasked = MultipleNegativesRankingLoss(nn.Identity(), scale=10.0, symmetric=symmetric, backend="reference")
    assert unmasked.compute_loss_from_embeddings(embs, labels) > got  # masking removed real candidates


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend(dtype):
    """The fused Triton kernels (interpreter on CPU) under the drop-in, against float64 with the error rule."""
    g = torch.Generator().manual_seed(11)
    masters = [torch.randn(13, 24, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = torch.tensor([0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9])

    def run(backend, dt):
        leaves = [m.to(dt).requires_grad_() for m in masters]
        if backend is None:
            value = _st_formula(leaves, 20.0, True, True, labels=labels)
        else:
            value = MultipleNegativesRankingLoss(nn.Identity(), symmetric=True, mask_same_label=True,
                                                 backend=backend).compute_loss_from_embeddings(leaves, labels)
        return value, torch.autograd.grad(value, leaves)

    got, g_got = run("triton", dtype)
    ref, g_ref = run(None, torch.float64)
    same, g_same = run(None, dtype)
    assert_no_worse_than_torch(f"mnrl triton {dtype} loss", got.reshape(1), ref.reshape(1), same.reshape(1), dtype)
    for i, (a, b, c) in enumerate(zip(g_got, g_ref, g_same)):
        assert_no_worse_than_torch(f"mnrl triton {dtype} grad {i}", a, b, c, dtype)


def test_config_and_bad_input():
    loss = MultipleNegativesRankingLoss(nn.Identity(), scale=25.0, similarity_fct="dot_score")
    assert loss.temperature == pytest.approx(0.04)
    assert loss.get_config_dict()["similarity_fct"] == "dot_score" and "henderson2017" in loss.citation
    with pytest.raises(ValueError, match="similarity_fct"):
        MultipleNegativesRankingLoss(nn.Identity(), similarity_fct="manhattan_sim")
    with pytest.raises(ValueError, match="scale"):
        MultipleNegativesRankingLoss(nn.Identity(), scale=0.0)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="at least anchors and positives"):
        loss.compute_loss_from_embeddings([x], None)
    masked = MultipleNegativesRankingLoss(nn.Identity(), mask_same_label=True)
    for bad in (None, torch.zeros(4), torch.zeros(3, dtype=torch.long)):
        with pytest.raises(ValueError, match="labels must be a \\(4,\\) integer tensor"):
            masked.compute_loss_from_embeddings([x, x], bad)
    with pytest.raises(ValueError, match="p"):  # shapes are checked by effir.info_nce, naming the argument
        loss.compute_loss_from_embeddings([x, x[:3]], None)


def test_same_loss_and_gradients_as_sentence_transformers(peer_python):
    """Against sentence-transformers 5.7 itself (peers env): MNRL and MNSRL, cos_sim and dot_score, with and
    without hard negatives, the reference and chunked backends, float64; and through a tiny SentenceTransformer's
    own forward (the trainer's call: feature dicts in, parameter gradients out)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([str(peer_python), str(REPO / "tests" / "_st_peer.py")], capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert len(result) == 17
    m = result["model"]
    assert m["n_grads"][0] == m["n_grads"][1] > 10, m  # every parameter of the tiny model got its gradient
    for case, r in result.items():
        assert abs(r["effir"] - r["peer"]) <= 1e-12 * abs(r["peer"]), (case, r)
        assert r["grad_max_abs_diff"] <= 1e-12 * r["grad_max_abs"], (case, r)


def test_sentence_transformers_trainer_trains_the_same_model(peer_python):
    """In SentenceTransformerTrainer (peers env: sentence-transformers 5.7, datasets, accelerate): 4 AdamW steps
    on a dropout-free float64 model with effir's loss (reference and chunked backends, and
    CachedMultipleNegativesRankingLoss with 4 texts at a time) give the logged losses and the final
    parameters of the same run with sentence-transformers' own MNRL / MNSRL, and the saved model card names it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([str(peer_python), str(REPO / "tests" / "_st_peer.py"), "trainer"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert sorted(result) == ["fwd/cached", "fwd/chunked", "fwd/reference", "sym/cached", "sym/chunked",
                              "sym/reference"]
    for case, r in result.items():
        assert len(r["peer_losses"]) == 4 and r["effir_losses"] == r["peer_losses"], (case, r)
        assert r["param_max_moved"] > 1e-4, (case, r)  # training moved the weights: the comparison means something
        # float64 through the model and 4 AdamW steps: measured ~5e-12 of how far the weights moved
        assert r["param_max_abs_diff"] <= 1e-9 * r["param_max_moved"], (case, r)
        assert r["card_names_loss"], (case, r)


def test_sentence_transformers_5_arguments():
    """directions / partition_mode (sentence-transformers 5.x) map onto symmetric; what has no fused form is
    refused by name; the Symmetric classes are symmetric=True."""
    both = ("query_to_doc", "doc_to_query")
    assert not MultipleNegativesRankingLoss(nn.Identity(), directions=("query_to_doc",), partition_mode="per_direction").symmetric
    loss = MultipleNegativesRankingLoss(nn.Identity(), directions=both, partition_mode="per_direction")
    assert loss.symmetric and loss.get_config_dict()["directions"] == both
    assert MultipleNegativesSymmetricRankingLoss(nn.Identity()).symmetric
    assert CachedMultipleNegativesSymmetricRankingLoss(nn.Identity(), mini_batch_size=3).symmetric
    for kw, match in (({"directions": both}, "partition_mode='joint' has no fused form"),
                      ({"directions": ("query_to_doc", "doc_to_doc"), "partition_mode": "per_direction"}, "doc_to_doc"),
                      ({"hardness_mode": "hard_negatives", "hardness_strength": 5.0}, "hardness_mode")):
        with pytest.raises(ValueError, match=match):
            MultipleNegativesRankingLoss(nn.Identity(), **kw)


def test_compat_and_patching_against_sentence_transformers(peer_python):
    """Peers env (sentence-transformers 5.7): the 5.x symmetric spelling gives sentence-transformers' loss and
    gradients; after effir.patch_sentence_transformers() the classes a script reads from
    sentence_transformers.losses are effir's and, built with sentence-transformers' arguments, give its loss and
    gradients; arguments without a fused form are refused by name; unpatching restores the originals."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([str(peer_python), str(REPO / "tests" / "_st_peer.py"), "compat"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert len(r["patched"]) == 4 and r["is_effir"] and r["restored"], r
    assert "query_to_query" in r["refused"], r
    for case in ("directions", "patched_mnrl", "patched_mnsrl"):
        a, b = r[case]["loss"]
        assert abs(a - b) <= 1e-13 * abs(a) and r[case]["grad_max_abs_diff"] <= 1e-12 * r[case]["grad_max_abs"], r


@pytest.mark.parametrize("mini", [1, 4, 64])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cached_loss_equals_the_uncached_one(mini, symmetric, masked):
    """CachedMultipleNegativesRankingLoss (GradCache) in float64: the loss and every parameter gradient of
    MultipleNegativesRankingLoss, whatever the mini-batch; the caller's backward factor reaches the model."""
    labels = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5, 6])
    results = []
    for cls, kw in ((MultipleNegativesRankingLoss, {}), (CachedMultipleNegativesRankingLoss, {"mini_batch_size": mini})):
        torch.manual_seed(0)
        model = _Encoder()
        loss = cls(model, symmetric=symmetric, mask_same_label=masked, backend="reference", **kw)
        value = loss(_features(3), labels)
        (3.0 * value).backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-13, atol=0)
    for a, b in zip(g1, g0):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_cached_loss_under_autocast_replays_in_the_forwards_precision():
    """A trainer runs the loss's forward under autocast and its backward outside: the re-embedding in the
    backward hook must still run in bf16 (the first pass's precision), or the cached gradients would belong to
    other embeddings."""
    torch.manual_seed(0)
    model = _Encoder(dtype=torch.float32)
    dtypes = []
    forward = model.forward

    def spy(features):
        out = forward(features)
        dtypes.append(out["sentence_embedding"].dtype)
        return out

    model.forward = spy
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(_features(2, dtype=torch.float32), None)
    value.backward()
    assert len(dtypes) == 2 * 2 * 3 and set(dtypes) == {torch.bfloat16}  # 2 columns x 3 chunks, both passes
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cached_config_and_bad_input():
    loss = CachedMultipleNegativesRankingLoss(nn.Identity(), mini_batch_size=7)
    assert loss.get_config_dict()["mini_batch_size"] == 7 and "gao2021scaling" in loss.citation
    assert loss.uses_gradient_cache
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="mini_batch_size must be a positive int"):
            CachedMultipleNegativesRankingLoss(nn.Identity(), mini_batch_size=bad)
        with pytest.raises(ValueError, match="mini_batch_num_tokens must be a positive int or None"):
            CachedMultipleNegativesRankingLoss(nn.Identity(), mini_batch_num_tokens=bad)


def test_cached_loss_against_sentence_transformers(peer_python):
    """Against sentence-transformers 5.7 (peers env), tiny float64 SentenceTransformer, mini-batches of 1, 3 and
    16 texts and a 9-token budget (mini_batch_num_tokens), MNRL with a hard-negative column and MNSRL: in eval mode the uncached loss's value and gradients
    (GradCache changes nothing); in train mode (dropout) sentence-transformers' cached loss from the same RNG
    state: the same loss (the same masks), gradients within its own cached-vs-uncached deviation (~1.4e-7)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([str(peer_python), str(REPO / "tests" / "_st_peer.py"), "cached"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert len(result) == 16
    for case, r in result.items():
        assert r["n_grads"][0] == r["n_grads"][1] > 10, (case, r)
        if case.startswith("peer_cached_vs_uncached"):
            continue  # sentence-transformers' own deviation, recorded for the comparison above
        a, b = r["loss"]
        assert abs(a - b) <= 1e-13 * abs(a), (case, r)
        tol = 1e-12 if case.startswith("exact") else 1e-6
        assert r["grad_max_abs_diff"] <= tol * r["grad_max_abs"], (case, r)
