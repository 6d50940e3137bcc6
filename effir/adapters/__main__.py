"""`python -m effir.adapters convert SRC DST --to adapterhub|effir`: rewrite a saved adapter in the other format.

    python -m effir.adapters convert runs/X/adapters hub_adapter --to adapterhub   # for AdapterHub's load_adapter
    python -m effir.adapters convert hub_adapter my_adapter --to effir
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m effir.adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite a saved adapter (effir or AdapterHub format) in the other format")
    c.add_argument("src", help="adapter directory (effir.save_adapters or AdapterHub's save_adapter)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--to", required=True, choices=("adapterhub", "effir"), help="format to write")
    args = p.parse_args(argv)
    from effir.adapters.io import convert_adapters

    try:
        out = convert_adapters(args.src, args.dst, format=args.to)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} adapter to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
