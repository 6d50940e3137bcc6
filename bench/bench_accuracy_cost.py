"""Accuracy against cost: sampling ∈ {mono, cross, hybrid} × {adapters (seq_bn), full fine-tuning}.

    pytest bench/bench_accuracy_cost.py --benchmark-only

Each configuration is one `effir.training.run` (the code behind `python -m effir.train`) on the default
encoder (multilingual-e5-small, 4-bit weights) and training mix, followed by zero-shot XQuAD-R and MLQA-R.
Reported per configuration: Mo./Cr./Mul. mAP and language bias (rank distance) before and after, training
time, trainable parameters, peak memory of the training loop (above its start), and training FLOPs
(analytic, bench/_flops.py, from the padded shapes and real token counts of every step). Written to
bench/results/accuracy_cost_<device>.json and drawn as accuracy (XQuAD-R Mul. mAP) against cost
(training FLOPs and training time), one point per configuration: bench/results/accuracy_cost_<device>.png.

CPU (default): short runs -- EFFIR_BENCH_STEPS (30) steps of EFFIR_BENCH_BATCH (16) pairs, evaluation on the
first EFFIR_BENCH_PARAGRAPHS (16) paragraph groups; differences this small are within noise and only show
that the pipeline runs. GPU: 300 steps of 64 pairs, full evaluation sets.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench._common import RESULTS_DIR, write_results

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
STEPS = int(os.environ.get("EFFIR_BENCH_STEPS", 300 if ON_GPU else 30))
BATCH = int(os.environ.get("EFFIR_BENCH_BATCH", 64 if ON_GPU else 16))
PARAGRAPHS = os.environ.get("EFFIR_BENCH_PARAGRAPHS", "all" if ON_GPU else "16")
MODEL = os.environ.get("EFFIR_BENCH_MODEL", "multilingual-e5-small")  # another encoder (folder) for smoke runs
CONFIGS = [(s, k) for k in ("adapters", "full") for s in ("mono", "cross", "hybrid")]


@pytest.fixture(scope="module")
def collected():
    """Results of every configuration; the JSON and the plot are written once all have run."""
    rows: list[dict] = []
    yield rows
    if rows:
        payload = {"device": DEVICE, "steps": STEPS, "batch_size": BATCH, "eval_paragraphs": PARAGRAPHS,
                   "configs": rows}
        path = write_results(f"accuracy_cost_{DEVICE}", payload)
        _plot(rows, RESULTS_DIR / f"accuracy_cost_{DEVICE}.png")
        print(f"\naccuracy vs cost -> {path}")


def _flops(run_dir, dims: dict, adapters: bool) -> float:
    from bench._flops import analytic_step_flops
    from effir.training.metrics_log import read_jsonl

    total = 0
    for r in read_jsonl(run_dir / "train_log.jsonl"):
        if r["event"] != "step":
            continue
        (bq, tq), (bp, tp) = r["q_shape"], r["p_shape"]
        inputs = [(bq, tq, r["q_tokens"]), (bp, tp, r["p_tokens"])]  # the encoder runs unpadded (the default)
        total += analytic_step_flops(**dims, inputs=inputs, reduction=16 if adapters else None, unpadded=True,
                                     adapter_impl="fused", loss_impl="fused", loss_rows=bq, loss_cols=bp)["total"]
    return float(total)


@pytest.mark.parametrize("sampling, kind", CONFIGS, ids=[f"{s}-{k}" for s, k in CONFIGS])
def test_accuracy_cost(benchmark, collected, tmp_path, sampling, kind):
    from effir._paths import data_mirror
    from effir.training import TrainConfig, run

    if data_mirror() is None:
        pytest.skip("shared data mirror not found: set EFFIR_DATA_DIR to ../shared/data")
    adapters = kind == "adapters"
    cfg = TrainConfig(model=MODEL, sampling=sampling, adapters="seq_bn" if adapters else "none", steps=STEPS,
                      batch_size=BATCH, output_dir=str(tmp_path / "run"), progress=False,
                      eval_full=PARAGRAPHS == "all",
                      eval_max_paragraphs=None if PARAGRAPHS == "all" else int(PARAGRAPHS))
    box = {}
    benchmark.pedantic(lambda: box.setdefault("m", run(cfg, print_fn=lambda *a, **k: None)),
                       rounds=1, iterations=1)
    m = box["m"]
    from effir import load_encoder

    hf = load_encoder(cfg.model).model.config
    dims = {"layers": hf.num_hidden_layers, "hidden": hf.hidden_size, "intermediate": hf.intermediate_size}
    row = {
        "sampling": sampling, "kind": kind, "adapters": cfg.adapters, "lr": cfg.resolved_lr(),
        "train_s": m["training"]["train_wall_s"], "examples_per_s": m["training"]["examples_per_s"],
        "tokens_per_s": m["training"]["tokens_per_s"], "trainable_parameters": m["parameters"]["trainable"],
        "total_parameters": m["parameters"]["total"],
        "peak_memory_added_bytes": m["training"]["peak_memory_added_bytes"],
        "peak_memory_bytes": m["training"]["peak_memory_bytes"],
        "train_flops": _flops(tmp_path / "run", dims, adapters), "final_loss": m["training"]["final_loss"],
        "model": MODEL,
    }
    for when in ("before", "after"):
        for ds, r in m[when].items():
            row[f"{ds}_{when}"] = {"map": r["map"], "rank_distance": r["rank_distance"],
                                   "recall": r.get("recall")}
    collected.append(row)
    benchmark.extra_info.update({k: v for k, v in row.items() if not isinstance(v, dict)})
    benchmark.extra_info["xquad_r_mul_after"] = row.get("xquad-r_after", {}).get("map", {}).get("mul")


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    marker = {"adapters": "o", "full": "s"}
    color = {"mono": "tab:blue", "cross": "tab:orange", "hybrid": "tab:green"}
    for ax, (key, label) in zip(axes, (("train_flops", "training FLOPs (analytic)"),
                                      ("train_s", "training time (s)"))):
        for r in rows:
            acc = r.get("xquad-r_after", {}).get("map", {}).get("mul")
            if acc is None:
                continue
            ax.scatter(r[key], acc, marker=marker[r["kind"]], color=color[r["sampling"]], s=60,
                       label=f"{r['sampling']} / {r['kind']}")
            ax.annotate(f"{r['sampling']}/{r['kind']}", (r[key], acc), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        before = next((r["xquad-r_before"]["map"]["mul"] for r in rows if "xquad-r_before" in r), None)
        if before is not None:
            ax.axhline(before, color="gray", ls="--", lw=1, label="before training")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("XQuAD-R Mul. mAP (after)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=4, fontsize=8)
    name = "multilingual-e5-small, 4-bit weights" if MODEL == "multilingual-e5-small" else MODEL
    fig.suptitle(f"accuracy vs cost ({DEVICE}, {STEPS} steps x {BATCH} pairs; {name})")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
