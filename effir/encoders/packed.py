"""Unpadded ("packed") forward of BERT-family encoders: every position-wise op runs on real tokens only.

A batch of (B, L) token ids with an attention mask holds T <= B*L real tokens; in retrieval batches a third
to a half of B*L is padding (short queries padded to the longest one). In a BERT layer everything but the
attention core is position-wise (the Q/K/V projections, the attention output dense + residual + LayerNorm,
the feed-forward block, and the adapters effir injects there), so those run on a (T, d) tensor of real
tokens. Only the attention core needs the (B, L) layout: the packed Q/K/V are scattered into it, attention
runs with the padding mask (torch's scaled_dot_product_attention, the same math as the HF module), and the
real tokens are gathered back. The encoder's FLOPs then scale with T instead of B*L; its outputs on real
tokens are those of the padded forward (padding never reaches a real token through attention), so pooling
over them gives the same embeddings.

Works on models whose `embeddings` / `encoder.layer[i].{attention.self, attention.output, intermediate,
output}` follow transformers' BERT layout with absolute positions (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA and
the default multilingual-e5-small); `unpad_support(model)` says why another model is not supported and the
caller then runs the model's own padded forward (with a warning).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _layers(model: nn.Module):
    encoder = getattr(model, "encoder", None)
    return getattr(encoder, "layer", None)


def unpad_support(model: nn.Module) -> str | None:
    """None when `packed_hidden_states` can run `model`, else the reason it cannot (for the warning)."""
    cfg = getattr(model, "config", None)
    layers = _layers(model)
    if cfg is None or getattr(model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
        return f"{type(model).__name__} has no BERT-style embeddings + encoder.layer"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "decoder / cross-attention models are not supported"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type={cfg.position_embedding_type!r} (only absolute positions)"
    for layer in layers:
        att = getattr(layer, "attention", None)
        sa = getattr(att, "self", None)
        if sa is None or not all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value")):
            return f"{type(layer).__name__} has no attention.self.query/key/value"
        if not all(hasattr(m, "forward") for m in (att.output, getattr(layer, "intermediate", None),
                                                   getattr(layer, "output", None))):
            return f"{type(layer).__name__} lacks attention.output / intermediate / output"
    return None


def _attention_core(sa: nn.Module, x: Tensor, flat: Tensor, keep: Tensor, batch: int, length: int,
                    dropout_p: float) -> Tensor:
    """Self-attention context of the real tokens. x (T, d) packed; flat (T,) int64 positions in the (B*L) grid;
    keep (B, 1, 1, L) bool key mask. Returns (T, all_head_size)."""
    heads, dh = sa.num_attention_heads, sa.attention_head_size
    # one (T, 3*d') projection instead of three: one matmul, one scatter
    w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
    b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
    qkv = F.linear(x, w, b)
    grid = qkv.new_zeros(batch * length, qkv.shape[1]).index_copy(0, flat, qkv)
    q, k, v = grid.view(batch, length, 3, heads, dh).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, dh)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p,
                                         scale=getattr(sa, "scaling", dh ** -0.5))
    return ctx.transpose(1, 2).reshape(batch * length, heads * dh).index_select(0, flat)


def _layer(layer: nn.Module, x: Tensor, flat: Tensor, keep: Tensor, batch: int, length: int,
           dropout_p: float) -> Tensor:
    ctx = _attention_core(layer.attention.self, x, flat, keep, batch, length, dropout_p)
    a = layer.attention.output(ctx, x)  # dense, dropout, (adapter), residual, LayerNorm: position-wise
    return layer.output(layer.intermediate(a), a)


def packed_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                         token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Last hidden states of the real tokens only.

    input_ids (B, L) int, attention_mask (B, L) int/bool (1 = token; every row needs at least one),
    token_type_ids (B, L) or None. Returns (hidden (T, d) in the model's compute dtype, row (T,) int64: the batch
    row of each token), tokens in row-major order (so each row's tokens are contiguous, in position order).
    Dropout follows model.training; HF activation / gradient checkpointing (`model.activation_checkpointing_enable()`) is
    honoured.
    """
    batch, length = input_ids.shape
    mask = attention_mask.bool()
    flat = mask.reshape(-1).nonzero().squeeze(1)
    row = torch.div(flat, length, rounding_mode="floor")
    kwargs = {"input_ids": input_ids}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    # embeddings (word + position + type, LayerNorm, dropout) on the padded grid: positions come out right for
    # every model family (RoBERTa's start after padding_idx) and the cost is one lookup per position
    x = model.embeddings(**kwargs).reshape(batch * length, -1).index_select(0, flat)
    keep = mask[:, None, None, :]
    dropout_p = float(model.config.attention_probs_dropout_prob) if model.training else 0.0
    may_ckpt = model.training and torch.is_grad_enabled()
    encoder_ckpt = bool(getattr(model.encoder, "gradient_checkpointing", False))
    for layer in model.encoder.layer:
        # transformers >= 4.52 flags each layer (every_n_layers), older ones the encoder
        if may_ckpt and (encoder_ckpt or bool(getattr(layer, "gradient_checkpointing", False))):
            x = checkpoint(_layer, layer, x, flat, keep, batch, length, dropout_p, use_reentrant=False)
        else:
            x = _layer(layer, x, flat, keep, batch, length, dropout_p)
    return x, row
