"""`load_encoder` on any Hugging Face model: tiny random BertModel / XLMRobertaModel saved to a tmp dir."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from effir import load_encoder
from effir.encoders import EncoderNotAvailableError

WORDS = ("the a of and to in is was for on with as by at from river city war king first new year "
         "der die und la el de los les le und в и на 的 是 ไทย नदी").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz:?.,0123456789") + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=40)


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def model_dir(request, tmp_path_factory):
    """A tiny random model with odd sizes (hidden 36, 3 heads, ffn 37, 2 layers) saved with its tokenizer."""
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    tok = _tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                  intermediate_size=37, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(7)
    if request.param == "bert":
        model = BertModel(BertConfig(max_position_embeddings=40, pad_token_id=0, **common))
    else:
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=42, pad_token_id=0, **common))
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


TEXTS = ["The river of the city", "a war", "Der König und die Stadt in the first year", "是 的", "x"]


def _ref_pool(enc, texts, prefix, pooling):
    """float64 pooling of the model's own last hidden states, text by text (no padding)."""
    out = []
    for t in texts:
        b = enc.tokenizer([prefix + t], return_tensors="pt")
        with torch.no_grad():
            h = enc.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0][0].double()
        v = h[0] if pooling == "cls" else h.mean(0)
        out.append(v / v.norm())
    return torch.stack(out)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_prefixes_and_order(model_dir, pooling):
    enc = load_encoder(model_dir, pooling=pooling, query_prefix="q: ", passage_prefix="p: ", max_length=40)
    assert enc.pooling == pooling and enc.hidden_size == 36 and not enc.training
    batch = enc.tokenize(TEXTS, "query")
    want = enc.tokenizer(["q: " + t for t in TEXTS], padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["input_ids"], want)
    q = enc.encode_queries(TEXTS, batch_size=2)  # sorted by length internally, order restored
    p = enc.encode_passages(TEXTS, batch_size=3)
    assert q.dtype == torch.float32 and q.shape == (len(TEXTS), 36)
    assert torch.allclose(q.double(), _ref_pool(enc, TEXTS, "q: ", pooling), atol=1e-5)
    assert torch.allclose(p.double(), _ref_pool(enc, TEXTS, "p: ", pooling), atol=1e-5)
    assert not torch.allclose(q, p)  # prefixes matter
    fwd = enc(**batch)  # padded training batch == unpadded inference
    assert torch.allclose(fwd.detach(), q, atol=1e-5)


def test_unnormalized_and_windowing(model_dir):
    enc = load_encoder(model_dir, normalize=False, max_length=9)
    long = " ".join(["the king of the river city was first"] * 3)  # 24 content tokens -> windows of 7
    ids = enc.tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(ids) == 24
    chunks = [ids[a:a + 7] for a in range(0, 24, 7)]
    ref = torch.zeros(36, dtype=torch.float64)
    with torch.no_grad():
        for c in chunks:
            x = torch.tensor([[2] + c + [3]])
            ref += len(c) * enc.model(input_ids=x, attention_mask=torch.ones_like(x))[0][0].double().mean(0)
    ref /= 24
    got = enc.encode_passages([long, "a"])
    assert torch.allclose(got[0].double(), ref, atol=1e-5)
    assert got[0].norm() != pytest.approx(1.0)
    trunc = load_encoder(model_dir, normalize=False, max_length=9, long_inputs="truncate")
    x = torch.tensor([[2] + ids[:7] + [3]])
    with torch.no_grad():
        ref_t = trunc.model(input_ids=x, attention_mask=torch.ones_like(x))[0][0].double().mean(0)
    assert torch.allclose(trunc.encode_passages([long])[0].double(), ref_t, atol=1e-5)


def test_gradients_autocast_and_dtype(model_dir):
    enc = load_encoder(model_dir, max_length=40)
    enc.train()
    batch = enc.tokenize(TEXTS, "passage", max_length=6)
    assert batch["input_ids"].shape[1] == 6
    out = enc(**batch)
    (out @ out.T).sum().backward()
    grads = [p.grad for p in enc.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:4]) and any(g.abs().sum() > 0 for g in grads if g is not None)
    enc.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(**batch)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    half = load_encoder(model_dir, dtype="bf16", max_length=40)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    e = half.encode_queries(TEXTS)
    assert e.dtype == torch.float32 and torch.allclose(e.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)


def test_save_and_reload_keeps_settings(model_dir, tmp_path):
    enc = load_encoder(model_dir, pooling="cls", query_prefix="Q: ", passage_prefix="P: ", max_length=40)
    enc.save_pretrained(tmp_path / "enc")
    back = load_encoder(tmp_path / "enc", max_length=40)
    assert (back.pooling, back.query_prefix, back.passage_prefix) == ("cls", "Q: ", "P: ")
    assert torch.allclose(back.encode_queries(TEXTS), enc.encode_queries(TEXTS), atol=1e-6)


def test_missing_name_fails_offline_quickly():
    t0 = time.perf_counter()
    with pytest.raises(EncoderNotAvailableError, match="offline"):
        load_encoder("effir-test-org/no-such-encoder-anywhere")
    assert time.perf_counter() - t0 < 60
    assert issubclass(EncoderNotAvailableError, OSError)


def test_bad_arguments(model_dir):
    with pytest.raises(ValueError, match="pooling"):
        load_encoder(model_dir, pooling="max")
    with pytest.raises(ValueError, match="long_inputs"):
        load_encoder(model_dir, long_inputs="slide")
    with pytest.raises(ValueError, match="dtype"):
        load_encoder(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="max_length"):
        load_encoder(model_dir, max_length=2)
    with pytest.warns(UserWarning, match="max_length=4096"):
        enc = load_encoder(model_dir, max_length=4096)
    # BERT: 40 positions; XLM-R: 42 minus the padding offset (pad id 0 -> positions start at 1)
    assert enc.max_length == (40 if enc.model.config.model_type == "bert" else 41)
    with pytest.raises(ValueError, match="name_or_path"):
        load_encoder(123)


@pytest.mark.peers
def test_same_embeddings_under_transformers_4(peer_python, model_dir):
    enc = load_encoder(model_dir, pooling="cls", query_prefix="q: ", max_length=40)
    script = textwrap.dedent("""
        import json, sys
        import transformers
        from effir import load_encoder
        texts = json.loads(sys.stdin.read())
        enc = load_encoder(sys.argv[1], pooling="cls", query_prefix="q: ", max_length=40)
        print(json.dumps({"v": transformers.__version__, "emb": enc.encode_queries(texts).tolist()}))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([str(peer_python), "-c", script, str(model_dir)], input=json.dumps(TEXTS),
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["v"].startswith("4.")
    assert torch.allclose(torch.tensor(out["emb"]), enc.encode_queries(TEXTS), atol=1e-5)
