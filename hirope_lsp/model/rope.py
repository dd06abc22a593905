"""The position math of HiRoPE and the window methods that share its shape (each method's own
part lives in ``methods/``, one module per method).

Every window method keeps plain RoPE for query/key pairs closer than the window
``W`` and gives far pairs other positions, rotary pair by rotary pair.  A
method is described by its *far positions*: for every token and every rotary
pair, the position that pair uses when the token takes part in a far
(query, key) score.  The score of pair ``j`` for query ``m`` and key ``n`` is
then ``(far_q[m, j] - far_k[n, j]) * theta_j``.

Hierarchical positions come from the caller as ``[B, T, levels]`` integer
tensors, coarse to fine; the last level is always the global token index
(the plain RoPE position).  For two levels that is ``(unit, token)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TOKEN_INDEX_MODES = ("global", "restart")
FAR_BIAS_MODES = ("constant", "log", "distance")
# The prior against far keys when none is configured: the one place to change the shipped default.
# 0.0 is HiRoPE as published (no prior); docs/hirope.md measures what a prior does to a small model.
DEFAULT_FAR_BIAS = 0.0


@dataclass(kw_only=True)
class RopeMethodConfig:
    """One switch for every position method the project compares.

    Defaults and why:
    - ``split=None``: the fraction of rotary pairs that keep token positions is
      derived from the model (``log_base(train_length / 2pi)``, the paper's
      theory): exactly the pairs whose period the model saw whole in training.
      The paper's fixed 0.5 breaks short-context models (see docs/hirope.md).
    - ``window=None``: half the training length.  ``W - 1`` plus the unit
      distances in reach must stay inside the training length, so a window near
      that length leaves the trained range at once; a small one gives up exact
      scores the model was trained on.  Measured on the default model (README):
      L/2 beat L/8, L/4 and 3L/4 at 4x-32x the training length.
    - ``token_index="global"``: measured equal or better than restarting the
      index in each unit, and it keeps far token-level distances periodic.
    - ``levels=2``: unit and token, as in the paper (``levels=1`` is the token
      index alone, i.e. plain RoPE; more levels split the low-frequency pairs).
    - ``far_bias=None``: the prior the model's card records (``hirope-lsp calibrate
      far-bias --write``, chosen on a held-out corpus), else ``DEFAULT_FAR_BIAS``
      (0); resolved when the method is attached.  A prior against far keys, ``b >= 0``
      subtracted from the score (the scaled logit) of every key at distance
      ``>= window``, so that a far key wins only where its match is sharp; 0 is
      HiRoPE exactly.  ``far_bias_mode="constant"``: ``b = far_bias``;
      ``"log"``: ``b = far_bias * log(max(1, n_far / window))`` with ``n_far``
      the number of far keys the query sees, growing with the context and 0
      while ``n_far <= window``; ``"distance"``: ``b = far_bias * log(1 + d / window)``
      for the key at token distance ``d``, so a key's prior does not change
      with the context beyond it.  A list gives one value per layer (a
      constant, or the log mode's factor), checked against the model's layer
      count at attach time.  Window methods only (the others have no far keys).
    """

    method: str = "hirope"
    levels: int = 2
    split: float | None = None
    window: int | None = None
    token_index: str = "global"
    train_length: int | None = None
    unit_size: int = 128  # hirope-fixed: every unit_size tokens are a unit
    group_size: int = 8  # self-extend: neighbour tokens per group
    factor: float | None = None  # ntk / yarn: context extension factor
    query_chunk: int = 256  # rows of queries per pass: memory bound, and the masked band at the window edge
    # prior against far keys (see above); a list: one per layer; None: the model's own (its card), else 0
    far_bias: float | list[float] | None = None
    far_bias_mode: str = "constant"  # "constant", "log" (grows with the number of far keys) or "distance"
    extra: dict = field(default_factory=dict)

    def validate(self, num_layers: int | None = None) -> None:
        """Raise ValueError for a bad setting; ``num_layers`` (at attach time) checks a per-layer far bias."""
        from .methods import position_method

        position_method(self.method)  # raises for an unknown name
        if self.split is not None and not (0.0 <= self.split <= 1.0):
            raise ValueError(f"HiRoPE split must lie in [0, 1], got {self.split}")
        if self.window is not None and self.window <= 0:
            raise ValueError(f"HiRoPE window must be a positive number of tokens, got {self.window}")
        if self.levels < 1:
            raise ValueError(f"HiRoPE needs at least 1 level (the token index), got {self.levels}")
        if self.token_index == "restart" and self.levels < 2:
            raise ValueError("token_index='restart' needs a unit level above the token level (levels >= 2)")
        if self.token_index not in TOKEN_INDEX_MODES:
            raise ValueError(f"token_index must be 'global' or 'restart', got {self.token_index!r}")
        if self.unit_size <= 0:
            raise ValueError(f"unit_size must be positive, got {self.unit_size}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.factor is not None and self.factor < 1.0:
            raise ValueError(f"scaling factor must be >= 1, got {self.factor}")
        if self.query_chunk <= 0:
            raise ValueError(f"query_chunk must be positive, got {self.query_chunk}")
        if self.far_bias_mode not in FAR_BIAS_MODES:
            raise ValueError(f"far_bias_mode must be one of {', '.join(FAR_BIAS_MODES)}, got {self.far_bias_mode!r}")
        if self.far_bias is None:
            return
        values = self.far_bias if isinstance(self.far_bias, (list, tuple)) else [self.far_bias]
        if not values:
            raise ValueError("far_bias as a list needs one value per layer, got an empty list")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"far_bias must be a number or a list of numbers (one per layer), got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"far_bias must be a finite number >= 0 (subtracted from far scores), got {value!r}")
        if num_layers is not None and isinstance(self.far_bias, (list, tuple)) and len(self.far_bias) != num_layers:
            raise ValueError(f"far_bias lists {len(self.far_bias)} values, one per layer, but the model has "
                             f"{num_layers} layers")

    def layer_far_bias(self) -> float | tuple[float, ...]:
        """The far bias as the attention plan takes it: one number, or a tuple with one per layer."""
        if isinstance(self.far_bias, (list, tuple)):
            return tuple(float(v) for v in self.far_bias)
        return float(DEFAULT_FAR_BIAS if self.far_bias is None else self.far_bias)


def theory_split(base: float, train_length: int) -> float:
    """Fraction of rotary pairs whose period fits inside the training length.

    Pair ``j`` of ``d/2`` has period ``2pi * base^(2j/d)``; it is fully trained
    when that is below ``train_length``, i.e. ``2j/d < log_base(L / 2pi)``.
    """
    if train_length <= 2 * math.pi:
        return 0.0
    return min(1.0, max(0.0, math.log(train_length / (2 * math.pi)) / math.log(base)))


def default_window(train_length: int) -> int:
    return max(1, train_length // 2)


def pair_levels(num_pairs: int, split: float, levels: int) -> torch.Tensor:
    """Level used by each rotary pair in far scores, ``[num_pairs]``.

    Pairs below ``split * num_pairs`` (high frequency) take the finest level,
    ``levels - 1``; the low-frequency rest is divided evenly among the coarser
    levels, the lowest frequencies taking level 0 (the coarsest).
    """
    token_pairs = int(round(split * num_pairs))
    level = torch.full((num_pairs,), levels - 1, dtype=torch.long)
    coarse = num_pairs - token_pairs
    if coarse > 0:
        coarse_levels = levels - 1
        # j = token_pairs .. num_pairs-1 ; the last (lowest frequency) -> level 0
        rank = torch.arange(coarse - 1, -1, -1)  # 0 for the lowest frequency pair
        level[token_pairs:] = (rank * coarse_levels) // coarse
    return level


def restart_token_index(positions: torch.Tensor) -> torch.Tensor:
    """Token index counted from the first token of its unit, ``[B, T]``.

    Units are runs of equal values in the second-finest level.
    """
    unit = positions[..., -2]
    token = positions[..., -1]
    starts = torch.ones_like(unit, dtype=torch.bool)
    starts[..., 1:] = unit[..., 1:] != unit[..., :-1]
    idx = torch.arange(unit.shape[-1], device=unit.device).expand_as(unit)
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return token - torch.gather(token, -1, run_start)


def fixed_unit_positions(length: int, unit_size: int = 128, start: int = 0, batch: int = 1) -> torch.Tensor:
    """``(unit, token)`` positions with a unit every ``unit_size`` tokens, ``[B, T, 2]``."""
    token = torch.arange(start, start + length)
    pos = torch.stack([token // unit_size, token], dim=-1)
    return pos.unsqueeze(0).expand(batch, -1, -1).contiguous()


def plain_positions(length: int, start: int = 0, batch: int = 1) -> torch.Tensor:
    """One unit holding every token: positions for which HiRoPE is plain RoPE."""
    token = torch.arange(start, start + length)
    pos = torch.stack([torch.zeros_like(token), token], dim=-1)
    return pos.unsqueeze(0).expand(batch, -1, -1).contiguous()


@dataclass
class FarPositions:
    """Positions per rotary pair used in far scores, ``[B, T, P]`` float."""

    query: torch.Tensor
    key: torch.Tensor


def delta_rotation(far: torch.Tensor, token: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin ``[B, T, D]`` that turn a key rotated by ``token`` into one rotated by ``far``.

    Rotations compose, so the far key is the cached plain key turned by
    ``(far - token) * theta`` (in the rotate_half layout: pair j at j and j + D/2).
    """
    angle = (far - token.to(torch.float64).unsqueeze(-1)) * inv_freq.to(torch.float64)
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
