"""Injection of bottleneck adapters into random-weight BERT / RoBERTa / XLM-R encoders and a
sentence-transformers model: identity at init, frozen backbone, named adapters, save/load, clear errors."""
import json

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

import effir
from effir.adapters import adapter_summary, find_adapter_sites, set_active_adapter

KW = dict(vocab_size=50, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MODELS = {
    "bert": lambda: BertModel(BertConfig(hidden_size=64, intermediate_size=96, **KW)),
    "roberta": lambda: RobertaModel(RobertaConfig(hidden_size=80, intermediate_size=112, **KW)),
    "xlmr": lambda: XLMRobertaModel(XLMRobertaConfig(hidden_size=96, intermediate_size=128, **KW)),
}


def make(kind, seed=0):
    torch.manual_seed(seed)
    return MODELS[kind]().eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding
    return dict(input_ids=ids, attention_mask=mask)


def randomize_adapters(model, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"effir_adapters.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def expected_params(model, cfg):
    d = model.config.hidden_size
    r = cfg.bottleneck_size(d)
    per = 2 * d * r + r + d
    return model.config.num_hidden_layers * per * (int(cfg.mh_adapter) + int(cfg.output_adapter))


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_inject_identity_frozen_and_trainable(kind, config):
    model = make(kind)
    inputs = batch()
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    effir.add_adapters(model, config, backend="recompute")
    with torch.no_grad():
        same = model(**inputs).last_hidden_state
    torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-5)  # new adapters are the identity
    cfg = effir.adapters.resolve_config(config)
    s = adapter_summary(model)
    assert s["trainable"] == expected_params(model, cfg) == s["adapter_params"]["default"]
    assert s["total"] == sum(p.numel() for p in model.parameters()) and s["active"] == "default"
    randomize_adapters(model, "default")
    model.train()
    out = model(**inputs).last_hidden_state
    assert (out - base).abs().max() > 1e-3  # the adapter now changes the hidden states
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if "effir_adapters" in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_backends_agree_in_a_model():
    """The triton backend (interpreter) and the pure-torch one give the same injected training step."""
    grads = {}
    for backend in ["recompute", "triton", "reference"]:
        model = make("bert")
        effir.add_adapters(model, "double_seq_bn", backend=backend)
        randomize_adapters(model, "default")
        model(**batch()).last_hidden_state.square().mean().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for backend in ["triton", "reference"]:
        for n, g in grads["recompute"].items():
            torch.testing.assert_close(grads[backend][n], g, rtol=1e-4, atol=1e-6)


def test_named_adapters_switch():
    model = make("xlmr")
    inputs = batch()
    effir.add_adapters(model, "seq_bn", "lang_a", backend="recompute")
    randomize_adapters(model, "lang_a", seed=1)
    effir.add_adapters(model, "par_bn", "lang_b", reduction_factor=4, backend="recompute")
    randomize_adapters(model, "lang_b", seed=2)
    assert adapter_summary(model)["active"] == "lang_b"
    with torch.no_grad():
        ob = model(**inputs).last_hidden_state
        set_active_adapter(model, "lang_a")
        oa = model(**inputs).last_hidden_state
        set_active_adapter(model, None)
        o0 = model(**inputs).last_hidden_state
    assert (oa - ob).abs().max() > 1e-3 and (oa - o0).abs().max() > 1e-3
    set_active_adapter(model, "lang_a")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("effir_adapters.lang_a." in n for n in trainable)
    with pytest.raises(ValueError, match="lang_a"):
        effir.add_adapters(model, "seq_bn", "lang_a")
    with pytest.raises(ValueError, match="unknown adapter 'nope'.*lang_a"):
        set_active_adapter(model, "nope")


def test_save_load_round_trip(tmp_path):
    model = make("roberta")
    inputs = batch()
    effir.add_adapters(model, "double_seq_bn", "ret", reduction_factor=8, backend="recompute")
    randomize_adapters(model, "ret")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    effir.save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["name"] == "ret" and meta["config"]["reduction_factor"] == 8 and meta["hidden_size"] == 80
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    n_adapter = adapter_summary(model)["adapter_params"]["ret"]
    assert size < 4 * n_adapter + 16384  # only the adapter weights (+ a small header)
    fresh = make("roberta")
    name = effir.load_adapters(fresh, tmp_path, backend="recompute")
    assert name == "ret"
    with torch.no_grad():
        got = fresh(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert adapter_summary(fresh)["trainable"] == n_adapter


def test_errors_say_what_is_supported(tmp_path):
    with pytest.raises(ValueError, match="unknown adapter config 'lora'.*seq_bn"):
        effir.add_adapters(make("bert"), "lora")
    with pytest.raises(ValueError, match="unknown adapter config overrides.*reduction"):
        effir.add_adapters(make("bert"), "seq_bn", reduction=3)
    with pytest.raises(ValueError, match="unsupported model.*BertModel"):
        effir.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), "seq_bn")
    with pytest.raises(ValueError, match="hidden size mismatch"):
        effir.add_adapters(make("bert"), "seq_bn", hidden_size=96)
    with pytest.raises(ValueError, match="activation"):
        effir.add_adapters(make("bert"), "seq_bn", non_linearity="tanhh")
    small = make("bert")
    effir.add_adapters(small, "seq_bn", backend="recompute")
    effir.save_adapters(small, tmp_path)
    with pytest.raises(ValueError, match="hidden size mismatch.*64.*96"):
        effir.load_adapters(make("xlmr"), tmp_path)
    with pytest.raises(ValueError, match="x must have shape"):
        effir.BottleneckAdapter(16)(torch.randn(3, 15))


