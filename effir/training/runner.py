"""One training run end to end: checks, data, before-evaluation, training, saving, after-evaluation.

Every check that can fail on bad input (model, languages, batch size, output folder) runs before the
first training step, so a mistake costs seconds, not a training run.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from effir._paths import REPO_ROOT

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import RunContext, barrier, broadcast_object, setup, teardown
from .evaluation import format_table, load_json, max_paragraphs_for, run_evaluation, subset_note
from .metrics_log import JsonlLog, write_json_atomic

# Default number of optimizer steps when neither --steps nor --epochs is given: a few minutes on a 2-core
# CPU with the default encoder and batch (measured; see README), enough to move XQuAD-R Mul. mAP.
DEFAULT_STEPS = 72
EXIT_INTERRUPTED = 130


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# checks and construction
# ---------------------------------------------------------------------------------------------------
def prepare_output_dir(cfg: TrainConfig, ctx: RunContext) -> Path:
    """The run folder (rank 0 names a fresh one under runs/ when none is given); raises ValueError when
    it cannot be written."""
    if cfg.output_dir:
        out = Path(cfg.output_dir)
    else:
        name = None
        if ctx.is_main:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = REPO_ROOT / "runs" if (REPO_ROOT / "effir").is_dir() and os.access(REPO_ROOT, os.W_OK) \
                else Path.cwd() / "runs"
            name = str(base / f"{stamp}-{cfg.sampling}-{cfg.adapters}")
            i = 1
            while Path(name).exists():
                name = str(base / f"{stamp}-{cfg.sampling}-{cfg.adapters}-{i}")
                i += 1
        out = Path(broadcast_object(ctx, name))
    if cfg.resume and not (out / "checkpoint" / ckpt.CHECKPOINT_NAME).is_file():
        raise ValueError(f"--resume: no checkpoint in {out / 'checkpoint'}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--output-dir: cannot write to {out} ({exc.strerror or exc})") from None
    return out


def load_model(cfg: TrainConfig, ctx: RunContext):
    """The encoder on the run's device, or ValueError for a model that cannot be loaded."""
    from effir import load_encoder

    try:
        # Training truncates per call (--max-query-length / --max-passage-length); evaluation keeps the
        # encoder's own limit.
        return load_encoder(cfg.model, device=ctx.device)
    except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
        raise ValueError(f"--model: cannot load encoder {cfg.model!r}: {exc}") from exc


def load_groups(cfg: TrainConfig):
    """Training groups from the configured sources: registry names and/or JSONL files of parallel groups."""
    from effir.data.loaders import load_training_groups

    try:
        return list(load_training_groups(sources=list(cfg.sources), passage=cfg.passage))
    except (KeyError, FileNotFoundError) as exc:
        raise ValueError(f"--sources: {exc}") from exc


def check_data(cfg: TrainConfig, groups, ctx: RunContext) -> list[str]:
    """The training languages; ValueError for languages without data or a batch larger than the data."""
    from effir.data.groups import languages as count_languages

    have = count_languages(groups)
    if not groups:
        raise ValueError(f"--sources {cfg.sources}: no training groups were loaded")
    langs = list(cfg.languages) if cfg.languages else sorted(have)
    missing = [lang for lang in langs if lang not in have]
    if missing:
        raise ValueError(f"--languages: no training data for {missing}; the sources {cfg.sources} hold "
                         f"{have}")
    usable = [g for g in groups if any(lang in langs for lang in g.items)]
    if cfg.batch_size > len(usable):
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the data: only {len(usable)} groups "
                         f"have the languages {langs}")
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) must be divisible by the number of "
                         f"processes ({ctx.world_size})")
    return langs


def make_sampler(cfg: TrainConfig, groups, langs, ctx: RunContext):
    from effir import HybridBatchSampler

    try:
        return HybridBatchSampler(groups, cfg.batch_size, mode=cfg.sampling, alpha=cfg.alpha, languages=langs,
                                  language_weights=cfg.language_weights, seed=cfg.seed, rank=ctx.rank,
                                  world_size=ctx.world_size, drop_last=True)
    except ValueError as exc:
        raise ValueError(f"sampler (--sampling {cfg.sampling}, --batch-size {cfg.batch_size}): {exc}") from exc


