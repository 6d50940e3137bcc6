"""The unpadded encoder forward (effir.encoders.packed) against the model's own padded forward.

Real tokens only through every position-wise op must give the padded forward's embeddings and gradients:
float64 random-weight BERT / RoBERTa / XLM-R (with and without adapters of each config, mean and cls pooling,
odd lengths, a 1-token row), bf16 against the float64 padded forward no worse than the padded bf16 forward,
gradient checkpointing, and the warned fallback for a model it cannot run.
"""
import warnings

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

import effir
from effir.encoders import Encoder
from effir.encoders.packed import packed_hidden_states, unpad_support

KW = dict(vocab_size=60, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, pad_token_id=1)
MODELS = {
    "bert": lambda kw: BertModel(BertConfig(hidden_size=64, intermediate_size=96, **kw), add_pooling_layer=False),
    "roberta": lambda kw: RobertaModel(RobertaConfig(hidden_size=36, intermediate_size=52, **kw),
                                       add_pooling_layer=False),
    "xlmr": lambda kw: XLMRobertaModel(XLMRobertaConfig(hidden_size=28, intermediate_size=44, **kw),
                                       add_pooling_layer=False),
}


def make(kind, *, pooling="mean", adapters=None, dropout=0.0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = MODELS[kind](dict(KW, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    if adapters:
        effir.add_adapters(model, adapters)
        with torch.no_grad():  # non-identity adapters, so they matter
            for name, p in model.named_parameters():
                if "effir_adapters" in name:
                    p.normal_(0.0, 0.2)
    enc = Encoder(model.to(dtype), None, name=f"random-{kind}", pooling=pooling, max_length=32)
    return enc.eval()


def batch(lengths=(9, 1, 7, 4), width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(3, 60, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = KW["pad_token_id"]
    return ids, mask


def both(enc, ids, mask):
    enc.unpad = True
    a = enc(ids, mask)
    enc.unpad = False
    b = enc(ids, mask)
    enc.unpad = True
    return a, b


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("adapters", [None, "seq_bn", "double_seq_bn", "par_bn"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_unpadded_equals_padded_float64(kind, adapters, pooling):
    enc = make(kind, pooling=pooling, adapters=adapters)
    ids, mask = batch()
    assert enc._real_counts(mask) is not None
    a, b = both(enc, ids, mask)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_gradients_match_float64(kind):
    enc = make(kind, adapters="seq_bn")
    enc.train()  # dropout is 0: train mode, the adapter weights get gradients
    ids, mask = batch(lengths=(5, 12, 1, 8, 3), seed=1)
    w = torch.randn(5, enc.hidden_size, dtype=torch.float64)
    grads = []
    for unpad in (True, False):
        enc.unpad = unpad
        enc.model.zero_grad(set_to_none=True)
        (enc(ids, mask) * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in enc.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-11, msg=name)


def test_bf16_error_no_worse_than_padded():
    """bf16 unpadded vs the float64 padded forward: within a small factor of the padded bf16 forward's error."""
    ref = make("bert", adapters="seq_bn")
    ids, mask = batch(lengths=(17, 3, 11, 29, 6), seed=2)
    ref.unpad = False
    exact = ref(ids, mask)
    enc = make("bert", adapters="seq_bn", dtype=torch.bfloat16)
    a, b = both(enc, ids, mask)
    err_unpad = (a.double() - exact).abs().max().item()
    err_pad = (b.double() - exact).abs().max().item()
    assert err_unpad <= 4 * err_pad + 1e-3, (err_unpad, err_pad)


def test_no_padding_and_empty_rows_take_the_padded_path():
    enc = make("bert")
    ids, mask = batch(lengths=(6, 6))
    assert enc._real_counts(mask) is None
    ids, mask = batch(lengths=(6, 0, 3))
    assert enc._real_counts(mask) is None  # an empty row: the padded forward defines its (zero) embedding


def test_gradient_checkpointing_same_result():
    enc = make("xlmr", adapters="seq_bn")
    enc.train()
    ids, mask = batch(seed=3)
    out, calls = [], []
    enc.model.encoder.layer[0].intermediate.register_forward_hook(lambda *a: calls.append(1))
    for ckpt in (False, True):
        calls.clear()
        if ckpt:
            enable = getattr(enc.model, "activation_checkpointing_enable", None)  # transformers >= 5
            (enable or enc.model.gradient_checkpointing_enable)()
        enc.model.zero_grad(set_to_none=True)
        e = enc(ids, mask)
        e.sum().backward()
        g = [p.grad.clone() for p in enc.model.parameters() if p.requires_grad]
        out.append((e.detach(), g))
        assert len(calls) == (2 if ckpt else 1)  # checkpointing recomputes the layer in backward
    assert any(getattr(m, "gradient_checkpointing", False) for m in enc.model.modules())
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
    for g0, g1 in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-12)


def test_dropout_in_training_mode_is_applied():
    enc = make("bert", dropout=0.3)
    enc.train()
    ids, mask = batch()
    torch.manual_seed(0)
    a = enc(ids, mask)
    torch.manual_seed(1)
    b = enc(ids, mask)
    assert (a - b).abs().max() > 1e-3  # different dropout masks -> different embeddings
    enc.eval()
    torch.testing.assert_close(enc(ids, mask), enc(ids, mask))


def test_tokens_come_back_in_row_major_order():
    enc = make("bert")
    ids, mask = batch(lengths=(3, 1, 4))
    hidden, row = packed_hidden_states(enc.model, ids, mask)
    assert hidden.shape == (8, enc.hidden_size)
    assert row.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    padded = enc.model(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(hidden, padded[mask.bool()], rtol=1e-10, atol=1e-10)


def test_unsupported_model_warns_and_runs_padded():
    enc = make("bert")
    enc.model.config.position_embedding_type = "relative_key"
    assert "relative_key" in unpad_support(enc.model)
    ids, mask = batch()
    with pytest.warns(UserWarning, match="runs padded"):
        out = enc(ids, mask)
    assert out.shape == (4, enc.hidden_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(ids, mask)  # warned once
