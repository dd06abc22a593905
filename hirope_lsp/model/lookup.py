"""Draft tokens for greedy decoding from the text already seen (prompt lookup): where the last few
tokens occurred before, the tokens that followed them there.  Code repeats itself (names, calls,
whole lines), so a draft is often right; one forward checks all of its tokens at once, and greedy
decoding keeps exactly the tokens the model would have chosen one by one."""

from __future__ import annotations

MAX_NGRAM = 3


class PromptLookup:
    def __init__(self, tokens: list[int], draft: int):
        self.tokens = list(tokens)
        self.draft = draft
        self.added = 0  # tokens extended since the start
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> end index of its latest occurrence
        self._indexed = 0  # n-grams ending before this index are in ``_last``
        self._index(len(self.tokens) - 1)

    def _index(self, until: int) -> None:
        """Index the n-grams ending at ``_indexed .. until - 1`` (the sequence's last n-gram stays out:
        a lookup of it must find an earlier occurrence, with tokens after it)."""
        t = self.tokens
        for end in range(self._indexed, until):
            for n in range(1, MAX_NGRAM + 1):
                if end - n + 1 < 0:
                    break
                self._last[tuple(t[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, until)

    def extend(self, new: list[int]) -> None:
        self.tokens.extend(new)
        self.added += len(new)
        self._index(len(self.tokens) - 1)

    def propose(self) -> list[int]:
        """Up to ``draft`` tokens that followed the longest recent n-gram ending the sequence; [] if none."""
        t = self.tokens
        for n in range(min(MAX_NGRAM, len(t)), 0, -1):
            end = self._last.get(tuple(t[len(t) - n :]))
            if end is not None:
                return t[end + 1 : end + 1 + self.draft]
        return []
