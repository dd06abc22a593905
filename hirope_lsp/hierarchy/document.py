"""One open document: text kept exactly as the client's, LSP positions in any
encoding, incremental reparse, and definitions recomputed only where the tree changed."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from .languages import Grammar, grammar, language_for_document
from .units import Definition, Unit, build_units, extract_definitions, unit_of_offsets

log = logging.getLogger(__name__)

LINE_BREAK = re.compile(r"\r\n|\r|\n")
LONE_CR = re.compile(r"\r(?!\n)")
ENCODINGS = ("utf-16", "utf-8", "utf-32")
MAX_PARSE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Change:
    """One LSP content change: ``range`` is ((line, character), (line, character)) or None for the whole text."""

    text: str
    range: tuple[tuple[int, int], tuple[int, int]] | None = None


def char_to_byte_offsets(text: str, chars: list[int]) -> list[int]:
    """UTF-8 byte offsets of char offsets into ``text``, in one pass when they ascend."""
    if text.isascii():
        return list(chars)
    out, last_c, last_b = [], 0, 0
    for c in chars:
        if c < last_c:
            last_c, last_b = 0, 0
        last_b += len(text[last_c:c].encode("utf-8"))
        last_c = c
        out.append(last_b)
    return out


def _line_starts(text: str, base: int = 0) -> list[int]:
    return [base] + [base + m.end() for m in LINE_BREAK.finditer(text)]


def _width(ch: str, encoding: str) -> int:
    if encoding == "utf-16":
        return 2 if ord(ch) > 0xFFFF else 1
    if encoding == "utf-8":
        return len(ch.encode("utf-8"))
    return 1


class Document:
    def __init__(self, uri: str, text: str, version: int = 0, language_id: str | None = None,
                 encoding: str = "utf-16", max_parse_bytes: int = MAX_PARSE_BYTES):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown position encoding {encoding!r}")
        self.uri = uri
        self.version = version
        self.encoding = encoding
        self.language = language_for_document(language_id, uri)
        self.max_parse_bytes = max_parse_bytes
        self.grammar: Grammar | None = None
        self._parser = None
        self._tree = None
        self._definitions: list[Definition] = []
        self._units: list[Unit] | None = None
        self._pending_edits: list[tuple[int, int, int]] = []  # (start, old_end, new_end) bytes, not yet parsed
        self._set_text(text)

    # ---- text and line tables ----

    def _set_text(self, text: str) -> None:
        self.text = text
        self.source = text.encode("utf-8")
        starts = _line_starts(text)
        self.line_char = np.array(starts, dtype=np.int64)
        self.line_byte = np.array(char_to_byte_offsets(text, starts), dtype=np.int64)
        self._lone_cr = bool(LONE_CR.search(text))
        self._full_parse()

    @property
    def line_count(self) -> int:
        return len(self.line_char)

    def line_text(self, line: int) -> str:
        """Line ``line`` without its line break."""
        start = int(self.line_char[line])
        end = int(self.line_char[line + 1]) if line + 1 < self.line_count else len(self.text)
        return self.text[start:end].rstrip("\r\n")

    def offset_at(self, line: int, character: int) -> tuple[int, int]:
        """(char offset, byte offset) of an LSP position; positions past a line's or the document's end clamp."""
        if line < 0 or character < 0:
            raise ValueError(f"negative position ({line}, {character})")
        if line >= self.line_count:
            log.info("%s: position line %d past the end (%d lines); using the end", self.uri, line, self.line_count)
            return len(self.text), len(self.source)
        content = self.line_text(line)
        if self.encoding == "utf-32" or content.isascii():
            cp = min(character, len(content))
        else:
            cp, units = 0, 0
            while cp < len(content) and units < character:
                units += _width(content[cp], self.encoding)
                cp += 1
            if units > character:  # inside a surrogate pair or a multi-byte sequence: stay before it
                cp -= 1
        char = int(self.line_char[line]) + cp
        byte = int(self.line_byte[line]) + (cp if content.isascii() else len(content[:cp].encode("utf-8")))
        return char, byte

    def position_at(self, char_offset: int) -> tuple[int, int]:
        """LSP (line, character) of a char offset, in this document's encoding."""
        char_offset = max(0, min(char_offset, len(self.text)))
        line = int(np.searchsorted(self.line_char, char_offset, side="right")) - 1
        prefix = self.text[int(self.line_char[line]) : char_offset]
        if self.encoding == "utf-32" or prefix.isascii():
            return line, len(prefix)
        return line, sum(_width(ch, self.encoding) for ch in prefix)

    def byte_to_char(self, byte_offset: int) -> int:
        """The char offset of a UTF-8 byte offset, through the line tables (decodes one line's part)."""
        line = int(np.searchsorted(self.line_byte, byte_offset, side="right")) - 1
        start = int(self.line_byte[line])
        return int(self.line_char[line]) + len(self.source[start:byte_offset].decode("utf-8", "ignore"))

    # ---- edits ----

    def apply_changes(self, changes: list[Change], version: int | None = None) -> None:
        """Apply LSP content changes in order.  The text is current at once; the tree and the
        definitions catch up (one incremental reparse for all pending edits) when next read."""
        for change in changes:
            if change.range is None:
                self._set_text(change.text)
                continue
            (sl, sc), (el, ec) = change.range
            start_char, start_byte = self.offset_at(sl, sc)
            end_char, end_byte = self.offset_at(el, ec)
            if end_char < start_char:
                raise ValueError(f"change range ends before it starts: {change.range}")
            self._splice(start_char, end_char, start_byte, end_byte, change.text)
        if version is not None:
            self.version = version

    def with_insertion(self, char_offset: int, text: str) -> "Document":
        """A copy with ``text`` inserted at ``char_offset`` (the document once a suggestion is accepted),
        parsed incrementally from this one's tree instead of from scratch; this document is unchanged."""
        self._catch_up()
        copy = object.__new__(Document)
        copy.__dict__.update(self.__dict__)
        copy._definitions, copy._pending_edits, copy._units = list(self._definitions), [], None
        if self._tree is not None:
            copy._tree, copy._parser = self._tree.copy(), self.grammar.parser()
        _, byte = self.offset_at(*self.position_at(char_offset))
        copy._splice(char_offset, char_offset, byte, byte, text)
        return copy

    def _splice(self, s: int, e: int, sb: int, eb: int, new: str) -> None:
        old_text = self.text
        text = old_text[:s] + new + old_text[e:]
        new_bytes = new.encode("utf-8")
        source = self.source[:sb] + new_bytes + self.source[eb:]
        delta_char = len(new) - (e - s)
        delta_byte = len(new_bytes) - (eb - sb)
        if self._tree is not None:  # points in the old text, so before the line tables change
            old_start, old_end = self._point(sb), self._point(eb)
        # re-scan the lines around the edit, one line of margin each side (CRLF pairs split or joined)
        ls = max(0, int(np.searchsorted(self.line_char, s, side="right")) - 2)
        le = int(np.searchsorted(self.line_char, e, side="right")) - 1
        tail = le + 2
        win_start = int(self.line_char[ls])
        win_end_old = int(self.line_char[tail]) if tail < self.line_count else len(old_text)
        win_end = win_end_old + delta_char
        starts = _line_starts(text[win_start:win_end], win_start)
        if tail < self.line_count:  # the break ending the window starts the first kept line
            starts = [x for x in starts if x < win_end]
        byte_start = int(self.line_byte[ls])
        bstarts = [byte_start + b for b in char_to_byte_offsets(text[win_start:win_end], [x - win_start for x in starts])]
        self.line_char = np.concatenate([self.line_char[:ls], np.array(starts, dtype=np.int64),
                                         self.line_char[tail:] + delta_char])
        self.line_byte = np.concatenate([self.line_byte[:ls], np.array(bstarts, dtype=np.int64),
                                         self.line_byte[tail:] + delta_byte])
        if "\r" in new or "\r" in old_text[max(0, s - 1) : e + 1]:
            self._lone_cr = bool(LONE_CR.search(text))
        self.text, self.source = text, source
        self._units = None
        if self._tree is not None:
            new_end = sb + len(new_bytes)
            self._tree.edit(start_byte=sb, old_end_byte=eb, new_end_byte=new_end,
                            start_point=old_start, old_end_point=old_end, new_end_point=self._point(new_end))
            self._pending_edits.append((sb, eb, new_end))

    def _point(self, byte: int) -> tuple[int, int]:
        """Tree-sitter point (rows counted by LF only) of a byte offset in the current source."""
        if self._lone_cr:
            row = self.source.count(b"\n", 0, byte)
            return row, byte - (self.source.rfind(b"\n", 0, byte) + 1)
        line = int(np.searchsorted(self.line_byte, byte, side="right")) - 1
        return line, byte - int(self.line_byte[line])

    # ---- syntax ----

    def _full_parse(self) -> None:
        self._units = None
        self._pending_edits = []
        self.grammar = grammar(self.language) if self.language else None
        self._tree = None
        self._definitions = []
        if self.grammar is None:
            return
        if len(self.source) > self.max_parse_bytes:
            log.warning("%s: %d bytes is over the parse limit (%d); plain text with fixed-size units",
                        self.uri, len(self.source), self.max_parse_bytes)
            self.grammar = None
            return
        self._parser = self.grammar.parser()
        self._tree = self._parser.parse(self.source)
        self._definitions = extract_definitions(self.grammar, self._tree)

    @property
    def tree(self):
        """The syntax tree of the current text (None for plain text)."""
        self._catch_up()
        return self._tree

    @property
    def definitions(self) -> list[Definition]:
        self._catch_up()
        return self._definitions

    @property
    def stale(self) -> bool:
        return bool(self._pending_edits)

    def _catch_up(self) -> None:
        if not self._pending_edits:
            return
        edits, self._pending_edits = self._pending_edits, []
        if len(self.source) > self.max_parse_bytes:
            log.warning("%s grew over the parse limit; plain text from now on", self.uri)
            self._full_parse()
            return
        dirty: tuple[int, int] | None = None
        for start, old_end, new_end in edits:
            dirty = _map_dirty(dirty, start, old_end, new_end)
            dropped = self._shift_definitions(start, old_end, new_end - old_end)
            if dropped is not None:
                dirty = (min(dirty[0], dropped[0]), max(dirty[1], dropped[1]))
        self._reparse(dirty)

    def _reparse(self, dirty: tuple[int, int]) -> None:
        old_tree = self._tree
        self._tree = self._parser.parse(self.source, old_tree)
        lo, hi = dirty
        for r in old_tree.changed_ranges(self._tree):
            lo, hi = min(lo, r.start_byte), max(hi, r.end_byte)
        lo, hi = self._top_level_span(lo, hi)
        keep_before = [d for d in self._definitions if d.end <= lo]
        keep_after = [d for d in self._definitions if d.start >= hi]
        fresh = extract_definitions(self.grammar, self._tree, lo, hi)
        self._definitions = keep_before + fresh + keep_after
        self._units = None

    def _top_level_span(self, lo: int, hi: int) -> tuple[int, int]:
        """Widen [lo, hi) to whole top-level nodes, the scope in which definitions can have changed."""
        cursor = self._tree.root_node.walk()
        if cursor.goto_first_child_for_byte(lo) is None:
            return lo, hi
        new_lo, new_hi = min(lo, cursor.node.start_byte), hi
        while cursor.node.start_byte < max(hi, lo + 1):
            new_hi = max(new_hi, cursor.node.end_byte)
            if not cursor.goto_next_sibling():
                break
        return new_lo, new_hi

    def _shift_definitions(self, start: int, old_end: int, delta: int) -> tuple[int, int] | None:
        """Move definitions past an edit; drop those touching it (re-extracted after the reparse) and
        return the span they covered, in new coordinates, so the re-extraction reaches them."""
        kept, dropped = [], None
        for d in self.definitions:
            if d.end < start:
                kept.append(d)
            elif d.start > old_end:
                kept.append(Definition(d.start + delta, d.end + delta, d.kind, d.name))
            else:
                end = d.end + delta if d.end >= old_end else old_end + delta
                dropped = (d.start, end) if dropped is None else (min(dropped[0], d.start), max(dropped[1], end))
        self._definitions = kept
        return dropped

    # ---- hierarchy ----

    @property
    def units(self) -> list[Unit] | None:
        """Units of the current text (None for plain text: callers use fixed-size units)."""
        if self.tree is None:
            return None
        if self._units is None:
            self._units = build_units(self._definitions, self.source)
        return self._units

    def unit_of_bytes(self, offsets: list[int]) -> list[int] | None:
        units = self.units
        return None if units is None else unit_of_offsets(units, offsets)


def _map_dirty(dirty, start: int, old_end: int, new_end: int):
    """Carry the changed byte interval through one more edit and add that edit."""
    if dirty is None:
        return start, new_end
    delta = new_end - old_end

    def move(x: int, inside: int) -> int:
        if x <= start:
            return x
        if x >= old_end:
            return x + delta
        return inside

    lo, hi = move(dirty[0], start), move(dirty[1], new_end)
    return min(lo, start), max(hi, new_end)

