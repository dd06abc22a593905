"""The model side: load, attach the position method, prefill with KV reuse, greedy decoding
with stop rules and cancellation.  Knows tensors, never LSP or tree-sitter."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import KVCachePool
from .loading import load_model
from .patch import attach, trained_length
from .rope import RopeMethodConfig

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The request was cancelled or superseded while the model worked on it."""


@dataclass(kw_only=True)
class EngineSettings:
    model: str | None = None  # directory or hub id; None: the embedded default model
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_download: bool = False
    rope: RopeMethodConfig = field(default_factory=RopeMethodConfig)
    cache_budget_mb: int = 1024
    reuse_cache: bool = True
    prefill_chunk: int = 1024


@dataclass
class Prompt:
    key: str  # cache slot (one per document)
    token_ids: list[int]
    positions: torch.Tensor  # [T, levels] int64; the last level is the token index


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    reused_tokens: int
    computed_tokens: int
    seconds: float
    stopped_by: str


class Engine:
    def __init__(self, settings: EngineSettings, loaded=None):
        self.settings = settings
        if loaded is None:
            loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype,
                                trust_remote_code=settings.trust_remote_code, allow_download=settings.allow_download)
        self.model, self.tokenizer, self.fim = loaded
        self.device = next(self.model.parameters()).device
        self.handle = attach(self.model, settings.rope)
        self.train_length = trained_length(self.model.config)
        self.pool = KVCachePool(self.model.config, settings.cache_budget_mb << 20, settings.reuse_cache)
        self.lock = threading.Lock()  # one inference at a time
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        for name in ("<|endoftext|>", "<|file_sep|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|im_end|>"):
            tid = self.tokenizer.get_vocab().get(name)
            if tid is not None:
                self.eos_ids.add(tid)

    @property
    def description(self) -> str:
        name = self.settings.model or "default"
        return f"{name} on {self.device} ({str(next(self.model.parameters()).dtype).replace('torch.', '')})"

    def reconfigure_rope(self, rope: RopeMethodConfig) -> None:
        with self.lock:
            self.handle.detach()
            self.handle = attach(self.model, rope)
            self.settings.rope = rope
            self.pool.clear()

    @torch.inference_mode()
    def generate(self, prompt: Prompt, max_new_tokens: int,
                 should_stop: Callable[[str], bool] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Generation:
        """Greedy continuation of ``prompt``; ``should_stop(text)`` ends it early, ``cancelled()`` aborts
        (raising Cancelled) between any two model steps."""
        cancelled = cancelled or (lambda: False)
        start = time.perf_counter()
        ids, positions = prompt.token_ids, prompt.positions.to(torch.long)
        if not ids:
            raise ValueError("empty prompt")
        with self.lock:
            slot, reused = self.pool.acquire(prompt.key, ids, positions)
            try:
                logits = None
                pos_all = positions.unsqueeze(0).to(self.device)
                for a in range(reused, len(ids), self.settings.prefill_chunk):
                    if cancelled():
                        raise Cancelled()
                    b = min(len(ids), a + self.settings.prefill_chunk)
                    chunk = torch.tensor([ids[a:b]], device=self.device)
                    logits = self.handle.forward(chunk, pos_all[:, :b], past_key_values=slot.cache,
                                                 use_cache=True, logits_to_keep=1).logits
                # the prompt is cached now: keep it even if decoding is cancelled
                slot.token_ids, slot.positions = list(ids), positions.clone()
                out: list[int] = []
                stopped_by = "length"
                unit, token = positions[-1, :-1], int(positions[-1, -1])
                new_positions = pos_all
                for step in range(max_new_tokens):
                    if cancelled():
                        raise Cancelled()
                    next_id = int(logits[0, -1].argmax())
                    if next_id in self.eos_ids:
                        stopped_by = "eos"
                        break
                    out.append(next_id)
                    text = self.tokenizer.decode(out, skip_special_tokens=True)
                    if should_stop is not None and should_stop(text):
                        stopped_by = "rule"
                        break
                    if step + 1 == max_new_tokens:
                        break
                    # generated tokens continue the cursor's unit
                    pos = torch.cat([unit, torch.tensor([token + len(out)])]).view(1, 1, -1).to(self.device)
                    new_positions = torch.cat([new_positions, pos], dim=1)
                    logits = self.handle.forward(torch.tensor([[next_id]], device=self.device), new_positions,
                                                 past_key_values=slot.cache, use_cache=True).logits
            finally:
                self.pool.release(slot, slot.token_ids or ids[:reused], slot.positions if slot.positions is not None
                                  else positions[:reused])
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return Generation(out, text, reused, len(ids) - reused, time.perf_counter() - start, stopped_by)
