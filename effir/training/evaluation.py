"""Zero-shot evaluation around training: the before/after runs, the on-disk cache, the printed table.

The "before" evaluation of an unchanged base encoder only depends on the model, the data set and the
subset, so it is cached under `$EFFIR_CACHE/train-eval/` keyed by those (plus effir's version and a cache
format number); re-runs skip it (`--no-eval-cache` recomputes).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from effir._paths import cache_dir

from .metrics_log import write_json_atomic

# Paragraph subset per evaluation in the default (CPU) run: about a minute each on 2 cores.
DEFAULT_MAX_PARAGRAPHS = {"xquad-r": 24, "mlqa-r": 48}
DISPLAY = {"xquad-r": "XQuAD-R", "mlqa-r": "MLQA-R"}


def max_paragraphs_for(cfg, dataset: str) -> int | None:
    if cfg.eval_full:
        return None
    if cfg.eval_max_paragraphs is not None:
        return int(cfg.eval_max_paragraphs)
    return DEFAULT_MAX_PARAGRAPHS[dataset]


CACHE_FORMAT = 1  # bump when the evaluation's definition or output changes


def cache_key(model: str, dataset: str, max_paragraphs, extra: dict | None = None) -> str:
    """Key of a cached base-encoder evaluation: model + dataset + subset (+ effir's version and the cache
    format). `--no-eval-cache` recomputes after a change the key does not see (e.g. a rebuilt local model)."""
    from effir import __version__

    payload = {"model": str(model), "dataset": dataset, "max_paragraphs": max_paragraphs,
               "effir": __version__, "format": CACHE_FORMAT, **(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def run_evaluation(encoder, dataset: str, *, model_name: str, max_paragraphs, batch_size: int,
                   cache: bool = False, cache_extra: dict | None = None, log=None, label: str = "",
                   progress: bool = False) -> dict:
    """`effir.evaluate` on `dataset` (eval JSON format), from the cache when `cache` and already there."""
    import sys

    from effir import evaluate

    path = None
    if cache:
        path = cache_dir() / "train-eval" / f"{cache_key(model_name, dataset, max_paragraphs, cache_extra)}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            result["cached"] = True
            if log is not None:
                log.write("eval", dataset=dataset, cached=True, path=str(path))
            if progress:
                print(f"{DISPLAY.get(dataset, dataset)} {label}: cached ({path})", file=sys.stderr)
            return result
    if progress:
        subset = "all paragraphs" if max_paragraphs is None else f"{max_paragraphs} paragraph groups"
        print(f"evaluating {DISPLAY.get(dataset, dataset)} {label} ({subset})", file=sys.stderr)
    was_training = encoder.training
    encoder.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        result = evaluate(encoder, dataset=dataset, max_paragraphs=max_paragraphs, batch_size=batch_size,
                          show_progress=progress)
    result = dict(result)
    result["eval_wall_s"] = round(time.perf_counter() - t0, 2)
    result["max_paragraphs"] = max_paragraphs
    if was_training:
        encoder.train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
    if log is not None:
        log.write("eval", dataset=dataset, cached=False, seconds=result["eval_wall_s"],
                  map=result.get("map"), rank_distance=result.get("rank_distance"))
    return result


def _row(res: dict | None) -> list[str]:
    if not res:
        return ["-"] * 4
    m = res.get("map", {})
    bias = res.get("rank_distance")
    if isinstance(bias, dict):  # tolerate a {"mean": ...} form
        bias = bias.get("mean", bias.get("macro"))
    return [f"{m.get('mo', float('nan')):.3f}", f"{m.get('cr', float('nan')):.3f}",
            f"{m.get('mul', float('nan')):.3f}", "-" if bias is None else f"{float(bias):.1f}"]


def format_table(before: dict, after: dict, datasets) -> str:
    """The Mo./Cr./Mul. mAP and language-bias table, before vs after training, one block per data set."""
    lines = []
    header = f"{'':8s}" + "".join(f"| {DISPLAY.get(d, d) + ' (mAP; bias = rank distance)':^38s}" for d in datasets)
    sub = f"{'':8s}" + "".join(f"| {'Mo.':>7s} {'Cr.':>7s} {'Mul.':>7s} {'bias':>8s}     " for _ in datasets)
    lines += [header, sub, "-" * len(sub)]
    for label, res in (("before", before), ("after", after)):
        cells = ""
        for d in datasets:
            r = _row(res.get(d))
            cells += f"| {r[0]:>7s} {r[1]:>7s} {r[2]:>7s} {r[3]:>8s}     "
        lines.append(f"{label:8s}" + cells)
    if before and after:
        cells = ""
        for d in datasets:
            b, a = before.get(d), after.get(d)
            if not (b and a):
                cells += f"| {'':38s}"
                continue
            dm = {k: a["map"][k] - b["map"][k] for k in ("mo", "cr", "mul")}
            bb, ab = _row(b)[3], _row(a)[3]
            db = "-" if "-" in (bb, ab) else f"{float(ab) - float(bb):+.1f}"
            cells += f"| {dm['mo']:>+7.3f} {dm['cr']:>+7.3f} {dm['mul']:>+7.3f} {db:>8s}     "
        lines.append(f"{'change':8s}" + cells)
    return "\n".join(lines)


def subset_note(results: dict) -> str:
    parts = []
    for d, r in results.items():
        mp = r.get("max_paragraphs")
        parts.append(f"{DISPLAY.get(d, d)}: {'all paragraphs' if mp is None else f'first {mp} paragraphs'}")
    return "; ".join(parts)


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
