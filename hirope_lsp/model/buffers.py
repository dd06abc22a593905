"""Tensors that grow along the sequence axis in place.

A decoding step adds one token to every layer's keys and values; concatenating
copies the whole cache each time (and on CPU touches freshly mapped pages).
A ``GrowingTensor`` keeps spare capacity and writes new tokens into it, so a
step costs the new token only; cutting back is a view.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

ROUND = 64  # capacity is a multiple of this many tokens
SPARE = 16  # growing leaves room for 1/SPARE more (at least ROUND tokens): amortized copies, little waste


class GrowingTensor:
    """``[..., T, D]`` with room to grow along ``T`` (dimension -2)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.length = 0

    @property
    def view(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer[..., : self.length, :]

    def append(self, x: torch.Tensor) -> torch.Tensor:
        need = self.length + x.shape[-2]
        if x.requires_grad or (self.buffer is not None and self.buffer.requires_grad):
            # autograd (training, tests with gradients): plain concatenation, no in-place writes
            self.buffer = x if self.length == 0 else torch.cat([self.view, x], dim=-2)
            self.length = need
            return self.buffer
        if not self._fits(x, need):
            capacity = need + max(ROUND, need // SPARE)
            capacity = -(-capacity // ROUND) * ROUND
            grown = x.new_empty(*x.shape[:-2], capacity, x.shape[-1])
            if self.length:
                grown[..., : self.length, :].copy_(self.view)
            self.buffer = grown
        self.buffer[..., self.length : need, :].copy_(x)
        self.length = need
        return self.view

    def _fits(self, x: torch.Tensor, need: int) -> bool:
        b = self.buffer
        return (
            b is not None
            and need <= b.shape[-2]
            and b.shape[:-2] == x.shape[:-2]
            and b.shape[-1] == x.shape[-1]
            and b.dtype == x.dtype
            and b.device == x.device
            # an inference-mode buffer cannot be written outside inference mode (and vice versa)
            and b.is_inference() == torch.is_inference_mode_enabled()
        )

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[-2]

    def truncate(self, length: int) -> None:
        self.length = max(0, min(self.length, length))

    def compact(self) -> None:
        """Give back spare capacity (after cutting far back to fit a memory budget)."""
        if self.buffer is not None and self.capacity > self.length:
            smaller = self.buffer.new_empty(*self.buffer.shape[:-2], self.length, self.buffer.shape[-1])
            smaller[..., : self.length, :].copy_(self.view)
            self.buffer = smaller

    def nbytes(self) -> int:
        """Bytes held, spare capacity included."""
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values grow in place instead of being concatenated."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys, self._values = GrowingTensor(), GrowingTensor()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._keys.append(key_states)
        self.values = self._values.append(value_states)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(0, self._keys.length + tokens_to_remove)
        self._keys.truncate(keep)
        self._values.truncate(keep)
        self.keys, self.values = self._keys.view, self._values.view

    def compact(self) -> None:
        if self.is_initialized:
            self._keys.compact()
            self._values.compact()
            self.keys, self.values = self._keys.view, self._values.view

    def nbytes(self) -> int:
        return self._keys.nbytes() + self._values.nbytes() if self.is_initialized else 0


def growing_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose layers grow in place.  Sliding-window layers keep every
    key too (the attention masks the old ones): transformers' rolling ones keep only the last
    ``window - 1`` and cannot be cut back once they roll, which reusing a prefix needs."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache
