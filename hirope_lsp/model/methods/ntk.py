"""NTK-aware scaling: a larger rotary base, so low frequencies stretch and high ones stay."""

import torch

from .base import PositionMethod, RotaryBase, scale_factor


def ntk_frequencies(rotary: RotaryBase, factor: float) -> tuple[torch.Tensor, float]:
    d = 2 * rotary.num_pairs
    base = rotary.base * factor ** (d / (d - 2))
    idx = torch.arange(0, d, 2, dtype=torch.float64, device=rotary.inv_freq.device) / d
    return (1.0 / base**idx).float(), rotary.attention_scaling


NTK = PositionMethod("ntk", "ntk", frequencies=ntk_frequencies, sized_for=scale_factor)
# the factor follows each input's length (1 inside the trained length)
DYNAMIC_NTK = PositionMethod("dynamic-ntk", "dynamic-ntk", frequencies=ntk_frequencies, factor_from_input=True)
