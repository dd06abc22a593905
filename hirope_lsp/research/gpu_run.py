"""One training run of the default model's shape on a lent GPU, prepared here.

The device machine reaches nothing and takes at most 64 MiB of working tree, so ``pack`` writes what
the run needs into one folder: a slice of the packed token stream (pieces spread over each
language's segment, its share as the recipe samples languages, xz-compressed: ~0.4 bytes a token),
the tokenizer, the held-out windows the training log reports, and the recipe
scaled to the card (a larger batch; the model's shape, hence the inference cost, unchanged).
There, ``train`` unpacks it, times a few steps to size the cosine schedule to the minutes given,
trains, and leaves ``best.safetensors`` (fp16), ``best.json`` and ``loss.jsonl`` in the output folder.

    python -m hirope_lsp.research.gpu_run pack runs/v2 gpu_pack --tokens 90000000       # here
    python3 -m hirope_lsp.research.gpu_run train gpu_pack /tmp/gpu_run $OUT --minutes 6  # there
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import torch

from ..model.loading import DEFAULT_MODEL_DIR
from .train import FILE_SEP, TrainConfig, held_out_windows, train

PIECES_PER_LANGUAGE = 64  # a slice of each language's segment in this many pieces: every part of it is seen
GPU_RECIPE = {"batch_size": 256, "lr": 1e-3, "warmup": 100, "checkpoint_every": 250, "device": "cuda"}
PROBE_STEPS = 30


def stream_slice(stream: np.ndarray, segments: dict, weights: dict, tokens: int, separator: int):
    """About ``tokens`` of ``stream``, each language's share by ``weights`` (all of a smaller segment),
    as pieces spread over its segment joined by ``separator``; returns (slice, its segments)."""
    shares = {lang: w for lang, w in weights.items() if w > 0 and lang in segments}
    total = sum(shares.values())
    parts, out_segments, at = [], {}, 0
    for lang, (a, b) in segments.items():
        if lang not in shares:
            continue
        want = min(b - a, int(tokens * shares[lang] / total))
        piece = want // PIECES_PER_LANGUAGE
        if piece == 0:
            continue
        starts = np.linspace(a, b - piece, PIECES_PER_LANGUAGE).astype(np.int64)
        begin = at
        for s in starts:
            parts.append(np.array([separator], dtype=stream.dtype))
            parts.append(np.asarray(stream[s : s + piece]))
            at += piece + 1
        out_segments[lang] = (begin, at)
    if not parts:
        raise ValueError(f"{tokens} tokens leave no language a piece of its segment")
    return np.concatenate(parts), out_segments


def pack(run_dir: Path, out: Path, tokens: int, start: Path | None = None) -> dict:
    """``start``: fp16 weights to start from, carried along; None: the shipped default model's, which
    travel with the package anyway."""
    from transformers import AutoTokenizer

    cfg = TrainConfig(**json.loads((run_dir / "train_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    stream = np.load(run_dir / "stream.npy", mmap_mode="r")
    segments = {lang: tuple(v) for lang, v in json.loads((run_dir / "segments.json").read_text()).items()}
    part, part_segments = stream_slice(stream, segments, cfg.language_weights, tokens,
                                       tokenizer.convert_tokens_to_ids(FILE_SEP))
    out.mkdir(parents=True, exist_ok=True)
    with lzma.open(out / "stream.u16.xz", "wb", preset=6) as f:
        f.write(part.astype(np.uint16).tobytes())
    (out / "segments.json").write_text(json.dumps(part_segments))
    held = torch.load(run_dir / "held_out.pt")
    torch.save(held_out_windows(held, cfg.context, cfg.held_out_windows), out / "held_out.pt")
    shutil.copytree(run_dir / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    if start is not None:
        shutil.copyfile(start, out / "start.safetensors")  # no best.json beside it: a schedule of its own
    recipe = dataclasses.replace(cfg, corpus=None, max_minutes=None, **GPU_RECIPE)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
    info = {"tokens": int(len(part)), "segments": part_segments, "from": str(run_dir),
            "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}
    (out / "pack.json").write_text(json.dumps(info, indent=2))
    return info


def unpack(packed: Path, run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun on the same machine starts over, not from the last try
    run_dir.mkdir(parents=True)
    with lzma.open(packed / "stream.u16.xz", "rb") as f:
        np.save(run_dir / "stream.npy", np.frombuffer(f.read(), dtype=np.uint16))
    for name in ("segments.json", "held_out.pt", "train_config.json"):
        shutil.copyfile(packed / name, run_dir / name)
    shutil.copytree(packed / "tokenizer", run_dir / "tokenizer", dirs_exist_ok=True)


def steps_for(run_dir: Path, cfg: TrainConfig, minutes: float) -> int:
    """How many steps of ``cfg`` fit in ``minutes`` here: a throwaway copy of the run trains a few steps,
    timed from its log after the first ones (set-up, kernels, allocator) and without the measurements."""
    probe = run_dir.parent / (run_dir.name + "-probe")
    shutil.rmtree(probe, ignore_errors=True)
    shutil.copytree(run_dir, probe, ignore=shutil.ignore_patterns("checkpoint.pt", "loss.jsonl", "best.*"))
    probe_cfg = dataclasses.replace(cfg, steps=5 + PROBE_STEPS, checkpoint_every=10**9)
    (probe / "train_config.json").write_text(json.dumps(dataclasses.asdict(probe_cfg)))  # the saved recipe wins
    train(probe, probe_cfg)
    times = {r["step"]: r["s"] for r in map(json.loads, (probe / "loss.jsonl").read_text().splitlines()) if "s" in r}
    per_step = (times[5 + PROBE_STEPS] - times[5]) / PROBE_STEPS
    shutil.rmtree(probe, ignore_errors=True)
    return max(cfg.warmup + 1, int(minutes * 60 * 0.9 / per_step))


def run(packed: Path, run_dir: Path, out: Path, minutes: float, device: str = "cuda") -> dict:
    unpack(packed, run_dir)
    cfg = TrainConfig(**json.loads((run_dir / "train_config.json").read_text()))
    cfg = dataclasses.replace(cfg, device=device)
    steps = steps_for(run_dir, cfg, minutes)
    start = packed / "start.safetensors"
    summary = train(run_dir, dataclasses.replace(cfg, steps=steps, max_minutes=minutes),
                    init_from=start if start.exists() else DEFAULT_MODEL_DIR / "model.safetensors", given=("steps",))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("best.safetensors", "best.json", "loss.jsonl", "train_config.json"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, out / name)
    summary = {**summary, "planned_steps": steps, "minutes": minutes, "device": device}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m hirope_lsp.research.gpu_run")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="here: the folder a GPU run carries")
    a.add_argument("run_dir", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--tokens", type=int, default=90_000_000)
    a.add_argument("--start", type=Path, default=None, help="fp16 weights to start from (default: the shipped model)")
    b = sub.add_parser("train", help="there: unpack, size the schedule to the minutes, train")
    b.add_argument("packed", type=Path)
    b.add_argument("run_dir", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--minutes", type=float, default=6.0)
    b.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.command == "pack":
        print(json.dumps(pack(args.run_dir, args.out, args.tokens, args.start), indent=2))
    else:
        print(json.dumps(run(args.packed, args.run_dir, args.out, args.minutes, args.device), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
