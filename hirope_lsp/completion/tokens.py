"""Tokenizing a prompt part that mostly repeats the last one (typing changes its end).

The tokens before the last *split point* ahead of the first changed character
are kept and only the rest is tokenized again.  A split point is a place a
tokenizer never merges across: for the regex pre-tokenizers of byte-level BPE
(GPT-2, Llama 3, Qwen, StarCoder, the embedded model) a newline right after a
letter or digit, and a line start before a non-blank character.  Which rules a
tokenizer honours is checked once on sample code (joining the halves' tokens
must give the whole's at every candidate point); a tokenizer that honours none
is always tokenized whole.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable

log = logging.getLogger(__name__)

Encoding = tuple[list[int], list[tuple[int, int]]]  # token ids and their (start, end) char offsets

SAMPLE = '''import os
from typing import Any


class Store:
    """Keeps values."""

    def __init__(self, path: str):
        self.path = path
        self.items: dict[str, Any] = {}

    def get(self, key):
        if key in self.items:
            return self.items[key]
        return None  # missing


def main(argv=None):
    store = Store(os.getcwd())
    for n in range(10):
        store.items[str(n)] = n * 2
    print(store.get("3"))
    return 0
'''

MAX_LINES_BACK = 400  # scanned for a split point before tokenizing everything again


def after_word_newlines(text: str, lo: int, hi: int):
    """Split points before a newline that follows a letter or digit, latest first."""
    p = text.rfind("\n", lo, hi)
    while p > lo:
        if text[p - 1].isalnum():
            yield p
        p = text.rfind("\n", lo, p)


def top_level_line_starts(text: str, lo: int, hi: int):
    """Split points at the start of a line that begins with a non-blank character, latest first."""
    p = text.rfind("\n", lo, hi - 1)
    while p >= lo:
        if p + 1 < hi and not text[p + 1].isspace():
            yield p + 1
        p = text.rfind("\n", lo, p)


RULES = {"after-word-newline": after_word_newlines, "top-level-line": top_level_line_starts}


def common_prefix_length(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # largest n with a[:n] == b[:n]; slices compare at C speed
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class IncrementalEncoder:
    def __init__(self, encode: Callable[[str], Encoding]):
        self.encode = encode
        self.rules = [name for name, rule in RULES.items() if self._honours(rule)]
        if not self.rules:
            log.info("the tokenizer merges across lines: prompts are tokenized whole on every request")
        self._last: dict[object, tuple[str, Encoding]] = {}

    def _honours(self, rule) -> bool:
        whole = self.encode(SAMPLE)
        for p in rule(SAMPLE, 0, len(SAMPLE)):
            head, tail = self.encode(SAMPLE[:p]), self.encode(SAMPLE[p:])
            if head[0] + tail[0] != whole[0]:
                return False
        return True

    def __call__(self, key, text: str) -> Encoding:
        """The encoding of ``text``, reusing what ``key``'s previous text had in common with it."""
        encoded = self._reuse(key, text)
        if encoded is None:
            encoded = self.encode(text)
        self._last[key] = (text, encoded)
        return encoded

    def forget(self, key) -> None:
        self._last.pop(key, None)

    def _reuse(self, key, text: str) -> Encoding | None:
        last = self._last.get(key)
        if last is None or not self.rules:
            return None
        old_text, (old_ids, old_offsets) = last
        same = common_prefix_length(old_text, text)
        if same == len(text) == len(old_text):
            return old_ids, old_offsets
        split = self._split_point(text, same)
        if split is None:
            return None
        starts = [s for s, _ in old_offsets]
        i = bisect.bisect_left(starts, split)
        if i == len(starts) or starts[i] != split or (i and old_offsets[i - 1][1] > split):
            return None  # no token starts there in the old encoding (should not happen at a split point)
        tail_ids, tail_offsets = self.encode(text[split:])
        return old_ids[:i] + list(tail_ids), old_offsets[:i] + [(s + split, e + split) for s, e in tail_offsets]

    def _split_point(self, text: str, same: int) -> int | None:
        """The latest split point before ``same``, looking back at most ``MAX_LINES_BACK`` lines.
        The old and new texts agree up to ``same``, so a point found in ``text`` whose characters on
        both sides lie before ``same`` splits both."""
        limit = max(0, same - 1)
        lo = limit
        for _ in range(MAX_LINES_BACK):
            lo = text.rfind("\n", 0, lo)
            if lo <= 0:
                lo = 0
                break
        best = None
        for name in self.rules:
            for p in RULES[name](text, lo, limit):
                if p > 0 and (best is None or p > best):
                    best = p
                break  # rules yield latest first
        return best
