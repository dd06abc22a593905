"""Code like the code at the cursor, from the workspace's other files: the windows of lines whose
identifiers overlap most (Jaccard) with the lines just before the cursor.

A small model is good at copying what it finds and poor at writing a line alone; a similar window
from a neighbouring file (a sibling test, the same pattern in another module) is what it can copy.
Candidates are the open documents and the files in the cursor file's folder: the neighbours an
editor user works across, bounded however large the workspace.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from ..workspace.index import WorkspaceIndex

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
QUERY_LINES = 8
WINDOW_LINES = 12
MAX_CANDIDATE_FILES = 64
MAX_FILE_CHARS = 256 * 1024
MIN_SIMILARITY = 0.25


@dataclass(frozen=True)
class Snippet:
    path: Path
    first_line: int
    text: str
    similarity: float


def identifiers(text: str) -> frozenset[str]:
    return frozenset(IDENTIFIER.findall(text))


@functools.lru_cache(maxsize=256)
def _windows(text: str) -> tuple[tuple[int, frozenset[str]], ...]:
    """(first line, identifiers) of every window of ``WINDOW_LINES`` lines, stepping by half a window."""
    lines = text.split("\n")
    step = WINDOW_LINES // 2
    return tuple((i, identifiers("\n".join(lines[i : i + WINDOW_LINES])))
                 for i in range(0, max(1, len(lines) - step), step))


def similar_snippets(query_text: str, here: Path | None, index: WorkspaceIndex, top: int = 2) -> list[Snippet]:
    """The ``top`` windows most like ``query_text``'s last lines, at most one per file, best first."""
    query = identifiers("\n".join(query_text.split("\n")[-QUERY_LINES:]))
    if len(query) < 2:
        return []
    found = []
    for path in candidate_files(here, index):
        text = index.text_of(path)
        if not text or len(text) > MAX_FILE_CHARS:
            continue
        best = max(((len(query & ids) / len(query | ids), line) for line, ids in _windows(text) if ids),
                   default=(0.0, 0))
        if best[0] >= MIN_SIMILARITY:
            found.append((best[0], str(path), best[1], path, text))
    found.sort(key=lambda f: (-f[0], f[1], f[2]))
    out = []
    for similarity, _, line, path, text in found[:top]:
        lines = text.split("\n")[line : line + WINDOW_LINES]
        out.append(Snippet(path, line, "\n".join(lines).rstrip() + "\n", similarity))
    return out


def candidate_files(here: Path | None, index: WorkspaceIndex) -> list[Path]:
    return index.neighbours(here, MAX_CANDIDATE_FILES)
