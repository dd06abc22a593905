"""What the copy model reads from the workspace (``copy_workspace``): the neighbouring files a user works
across (open documents, the cursor file's folder), most alike first, up to a character budget.

The copy model costs no attention: a file it reads adds a linear scan per decoding step and one
tokenization, so it can read far more than the prompt holds.  A small model copies well what it is shown
(the same call written in a sibling module, a docstring's parameter text repeated across a package), so
whole neighbouring files are worth more to it than to a model that could write those lines itself.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..workspace.index import WorkspaceIndex
from .retrieval import identifiers

COPY_WORKSPACE_CHARS = 256 * 1024  # the most the copy model reads from other files
MAX_WORKSPACE_FILE_CHARS = 128 * 1024  # a larger file is read only up to this (its start)
MAX_WORKSPACE_CANDIDATES = 256  # neighbours looked at, however large the folder


@functools.lru_cache(maxsize=MAX_WORKSPACE_CANDIDATES)
def _identifiers(text: str) -> frozenset[str]:
    return identifiers(text)


def similarity(query: frozenset[str], text: str) -> float:
    """Jaccard overlap of identifier sets (as for similar code)."""
    ids = _identifiers(text)
    return len(query & ids) / len(query | ids) if ids else 0.0


def workspace_texts(here: Path | None, document_text: str, index: WorkspaceIndex,
                    budget_chars: int = COPY_WORKSPACE_CHARS) -> list[tuple[Path, str]]:
    """(path, text) of the neighbours of ``here`` (never ``here``), the most alike ``document_text`` first,
    as many as fit ``budget_chars`` (each cut to MAX_WORKSPACE_FILE_CHARS at a line end)."""
    query = identifiers(document_text)  # not cached: the document changes at every keystroke
    scored = []
    for path in index.neighbours(here, MAX_WORKSPACE_CANDIDATES):
        text = index.text_of(path)
        if not text:
            continue
        if len(text) > MAX_WORKSPACE_FILE_CHARS:
            text = text[: text.rfind("\n", 0, MAX_WORKSPACE_FILE_CHARS) + 1 or MAX_WORKSPACE_FILE_CHARS]
        scored.append((-similarity(query, text), str(path), path, text))
    scored.sort(key=lambda item: item[:2])
    out, used = [], 0
    for _, _, path, text in scored:
        if used + len(text) > budget_chars:
            continue  # a smaller, less alike file may still fit
        out.append((path, text))
        used += len(text)
    return out
