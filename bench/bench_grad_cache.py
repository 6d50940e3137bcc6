"""GradCache benchmark (`python -m effir.train --mini-batch-size N`): memory and time of one contrastive step
against batch size, with and without GradCache, and the gradients checked equal.

    pytest bench/bench_grad_cache.py --benchmark-only

Encoder: multilingual-e5-small's shape (12 layers, hidden 384, 12 heads, FFN 1536) with RANDOM weights and a
2000-token vocabulary (the 250k-row embedding table would only add parameter memory, the same for both), seq_bn
adapters (reduction 16, random non-zero weights), fp32 on CPU. Batches: B query/passage pairs of random length
(queries 8-32 tokens, passages 16-64, right-padded), InfoNCE at t = 0.05 with group masking. Step: forward and
backward (effir.grad_cache.dual_encoder_backward with mini-batches of 16 texts, or the whole batch at
once as effir.training.loop.DualEncoderLoss does). Peak memory: the peak of live torch allocations during the
step (torch.profiler memory events, exact; bench/_train_step_worker.torch_peak_bytes). Results:
bench/results/grad_cache_cpu.json + grad_cache_cpu.png.
"""
from __future__ import annotations

import time

import pytest
import torch

from bench._common import RESULTS_DIR, write_results
from bench._train_step_worker import torch_peak_bytes

BATCHES = (32, 128)
MINI = 16


def _encoder():
    from transformers import BertConfig, BertModel

    import effir
    from effir.encoders.encoder import Encoder

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=2000, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=1536, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0), add_pooling_layer=False)
    effir.add_adapters(model, "seq_bn")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "effir_adapters" in n:
                p.normal_(0.0, 0.02)
    return Encoder(model.train(), None, name="e5-small-shaped (random weights)", max_length=128)


def _batch(b: int, lo: int, hi: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (b,), generator=g)
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(5, 2000, mask.shape, generator=g) * mask, "attention_mask": mask}


def _step(enc, loss_fn, q, p, groups, mini):
    from effir import grad_cache

    params = [x for x in enc.parameters() if x.requires_grad]
    for x in params:
        x.grad = None
    if mini is None:
        loss = loss_fn(enc(**q), enc(**p), query_groups=groups, doc_groups=groups)
        loss.backward()
    else:
        loss = grad_cache.dual_encoder_backward(enc, loss_fn, q, p, groups, mini, torch.device("cpu"))
    return float(loss.detach()), [x.grad.clone() for x in params]


def test_grad_cache_memory_and_time(benchmark):
    from effir import InfoNCELoss

    if torch.cuda.is_available():
        pytest.skip("CPU benchmark (peak from torch.profiler's CPU memory events)")
    enc = _encoder()
    loss_fn = InfoNCELoss(temperature=0.05)
    rows = []
    grads = {}
    for b in BATCHES:
        q, p = _batch(b, 8, 32, seed=b), _batch(b, 16, 64, seed=b + 1)
        groups = torch.arange(b) // 2  # pairs of translations: each one's partner is masked out
        for mini in (None, MINI):
            _step(enc, loss_fn, q, p, groups, mini)  # warm-up
            t0 = time.perf_counter()
            peak, (loss, g) = torch_peak_bytes(lambda: _step(enc, loss_fn, q, p, groups, mini))
            seconds = time.perf_counter() - t0  # with the profiler on: compare these side by side only
            t0 = time.perf_counter()
            _step(enc, loss_fn, q, p, groups, mini)
            rows.append({"pairs": b, "mini_batch_size": mini, "peak_bytes": peak, "loss": loss,
                         "step_s": time.perf_counter() - t0, "step_s_profiled": seconds,
                         "tokens": int(q["attention_mask"].sum() + p["attention_mask"].sum())})
            grads[(b, mini)] = (loss, g)
            print(f"pairs {b:4d}  mini-batch {str(mini):>4}: peak {peak / 2**20:8.1f} MiB  "
                  f"step {rows[-1]['step_s']:.2f} s  loss {loss:.6f}")
    big = BATCHES[-1]
    q, p = _batch(big, 8, 32, seed=big), _batch(big, 16, 64, seed=big + 1)
    groups = torch.arange(big) // 2
    benchmark.pedantic(lambda: _step(enc, loss_fn, q, p, groups, MINI), rounds=1, iterations=1)

    by = {(r["pairs"], r["mini_batch_size"]): r for r in rows}
    for b in BATCHES:  # the same step: loss and gradients agree to fp32 rounding
        (l0, g0), (l1, g1) = grads[(b, None)], grads[(b, MINI)]
        assert l1 == pytest.approx(l0, rel=1e-5)
        for x, y in zip(g1, g0):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5 * float(y.abs().max()))
    whole, cached = by[(big, None)]["peak_bytes"], by[(big, MINI)]["peak_bytes"]
    ratio_mem = whole / cached
    ratio_time = by[(big, MINI)]["step_s"] / by[(big, None)]["step_s"]
    growth = cached / by[(BATCHES[0], MINI)]["peak_bytes"]
    path = write_results("grad_cache_cpu", {
        "config": {"encoder": "e5-small shape, random weights, vocab 2000, seq_bn adapters", "dtype": "float32",
                   "mini_batch_size": MINI, "batches": list(BATCHES)},
        "rows": rows, "whole_over_cached_peak": ratio_mem, "cached_over_whole_time": ratio_time,
        "cached_peak_growth": growth})
    _plot(rows)
    benchmark.extra_info.update(whole_over_cached_peak=ratio_mem, cached_over_whole_time=ratio_time)
    print(f"pairs {big}: whole-batch peak / GradCache peak = {ratio_mem:.2f}x, GradCache time = {ratio_time:.2f}x; "
          f"GradCache peak grows {growth:.2f}x from {BATCHES[0]} to {big} pairs -> {path}")
    assert ratio_mem > 2.0, rows  # the activations of 16 texts instead of 2 x 128
    assert growth < 1.5, rows  # what grows with the batch is O(B x hidden): embeddings, their gradients


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    width = 0.38
    for k, (mini, label) in enumerate(((None, "whole batch"), (MINI, f"GradCache, {MINI} texts at a time"))):
        sel = [r for r in rows if r["mini_batch_size"] == mini]
        xs = [i + (k - 0.5) * width for i in range(len(sel))]
        ax.bar(xs, [r["peak_bytes"] / 2**20 for r in sel], width, label=label)
        for x, r in zip(xs, sel):
            ax.annotate(f"{r['step_s']:.1f} s", (x, r["peak_bytes"] / 2**20), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(BATCHES)), [f"{b} pairs" for b in BATCHES])
    ax.set_ylabel("peak live torch memory (MiB)")
    ax.set_title("one train step, e5-small shape, fp32, CPU (label: step time)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "grad_cache_cpu.png", dpi=120)
    plt.close(fig)
