"""Loss forward+backward benchmarks: time, peak memory, FLOPs (8 B N d with recompute) and FLOP/s per backend.

`pytest bench/bench_loss.py --benchmark-only` (CPU: small sizes plus the issue's CPU target, a few minutes).
Results: bench/results/loss_<device>.json and loss_<device>.png. The GPU peers (memeff, inf-cl, ...) are
measured by bench/gpu/loss.py from the prepared GPU script.

CPU target (issue 2): B = N = 8192, d = 768, fp32: chunked peak <= 1/8 of the reference's and time <= 1.5x.
Peak memory on CPU is measured in a fresh subprocess per backend with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_), so every large block is returned on free and the resident-set high-water mark is
the true peak, not an artefact of which backend ran first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench._common import RESULTS_DIR, PeakMemory, write_results
from effir.backends import available_backends
from effir.losses import info_nce

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# CPU threads: EFFIR_BENCH_THREADS pins torch's intra-op threads (recorded in every row). On an oversubscribed
# machine each parallel op waits for a descheduled thread at its barrier, which punishes many small ops
# (the chunked path) far more than a few big ones; 1 thread keeps the comparison about the algorithms.
if os.environ.get("EFFIR_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["EFFIR_BENCH_THREADS"]))
REPO = Path(__file__).resolve().parent.parent
# (B, M, d, dtype): N = B + M
SIZES = ([(1024, 0, 384, torch.float32), (2048, 1023, 256, torch.float32)] if DEVICE.type == "cpu" else
         [(8192, 0, 768, torch.bfloat16), (16384, 0, 768, torch.bfloat16)])
# Triton on CPU is the interpreter: a correctness tool, not something to time.
BACKENDS = [b for b in available_backends("loss", DEVICE) if not (b == "triton" and DEVICE.type == "cpu")]
TARGET = (8192, 0, 768, torch.float32)
_RESULTS: dict[str, dict] = {}


def flops(B: int, N: int, d: int) -> float:
    """Executed with recompute: S in forward, S again plus dQ and dD in backward."""
    return 8.0 * B * N * d


def make(B, M, d, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(2 * B + M, d, generator=g), dim=1).to(device, dtype)
    return x[:B], x[B:2 * B], (x[2 * B:] if M else None)


def fwd_bwd(backend, q, p, neg):
    leaves = [t.detach().requires_grad_(True) for t in (q, p) + ((neg,) if neg is not None else ())]
    loss = info_nce(leaves[0], leaves[1], leaves[2] if neg is not None else None, backend=backend)
    loss.backward()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return loss


def _peak_subprocess(backend, B, M, d, dtype) -> int:
    """Peak bytes of one fwd+bwd in a fresh process (CPU), after a tiny warm-up of the same code path."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "bench.bench_loss", "--peak", backend, str(B), str(M), str(d), str(dtype)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"peak subprocess failed: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def _peak(backend, q, p, neg) -> int:
    if DEVICE.type == "cpu":
        B, d = q.shape
        return _peak_subprocess(backend, B, 0 if neg is None else neg.shape[0], d, q.dtype)
    with PeakMemory(DEVICE) as pm:
        fwd_bwd(backend, q, p, neg)
    return pm.peak


def _record(benchmark, key, backend, B, M, d, dtype, peak):
    t = benchmark.stats.stats.min if benchmark.stats is not None else float("nan")
    N = B + M
    row = dict(backend=backend, B=B, N=N, d=d, dtype=str(dtype).replace("torch.", ""), time_s=t,
               peak_bytes=peak, flops=flops(B, N, d), flop_per_s=flops(B, N, d) / t,
               threads=torch.get_num_threads() if DEVICE.type == "cpu" else None)
    benchmark.extra_info.update(row)
    _RESULTS[key] = row
    return row


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    if _RESULTS:
        rows = list(_RESULTS.values())
        write_results(f"loss_{DEVICE.type}", {"device": DEVICE.type, "rows": rows, "cpu_target": _target_summary()})
        _plot(rows, RESULTS_DIR / f"loss_{DEVICE.type}.png")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B{s[0]}-M{s[1]}-d{s[2]}-{str(s[3])[6:]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_fwd_bwd(benchmark, backend, size):
    B, M, d, dtype = size
    q, p, neg = make(B, M, d, dtype)
    fwd_bwd(backend, q, p, neg)  # warm-up (compilation, autotuning, first-touch of memory)
    benchmark.pedantic(fwd_bwd, args=(backend, q, p, neg), rounds=3, iterations=1)
    _record(benchmark, f"{backend}-{B}-{M}-{d}-{dtype}", backend, B, M, d, dtype, _peak(backend, q, p, neg))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU target of issue 2 (GPU sizes: bench/gpu/loss.py)")
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_cpu_target_8192(benchmark, backend):
    """B = N = 8192, d = 768, fp32: chunked <= 1/8 of the reference's peak memory, <= 1.5x its time."""
    B, M, d, dtype = TARGET
    q, p, neg = make(B, M, d, dtype)
    fwd_bwd(backend, q[:64], p[:64], None)  # warm-up of the code path only
    benchmark.pedantic(fwd_bwd, args=(backend, q, p, neg), rounds=2, iterations=1)
    _record(benchmark, f"target-{backend}", backend, B, M, d, dtype, _peak(backend, q, p, neg))
    if backend == "chunked":
        s = _target_summary()
        assert s["memory_ratio"] <= 1 / 8, s
        assert s["time_ratio"] <= 1.5, s


def _target_summary():
    ref, ch = _RESULTS.get("target-reference"), _RESULTS.get("target-chunked")
    if not (ref and ch):
        return None
    return dict(memory_ratio=ch["peak_bytes"] / ref["peak_bytes"], time_ratio=ch["time_s"] / ref["time_s"],
                reference_peak_mib=ref["peak_bytes"] / 2**20, chunked_peak_mib=ch["peak_bytes"] / 2**20,
                reference_time_s=ref["time_s"], chunked_time_s=ch["time_s"])


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # plotting is a convenience; the JSON holds the numbers
        print(f"bench_loss: no plot ({exc})")
        return
    labels = [f"{r['backend']} B={r['B']} N={r['N']} d={r['d']} {r['dtype']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.4 * len(rows)), 5.5))
    axes[0].bar(range(len(rows)), [r["time_s"] * 1e3 for r in rows])
    axes[0].set_ylabel("fwd+bwd time (ms)")
    axes[1].bar(range(len(rows)), [r["peak_bytes"] / 2**20 for r in rows], color="tab:orange")
    axes[1].set_ylabel("peak memory (MiB)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7, rotation=40, ha="right")
    fig.suptitle(f"effir InfoNCE forward+backward on {DEVICE.type}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _peak_main(argv):
    backend, B, M, d, dtype = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), getattr(torch, argv[4][6:])
    q, p, neg = make(B, M, d, dtype, device=torch.device("cpu"))
    fwd_bwd(backend, q[:64], p[:64], None)  # imports and first-call set-up happen outside the measurement
    with PeakMemory("cpu") as pm:
        fwd_bwd(backend, q, p, neg)
    print(json.dumps({"peak": pm.peak}))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--peak":
    _peak_main(sys.argv[2:])
