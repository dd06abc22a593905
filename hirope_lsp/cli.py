"""Command line: ``hirope-lsp [serve|complete|eval|bench|train] ...`` (no command serves stdio)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the default model by the project's recipe (resumable)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    p.add_argument("--export", type=Path, default=None, help="write a HuggingFace model directory here at the end")
    p.add_argument("--tiny", action="store_true", help="a tiny configuration for smoke tests")
    p.add_argument("--threads", type=int, default=None)


def _run_train(args) -> int:
    import torch

    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    if args.tiny:
        cfg = TrainConfig(vocab_size=400, hidden_size=32, layers=1, heads=2, intermediate_size=64, context=32,
                          batch_size=4, steps=20, warmup=2, checkpoint_every=10, held_out_percent=10,
                          max_files=60)
    if args.steps is not None:
        cfg.steps = args.steps
    cfg.max_minutes = args.max_minutes
    summary = train(args.run_dir, cfg, export=args.export)
    print(json.dumps(summary, indent=2))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench", required=True)
    a = bsub.add_parser("attention", help="HiRoPE vs plain RoPE forward time and peak memory by length")
    a.add_argument("--lengths", default="1024,4096,8192,16384")
    a.add_argument("--repeats", type=int, default=2)
    a.add_argument("--device", default="cpu")
    a.add_argument("--json", type=Path, default=None)
    h = bsub.add_parser("hierarchy", help="per-keystroke hierarchy update time and workspace indexing")
    h.add_argument("--lines", type=int, default=10000)
    h.add_argument("--keystrokes", type=int, default=300)
    h.add_argument("--index-root", type=Path, default=None, help="directory to index (default: the standard library)")
    h.add_argument("--json", type=Path, default=None)


def _run_bench(args) -> int:
    if args.bench == "attention":
        from .bench import bench_attention

        result = bench_attention([int(x) for x in args.lengths.split(",")], repeats=args.repeats, device=args.device)
    else:
        from .bench import bench_hierarchy

        result = bench_hierarchy(lines=args.lines, keystrokes=args.keystrokes, index_root=args.index_root)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


COMMANDS = {"train": (_add_train, _run_train), "bench": (_add_bench, _run_bench)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hirope-lsp", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["serve"])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, run = COMMANDS[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
