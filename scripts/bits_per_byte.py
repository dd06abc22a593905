"""Held-out bits per byte of several models on the same held-out packages (the model card's figures).

    .venv/bin/python scripts/bits_per_byte.py --model v0.1=DIR --model v0.3=default \
        --corpus transformers=DIR --corpus networkx=DIR [--windows 150] [--context N] [--json FILE]

Windows are each model's trained length unless --context gives one length for all (models trained at
different lengths compare at the same context only).
"""
import argparse
import json
from pathlib import Path

import torch

from hirope_lsp.research.bits import bits_per_byte


def pairs(values):
    return [tuple(v.split("=", 1)) for v in values]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", required=True, help="NAME=DIR (DIR 'default': the embedded model)")
    p.add_argument("--corpus", action="append", required=True, help="NAME=DIR of held-out sources (*.py)")
    p.add_argument("--windows", type=int, default=150)
    p.add_argument("--context", type=int, default=None, help="window length for every model (default: its own)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = {}
    for cname, root in pairs(args.corpus):
        files = sorted(Path(root).rglob("*.py"))
        for mname, model in pairs(args.model):
            r = bits_per_byte(None if model == "default" else model, files, context=args.context,
                              max_windows=args.windows)
            out[f"{cname} {mname}"] = r
            print(f"{cname:<14} {mname:<8} {r['bits_per_byte']:.4f} bits/byte ({r['windows']} windows of {r['context']})",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
