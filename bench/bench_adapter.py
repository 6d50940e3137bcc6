"""Bottleneck-adapter benchmark (CPU sizes; the GPU numbers come from bench/gpu/adapter.py via bench/gpu_suite.py).

    pytest bench/bench_adapter.py --benchmark-only

Per variant ("plain" adapter; "ln" = adapter + residual + LayerNorm as in double_seq_bn; "ln_pre" = seq_bn with
the layer's LayerNorm before and after) and method (effir backends; the torch reference eager = the unfused op
sequence; torch.compile of the reference; AdapterHub's `Adapter` module where `adapters` imports, else
recorded missing): forward+backward median time, bytes of the tensors saved for backward (counted with
torch.autograd.graph.saved_tensors_hooks, distinct storages, parameters excluded), and achieved bytes/s on the
minimal bytes (bench/gpu/adapter.py MIN_BYTES). Plus the 12-layer encoder comparison against AdapterHub in
the peers env (tests/_adapterhub_peer.py memory). Results: bench/results/adapter_cpu.json + adapter_cpu.png.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from bench._common import RESULTS_DIR, write_results
from bench.gpu.adapter import MIN_BYTES, _fn
from effir.backends import available_backends

REPO = Path(__file__).resolve().parent.parent
PEER_PY = Path(os.environ.get("EFFIR_PEER_PYTHON", REPO / ".venv-peers" / "bin" / "python"))
M, D, R = 2048, 384, 24  # CPU size: 2048 tokens of multilingual-e5-small width, reduction 16
VARIANTS = ("ln_pre", "ln", "plain")
METHODS = ("effir_recompute", "effir_reference", "effir_triton", "torch_compile", "adapterhub")
_ARGS = ("h", "t", "w_down", "b_down", "w_up", "b_up", "ln_weight", "ln_bias")
RESULTS: dict = {"config": {"M": M, "d": D, "r": R, "dtype": "float32", "device": "cpu"}, "rows": [], "missing": {}}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {k: torch.randn(*s, generator=g) for k, s in
         dict(h=(M, D), t=(M, D), w_down=(R, D), b_down=(R,), w_up=(D, R), b_up=(D,), ln_weight=(D,), ln_bias=(D,),
              dy=(M, D)).items()}
    p["w_down"] /= D**0.5
    p["w_up"] /= R**0.5
    return p


def _adapterhub(variant):
    from adapters.configuration import DoubleSeqBnConfig, SeqBnConfig
    from adapters.methods.modeling import Adapter

    cfg = (SeqBnConfig if variant == "ln_pre" else DoubleSeqBnConfig)(non_linearity="relu", scaling=1.0)
    mod, ln = Adapter("bench", D, R, cfg), torch.nn.LayerNorm(D, eps=1e-5).requires_grad_(False)

    def f(h, t, *_):
        x, _, residual = mod.pre_forward(h, t, ln)
        out, _, _ = mod(x, residual_input=residual)
        return mod.post_forward(out, h, t, ln)

    return f, list(mod.parameters())


def _method(variant, method):
    """(f, extra params to differentiate) or pytest.skip with the reason (also recorded)."""
    if method == "adapterhub":
        if variant == "plain":
            pytest.skip("AdapterHub has no stand-alone adapter without its layer's residual / LayerNorm")
        try:
            return _adapterhub(variant)
        except Exception as exc:
            RESULTS["missing"]["adapterhub"] = f"{type(exc).__name__}: {exc}"[:300]
            pytest.skip(f"AdapterHub not importable here: {exc}")
    if method == "effir_triton" and "triton" not in available_backends("adapter", "cpu"):
        pytest.skip("triton needs a GPU (or TRITON_INTERPRET=1, too slow to time)")
    if method == "effir_triton" and os.environ.get("TRITON_INTERPRET") == "1":
        RESULTS["missing"]["effir_triton"] = "CPU: Triton runs only in its interpreter; timed on the GPU"
        pytest.skip("Triton interpreter timings are meaningless; see bench/gpu/adapter.py")
    if method == "torch_compile":
        return torch.compile(_fn(variant, None, "relu", 1.0)), []
    return _fn(variant, method.removeprefix("effir_"), "relu", 1.0), []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_fwd_bwd(benchmark, variant, method):
    f, extra = _method(variant, method)
    p = _inputs()
    leaves = {k: p[k].clone().requires_grad_(k not in ("ln_weight", "ln_bias")) for k in _ARGS}
    params = {leaves[k].untyped_storage().data_ptr() for k in _ARGS[2:]} | {
        q.untyped_storage().data_ptr() for q in extra}
    wrt = [leaves["h"]] + ([] if variant == "plain" else [leaves["t"]]) + (
        extra if method == "adapterhub" else [leaves[k] for k in ("w_down", "b_down", "w_up", "b_up")])

    def step():
        y = f(*[leaves[k] for k in _ARGS])
        torch.autograd.grad(y, wrt, p["dy"])

    step()  # warm-up (and torch.compile's compilation)
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = f(*[leaves[k] for k in _ARGS])
    del y
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    nbytes = MIN_BYTES[variant] * M * D * 4
    row = {"variant": variant, "method": method, "median_s": med, "saved_bytes": sum(seen.values()),
           "saved_per_token_bytes": sum(seen.values()) / M, "min_bytes": nbytes, "bytes_per_s": nbytes / med}
    RESULTS["rows"].append(row)
    benchmark.extra_info.update(row)
    if method in ("effir_recompute", "effir_triton"):
        # only its inputs: x (plain), h and t (ln), z = h + t (ln_pre)
        n_in = {"plain": 1, "ln": 2, "ln_pre": 1}[variant]
        assert sum(seen.values()) == n_in * M * D * 4, row


def test_encoder_saved_activation_memory_vs_adapterhub(benchmark):
    """12-layer XLM-R-like encoder (hidden 384, fp32, 64 tokens), one training-step forward: saved bytes of
    the frozen backbone alone, AdapterHub and effir, per config (peers env)."""
    if not PEER_PY.exists():
        RESULTS["missing"]["encoder_memory"] = f"peers env missing ({PEER_PY})"
        pytest.skip(f"peers env missing ({PEER_PY}); run .ci/setup")
    payload = {"configs": ["seq_bn", "double_seq_bn", "par_bn"], "layers": 12, "hidden": 384, "heads": 12,
               "intermediate": 1536, "batch": 2, "seq": 32, "backend": "recompute"}
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def run():
        proc = subprocess.run([str(PEER_PY), str(REPO / "tests" / "_adapterhub_peer.py"), "memory",
                               json.dumps(payload)], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    for cfg in payload["configs"]:
        res[f"drop_bytes/{cfg}"] = res[f"adapterhub/{cfg}"] - res[f"effir/{cfg}"]
    RESULTS["encoder_memory"] = res
    benchmark.extra_info.update(res)
    assert res["drop_bytes/seq_bn"] >= res["layers"] * res["tokens"] * (res["hidden"] + res["bottleneck/seq_bn"]) * 4


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    if not RESULTS["rows"] and "encoder_memory" not in RESULTS:
        return
    path = write_results("adapter_cpu", RESULTS)
    try:
        _plot(RESULTS, RESULTS_DIR / "adapter_cpu.png")
    except Exception as exc:  # matplotlib missing: the JSON still holds every number
        RESULTS["missing"]["plot"] = f"{type(exc).__name__}: {exc}"
        write_results("adapter_cpu", RESULTS)
    print(f"\nadapter results: {path}")


def _plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    methods = sorted({r["method"] for r in rows})
    for i, key, label in ((0, "median_s", "fwd+bwd median (ms)"), (1, "saved_per_token_bytes", "saved bytes / token")):
        ax = axes[i]
        width = 0.8 / max(len(methods), 1)
        for j, m in enumerate(methods):
            vals = [next((r[key] for r in rows if r["variant"] == v and r["method"] == m), 0) for v in VARIANTS]
            vals = [v * 1e3 for v in vals] if key == "median_s" else vals
            ax.bar([k + j * width for k in range(len(VARIANTS))], vals, width, label=m)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(VARIANTS))], VARIANTS)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    c = res["config"]
    fig.suptitle(f"bottleneck adapter, CPU, M={c['M']} d={c['d']} r={c['r']} fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
