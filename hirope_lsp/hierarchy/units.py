"""Syntax tree -> definitions -> hierarchical units, and byte offset -> unit index.

A *definition* is a class, function, method, interface, type, module or macro
found by the grammar's tags query (``@definition.*``; module-level constants
are left out: they are single statements, not structure).

*Units* (the coarse level of HiRoPE's index) are the maximal runs of bytes
owned by one innermost definition, in text order: the code between top-level
definitions is a unit of its own, a nested method is a unit, and the rest of
its class after the method is another.  A run holding only whitespace joins
the unit after it.  Unit indices therefore increase along the text, and any
byte offset maps to exactly one unit (``unit_of_offsets``).  Files without a
grammar have no units; callers give them fixed-size token units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tree_sitter import Node, QueryCursor, Tree

from .languages import Grammar

# what a unit is for the positions (``positions.token_unit_keys``): the run of one innermost definition,
# the whole top-level run it lies in, or one line
UNIT_GRAINS = ("definition", "top", "line")
UNIT_KINDS = frozenset({"class", "function", "method", "interface", "module", "type", "macro"})
WRAPPERS = frozenset({"decorated_definition", "export_statement", "template_declaration"})


@dataclass(frozen=True, order=True)
class Definition:
    start: int  # byte offsets of the whole definition, decorators and export included
    end: int
    kind: str
    name: str


@dataclass(frozen=True)
class Unit:
    start: int  # first byte of the unit
    owner: int  # index of the innermost definition owning it, -1 for module-level code
    top: int  # index of the top-level run it belongs to (a coarser level)


def _definition_node(node: Node) -> Node:
    """Widen a captured node to the whole definition (C declarators, decorators, exports, const x = () => ...)."""
    while node.parent is not None and node.type.endswith("declarator"):
        node = node.parent
    while node.parent is not None and node.parent.type in WRAPPERS:
        node = node.parent
    if node.type == "variable_declarator" and node.parent is not None:
        node = node.parent
    return node


def extract_definitions(grammar: Grammar, tree: Tree, lo: int = 0, hi: int | None = None) -> list[Definition]:
    """Definitions lying inside bytes ``[lo, hi)``, sorted by (start, end)."""
    root = tree.root_node
    hi = root.end_byte if hi is None else hi
    cursor = QueryCursor(grammar.tags)
    cursor.set_byte_range(lo, hi)
    found: dict[tuple[int, int], Definition] = {}
    for _, captures in cursor.matches(root):
        for capture, nodes in captures.items():
            if not capture.startswith("definition."):
                continue
            kind = capture.split(".", 1)[1]
            if kind not in UNIT_KINDS:
                continue
            names = captures.get("name") or []
            name = names[0].text.decode("utf-8", "replace") if names else ""
            for node in nodes:
                node = _definition_node(node)
                if node.start_byte < lo or node.end_byte > hi or node.end_byte <= node.start_byte:
                    continue
                key = (node.start_byte, node.end_byte)
                if key not in found:
                    found[key] = Definition(node.start_byte, node.end_byte, kind, name)
    return sorted(found.values())


def build_units(definitions: list[Definition], source: bytes) -> list[Unit]:
    """Units of a file of ``len(source)`` bytes from its sorted definitions."""
    size = len(source)
    # boundaries: (offset, owner, outermost) where owner takes over at offset
    boundaries: list[tuple[int, int, int]] = [(0, -1, -1)]
    stack: list[int] = []  # indices of open definitions (innermost last)

    def close_until(offset: int) -> None:
        while stack and definitions[stack[-1]].end <= offset:
            ended = stack.pop()
            boundaries.append((definitions[ended].end, stack[-1] if stack else -1, stack[0] if stack else -1))

    for i, d in enumerate(definitions):
        close_until(d.start)
        if stack and d.end > definitions[stack[-1]].end:
            continue  # overlapping without nesting: keep the outer one
        stack.append(i)
        boundaries.append((d.start, i, stack[0]))
    close_until(size + 1)
    # the last boundary at each offset wins; drop empty runs
    runs: list[tuple[int, int, int]] = []
    for offset, owner, outer in boundaries:
        offset = min(offset, size)
        if runs and runs[-1][0] == offset:
            runs[-1] = (offset, owner, outer)
        else:
            runs.append((offset, owner, outer))
    runs = [r for r in runs if r[0] < size] or [(0, -1, -1)]
    # whitespace-only runs join the run after them
    merged: list[tuple[int, int, int]] = []
    pending_start: int | None = None
    for k, (start, owner, outer) in enumerate(runs):
        end = runs[k + 1][0] if k + 1 < len(runs) else size
        if k + 1 < len(runs) and not source[start:end].strip():
            pending_start = start if pending_start is None else pending_start
            continue
        merged.append((pending_start if pending_start is not None else start, owner, outer))
        pending_start = None
    if len(merged) > 1 and not source[merged[-1][0]:].strip():
        merged.pop()  # trailing whitespace stays with the last unit
    units: list[Unit] = []
    top = -1
    previous_outer: int | None = None
    for start, owner, outer in merged:
        if units and units[-1].owner == owner:
            continue
        if outer != previous_outer or outer == -1:
            top += 1
            previous_outer = outer
        units.append(Unit(start, owner, top))
    return units


def unit_of_offsets(units: list[Unit], offsets: list[int]) -> list[int]:
    """Unit index of each byte offset."""
    starts = np.fromiter((u.start for u in units), dtype=np.int64, count=len(units))
    found = np.searchsorted(starts, np.asarray(offsets, dtype=np.int64), side="right") - 1
    return np.maximum(found, 0).tolist()
