"""Nsight Compute counters of the fused kernels at the issues' target sizes (called by bench/gpu_suite.py).

Why: the first H100 runs gave times per kernel (torch.profiler) but not why a kernel is slow. ncu reads, per
kernel, DRAM and SM throughput as a fraction of the card's peak, the L2 hit rate, achieved occupancy and the
warp stall reasons: whether the adapter's row kernel is bound by memory, by latency or by its re-reads, and
how far the loss GEMMs are from the tensor-core peak.

A child process warms up (JIT compile, autotuning) outside the profiled range, then runs one adapter step
(Pfeiffer LayerNorm variant, 65536 tokens, d = 768, r = 48, bf16) and one loss step (B = N = 32768, d = 768,
bf16) between cudaProfilerStart/Stop; ncu (`--profile-from-start off`) profiles the first LAUNCHES launches of
the Triton kernels there. Writes out/ncu.csv (ncu's own CSV, `--page details`) and returns a short summary.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNELS = "regex:_fwd_kernel|_bwd_rows_kernel|_bwd_dscores_kernel|_mm_acc_kernel"
LAUNCHES = 8  # adapter forward + row kernel, loss forward, then dS / GEMM launches of the first blocks
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats", "LaunchStats")

CHILD = r"""
import torch
from effir.losses import info_nce
from effir.ops.bottleneck_adapter import bottleneck_adapter_layernorm

torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
m, d, r = 65536, 768, 48
h, t, dy = (torch.randn(m, d, device=dev, dtype=bf) for _ in range(3))
ws = [torch.randn(r, d, device=dev, dtype=bf) / d ** 0.5, 0.1 * torch.randn(r, device=dev, dtype=bf),
      torch.randn(d, r, device=dev, dtype=bf) / r ** 0.5, 0.1 * torch.randn(d, device=dev, dtype=bf)]
lw, lb = 1 + 0.1 * torch.randn(d, device=dev, dtype=bf), 0.1 * torch.randn(d, device=dev, dtype=bf)
leaves = [x.requires_grad_() for x in [h] + ws]

def adapter_step():
    y = bottleneck_adapter_layernorm(h, t, *ws, lw, lb, activation="relu", original_ln_before=True,
                                     backend="triton")
    torch.autograd.grad(y, leaves, dy)

x = torch.nn.functional.normalize(torch.randn(2 * 32768, d, device=dev), dim=1).to(bf)
q, p = x[:32768].clone().requires_grad_(), x[32768:].clone().requires_grad_()

def loss_step():
    torch.autograd.grad(info_nce(q, p, temperature=0.05, backend="triton"), (q, p))

for _ in range(2):
    adapter_step(); loss_step()
torch.cuda.synchronize()
torch.cuda.profiler.start()
adapter_step(); loss_step()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("NCU_CHILD_OK", flush=True)
"""


def run(out, quick: bool = False, budget_s: float = 80.0) -> dict:
    ncu = shutil.which("ncu")
    if ncu is None:
        for cand in sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu")) + [Path("/usr/local/cuda/bin/ncu")]:
            if cand.exists():
                ncu = str(cand)
    if ncu is None:
        return {"skipped": "ncu not found"}
    cmd = [ncu, "--profile-from-start", "off", "--target-processes", "all", "--kernel-name", KERNELS,
           "--launch-count", str(LAUNCHES), "--clock-control", "none", "--csv", "--page", "details"]
    for sec in SECTIONS:
        cmd += ["--section", sec]
    cmd += [sys.executable, "-c", CHILD]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, budget_s), cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        (Path(out) / "ncu.csv").write_text(text)
        return {"error": f"ncu still running after {budget_s:.0f} s (killed); partial output in ncu.csv"}
    (Path(out) / "ncu.csv").write_text(p.stdout)
    res = {"rc": p.returncode, "seconds": round(time.time() - t0, 1), "child_ok": "NCU_CHILD_OK" in p.stdout,
           "stderr_tail": p.stderr[-1500:], "summary": summarize(p.stdout)}
    for row in res["summary"]:
        print(f"  ncu {row['kernel'][:28]:28s} " + " ".join(f"{k}={v}" for k, v in row.items() if k != "kernel"))
    return res


_KEEP = {  # (section, metric) -> short name
    ("GPU Speed Of Light Throughput", "Duration"): "us",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_pct",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_pct",
    ("GPU Speed Of Light Throughput", "L2 Cache Throughput"): "l2_pct",
    ("Memory Workload Analysis", "L2 Hit Rate"): "l2_hit_pct",
    ("Occupancy", "Achieved Occupancy"): "occupancy_pct",
    ("Launch Statistics", "Registers Per Thread"): "regs",
}


def summarize(csv_text: str) -> list[dict]:
    """Per profiled launch: the few numbers above, from ncu's details CSV (columns include "ID", "Kernel Name",
    "Section Name", "Metric Name", "Metric Unit", "Metric Value"); unknown layouts give an empty list."""
    import csv
    import io

    lines = [ln for ln in csv_text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    out: dict = {}
    for r in rows:
        key = (r.get("Section Name", ""), r.get("Metric Name", ""))
        if key not in _KEEP or "ID" not in r:
            continue
        entry = out.setdefault(r["ID"], {"kernel": r.get("Kernel Name", "?")})
        val = r.get("Metric Value", "").replace(",", "")
        if key[1] == "Duration":  # to microseconds, whatever unit ncu chose
            scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
            try:
                val = str(round(float(val) * scale.get(r.get("Metric Unit", "usecond"), 1.0), 1))
            except ValueError:
                pass
        entry[_KEEP[key]] = val
    return [out[k] for k in sorted(out, key=lambda s: int(s) if s.isdigit() else 0)]
