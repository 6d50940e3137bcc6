"""GPU section of the prepared script: GradCache (`effir.grad_cache`, `python -m effir.train --mini-batch-size`)
on CUDA, where its RNG replay uses the device's generator (the CPU tests cannot reach that path).

On a tiny random BERT with seq_bn adapters, 24 query / passage pairs, chunks of 5 texts:
  replay_exact: with dropout 0.1 under bf16 autocast, every chunk re-embedded in the backward pass equals the
                first pass's embeddings bit for bit (the same CUDA dropout masks);
  grads:        without dropout in fp32 (TF32 off), the GradCache gradients against the whole-batch step's,
                with the fused InfoNCE on its GPU backend (auto): max relative error over the adapter tensors;
  rng_untouched: the CUDA generator after the step is where the first pass left it.
A few seconds.
"""
from __future__ import annotations

import torch


def _encoder(dropout: float, device):
    from transformers import BertConfig, BertModel

    import effir
    from effir.encoders.encoder import Encoder

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=dropout,
                                 attention_probs_dropout_prob=dropout), add_pooling_layer=False)
    effir.add_adapters(model, "seq_bn", reduction_factor=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "effir_adapters" in n:
                p.normal_(0.0, 0.1)
    return Encoder(model.to(device).train(), None, name="tiny", max_length=64)


def _batch(b, t, seed, device):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return {"input_ids": (torch.randint(5, 500, (b, t), generator=g) * mask).to(device),
            "attention_mask": mask.to(device)}


def run(out=None, quick: bool = False, device: str = "cuda") -> dict:
    from effir import InfoNCELoss
    from effir.grad_cache import backward_through_chunks, dual_encoder_backward, embed_without_graph

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    dev = torch.device(device)
    q, p = _batch(24, 20, 1, dev), _batch(24, 40, 2, dev)
    groups = (torch.arange(24) // 2).to(dev)
    res = {}

    enc = _encoder(0.1, dev)
    seen = []

    def encode(**chunk):
        e = enc(**chunk)
        seen.append(e.detach().clone())
        return e

    with torch.autocast(dev.type, dtype=torch.bfloat16):
        emb, chunks, states = embed_without_graph(encode, p, 5, dev)
    first = list(seen)
    after = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state()
    seen.clear()
    backward_through_chunks(encode, chunks, states, torch.ones_like(emb),
                            autocast=lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
    res["replay_exact"] = len(first) == len(seen) == 5 and all(torch.equal(a, b) for a, b in zip(first, seen))
    now = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state()
    res["rng_untouched"] = bool(torch.equal(now, after))

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        enc = _encoder(0.0, dev)
        loss_fn = InfoNCELoss(temperature=0.05)
        params = [x for x in enc.parameters() if x.requires_grad]
        whole = loss_fn(enc(**q), enc(**p), query_groups=groups, doc_groups=groups)
        want = torch.autograd.grad(whole, params)
        loss = dual_encoder_backward(enc, loss_fn, q, p, groups, 5, dev)
        rel = max(float((x.grad - w).abs().max() / w.abs().max()) for x, w in zip(params, want))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    res.update(loss_whole=float(whole), loss_cached=float(loss), grad_max_rel_err=rel)
    res["ok"] = res["replay_exact"] and res["rng_untouched"] and rel < 1e-4 and abs(float(loss) - float(whole)) < 1e-5
    if isinstance(out, dict):
        out.update(res)
    return res
