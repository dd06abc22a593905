"""The far part of a file as an outline: what lies before the raw text near the cursor, with the
bodies of its functions and methods dropped.

Imports, class headers, class attributes, module-level statements and every function's signature
stay, as written and in order; a function's body becomes ``...`` (Python) or ``...`` and its closing
line (brace languages).  A small model copies names from far away but is distracted by the bulk of
far code; the outline keeps the names (what is defined, with which parameters) and drops the bulk.

An outline is a list of *pieces*: ranges of the document's text, and the elision text that stands
for a dropped body (mapped to the last character of its function's header, so that it takes that
function's syntax unit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..hierarchy.document import Document

FUNCTION_KINDS = frozenset({"function", "method"})
MAX_HEADER_LINES = 6
_TRAILING_COMMENT = re.compile(r"\s*(#|//).*$")


@dataclass(frozen=True)
class Piece:
    start: int  # char offsets in the document's text
    end: int
    text: str | None = None  # elision text standing in at ``start`` (then ``end == start``)


def outline_pieces(doc: Document, end_char: int) -> list[Piece]:
    """The outline of ``doc.text[:end_char]``: functions lying wholly before ``end_char`` lose their bodies."""
    if end_char <= 0:
        return []
    if doc.grammar is None:
        return [Piece(0, end_char)]
    end_byte = len(doc.text[:end_char].encode("utf-8"))
    pieces: list[Piece] = []
    at = 0  # chars copied so far
    covered = -1  # end byte of the last dropped function (nested ones lie inside it)
    for d in doc.definitions:
        if d.start >= end_byte:
            break
        if d.kind not in FUNCTION_KINDS or d.end > end_byte or d.start < covered:
            continue
        start, end = doc.byte_to_char(d.start), doc.byte_to_char(d.end)
        header_end = _header_end(doc.text, start, end)
        if header_end is None:
            continue  # a one-liner or a header we cannot see the end of: kept whole
        body_end = end
        if doc.language != "python":  # the closing line stays: "}" and its indentation
            closing = doc.text.rfind("\n", header_end, end)
            body_end = closing if closing >= header_end else end
        if not doc.text[header_end:body_end].strip():
            continue  # nothing to drop
        covered = d.end
        pieces.append(Piece(at, header_end))
        pieces.append(Piece(header_end, header_end, "\n" + _indent_of_body(doc.text, header_end, end) + "..."))
        at = body_end
    pieces.append(Piece(at, end_char))
    return [p for p in pieces if p.text is not None or p.end > p.start]


def outline_text(doc: Document, pieces: list[Piece]) -> str:
    return "".join(p.text if p.text is not None else doc.text[p.start : p.end] for p in pieces)


def outline_char_map(pieces: list[Piece]) -> tuple[list[int], list[int], list[int]]:
    """For each piece: its start in the outline text, its start in the document, and whether it is the
    document's text (1) or an elision (0): enough to map an outline offset back to a document offset."""
    starts, sources, real = [], [], []
    at = 0
    for p in pieces:
        starts.append(at)
        sources.append(p.start)
        real.append(0 if p.text is not None else 1)
        at += len(p.text) if p.text is not None else p.end - p.start
    return starts, sources, real


def _header_end(text: str, start: int, end: int) -> int | None:
    """Char offset of the end of a function's header line (the line that opens its body), if that is
    within the first few lines and before the function's last line."""
    line_start = start
    for _ in range(MAX_HEADER_LINES):
        line_end = text.find("\n", line_start, end)
        if line_end < 0:
            return None
        code = _TRAILING_COMMENT.sub("", text[line_start:line_end]).rstrip()
        if code.endswith((":", "{")) or code.endswith("=>"):
            return line_end
        line_start = line_end + 1
    return None


def _indent_of_body(text: str, header_end: int, end: int) -> str:
    """The indentation of the body's first non-blank line (four spaces in if none is found)."""
    pos = header_end + 1
    while pos < end:
        line_end = text.find("\n", pos, end)
        line_end = end if line_end < 0 else line_end
        line = text[pos:line_end]
        if line.strip():
            return line[: len(line) - len(line.lstrip())]
        pos = line_end + 1
    return "    "
