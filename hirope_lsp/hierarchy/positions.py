"""Hierarchical positions of a token sequence from a unit key per token.

A unit key says which syntactic unit a token comes from (any hashable: a tree-sitter unit of
a file, a cross-file definition, a fixed block of a plain-text file).  The unit index counts
changes of key along the sequence, so it never decreases, whatever order the pieces of a
prompt come in; the token index is the place in the sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from ..hierarchy.document import Document, char_to_byte_offsets
from ..hierarchy.units import UNIT_GRAINS


def positions_from_unit_keys(keys: list) -> torch.Tensor:
    """``[T, 2]`` (unit, token) positions."""
    units = []
    unit, previous = -1, object()
    for key in keys:
        if key != previous:
            unit += 1
            previous = key
        units.append(unit)
    return torch.stack([torch.tensor(units, dtype=torch.long), torch.arange(len(keys))], dim=-1)


def token_unit_keys(doc: Document, char_spans: list[tuple[int, int]], tag=None, fixed_unit: int = 128,
                    grain: str = "definition") -> list:
    """A unit key per token of ``doc`` given the tokens' (start, end) char offsets in its text.

    A token belongs to the unit of its last character. ``grain`` says what a unit is: the run owned
    by one innermost definition (``definition``, the default), the whole top-level run it lies in (a
    class with its methods is one unit: ``top``), or one line (roughly a statement: ``line``).
    Documents without a grammar get a unit every ``fixed_unit`` tokens."""
    if grain not in UNIT_GRAINS:
        raise ValueError(f"unknown unit grain {grain!r}: one of {', '.join(UNIT_GRAINS)}")
    if doc.units is None:
        return [(tag, "fixed", i // fixed_unit) for i in range(len(char_spans))]
    ends = [max(s, e - 1) for s, e in char_spans]
    if grain == "line":
        lines = np.searchsorted(doc.line_char, ends, side="right") - 1  # the document's own line table
        return [(tag, "line", int(line)) for line in lines]
    units = doc.unit_of_bytes(char_to_byte_offsets(doc.text, ends))
    if grain == "top":
        return [(tag, "top", doc.units[u].top) for u in units]
    return [(tag, "unit", u) for u in units]