def total_steps_for(cfg: TrainConfig, sampler) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.epochs is not None:
        try:
            per_epoch = len(sampler)
        except TypeError:
            raise ValueError("--epochs: this sampler has no length; give --steps") from None
        return max(1, int(round(cfg.epochs * per_epoch)))
    return DEFAULT_STEPS


def attach_adapters(cfg: TrainConfig, encoder) -> None:
    if cfg.train_adapters and cfg.init_adapters is not None:
        from effir import load_adapters

        load_adapters(encoder.model, cfg.init_adapters, backend=cfg.adapter_backend)  # active, trainable
    elif cfg.train_adapters:
        from effir import add_adapters

        kwargs = {} if cfg.reduction_factor is None else {"reduction_factor": cfg.reduction_factor}
        add_adapters(encoder.model, config=cfg.adapters, backend=cfg.adapter_backend, **kwargs)
    else:
        # BERT's pooler never reaches the embedding (mean/CLS pooling of the last hidden states); keeping it
        # frozen also keeps DDP from waiting for gradients that never come
        for name, p in encoder.model.named_parameters():
            p.requires_grad_(not name.startswith("pooler."))
    encoder.unpad = cfg.unpad
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen backbone (no input needs requires_grad).
        model = encoder.model
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(module: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_fraction": trainable / max(total, 1)}


def save_final(cfg: TrainConfig, encoder, out: Path) -> Path:
    """Only the adapter weights when training adapters; the whole model (HF format) otherwise."""
    if cfg.train_adapters:
        from effir import save_adapters

        path = out / "adapters"
        save_adapters(encoder.model, path)
        return path
    # model + tokenizer + effir's settings: `--model <run>/model` or `effir.load_encoder` reloads it
    return encoder.save_pretrained(out / "model")


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def run(cfg: TrainConfig, *, groups=None, on_step=None, print_fn=print) -> dict:
    """Train and evaluate as `cfg` says; returns the metrics dict (also written to metrics.json).

    groups: training ParallelGroups to use instead of `cfg.sources` (tests, the Python API).
    on_step: called with each StepRecord on every rank (tests use it to interrupt a run).
    The returned dict has "exit_code": 0, or 130 when interrupted by Ctrl-C (checkpoint saved).
    """
    from effir.data.batching import collate

    from .loop import Trainer, resolve_precision

    cfg.validate()
    t_start = time.perf_counter()
    ctx = setup(cfg.device)
    log = None
    try:
        out = prepare_output_dir(cfg, ctx)
        cfg = cfg.replace(output_dir=str(out))
        precision = resolve_precision(cfg.precision, ctx.device)
        seed_everything(cfg.seed)
        # data checks first: they are cheaper than loading the model
        if groups is None:
            groups = load_groups(cfg)
        langs = check_data(cfg, groups, ctx)
        sampler = make_sampler(cfg, groups, langs, ctx)
        total_steps = total_steps_for(cfg, sampler)
        encoder = load_model(cfg, ctx)
        if cfg.resume:
            saved = ckpt.load_checkpoint(out)
            total_steps = max(total_steps, int(saved["total_steps"])) if cfg.steps is None else total_steps
        else:
            saved = None
        log = JsonlLog(out / "train_log.jsonl" if ctx.is_main else None)
        log.write("start", config=cfg.to_dict(), world_size=ctx.world_size, device=str(ctx.device),
                  precision=precision, groups=len(groups), languages=langs, resume=cfg.resume)

        metrics_path = out / "metrics.json"
        if ctx.is_main:
            write_json_atomic(out / "config.json", cfg.to_dict())  # what --resume starts from
        previous = load_json(metrics_path) if cfg.resume else None
        metrics = {"config": cfg.to_dict(), "model": cfg.model, "precision": precision,
                   "world_size": ctx.world_size, "device": str(ctx.device), "languages": langs,
                   "training_groups": len(groups), "before": {}, "after": {}}
        eval_kw = dict(model_name=cfg.model, batch_size=cfg.eval_batch_size, log=log, progress=cfg.progress)

        # ---- before: the base encoder, cached on disk ---------------------------------------------
        if cfg.eval_before and ctx.is_main:
            if previous and previous.get("before"):
                metrics["before"] = previous["before"]
            else:
                for d in cfg.eval_sets:
                    metrics["before"][d] = run_evaluation(
                        encoder, d, max_paragraphs=max_paragraphs_for(cfg, d), cache=cfg.eval_cache,
                        label="before training", **eval_kw)
            write_json_atomic(metrics_path, metrics)
        barrier(ctx)

        # ---- training ----------------------------------------------------------------------------
        attach_adapters(cfg, encoder)
        metrics["parameters"] = count_parameters(encoder)
        seed_everything(cfg.seed + ctx.rank)  # dropout differs per rank; the data order comes from the sampler
        trainer = Trainer(cfg, encoder, groups, sampler, collate, ctx, out, log, total_steps)
        if saved is not None:
            trainer.restore(saved)
            log.write("resumed", step=trainer.step)
        result = trainer.train(on_step=on_step)
        summary = result.summary()
        if previous and previous.get("training"):
            summary["previous_segments"] = previous["training"].get("previous_segments", []) + [previous["training"]]
        metrics["training"] = summary
        metrics["sampler"] = _sampler_stats(sampler)
        if result.interrupted:
            metrics["exit_code"] = EXIT_INTERRUPTED
            if ctx.is_main:
                write_json_atomic(metrics_path, metrics)
                print_fn(f"interrupted at step {result.steps_done}/{total_steps}; checkpoint saved in "
                         f"{out / 'checkpoint'}; continue with: python -m effir.train --output-dir {out} --resume",
                         file=sys.stderr)
            return metrics

        if ctx.is_main:
            metrics["saved"] = str(save_final(cfg, encoder, out))
        # ---- after ---------------------------------------------------------------------------------
        if cfg.eval_after and ctx.is_main:
            for d in cfg.eval_sets:
                metrics["after"][d] = run_evaluation(encoder, d, max_paragraphs=max_paragraphs_for(cfg, d),
                                                     cache=False, label="after training", **eval_kw)
        barrier(ctx)
        metrics["total_wall_s"] = round(time.perf_counter() - t_start, 2)
        metrics["exit_code"] = 0
        if ctx.is_main:
            write_json_atomic(metrics_path, metrics)
            log.write("end", total_wall_s=metrics["total_wall_s"])
            _report(cfg, metrics, out, print_fn)
        return metrics
    finally:
        if log is not None:
            log.close()
        teardown(ctx)


def _sampler_stats(sampler):
    stats = getattr(sampler, "stats", None)
    try:
        return stats() if callable(stats) else None
    except Exception as exc:  # stats are informative only; never lose a finished run over them
        return {"error": repr(exc)}


def _report(cfg: TrainConfig, metrics: dict, out: Path, print_fn) -> None:
    tr = metrics["training"]
    params = metrics.get("parameters", {})
    adapters = cfg.adapters if cfg.init_adapters is None else f"from {cfg.init_adapters}"
    print_fn(f"\nmodel: {cfg.model}{' (multilingual-e5-small, 4-bit weights)' if cfg.model == 'multilingual-e5-small' else ''}; "
             f"adapters: {adapters}; sampling: {cfg.sampling} (alpha {cfg.alpha}); "
             f"trainable parameters: {params.get('trainable', 0):,} of {params.get('total', 0):,}")
    eps, tps = tr.get("examples_per_s"), tr.get("tokens_per_s")
    print_fn(f"training: {tr['steps_done']} steps in {tr['train_wall_s']:.1f} s"
             + (f", {eps:.1f} examples/s, {tps:.0f} tokens/s" if eps else "")
             + (f", final loss {tr['final_loss']:.4f}" if tr.get("final_loss") is not None else ""))
    if metrics["before"] or metrics["after"]:
        print_fn(f"\nzero-shot evaluation ({subset_note(metrics['after'] or metrics['before'])}):")
        print_fn(format_table(metrics["before"], metrics["after"], cfg.eval_sets))
    print_fn(f"\nrun folder: {out} (metrics.json, train_log.jsonl, {Path(metrics.get('saved', '')).name or 'checkpoint'}/); "
             f"total {metrics['total_wall_s']:.1f} s")
