"""Plots of a GPU suite run (bench/gpu_suite.py): the loss and adapter comparisons at the issues' target sizes.

    python bench/plot_gpu.py bench/results/gpu_h100_2026-11-27_run2      # writes loss.png / adapter.png there

Reads loss.json / adapter.json / suite.json of one run (any may be missing) and draws, for every contestant
timed at the target size, its forward+backward time next to the floor the card's measured ceilings set (bf16
matmul for the loss, device-to-device copy for the adapter) and its peak memory. Runs on CPU (matplotlib, Agg).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _card(run: Path) -> str:
    try:
        prov = json.loads((run / "suite.json").read_text())["provenance"]
        # a dirty checkout (the device tool copies the working tree over a lagging HEAD): the tree names the code
        code = f"tree {prov['tree'][:7]}" if prov.get("dirty") and prov.get("tree") else f"commit {prov['commit'][:7]}"
        return f"{prov['gpu']}, driver {prov['driver']}, torch {prov['torch']}, triton {prov['triton']}, {code}"
    except Exception:
        return run.name


def plot_loss(run: Path) -> Path | None:
    f = run / "loss.json"
    if not f.exists():
        return None
    res = json.loads(f.read_text())
    rows = [r for r in res.get("timing", []) if r.get("status") == "ok" and (r["B"], r["d"]) == (32768, 768)]
    if not rows:
        return None
    rows.sort(key=lambda r: r["fwd_bwd_ms"])
    names = [r["name"] for r in rows]
    ms = [r["fwd_bwd_ms"] for r in rows]
    mem = [r["peak_bytes"] / 2**20 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2.2))
    colors = ["tab:blue" if n.startswith("effir") else "tab:gray" for n in names]
    ax1.barh(names, ms, color=colors)
    rate = (res.get("matmul_bf16") or {}).get("flop_per_s")
    if rate:
        floor = rows[0]["flops"] / rate * 1e3
        ax1.axvline(floor, color="k", ls="--", lw=1)
        ax1.axvline(2 * floor, color="tab:red", ls=":", lw=1)
        ax1.text(2 * floor, len(rows) - 0.5, " 50% of measured bf16 matmul", color="tab:red", va="top", fontsize=8)
        ax1.text(floor, -0.9, f"8BNd at {rate / 1e12:.0f} TFLOP/s", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("forward + backward, ms (log)")
    for i, v in enumerate(ms):
        ax1.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax2.barh(names, mem, color=colors)
    ax2.set_xscale("log")
    ax2.set_xlabel("peak memory above the inputs, MiB (log)")
    ax2.set_yticklabels([])
    for i, v in enumerate(mem):
        ax2.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    fig.suptitle(f"InfoNCE B = N = 32768, d = 768, bf16\n{_card(run)}", fontsize=9)
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_adapter(run: Path) -> Path | None:
    f = run / "adapter.json"
    if not f.exists():
        return None
    res = json.loads(f.read_text())
    rows = [r for r in res.get("timings", []) if "ms" in r and (r["M"], r["d"]) == (65536, 768)]
    if not rows:
        return None
    variants = sorted({r["variant"] for r in rows})
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 3.2), squeeze=False)
    copy = res.get("copy_bytes_per_s")
    for ax, v in zip(axes[0], variants):
        sel = sorted([r for r in rows if r["variant"] == v], key=lambda r: r["ms"])
        # knob rows are named after their environment ("effir_triton_tEFFIR_ADAPTER_BWD=split,..."): the
        # prefixes only crowd the axis
        names = [r["method"].replace("EFFIR_ADAPTER_", "").replace(",", " ") for r in sel]
        ax.barh(names, [r["ms"] for r in sel],
                color=["tab:blue" if n.startswith("effir") else "tab:gray" for n in names])
        for i, r in enumerate(sel):
            ax.text(r["ms"], i, f" {r['ms']:.2f} ({r.get('timing', 'wall')})", va="center", fontsize=8)
        if copy:
            floor = sel[0]["min_bytes"] / copy * 1e3
            ax.axvline(floor, color="k", ls="--", lw=1)
            ax.axvline(floor / 0.7, color="tab:red", ls=":", lw=1)
            ax.text(floor / 0.7, len(sel) - 0.5, " 70% of copy bandwidth", color="tab:red", va="top", fontsize=8)
        ax.set_xlabel("forward + backward GPU time, ms")
        ax.set_title(f"{v}: 65536 tokens, d = 768, r = 48, bf16", fontsize=9)
    fig.suptitle(_card(run), fontsize=9)
    fig.tight_layout()
    out = run / "adapter.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="result folders of bench/gpu_suite.py")
    args = ap.parse_args(argv)
    for run in args.runs:
        for out in (plot_loss(run), plot_adapter(run)):
            if out:
                print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
