"""GradCache (effir.grad_cache): chunking of tokenizer output, exact RNG replay, and the same loss and
gradients as the whole-batch step (float64, tiny random BERT with adapters)."""
import pytest
import torch
from transformers import BertConfig, BertModel

import effir
from effir.encoders.encoder import Encoder
from effir import grad_cache


def _encoder(dropout: float, seed=0) -> Encoder:
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=dropout,
                                 attention_probs_dropout_prob=dropout), add_pooling_layer=False)
    effir.add_adapters(model, "seq_bn", reduction_factor=4, backend="recompute")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "effir_adapters" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return Encoder(model.double().train(), None, name="tiny", max_length=40)


def _features(b: int, t: int, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    lengths[0] = t  # the whole batch is as wide as its longest row
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 60, (b, t), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}


def test_split_rows_chunks_and_trims_trailing_padding():
    f = _features(7, 9)
    f["attention_mask"][3:6, 6:] = 0  # rows 3..5 are at most 6 wide
    f["attention_mask"][3, 5] = 1
    chunks = grad_cache.split_rows(f, 3)
    assert [c["input_ids"].shape[0] for c in chunks] == [3, 3, 1]
    for i, c in enumerate(chunks):
        rows = f["attention_mask"][3 * i:3 * i + 3]
        width = int(rows.any(0).nonzero().max()) + 1
        assert c["attention_mask"].shape[1] == c["input_ids"].shape[1] == width
        assert torch.equal(c["attention_mask"], rows[:, :width])
    # left padding (the real tokens end every row): nothing to trim
    left = {"input_ids": torch.ones(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    left["attention_mask"][:, :2] = 0
    assert all(c["attention_mask"].shape[1] == 5 for c in grad_cache.split_rows(left, 2))
    with pytest.raises(ValueError, match="mini_batch_size must be a positive int"):
        grad_cache.split_rows(f, 0)
    # no attention mask: rows only; values that are not batch-first tensors go to every chunk
    plain = grad_cache.split_rows({"x": torch.randn(5, 3), "prompt_length": 2, "scalar": torch.tensor(1.0)}, 2)
    assert [c["x"].shape for c in plain] == [(2, 3), (2, 3), (1, 3)] and all(c["prompt_length"] == 2 for c in plain)
    assert all(c["scalar"].dim() == 0 for c in plain)
    with pytest.raises(ValueError, match="batch-first tensors"):
        grad_cache.split_rows({"prompt_length": 2}, 2)
    # a token budget: consecutive rows up to 10 real tokens (and 3 rows), a longer row alone
    lengths = [4, 5, 2, 12, 1, 1, 1, 1, 3]
    mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
    chunks = grad_cache.split_rows({"input_ids": mask * 7, "attention_mask": mask}, 3, max_tokens=10)
    assert [int(c["attention_mask"].sum()) for c in chunks] == [9, 2, 12, 3, 4]
    assert [c["attention_mask"].shape for c in chunks] == [(2, 5), (1, 2), (1, 12), (3, 1), (2, 3)]
    with pytest.raises(ValueError, match="max_tokens needs an 'attention_mask'"):
        grad_cache.split_rows({"x": torch.randn(3, 2)}, 2, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        grad_cache.split_rows(f, 2, max_tokens=0)


def test_replay_gives_the_same_embeddings_under_dropout_and_leaves_the_rng_alone():
    enc = _encoder(dropout=0.3)
    f = _features(10, 8)
    seen = []

    def encode(**chunk):
        out = enc(**chunk)
        seen.append(out.detach().clone())
        return out

    emb, chunks, states = grad_cache.embed_without_graph(encode, f, 4, torch.device("cpu"))
    grad = torch.randn(emb.shape, dtype=emb.dtype)
    after_first_pass = torch.get_rng_state()
    first = list(seen)
    seen.clear()
    grad_cache.backward_through_chunks(encode, chunks, states, grad)
    assert len(first) == len(seen) == 3
    for a, b in zip(first, seen):
        assert torch.equal(a, b)  # the same dropout masks: the cached gradients belong to these embeddings
    assert torch.equal(torch.get_rng_state(), after_first_pass)
    assert not torch.equal(first[0], enc(**chunks[0]).detach())  # dropout is on: the replay is what made them equal


@pytest.mark.parametrize("mini_batch_size", [1, 3, 16])
def test_same_loss_and_gradients_as_the_whole_batch(mini_batch_size):
    enc = _encoder(dropout=0.0)
    q, p = _features(9, 7, seed=1), _features(9, 11, seed=2)
    groups = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5, 6])
    loss_fn = effir.InfoNCELoss(temperature=0.05, backend="reference")
    params = [x for x in enc.parameters() if x.requires_grad]

    full = loss_fn(enc(**q), enc(**p), query_groups=groups, doc_groups=groups)
    want = torch.autograd.grad(full, params)

    loss = grad_cache.dual_encoder_backward(enc, loss_fn, q, p, groups, mini_batch_size, torch.device("cpu"))
    torch.testing.assert_close(loss, full, rtol=1e-12, atol=0)
    assert len(params) == 8 and all(x.grad is not None for x in params)
    for x, w in zip(params, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(x.grad, w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))


def test_autocast_replay_and_backward_outside_it():
    """Mixed precision: the re-embedding repeats the first pass under the same autocast (bf16 embeddings equal
    bit for bit, dropout on) while its backward runs outside autocast (the fused adapter's backward would mix
    dtypes under it); the GradCache step's gradients are the whole bf16 step's to bf16 rounding."""
    enc = _encoder(dropout=0.2).float()
    f = _features(8, 9, seed=3)
    seen = []

    def encode(**chunk):
        out = enc(**chunk)
        seen.append(out.detach().clone())
        return out

    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with amp():
        emb, chunks, states = grad_cache.embed_without_graph(encode, f, 3, torch.device("cpu"))
    first = list(seen)
    seen.clear()
    grad_cache.backward_through_chunks(encode, chunks, states, torch.randn(emb.shape), autocast=amp)
    assert all(torch.equal(a, b) for a, b in zip(first, seen)) and len(seen) == 3
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in enc.parameters() if p.requires_grad)

    enc = _encoder(dropout=0.0).float()
    q, p = _features(9, 7, seed=1), _features(9, 11, seed=2)
    groups = torch.arange(9)
    loss_fn = effir.InfoNCELoss(temperature=0.05, backend="reference")
    params = [x for x in enc.parameters() if x.requires_grad]
    with amp():
        qe, pe = enc(**q), enc(**p)
    want = torch.autograd.grad(loss_fn(qe, pe, query_groups=groups, doc_groups=groups), params)
    grad_cache.dual_encoder_backward(enc, loss_fn, q, p, groups, 4, torch.device("cpu"), autocast=amp)
    for x, w in zip(params, want):
        assert float((x.grad - w).abs().max()) <= 3e-2 * float(w.abs().max())