def test_module_identity_and_autocast():
    ad = effir.BottleneckAdapter(48, reduction_factor=16, activation="gelu", backend="recompute")
    assert ad.bottleneck_size == 3 and torch.all(ad.up.weight == 0)
    x = torch.randn(2, 7, 48)
    torch.testing.assert_close(ad(x), x)
    with torch.no_grad():
        ad.up.weight.normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ad(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("backend", ["reference", "recompute", "triton"])
def test_module_layernorm_under_autocast(backend):
    """Under bf16 autocast the module hands the op the layer's mix as it is (bf16 h, fp32 residual stream) with
    its weights cast to bf16 as autocast casts nn.Linear's: fp32 output, the same values whatever the backend
    (to bf16 rounding), and gradients for the fp32 master weights."""
    torch.manual_seed(3)
    ln = torch.nn.LayerNorm(48)
    h, t = torch.randn(2, 9, 48).bfloat16().requires_grad_(), torch.randn(2, 9, 48).requires_grad_()
    outs = {}
    for be in ("reference", backend):
        torch.manual_seed(4)
        ad = effir.BottleneckAdapter(48, reduction_factor=8, activation="gelu", backend=be)
        with torch.no_grad():
            ad.up.weight.normal_(0.0, 0.3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ad.forward_layernorm(h, t, ln, original_ln_before=True)
        assert y.dtype == torch.float32
        y.square().mean().backward()
        assert ad.up.weight.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
        outs[be] = (y.detach(), ad.up.weight.grad)
    torch.testing.assert_close(outs[backend][0], outs["reference"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[backend][1], outs["reference"][1], rtol=5e-2, atol=5e-3)


def test_autocast_training_step_in_model():
    model = make("bert")
    effir.add_adapters(model, "seq_bn", backend="recompute")
    randomize_adapters(model, "default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch()).last_hidden_state
    out.float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "effir_adapters" in n)


def test_sentence_transformers_model(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import models as st_models
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + list("abcdefgh"))}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, intermediate_size=96, **{**KW, "vocab_size": 12})).save_pretrained(tmp_path)
    model = st.SentenceTransformer(modules=[st_models.Transformer(str(tmp_path)), st_models.Pooling(64, "mean")],
                                   device="cpu")
    sents = ["a b c", "d e f g h"]
    e0 = model.encode(sents, convert_to_tensor=True)
    effir.add_adapters(model, "seq_bn", backend="recompute")
    assert len(find_adapter_sites(model)) == 4
    torch.testing.assert_close(model.encode(sents, convert_to_tensor=True), e0, rtol=1e-5, atol=1e-5)
    randomize_adapters(model, "default")
    feats = model.tokenize(sents)
    emb = model(feats)["sentence_embedding"]
    emb.square().sum().backward()
    assert all((p.grad is not None) == ("effir_adapters" in n) for n, p in model.named_parameters())


