"""ReRoPE: every far (query, key) pair sees the distance ``W``, the window's edge."""

import torch

from ..rope import FarPositions, RopeMethodConfig
from .base import PositionMethod


def rerope_far_positions(cfg: RopeMethodConfig, positions: torch.Tensor, num_pairs: int, split: float, window: int,
                         start: int = 0) -> FarPositions:
    B, T = positions[:, start:, -1].shape
    q = torch.full((B, T, num_pairs), float(window), dtype=torch.float64)
    k = torch.zeros((B, T, num_pairs), dtype=torch.float64)
    return FarPositions(q.to(positions.device), k.to(positions.device))


REROPE = PositionMethod("rerope", "rerope", far_positions=rerope_far_positions)
