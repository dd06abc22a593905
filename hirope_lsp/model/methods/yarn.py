"""YaRN, through transformers' own initialisation of its frequencies and attention scaling."""

import copy

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .base import PositionMethod, RotaryBase, scale_factor


def yarn_frequencies(rotary: RotaryBase, factor: float) -> tuple[torch.Tensor, float]:
    conf = copy.deepcopy(rotary.model_config)
    conf.rope_parameters = dict(conf.rope_parameters or {})
    conf.rope_parameters.update(rope_type="yarn", factor=float(factor),
                                original_max_position_embeddings=rotary.train_length)
    return ROPE_INIT_FUNCTIONS["yarn"](conf, rotary.inv_freq.device)


YARN = PositionMethod("yarn", "yarn", frequencies=yarn_frequencies, sized_for=scale_factor)
