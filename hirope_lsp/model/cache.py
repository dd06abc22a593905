"""KV state kept between requests: one slot per document, longest-common-prefix reuse,
a byte budget with LRU eviction across documents, and counters.

A slot's cache holds the keys and values of its ``token_ids`` at ``positions``;
a new prompt reuses the longest prefix where both tokens and hierarchical
positions agree (a token whose position moved has other keys), the cache is
cut back there, and only the rest is computed.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .buffers import growing_cache
from .patch import truncate_cache

log = logging.getLogger(__name__)

ESTIMATE_MIN_TOKENS = 256  # bytes per token are read off slots this long or longer (spare capacity <= 1/4)


@dataclass
class CacheSlot:
    key: str
    cache: DynamicCache
    token_ids: list[int] = field(default_factory=list)
    positions: torch.Tensor | None = None  # [T, levels]
    last_used: float = field(default_factory=time.monotonic)
    warmed: tuple[int, int] = (0, 0)  # [start, end) of tokens warmed ahead and not yet used by a request

    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            if hasattr(layer, "nbytes"):  # growing layers: spare capacity counts too
                total += layer.nbytes()
                continue
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total + (self.far_keys.nbytes() if self.far_keys is not None else 0)

    @property
    def far_keys(self):
        """The far-turned keys a windowed method keeps beside this cache (``FarKeyStore``), if any."""
        return getattr(self.cache, "hirope_far_keys", None)

    def truncate(self, length: int) -> None:
        truncate_cache(self.cache, length)
        if self.far_keys is not None:
            self.far_keys.truncate(length)
        self.token_ids = self.token_ids[:length]
        if self.positions is not None:
            self.positions = self.positions[:length]

    def compact(self) -> None:
        """Give back the spare capacity the growing buffers keep."""
        for layer in getattr(self.cache, "layers", []):
            if hasattr(layer, "compact"):
                layer.compact()
        if self.far_keys is not None:
            self.far_keys.compact()


@dataclass
class CacheCounters:
    requests: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    evictions: int = 0
    warmed_tokens: int = 0  # prefilled ahead of any request (warming)
    warmed_used_tokens: int = 0  # of those, reused by a request afterwards

    @property
    def reuse_ratio(self) -> float:
        total = self.reused_tokens + self.computed_tokens
        return self.reused_tokens / total if total else 0.0


def common_prefix(a_ids: list[int], a_pos: torch.Tensor | None, b_ids: list[int], b_pos: torch.Tensor) -> int:
    """Length of the longest prefix where token ids and positions both agree."""
    n = min(len(a_ids), len(b_ids))
    if n == 0 or a_pos is None:
        return 0
    a = torch.tensor(a_ids[:n])
    b = torch.tensor(b_ids[:n])
    same = (a == b) & (a_pos[:n] == b_pos[:n]).all(dim=-1)
    mismatch = (~same).nonzero()
    return int(mismatch[0]) if mismatch.numel() else n


class KVCachePool:
    def __init__(self, model_config, budget_bytes: int = 1 << 30, enabled: bool = True):
        self.model_config = model_config
        self.budget_bytes = budget_bytes
        self.enabled = enabled
        self.slots: OrderedDict[str, CacheSlot] = OrderedDict()
        self.counters = CacheCounters()
        self.bytes_per_token: float | None = None  # as the last slot kept showed it (capacity included)
        # the inference thread acquires and releases; the event loop drops closed documents and reports
        self._lock = threading.RLock()

    def reusable(self, key: str, token_ids: list[int], positions: torch.Tensor) -> int:
        """How many tokens of this prompt ``acquire`` would reuse, without touching the slot."""
        with self._lock:
            slot = self.slots.get(key)
            if slot is None or not self.enabled:
                return 0
            return min(common_prefix(slot.token_ids, slot.positions, token_ids, positions), len(token_ids) - 1)

    def acquire(self, key: str, token_ids: list[int], positions: torch.Tensor,
                warming: bool = False) -> tuple[CacheSlot, int]:
        """The slot for ``key`` cut back to the longest reusable prefix of this prompt (at most all but
        one token: the last is recomputed to get its logits), and that prefix's length."""
        with self._lock:
            slot = self.slots.get(key)
            if slot is None or not self.enabled:
                slot = CacheSlot(key, growing_cache(self.model_config))
                self.slots[key] = slot
            keep = common_prefix(slot.token_ids, slot.positions, token_ids, positions) if self.enabled else 0
            keep = min(keep, len(token_ids) - 1)
            if not warming:
                start, end = slot.warmed
                self.counters.warmed_used_tokens += max(0, min(keep, end) - start)
                slot.warmed = (0, 0)
            slot.truncate(keep)
            self.slots.move_to_end(key)
            slot.last_used = time.monotonic()
            if not warming:  # warming counts what it computes in ``warmed_tokens``
                self.counters.requests += 1
                self.counters.reused_tokens += keep
                self.counters.computed_tokens += len(token_ids) - keep
            return slot, keep

    def release(self, slot: CacheSlot, token_ids: list[int], positions: torch.Tensor) -> None:
        """Record that the slot now holds ``token_ids`` (the prompt), then keep within budget."""
        with self._lock:
            slot.truncate(len(token_ids))
            slot.token_ids = list(token_ids)
            slot.positions = positions.clone()
            if len(token_ids) >= ESTIMATE_MIN_TOKENS:  # a short slot's spare capacity would inflate it
                self.bytes_per_token = slot.nbytes() / len(token_ids)
            self.evict()

    def record_warmed(self, slot: CacheSlot, start: int, end: int) -> None:
        """Tokens ``[start, end)`` of ``slot`` were computed ahead of any request (warming, prefetching)."""
        if end <= start:
            return
        with self._lock:
            self.counters.warmed_tokens += end - start
            earlier, until = slot.warmed
            slot.warmed = (min(earlier, start) if until > earlier else start, end)

    def drop(self, key: str) -> None:
        with self._lock:
            self.slots.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self.slots.clear()

    def room_tokens(self) -> int:
        """How many more tokens the budget holds, at the bytes per token of the last slot kept; before any was
        kept, no bound while under budget (0 once it is full)."""
        left = self.budget_bytes - self.total_bytes()
        if left <= 0:
            return 0
        if self.bytes_per_token is None:
            return sys.maxsize
        return int(left // max(self.bytes_per_token, 1.0))

    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes() for s in self.slots.values())

    def evict(self) -> None:
        """Drop least recently used slots until the budget holds; a single slot over budget is cut back."""
        with self._lock:
            while self.slots and self.total_bytes() > self.budget_bytes:
                if len(self.slots) == 1:
                    slot = next(iter(self.slots.values()))
                    slot.compact()
                    if slot.nbytes() > self.budget_bytes:  # without its spare capacity it may fit
                        per_token = slot.nbytes() / max(1, len(slot.token_ids))
                        slot.truncate(min(len(slot.token_ids), int(self.budget_bytes // max(per_token, 1))))
                        slot.compact()
                    break
                key, _ = self.slots.popitem(last=False)
                self.counters.evictions += 1
                log.info("KV cache over budget: evicted %s", key)
