"""Hierarchical positions of a token sequence from a unit key per token.

A unit key says which syntactic unit a token comes from (any hashable: a tree-sitter unit of
a file, a cross-file definition, a fixed block of a plain-text file).  The unit index counts
changes of key along the sequence, so it never decreases, whatever order the pieces of a
prompt come in; the token index is the place in the sequence.
"""

from __future__ import annotations

import torch

from ..hierarchy.document import Document, char_to_byte_offsets


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


def token_unit_keys(doc: Document, char_spans: list[tuple[int, int]], tag=None, fixed_unit: int = 128) -> list:
    """A unit key per token of ``doc`` given the tokens' (start, end) char offsets in its text.

    A token belongs to the unit of its last character; documents without a grammar get a unit
    every ``fixed_unit`` tokens."""
    if doc.units is None:
        return [(tag, "fixed", i // fixed_unit) for i in range(len(char_spans))]
    ends = [max(s, e - 1) for s, e in char_spans]
    units = doc.unit_of_bytes(char_to_byte_offsets(doc.text, ends))
    return [(tag, "unit", u) for u in units]
