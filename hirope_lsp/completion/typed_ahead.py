"""The rest of a suggestion the user is typing along with, without the model.

When the only change to a document since a suggestion was shown is that the user typed its
first characters at the cursor, the rest of that suggestion is the answer: the model already
read everything but those characters, and it wrote them itself.  Checked on the document's
bytes (everything before the cursor, the typed text, everything after), so any other edit,
anywhere, falls back to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hierarchy.document import Document

MAX_KEPT_BYTES = 8 << 20  # a document's text is kept with its suggestion; not for huge ones


@dataclass(frozen=True)
class DocumentState:
    """A document's text at one moment (a live ``Document`` changes in place)."""

    uri: str
    source: bytes
    version: int

    @classmethod
    def of(cls, doc: Document) -> DocumentState:
        return cls(doc.uri, doc.source, doc.version)


@dataclass
class Shown:
    source: bytes  # the document's text when the suggestion was made
    cursor: int  # byte offset of the cursor in it
    text: bytes  # the suggestion ("" kept ahead: the model has nothing to say in exactly that state)
    short: bool = False  # made from a short prompt while the full one warmed


class ShownSuggestions:
    """``answers_at_start``: a suggestion made ahead for a document not yet in that state (the one after
    an accept) answers as soon as the document reaches it, before any character is typed, and an empty
    one answers "nothing" in exactly that state.  ``keep``: how many suggestions a document keeps
    (newest first); work ahead makes them for several states.  Documents are ``Document`` or
    ``DocumentState`` (anything with ``uri`` and ``source``)."""

    def __init__(self, answers_at_start: bool = False, keep: int = 1) -> None:
        self._shown: dict[str, list[Shown]] = {}
        self.answers_at_start = answers_at_start
        self.keep = keep

    def remember(self, doc: Document | DocumentState, cursor_byte: int, text: str, short: bool = False) -> None:
        if (not text and not self.answers_at_start) or len(doc.source) > MAX_KEPT_BYTES:
            if self.keep == 1:
                self._shown.pop(doc.uri, None)
            return
        kept = [s for s in self._shown.get(doc.uri, []) if (s.source, s.cursor) != (doc.source, cursor_byte)]
        self._shown[doc.uri] = [Shown(doc.source, cursor_byte, text.encode("utf-8"), short), *kept][: self.keep]

    def forget(self, uri: str) -> None:
        self._shown.pop(uri, None)

    def clear(self) -> None:
        self._shown.clear()

    def covers(self, doc: Document | DocumentState, cursor_byte: int, full_only: bool = False) -> bool:
        """Whether ``answer`` would answer for ``doc`` at the cursor (``full_only``: with a suggestion not
        made from a short prompt); nothing is changed."""
        return any(self._rest_of(shown, doc, cursor_byte) is not None and not (full_only and shown.short)
                   for shown in self._shown.get(doc.uri, ()))

    def answer(self, doc: Document | DocumentState, cursor_byte: int,
               typed_along: bool = True) -> tuple[str, bool] | None:
        """(what is left of a suggestion made for ``doc`` if the user typed its start up to the cursor and
        changed nothing else, whether it came from a short prompt); None otherwise (the rest is
        remembered as shown).  ``typed_along=False``: only a suggestion made for exactly this state."""
        kept = self._shown.get(doc.uri, [])
        for i, shown in enumerate(kept):
            if not typed_along and cursor_byte != shown.cursor:
                continue
            rest = self._rest_of(shown, doc, cursor_byte)
            if rest is not None:
                kept[i] = Shown(doc.source, cursor_byte, shown.text[cursor_byte - shown.cursor :], shown.short)
                return rest, shown.short
        return None

    def rest(self, doc: Document | DocumentState, cursor_byte: int) -> str | None:
        found = self.answer(doc, cursor_byte)
        return None if found is None else found[0]

    def _rest_of(self, shown: Shown, doc: Document | DocumentState, cursor_byte: int) -> str | None:
        typed = cursor_byte - shown.cursor
        new, old = doc.source, shown.source
        if not shown.text:
            return "" if self.answers_at_start and typed == 0 and new == old else None
        if not (0 if self.answers_at_start else 1) <= typed < len(shown.text) or len(new) != len(old) + typed:
            return None
        new_view, old_view = memoryview(new), memoryview(old)  # compared without copying the texts
        if (new[shown.cursor : cursor_byte] != shown.text[:typed]
                or new_view[: shown.cursor] != old_view[: shown.cursor]
                or new_view[cursor_byte:] != old_view[shown.cursor :]):
            return None
        try:
            return shown.text[typed:].decode("utf-8")
        except UnicodeDecodeError:  # the cursor is inside a character of the suggestion
            return None