def test_leave_out_layers(tmp_path):
    model = make("bert")
    inputs = batch()
    effir.add_adapters(model, "double_seq_bn", "lo", leave_out=[1], backend="recompute")
    assert {(layer, loc) for layer, loc, m in find_adapter_sites(model) if "lo" in m.effir_adapters} == {
        (0, "mh_adapter"), (0, "output_adapter")}
    cfg = effir.adapters.resolve_config("double_seq_bn")
    assert adapter_summary(model)["adapter_params"]["lo"] == expected_params(model, cfg) // 2
    randomize_adapters(model, "lo")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    effir.save_adapters(model, tmp_path)
    fresh = make("bert")
    effir.load_adapters(fresh, tmp_path, backend="recompute")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"leave_out \[2\] names layers this model does not have.*0\.\.1"):
        effir.add_adapters(make("bert"), "seq_bn", leave_out=[2])
    with pytest.raises(ValueError, match="leave_out must be a list of layer indices"):
        effir.add_adapters(make("bert"), "seq_bn", leave_out=[-1])


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn"])
def test_adapterhub_format_round_trip(tmp_path, config):
    """save_adapters(format="adapterhub") writes AdapterHub's files and key names (the AdapterHub side is checked
    in tests/test_adapterhub_parity.py); effir reads them back to the same outputs."""
    model = make("xlmr")
    inputs = batch()
    effir.add_adapters(model, config, "ret", leave_out=[0], scaling=0.5, backend="recompute")
    randomize_adapters(model, "ret")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    effir.save_adapters(model, tmp_path, format="adapterhub")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["name"] == "ret" and meta["model_type"] == "xlm-roberta" and meta["hidden_size"] == 96
    assert meta["version"].startswith("adapters.") and meta["config"]["leave_out"] == [0]
    keys = sorted(torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True))
    assert keys[0].startswith("encoder.layer.1.") and ".adapters.ret.adapter_" in keys[0]
    fresh = make("xlmr")
    assert effir.load_adapters(fresh, tmp_path, backend="recompute") == "ret"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="format must be 'effir' or 'adapterhub'"):
        effir.save_adapters(model, tmp_path, format="peft")


