"""`python -m effir.train`: train a multilingual dense retriever with hybrid batches, then evaluate zero-shot.

With no arguments: seq_bn adapters (reduction 16) on multilingual-e5-small (4-bit weights), hybrid
batches (alpha 0.5) over the default training mix, InfoNCE (temperature 0.05) with group masking, AdamW;
XQuAD-R and MLQA-R (a paragraph subset; `--eval-full` for all) before and after; prints the
Mo./Cr./Mul. mAP table and the language bias. Distributed: `torchrun --nproc-per-node N -m effir.train`.
Options override a `--config FILE` (JSON or TOML with the same names), which overrides the defaults.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effir.training.config import ADAPTERS, EVAL_SETS, PRECISIONS, SAMPLING, TrainConfig, read_config_file

S = argparse.SUPPRESS  # flags not given stay out of the namespace, so they do not override the config file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m effir.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=S)
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (flags override it)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="encoder: 'multilingual-e5-small' (default, 4-bit weights), a Hugging Face "
                                   "name or a local folder")
    m.add_argument("--adapters", choices=ADAPTERS, help="adapter type (default seq_bn); none = full fine-tuning")
    m.add_argument("--reduction-factor", type=float, help="adapter bottleneck reduction (default: the config's, 16 "
                                                          "for seq_bn)")
    m.add_argument("--init-adapters", metavar="DIR", help="start from a saved adapter (effir.save_adapters or "
                                                          "AdapterHub's save_adapter); its config sets the "
                                                          "architecture")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    m.add_argument("--no-unpad", action="store_false", dest="unpad",
                   help="run the encoder on the padded batch (default: on real tokens only, same results)")
    d = p.add_argument_group("data and sampling")
    d.add_argument("--sources", nargs="+", help="training sources: registry names and/or JSONL files of "
                                                "parallel groups (default: bipar xlinghealth tquad arcd "
                                                "cmrc2018 iapp)")
    d.add_argument("--languages", nargs="+", help="training languages (default: all the sources hold)")
    d.add_argument("--passage", choices=("sentence", "chunk"), help="passage = answer sentence or paragraph chunk")
    d.add_argument("--sampling", choices=SAMPLING, help="mono = X-X-mono, cross = X-Y, hybrid (default)")
    d.add_argument("--alpha", type=float, help="hybrid: probability of a monolingual batch (default 0.5)")
    d.add_argument("--language-weights", choices=("uniform", "size"), help="language draw for mono batches")
    d.add_argument("--hard-negatives", type=int, metavar="K", help="K extra negatives per pair: the other sentences "
                                                                  "of the answer's paragraph where the source has "
                                                                  "them, else random same-language passages "
                                                                  "(default 0)")
    d.add_argument("--batch-size", type=int, help="global batch: pairs per step over all processes (default 32)")
    d.add_argument("--max-length", type=int, dest="max_length_both", help="max tokens for queries and passages")
    d.add_argument("--max-query-length", type=int, help="max query tokens (default 32)")
    d.add_argument("--max-passage-length", type=int, help="max passage tokens (default 64)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3 adapters, 3e-5 full)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    o.add_argument("--warmup", type=float, help="warmup: fraction of steps (<1) or steps (>=1) (default 0.1)")
    o.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0)")
    o.add_argument("--mini-batch-size", type=int, help="GradCache: encode N texts at a time, so memory does not "
                                                       "grow with --batch-size (same gradients, ~1/3 more compute)")
    o.add_argument("--temperature", type=float, help="InfoNCE temperature (default 0.05)")
    o.add_argument("--learnable-temperature", action="store_true", help="learn the temperature")
    o.add_argument("--steps", type=int, help="optimizer steps (default 24)")
    o.add_argument("--epochs", type=float, help="passes over the sampler's epoch instead of --steps")
    o.add_argument("--precision", choices=PRECISIONS, help="autocast dtype; fp16 adds a GradScaler "
                                                           "(default auto: bf16 on GPU, fp32 on CPU)")
    o.add_argument("--loss-backend", choices=("auto", "reference", "chunked", "triton", "cuda"),
                   help="InfoNCE backend (default auto)")
    o.add_argument("--adapter-backend", choices=("auto", "reference", "recompute", "triton", "cuda"),
                   help="the adapters' fused op (default auto: the measured choice for the device and precision; "
                        "triton: the fused kernels, also under bf16 autocast, where they cut peak memory ~13%% "
                        "but measured ~15%% slower on an H100)")
    o.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    o.add_argument("--seed", type=int, help="seed of data order, initialisation and dropout (default 0)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-sets", nargs="+", choices=EVAL_SETS, help="evaluation sets (default both)")
    e.add_argument("--eval-full", action="store_true", help="evaluate on every paragraph (slow on CPU)")
    e.add_argument("--eval-max-paragraphs", type=int, help="paragraph subset per evaluation set")
    e.add_argument("--eval-batch-size", type=int, help="encoding batch for evaluation (default 64)")
    e.add_argument("--no-eval", action="store_true", help="skip both evaluations")
    e.add_argument("--no-eval-before", action="store_false", dest="eval_before", help="skip the before run")
    e.add_argument("--no-eval-after", action="store_false", dest="eval_after", help="skip the after run")
    e.add_argument("--no-eval-cache", action="store_false", dest="eval_cache",
                   help="do not reuse the cached before-evaluation of the base encoder")
    r = p.add_argument_group("output")
    r.add_argument("--output-dir", help="run folder (default: a fresh folder under runs/)")
    r.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    r.add_argument("--save-every", type=int, help="checkpoint every N steps (default: end and Ctrl-C only)")
    r.add_argument("--log-every", type=int, help="JSON-lines log every N steps (default 1)")
    r.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    return p


def config_from_args(argv=None) -> TrainConfig:
    """defaults < the resumed run's config.json < --config FILE < flags."""
    ns = vars(build_parser().parse_args(argv))
    data: dict = {}
    if ns.get("resume") and ns.get("output_dir"):
        saved = Path(ns["output_dir"]) / "config.json"
        if saved.is_file():
            import json

            data.update(json.loads(saved.read_text()))
            data.pop("resume", None)
    if "config" in ns:
        data.update(read_config_file(ns.pop("config")))
    both = ns.pop("max_length_both", None)
    if both is not None:
        data["max_query_length"] = data["max_passage_length"] = both
    if ns.pop("no_eval", False):
        data["eval_before"] = data["eval_after"] = False
    data.update(ns)
    return TrainConfig.from_dict(data, source="--config")


def main(argv=None) -> int:
    try:
        cfg = config_from_args(argv)
        from effir.training.runner import run

        metrics = run(cfg)
    except ValueError as exc:
        print(f"python -m effir.train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop without a checkpoint
        print("python -m effir.train: interrupted", file=sys.stderr)
        return 130
    return int(metrics.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
