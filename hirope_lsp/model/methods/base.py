"""What a position method is: the parts of attention and rotary it changes.

A method changes positions in one of two ways, or not at all:
- a *window method* (``far_positions``) keeps plain RoPE for (query, key) pairs closer than the
  window and gives far pairs other positions, rotary pair by rotary pair (see ``rope.py``);
- a *rescaling method* (``frequencies``) replaces the rotary frequencies, once for a context
  extension factor or, with ``factor_from_input``, at every call from the input's length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..rope import FarPositions, RopeMethodConfig


@dataclass(frozen=True)
class RotaryBase:
    """The model's own rotary, as saved when a method was attached: what rescaling starts from."""

    inv_freq: torch.Tensor
    attention_scaling: float
    base: float
    train_length: int
    model_config: object

    @property
    def num_pairs(self) -> int:
        return self.inv_freq.numel()


# (cfg, positions [B, T, levels], num_pairs, split, window, start) -> far positions of tokens start..T-1
FarPositionsFn = Callable[[RopeMethodConfig, torch.Tensor, int, float, int, int], FarPositions]
# (rotary, factor > 1) -> (inv_freq, attention scaling)
FrequenciesFn = Callable[[RotaryBase, float], tuple[torch.Tensor, float]]
# (cfg, input length, trained length) -> cfg sized for that length (the evaluation's comparison)
SizeFn = Callable[[RopeMethodConfig, int, int], RopeMethodConfig]


def scale_factor(cfg: RopeMethodConfig, length: int, train_length: int) -> RopeMethodConfig:
    """Rescaling methods as usually compared: the factor that stretches the trained length to ``length``."""
    return replace(cfg, factor=max(1.0, length / train_length))


@dataclass(frozen=True)
class PositionMethod:
    name: str
    summary: str  # a few words for the settings' documentation
    far_positions: FarPositionsFn | None = None
    frequencies: FrequenciesFn | None = None
    factor_from_input: bool = False
    hierarchical: bool = False  # reads the syntax hierarchy: positions carry ``cfg.levels`` levels
    sized_for: SizeFn | None = None

    def __post_init__(self):
        if self.far_positions is not None and self.frequencies is not None:
            raise ValueError(f"position method {self.name!r}: a window method or a rescaling one, not both")

    @property
    def windowed(self) -> bool:
        """Far (query, key) pairs get other positions: the patched attention and its far keys."""
        return self.far_positions is not None

    @property
    def rescales(self) -> bool:
        return self.frequencies is not None

    def size_for(self, cfg: RopeMethodConfig, length: int, train_length: int) -> RopeMethodConfig:
        """``cfg`` for this method on inputs of ``length`` tokens, as the evaluation compares methods."""
        cfg = replace(cfg, method=self.name)
        return self.sized_for(cfg, length, train_length) if self.sized_for is not None else cfg


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / max(1, b))