def _hub_dir(path, config: dict, tensors: dict, version=True, model_type="bert"):
    """An AdapterHub-style adapter directory written by hand (no `adapters` import needed)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"config": config, "hidden_size": 64, "model_type": model_type, "name": "h"}
    if version:
        meta["version"] = "adapters.1.3.0"
    (path / "adapter_config.json").write_text(json.dumps(meta))
    torch.save(tensors, path / "pytorch_adapter.bin")
    return path


def _hub_tensors(layers=2, d=64, r=4, extra=()):
    g = torch.Generator().manual_seed(5)
    out = {}
    for i in range(layers):
        p = f"bert.encoder.layer.{i}.output.adapters.h."  # with a head model's base prefix
        out[p + "adapter_down.0.weight"] = torch.randn(r, d, generator=g)
        out[p + "adapter_down.0.bias"] = torch.randn(r, generator=g)
        out[p + "adapter_up.weight"] = torch.randn(d, r, generator=g)
        out[p + "adapter_up.bias"] = torch.randn(d, generator=g)
        for name in extra:
            out[p + name] = torch.randn(1, generator=g)
    return out


SEQ_BN_HUB = {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
              "original_ln_before": True, "original_ln_after": True, "residual_before_ln": True, "scaling": 1.0,
              "is_parallel": False, "ln_before": False, "ln_after": False, "use_gating": False, "leave_out": []}


def test_adapterhub_dir_by_hand_loads_with_its_weights(tmp_path):
    tensors = _hub_tensors()
    _hub_dir(tmp_path, SEQ_BN_HUB, tensors)
    model = make("bert")
    assert effir.load_adapters(model, tmp_path, backend="recompute") == "h"
    ad = model.encoder.layer[1].output.effir_adapters["h"]
    torch.testing.assert_close(ad.up.weight, tensors["bert.encoder.layer.1.output.adapters.h.adapter_up.weight"],
                               rtol=0, atol=0)
    assert "h" not in model.encoder.layer[1].attention.output.effir_adapters
    effir.save_adapters(model, tmp_path / "as_effir")  # AdapterHub's seq_bn fields are effir's seq_bn preset
    assert json.loads((tmp_path / "as_effir" / "adapter_config.json").read_text())["config"]["name"] == "seq_bn"


@pytest.mark.parametrize("change,match", [
    ({"architecture": "lora"}, "architecture 'lora' is not supported"),
    ({"use_gating": True}, "use_gating=True is not supported"),
    ({"ln_before": True}, "ln_before=True is not supported"),
    ({"original_ln_after": False}, "original_ln_after=False is not supported"),
    ({"residual_before_ln": "post_add"}, "residual_before_ln='post_add'"),
    ({"scaling": "channel"}, "scaling='channel' is not supported"),
    ({"reduction_factor": {"default": 16, "1": 8}}, "reduction_factor=.* one number for every layer"),
    ({"non_linearity": "tanh"}, "non_linearity='tanh' is not supported"),
])
def test_adapterhub_configs_effir_cannot_compute(tmp_path, change, match):
    _hub_dir(tmp_path, {**SEQ_BN_HUB, **change}, _hub_tensors())
    with pytest.raises(ValueError, match=match):
        effir.load_adapters(make("bert"), tmp_path)


def test_adapterhub_legacy_and_fallbacks_are_said(tmp_path):
    # adapter-transformers (no "version"): its "gelu" is the tanh approximation, "gelu_orig" the exact one
    _hub_dir(tmp_path / "a", {**SEQ_BN_HUB, "non_linearity": "gelu"}, _hub_tensors(), version=False)
    with pytest.raises(ValueError, match="tanh approximation"):
        effir.load_adapters(make("bert"), tmp_path / "a")
    _hub_dir(tmp_path / "b", {**SEQ_BN_HUB, "non_linearity": "gelu_orig"}, _hub_tensors(), version=False)
    model = make("bert")
    effir.load_adapters(model, tmp_path / "b", backend="recompute")
    assert model.encoder.layer[0].output.effir_adapters["h"].activation == "gelu"
    _hub_dir(tmp_path / "c", SEQ_BN_HUB, _hub_tensors(extra=("gate.weight",)))
    with pytest.raises(ValueError, match="tensors effir does not compute.*gate.weight"):
        effir.load_adapters(make("bert"), tmp_path / "c")
    _hub_dir(tmp_path / "d", {**SEQ_BN_HUB, "dropout": 0.1, "init_weights": "houlsby"}, _hub_tensors(),
             model_type="roberta")
    with pytest.warns(UserWarning) as rec:
        effir.load_adapters(make("bert"), tmp_path / "d", backend="recompute")
    said = " ".join(str(w.message) for w in rec)
    assert "dropout=0.1" in said and "init_weights='houlsby'" in said and "'roberta' model" in said


def test_convert_between_formats_without_a_model(tmp_path, capsys):
    from effir.adapters.__main__ import main as adapters_cli

    model = make("roberta")
    inputs = batch()
    effir.add_adapters(model, "par_bn", "conv", leave_out=[1], backend="recompute")
    randomize_adapters(model, "conv")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    effir.save_adapters(model, tmp_path / "effir")
    assert adapters_cli(["convert", str(tmp_path / "effir"), str(tmp_path / "hub"), "--to", "adapterhub"]) == 0
    meta = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert meta["model_type"] == "roberta" and meta["config"]["is_parallel"] and meta["config"]["leave_out"] == [1]
    effir.adapters.convert_adapters(tmp_path / "hub", tmp_path / "back", format="effir")
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    first = json.loads((tmp_path / "effir" / "adapter_config.json").read_text())["config"]
    assert first["name"] == "par_bn" and back["config"] == {**first, "name": "custom"}  # AdapterHub has no names
    for d in ("hub", "back"):
        fresh = make("roberta")
        effir.load_adapters(fresh, tmp_path / d, backend="recompute")
        with torch.no_grad():
            torch.testing.assert_close(fresh(**inputs).last_hidden_state, want, rtol=0, atol=0)
    assert adapters_cli(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "effir"]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
