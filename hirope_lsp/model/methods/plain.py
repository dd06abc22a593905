"""Plain RoPE: the model as trained (the evaluation's ``truncate`` baseline runs it on a cut prompt)."""

from .base import PositionMethod

ROPE = PositionMethod("rope", "plain rope")
