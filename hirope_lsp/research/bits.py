"""Held-out loss in bits per byte: comparable between models whatever their tokenizers.

Each file is cut into windows of ``context`` tokens (the model's trained length unless given);
every token but a window's first is predicted, and its loss is divided by the bytes of text it
stands for. Windows are drawn from all files with a fixed seed, so two models are measured on
the same files (not the same windows: their tokens differ).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..model.loading import load_model
from ..model.patch import trained_length
from .train import read_text, token_byte_lengths


@torch.no_grad()
def bits_per_byte(model: str | None, files: list[Path], context: int | None = None, max_windows: int = 200,
                  seed: int = 0) -> dict:
    lm, tokenizer, _ = load_model(model, device="cpu", dtype="float32")
    context = context or trained_length(lm.config)
    byte_lengths = token_byte_lengths(tokenizer)
    windows = []
    for path in files:
        text = read_text(path)
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [ids[i : i + context] for i in range(0, len(ids) - 1, context) if len(ids[i : i + context]) > 1]
    random.Random(seed).shuffle(windows)
    nats, nbytes, tokens = 0.0, 0.0, 0
    for w in windows[:max_windows]:
        ids = torch.tensor([w])
        logits = lm(ids).logits[0, :-1].float()
        nats += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        nbytes += float(byte_lengths[ids[0, 1:]].sum())
        tokens += len(w) - 1
    return {"model": model or "default", "context": context, "windows": min(len(windows), max_windows),
            "tokens": tokens, "bytes": nbytes, "bits_per_byte": nats / math.log(2) / max(1.0, nbytes),
            "nats_per_token": nats / max(1, tokens)}
