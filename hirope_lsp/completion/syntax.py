"""Keep a single-line Python completion from breaking its line's syntax.

A small model often runs on past the end of an expression (``return x.radius =
False``).  When the cursor's line starts a statement (not a continuation inside
brackets) and the completed line does not parse on its own, the completion is
cut back to its longest prefix with which the line parses; when no prefix
does (the statement needs lines that follow, like ``elif x:``), it is kept.
"""

from __future__ import annotations

import threading

from ..hierarchy.document import Document
from ..hierarchy.languages import grammar

_local = threading.local()  # a parser per thread (parsers are not shared across threads)
MAX_CHECKED = 200  # characters of completion worth checking


def _python_parser():
    if not hasattr(_local, "parser"):
        g = grammar("python")
        _local.parser = g.parser() if g is not None else None
    return _local.parser


def statement_line(doc: Document, line: int, cursor: int) -> str | None:
    """The cursor's line up to the cursor (without indentation) when it starts a Python statement;
    None otherwise (another language, no tree, a continuation line)."""
    tree = doc.tree
    if doc.language != "python" or tree is None:
        return None
    head = doc.text[int(doc.line_char[line]) : cursor]
    stripped = head.lstrip()
    if not stripped:
        return None
    line_byte = int(doc.line_byte[line])
    first = line_byte + len(head[: len(head) - len(stripped)].encode("utf-8"))
    node = tree.root_node.descendant_for_byte_range(first, first)
    while node is not None and node.start_byte >= line_byte:
        node = node.parent
    # the innermost construct that began before this line: a statement container, or an open bracket
    if node is None or node.type in ("module", "block") or node.type.endswith(("_definition", "_statement", "_clause")):
        return stripped
    return None


def parses(text: str) -> bool:
    parser = _python_parser()
    return parser is not None and not parser.parse(text.encode("utf-8")).root_node.has_error


def cut_to_valid_line(line_head: str, completion: str, line_tail: str = "") -> str:
    """``completion`` cut back to the longest prefix with which ``line_head + prefix + line_tail``
    parses, or unchanged."""
    if "\n" in completion or not completion.strip() or len(completion) > MAX_CHECKED:
        return completion
    if parses(line_head + completion + line_tail):
        return completion
    for end in range(len(completion) - 1, 0, -1):
        piece = completion[:end]
        if piece[-1].isspace() or (completion[end].isalnum() and piece[-1].isalnum()):
            continue  # never end in the middle of a word or on a space
        if parses(line_head + piece + line_tail):
            return piece
    return completion
