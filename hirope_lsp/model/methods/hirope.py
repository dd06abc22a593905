"""HiRoPE: far pairs of low frequency take the position of a coarser level of the hierarchy
(the syntax unit), shifted by ``W - 1`` so that the far scores continue the window's; the pairs
the model saw whole in training keep the token index."""

import torch

from ..rope import FarPositions, RopeMethodConfig, pair_levels, restart_token_index
from .base import PositionMethod


def hirope_far_positions(cfg: RopeMethodConfig, positions: torch.Tensor, num_pairs: int, split: float, window: int,
                         start: int = 0) -> FarPositions:
    if cfg.token_index == "restart":
        # the restarting index counts from the start of each unit, which may lie before ``start``
        positions = torch.cat([positions[..., :-1], restart_token_index(positions).unsqueeze(-1)], -1)
    per_level = positions[:, start:].to(torch.float64)
    levels = per_level.shape[-1]
    level_of_pair = pair_levels(num_pairs, split, levels).to(positions.device)
    k = per_level[..., level_of_pair]  # [B, T, P]
    coarse = (level_of_pair < levels - 1).to(torch.float64)
    return FarPositions(k + coarse * (window - 1), k)


def fixed_block_far_positions(cfg: RopeMethodConfig, positions: torch.Tensor, num_pairs: int, split: float,
                              window: int, start: int = 0) -> FarPositions:
    token = positions[..., -1]
    blocks = torch.stack([torch.div(token, cfg.unit_size, rounding_mode="floor"), token], -1)
    return hirope_far_positions(cfg, blocks, num_pairs, split, window, start)


HIROPE = PositionMethod("hirope", "hirope (hierarchical)", far_positions=hirope_far_positions, hierarchical=True)
HIROPE_FIXED = PositionMethod("hirope-fixed", "hirope-fixed (units of unitSize tokens)",
                              far_positions=fixed_block_far_positions)
