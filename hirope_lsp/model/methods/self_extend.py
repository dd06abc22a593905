"""Self-Extend: far pairs use grouped positions (``token // group_size``), shifted to meet the window."""

import math
from dataclasses import replace

import torch

from ..rope import FarPositions, RopeMethodConfig, default_window
from .base import PositionMethod


def self_extend_far_positions(cfg: RopeMethodConfig, positions: torch.Tensor, num_pairs: int, split: float,
                              window: int, start: int = 0) -> FarPositions:
    g = cfg.group_size
    grouped = torch.div(positions[:, start:, -1], g, rounding_mode="floor").to(torch.float64)
    B, T = grouped.shape
    shift = window - window // g
    q = (grouped + shift).unsqueeze(-1).expand(B, T, num_pairs)
    k = grouped.unsqueeze(-1).expand(B, T, num_pairs)
    return FarPositions(q, k)


def groups_that_fit(cfg: RopeMethodConfig, length: int, train_length: int) -> RopeMethodConfig:
    """Self-Extend as its authors size it: groups large enough that the far positions fit the trained range."""
    window = cfg.window or default_window(train_length)
    return replace(cfg, group_size=max(cfg.group_size, math.ceil(length / max(1, train_length - window))))


SELF_EXTEND = PositionMethod("self-extend", "self-extend", far_positions=self_extend_far_positions,
                             sized_for=groups_that_fit)
