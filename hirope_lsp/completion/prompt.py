"""Turn a document, a cursor and the workspace into prompt tokens with a hierarchical
position for each.

Layout, so that what changes while typing comes last (KV reuse):

    spm:  [cross-file context] SUF suffix PRE [outline] prefix MID      (the embedded model)
    psm:  PRE [cross-file context] [outline] prefix SUF suffix MID      (most code models)
    none: [cross-file context] [outline] prefix                          (no FIM tokens)

``outline`` (``far_prompt="outline"``): the file before the kept prefix with its functions'
bodies dropped (``skeleton.py``), nearest part first when it does not fit.

Positions: ``(unit, token)``.  ``token`` is the index in the prompt.  ``unit``
counts changes of syntactic unit along the prompt: tokens of the current file
take the unit of their byte (tree-sitter units), each cross-file definition is
a unit, plain-text files get a unit every ``fixed_unit`` tokens, and special
tokens start a unit of their own.  Counting changes keeps unit indices
increasing along the prompt even when the suffix comes before the prefix.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..hierarchy.document import Document
from ..hierarchy.positions import positions_from_unit_keys, token_unit_keys
from ..model.copying import SEPARATOR
from ..model.loading import FimFormat
from ..workspace.index import WorkspaceIndex, uri_to_path
from .retrieval import similar_snippets
from .skeleton import Piece, outline_char_map, outline_pieces, outline_text
from .tokens import IncrementalEncoder
from .workspace_copy import MAX_WORKSPACE_CANDIDATES, workspace_texts

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
IMPORT_LINE = re.compile(r"^[ \t]*(?:import |from |#include|use ).*$", re.MULTILINE)
IMPORT_SCAN_CHARS = 256 * 1024  # imports are looked for in a file's head, not through a huge file per keystroke
MAX_DEFINITIONS_PER_NAME = 4
CONTEXT_FULL_TOKENS = 32
FAR_PROMPTS = ("raw", "outline")
COPY_DOCUMENT_CHARS = 64 * 1024  # the copy model reads at most this much of the document beyond the prompt
COPY_PIECE_CHARS = 8 * 1024  # ... tokenized in pieces cut on a grid, so that a jump re-reads only its two ends
FILE_PARTS = ("prefix", "suffix", "outline")  # their unit keys are the document's own (shared units)
KEYWORDS = frozenset("""False None True and as assert async await break class continue def del elif else except finally
for from global if import in is lambda nonlocal not or pass raise return try while with yield self cls print len range
str int list dict set tuple const let var function return new this export default interface type struct impl fn pub use
mod func package void static public private protected""".split())


@dataclass(kw_only=True)
class ContextSettings:
    budget_tokens: int = 4096  # whole prompt; HiRoPE lets this exceed the model's training length
    suffix_share: float = 0.15
    context_share: float = 0.2  # cross-file definitions
    context_lines: int = 40  # lines of the cursor's neighbourhood scanned for names
    max_definition_lines: int = 60
    fixed_unit: int = 128
    cross_file: bool = True
    # the far part of the file: "raw" text (cut where the budget ends), or its "outline" (signatures,
    # class headers, imports: function bodies dropped) before the last ``near_tokens`` of raw text
    far_prompt: str = "raw"
    # windows of similar code from open documents and the cursor file's folder (half the context budget)
    similar_code: bool = False
    near_tokens: int | None = None  # outline: raw tokens before the cursor; None: half the prefix budget
    # the copy model also reads the document beyond the prompt (the text before the kept prefix, then after
    # the kept suffix; up to COPY_DOCUMENT_CHARS, nearest the cursor): no attention cost, more to copy from
    copy_document: bool = True
    # ... and the workspace's neighbouring files (open documents, the cursor file's folder), most alike first,
    # up to COPY_WORKSPACE_CHARS (workspace_copy.py); on: every tune corpus gained (README, Evaluation)
    copy_workspace: bool = True


@dataclass
class PromptPart:
    kind: str  # special, context, prefix, suffix
    ids: list[int]
    units: list[int]  # a key per token; a change of key starts a new unit


@dataclass
class BuiltPrompt:
    token_ids: list[int]
    positions: torch.Tensor  # [T, 2]
    prefix_text: str
    suffix_text: str
    context_names: list[str] = field(default_factory=list)
    prefix_start: int = 0  # char offset where the kept prefix starts
    cursor_unit: torch.Tensor | None = None  # the unit of the token before the cursor (generated text's unit)


class PromptBuilder:
    def __init__(self, tokenizer, fim: FimFormat, settings: ContextSettings | None = None):
        self.tokenizer = tokenizer
        self.fim = fim
        self.settings = settings or ContextSettings()
        self._prefix_starts: dict[str, int] = {}  # document uri -> line the kept prefix starts at
        # typing changes the prefix at its end and leaves the suffix as it was (its window's end moves)
        self._incremental = IncrementalEncoder(self._encode)
        # the same definitions are picked again on most keystrokes
        self._encode_block = functools.lru_cache(maxsize=1024)(lambda block: tuple(self._encode(block)[0]))
        # and the same outline: typing after it leaves it as it was
        self._encode_outline = functools.lru_cache(maxsize=16)(self._encode)
        # and the same pieces of the document beyond the prompt (COPY_DOCUMENT_CHARS in COPY_PIECE_CHARS pieces)
        self._encode_beyond = functools.lru_cache(maxsize=4 * COPY_DOCUMENT_CHARS // COPY_PIECE_CHARS)(
            lambda text: np.asarray(self._encode(text)[0], dtype=np.int64))
        # similar code found for a document, kept while the cursor stays in the same unit (cache-friendly)
        self._similar: dict[str, tuple[object, list]] = {}
        # the workspace files the copy model reads for a document, kept while none of its neighbours changes
        self._workspace: dict[str, tuple[object, np.ndarray]] = {}
        self._encode_file = functools.lru_cache(maxsize=MAX_WORKSPACE_CANDIDATES)(
            lambda text: np.asarray(self._encode(text)[0] + [SEPARATOR], dtype=np.int64))

    def _special(self, token: str | None) -> list[int]:
        return [] if token is None else [self.tokenizer.convert_tokens_to_ids(token)]

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        fast = getattr(self.tokenizer, "_tokenizer", None)  # the Rust tokenizer, without the wrapper's copies
        if fast is not None:
            enc = fast.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def _file_part(self, kind: str, doc: Document, text: str, char_base: int, encoded=None) -> PromptPart:
        ids, offsets = encoded or self._encode(text)
        spans = [(char_base + s, char_base + e) for s, e in offsets]
        # fixed-size units restart per part; tree-sitter units are shared by the suffix and the prefix
        tag = kind if doc.units is None else doc.uri
        return PromptPart(kind, ids, token_unit_keys(doc, spans, tag, self.settings.fixed_unit))

    def _kept_prefix(self, doc: Document, cursor: int, cursor_line: int, budget: int):
        """A start line for the kept prefix that stays put while typing (cache-friendly): moved
        forward only when the prefix overflows, back when it shrank below half; then ~80 % full.
        Returns the line and the encoding of the text from it to the cursor."""
        # never tokenize more than ~16 characters per budget token (huge files, minified lines)
        earliest = int(np.searchsorted(doc.line_char, max(0, cursor - 16 * budget), side="left"))
        start = min(max(self._prefix_starts.get(doc.uri, 0), earliest), cursor_line)
        encode = lambda line: self._incremental(("prefix", doc.uri), doc.text[int(doc.line_char[line]) : cursor])  # noqa: E731
        encoded = encode(start)
        if start > earliest and len(encoded[0]) < budget // 2:
            start = earliest
            encoded = encode(start)
        ids, offsets = encoded
        if len(ids) > budget:
            drop = len(ids) - int(budget * 0.8)
            cut_char = int(doc.line_char[start]) + offsets[drop][0]
            start = min(int(np.searchsorted(doc.line_char, cut_char, side="left")), cursor_line)
            encoded = encode(start)
        self._prefix_starts[doc.uri] = start
        return start, encoded

    def forget(self, uri: str) -> None:
        self._prefix_starts.pop(uri, None)
        self._similar.pop(uri, None)
        self._workspace.pop(uri, None)
        self._incremental.forget(("prefix", uri))
        self._incremental.forget(("suffix", uri))

    def build(self, doc: Document, line: int, character: int, index: WorkspaceIndex | None = None) -> BuiltPrompt:
        s = self.settings
        cursor, cursor_byte = doc.offset_at(line, character)
        line, _ = doc.position_at(cursor)
        special_budget = 4
        suffix_budget = int(s.budget_tokens * s.suffix_share) if self.fim.available else 0
        context_budget = int(s.budget_tokens * s.context_share) if s.cross_file and index is not None else 0

        # suffix: whole lines after the cursor up to its budget
        suffix_part = None
        suffix_text = ""
        if suffix_budget:
            suffix_text = doc.text[cursor : cursor + 16 * suffix_budget]
            suffix_part = self._file_part("suffix", doc, suffix_text, cursor,
                                          self._incremental(("suffix", doc.uri), suffix_text))
            if len(suffix_part.ids) > suffix_budget:
                suffix_part.ids = suffix_part.ids[:suffix_budget]
                suffix_part.units = suffix_part.units[:suffix_budget]
                suffix_text = self.tokenizer.decode(suffix_part.ids)

        context_parts, names = self._context_parts(doc, cursor, cursor_byte, index, context_budget) if context_budget else ([], [])
        used = special_budget + (len(suffix_part.ids) if suffix_part else 0) + sum(len(p.ids) for p in context_parts)
        prefix_budget = max(16, s.budget_tokens - used)
        raw_budget = prefix_budget
        if s.far_prompt == "outline":
            raw_budget = max(16, min(prefix_budget, s.near_tokens or prefix_budget // 2))
        # the kept prefix starts no later than the line of its last character (never empty at a line start)
        last_line = doc.position_at(cursor - 1)[0] if cursor > 0 else 0
        start_line, encoded = self._kept_prefix(doc, cursor, last_line, raw_budget)
        start_char = int(doc.line_char[start_line])
        if start_char < cursor - 16 * prefix_budget:  # a huge single line
            start_char, encoded = cursor - 16 * prefix_budget, None
        prefix_text = doc.text[start_char:cursor]
        prefix_part = self._file_part("prefix", doc, prefix_text, start_char, encoded)
        if len(prefix_part.ids) > raw_budget:  # a single very long line: keep its end
            prefix_part.ids = prefix_part.ids[-raw_budget:]
            prefix_part.units = prefix_part.units[-raw_budget:]
        outline = []
        # the outline's budget does not follow the raw prefix's length: typing leaves the outline as it was
        if s.far_prompt == "outline" and start_char > 0 and prefix_budget - raw_budget >= CONTEXT_FULL_TOKENS:
            outline = [self._outline_part(doc, start_char, prefix_budget - raw_budget)]

        def special(tok, name):
            ids = self._special(tok)
            return [PromptPart("special", ids, [("special", name)] * len(ids))] if ids else []

        if not self.fim.available or suffix_part is None:
            parts = context_parts + outline + [prefix_part]
        elif self.fim.order == "spm":
            parts = context_parts + special(self.fim.suffix, "suf") + [suffix_part] + special(self.fim.prefix, "pre") \
                + outline + [prefix_part] + special(self.fim.middle, "mid")
        else:
            parts = special(self.fim.prefix, "pre") + context_parts + outline + [prefix_part] \
                + special(self.fim.suffix, "suf") + [suffix_part] + special(self.fim.middle, "mid")
        token_ids = [tid for part in parts for tid in part.ids]
        keys = [(part.kind, key) if part.kind not in FILE_PARTS else key for part in parts for key in part.units]
        positions = positions_from_unit_keys(keys)
        cursor_unit = None
        if prefix_part.ids:
            at = 0
            for part in parts[: parts.index(prefix_part) + 1]:
                at += len(part.ids)
            cursor_unit = positions[at - 1, :-1].clone()
        return BuiltPrompt(token_ids, positions, prefix_text, suffix_text, names, start_char, cursor_unit)

    def copy_history(self, doc: Document, built: BuiltPrompt) -> np.ndarray:
        """The tokens of ``doc`` that ``built`` does not hold, for the copy model (``copy_document``): after
        the kept suffix, then before the kept prefix (what the prompt continues), each cut to its part of
        COPY_DOCUMENT_CHARS nearest the cursor at a line start; int64. Any builder's prompt of ``doc`` will
        do: the pieces are cached here, so one builder serves every prompt budget."""
        text = doc.text
        before = built.prefix_start
        after = before + len(built.prefix_text) + len(built.suffix_text)  # the prefix ends at the cursor
        tail_end = min(len(text), after + COPY_DOCUMENT_CHARS // 4)
        if tail_end < len(text):
            tail_end = text.rfind("\n", after, tail_end) + 1 or after
        head_start = max(0, before - COPY_DOCUMENT_CHARS)
        if head_start > 0:
            head_start = text.find("\n", head_start, before) + 1 or before
        # the head's grid counts from the document's start and the tail's from its end, so typing between
        # them (which shifts neither) and jumping (which moves only their ends) leave most pieces as they were
        pieces = self._pieces(text, after, tail_end, from_end=True) + self._pieces(text, head_start, before)
        ids = [self._encode_beyond(text[a:b]) for a, b in pieces]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def workspace_history(self, doc: Document, index: WorkspaceIndex) -> np.ndarray:
        """The tokens of the workspace files the copy model reads beside ``doc`` (``copy_workspace``), each
        followed by the copy model's SEPARATOR; chosen again only when one of the neighbours changed (typing
        in ``doc`` keeps the choice)."""
        here = uri_to_path(doc.uri)
        neighbours = index.neighbours(here, MAX_WORKSPACE_CANDIDATES)
        key = tuple((path, index.revision(path)) for path in neighbours)
        kept = self._workspace.get(doc.uri)
        if kept is not None and kept[0] == key:
            return kept[1]
        ids = [self._encode_file(text) for _, text in workspace_texts(here, doc.text, index)]
        tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self._workspace[doc.uri] = (key, tokens)
        return tokens

    @staticmethod
    def _pieces(text: str, start: int, end: int, from_end: bool = False) -> list[tuple[int, int]]:
        """``[start, end)`` cut after the first line break at or after each multiple of COPY_PIECE_CHARS,
        counted from the document's start (or its end)."""
        if start >= end:
            return []
        size, n = COPY_PIECE_CHARS, len(text)
        if from_end:
            anchors = range(n - ((n - start) // size) * size, end, size)
        else:
            anchors = range(-(-start // size) * size, end, size)
        cuts = [start]
        for anchor in anchors:
            cut = text.find("\n", max(anchor, cuts[-1]), end) + 1
            if cut == 0:
                break
            if cuts[-1] < cut < end:
                cuts.append(cut)
        return list(zip(cuts, cuts[1:] + [end]))

    def _outline_part(self, doc: Document, end_char: int, budget: int) -> PromptPart:
        """The outline of ``doc.text[:end_char]``, its last ``budget`` tokens; each token takes the unit of the
        document text it comes from (an elided body: its function's header)."""
        pieces = [Piece(0, end_char)]  # the raw text where all of it fits
        text = outline_text(doc, pieces)
        ids, offsets = self._encode_outline(text)
        if len(ids) > budget:
            pieces = outline_pieces(doc, end_char)
            text = outline_text(doc, pieces)
            ids, offsets = self._encode_outline(text)
        if len(ids) > budget:  # its nearest part, from a paragraph's start (else a line's)
            first = len(ids) - budget
            at = offsets[first][0]
            gap = text.find("\n\n", at, at + 1024)
            newline = gap + 1 if gap >= 0 else text.find("\n", at)
            # from the token holding that newline: the indentation after it often shares the token
            cut = first if newline < 0 else max(first, bisect.bisect_right(offsets, (newline, 1 << 62), lo=first) - 1)
            ids, offsets = ids[cut:], offsets[cut:]
        starts, sources, real = outline_char_map(pieces)
        piece_of = np.searchsorted(np.asarray(starts), np.asarray([max(0, e - 1) for _, e in offsets]), side="right") - 1
        spans = []
        for (start, end), k in zip(offsets, piece_of.tolist()):
            last = sources[k] + (max(start, end - 1) - starts[k]) if real[k] else max(0, sources[k] - 1)
            spans.append((last, last + 1))
        tag = "outline" if doc.units is None else doc.uri
        return PromptPart("outline", list(ids), token_unit_keys(doc, spans, tag, self.settings.fixed_unit))

    def _context_parts(self, doc: Document, cursor: int, cursor_byte: int, index: WorkspaceIndex, budget: int):
        """Similar code (``similar_code``, up to half the budget), then definitions from other files of
        names used near the cursor, in a stable order."""
        similar = self._similar_parts(doc, cursor, cursor_byte, index, budget // 2) if self.settings.similar_code else []
        parts, names = self._definition_parts(doc, cursor, index, budget - sum(len(p.ids) for p in similar))
        return similar + parts, names

    def _similar_parts(self, doc: Document, cursor: int, cursor_byte: int, index: WorkspaceIndex,
                       budget: int) -> list[PromptPart]:
        here = uri_to_path(doc.uri)
        line, _ = doc.position_at(cursor)
        units = doc.unit_of_bytes([cursor_byte])
        where = (units[0] if units is not None else None, line if units is None else None)
        kept = self._similar.get(doc.uri)
        if kept is not None and kept[0] == where:
            return kept[1]
        parts, used = [], 0
        query = doc.text[max(0, cursor - 4096) : cursor]
        for snippet in similar_snippets(query, here, index):
            block = f"# {_display_path(snippet.path, index)}\n{snippet.text}\n"
            ids = self._encode_block(block)
            if used + len(ids) > budget:
                continue
            used += len(ids)
            parts.append(PromptPart("context", list(ids), [("similar", str(snippet.path), snippet.first_line)] * len(ids)))
        self._similar[doc.uri] = (where, parts)
        return parts

    def _definition_parts(self, doc: Document, cursor: int, index: WorkspaceIndex, budget: int):
        s = self.settings
        here = uri_to_path(doc.uri)
        line, _ = doc.position_at(cursor)
        lo = int(doc.line_char[max(0, line - s.context_lines)])
        hi_line = min(doc.line_count - 1, line + 5)
        hi = int(doc.line_char[hi_line]) + len(doc.line_text(hi_line))
        window = doc.text[lo:hi]
        imports = "\n".join(IMPORT_LINE.findall(doc.text, 0, IMPORT_SCAN_CHARS))
        names = sorted({m.group(0) for m in IDENTIFIER.finditer(window + "\n" + imports)} - KEYWORDS)
        chosen = []
        for name in names:
            symbols = [sym for sym in index.lookup(name) if here is None or sym.path != here]
            # a name defined in many places (forward, __init__, run) says nothing about which one is meant,
            # and encoding thousands of candidates per keystroke stalls a large workspace
            if len(symbols) <= MAX_DEFINITIONS_PER_NAME:
                chosen.extend(symbols)
        chosen.sort(key=lambda sym: (str(sym.path), sym.start))
        parts, used, picked = [], 0, []
        sources: dict[Path, bytes | None] = {}  # a file read and encoded once, however many of its definitions
        for sym in chosen:
            if sym.path not in sources:
                text = index.text_of(sym.path)
                sources[sym.path] = None if text is None else text.encode("utf-8")
            source = sources[sym.path]
            if source is None:
                continue
            body = source[sym.start : sym.end].decode("utf-8", "replace")
            body_lines = body.splitlines()[: s.max_definition_lines]
            block = f"# {_display_path(sym.path, index)}\n" + "\n".join(body_lines) + "\n\n"
            ids = self._encode_block(block)
            if used + len(ids) > budget:
                if budget - used < CONTEXT_FULL_TOKENS:
                    break  # full: the rest would not fit either
                continue
            used += len(ids)
            picked.append(sym.name)
            parts.append(PromptPart("context", list(ids), [("def", str(sym.path), sym.start)] * len(ids)))
        return parts, picked


def _display_path(path: Path, index: WorkspaceIndex) -> str:
    folder = index.folder_of(path)
    return path.relative_to(folder).as_posix() if folder is not None else path.name

