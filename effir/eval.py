"""`python -m effir.eval`: zero-shot XQuAD-R / MLQA-R evaluation of an encoder; writes JSON (+ PNG).

Example:
    python -m effir.eval --dataset xquad-r --output results/xquad.json
    python -m effir.eval --model out/encoder --adapters out/adapters --dataset mlqa-r --output m.json \
        --max-paragraphs 0.1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _paragraphs(value: str):
    """An int (paragraph groups) or a float fraction in (0, 1]."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or a fraction in (0, 1], got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from effir.evaluation.lareqa import CANDIDATE_TEXTS, DATASETS
    from effir.evaluation.search import SEARCHES

    p = argparse.ArgumentParser(prog="python -m effir.eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="multilingual-e5-small",
                   help="encoder name or directory (effir.load_encoder)")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--adapters", default=None, help="adapter directory written by effir.save_adapters or by AdapterHub's save_adapter")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--plot", default=None,
                   help="heatmap PNG path (default: the output path with .png); 'none' to skip")
    p.add_argument("--max-paragraphs", type=_paragraphs, default=None,
                   help="evaluate on N parallel paragraph groups (int) or a fraction (float) of them; "
                        "every language of a chosen paragraph is kept")
    p.add_argument("--languages", default=None, help="comma-separated subset of the data set's languages")
    p.add_argument("--seed", type=int, default=0, help="seed of the paragraph subset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="torch device of the encoder and the torch search")
    p.add_argument("--dtype", default=None, help="encoder dtype (fp32, bf16, fp16)")
    p.add_argument("--search", default="auto", choices=SEARCHES)
    p.add_argument("--candidate", default="sentence", choices=CANDIDATE_TEXTS)
    p.add_argument("--cache", default=None,
                   help="directory for embedding chunks: an interrupted run resumes, a repeated one is instant")
    p.add_argument("--no-matrix", action="store_true", help="print only the summary table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import effir
    from effir.evaluation import evaluate
    from effir.evaluation.report import print_report

    encoder = effir.load_encoder(args.model, device=args.device, dtype=args.dtype)
    if args.adapters is not None:
        effir.load_adapters(encoder.model, args.adapters)
        encoder.name = f"{encoder.name} + adapters {Path(args.adapters).name}"
    plot = None if (args.plot or "").lower() == "none" else (args.plot or Path(args.output).with_suffix(".png"))
    languages = args.languages.split(",") if args.languages else None
    result = evaluate(encoder, args.dataset, languages=languages, max_paragraphs=args.max_paragraphs,
                      seed=args.seed, batch_size=args.batch_size, search=args.search, candidate=args.candidate,
                      device=args.device, output=args.output, plot=plot,
                      show_progress=False if args.quiet else None, cache=args.cache)
    print_report(result, matrix=not args.no_matrix)
    print(f"wrote {args.output}" + (f" and {result['plot']}" if "plot" in result else ""), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
