"""A copy model over the text already seen (a cache n-gram model, Hellendoorn & Devanbu 2017): where the
last few tokens occurred before in the prompt, the tokens that followed them there, counted.  Mixed into
the network's next-token distribution it lets a name seen anywhere in the prompt, thousands of tokens
back, be copied even where the attention of a small model does not pick it up."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MAX_ORDER = 16  # longest context matched: a long match names the one place the text continues from
FULL_ORDER = 4  # a context this long gets the copy model's full weight (shorter ones a share of it)
SEPARATOR = -1  # between texts read one after another (files): no token, so never predicted, and a match
# that reaches it has found the start of a text


@dataclass
class CopySettings:
    weight: float = 0.0  # most of the mixture the copy model may take; 0: off
    min_order: int = 1  # shortest context (in tokens) whose occurrences are trusted
    max_order: int = MAX_ORDER
    full_order: int = FULL_ORDER

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def validate(self) -> None:
        if not 0 <= self.weight < 1:
            raise ValueError(f"copy weight {self.weight} must be in [0, 1)")
        if not 1 <= self.min_order <= self.max_order:
            raise ValueError(f"copy orders {self.min_order}..{self.max_order}: need 1 <= min <= max")
        if self.full_order < 1:
            raise ValueError(f"copy full order {self.full_order} must be at least 1")


def parse_copies(text: str) -> tuple[CopySettings, ...]:
    """``"0.5/1,0.8/2"`` -> two copy models (WEIGHT/MIN_ORDER; the order may be left out); ValueError on a
    bad one."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        weight, _, order = item.partition("/")
        try:
            copy = CopySettings(weight=float(weight), min_order=int(order or CopySettings.min_order))
            copy.validate()
        except ValueError as error:
            raise ValueError(f"copy model {item!r}: {error}") from None
        out.append(copy)
    return tuple(out)


@dataclass(frozen=True)
class CopyPrediction:
    token_ids: np.ndarray  # the distinct tokens that followed the context
    probs: np.ndarray  # their share of the occurrences
    order: int  # context length matched
    count: int  # occurrences of the context

    def mixture_weight(self, settings: CopySettings) -> float:
        """The copy model's share: grows with the evidence, ``weight`` x c / (c + 1) x min(1, order / full
        order) (a longer context that occurred more often is trusted more; chosen over a share by count
        alone on the tune corpus: next-token accuracy 59.1 against 58.9 %, perplexity 9.4 against 9.6).
        Contexts longer than ``full_order`` keep the full weight and only pick the occurrences: next-line
        ES on the tune corpus 27.2 (at most 4 tokens) -> 29.9 (at most 16), README, Evaluation."""
        return settings.weight * self.count / (self.count + 1) * min(1.0, self.order / settings.full_order)


class CopyModel:
    """Tokens seen so far, searched for the longest recent context (vectorized: no index to build, so a
    prompt that changes at every keystroke costs nothing until a suggestion is decoded)."""

    def __init__(self, tokens, settings: CopySettings):
        self.settings = settings
        self._tokens = np.asarray(tokens, dtype=np.int64)
        self._length = len(self._tokens)

    def extend(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if self._length + len(tokens) > len(self._tokens):
            grown = np.empty(max(2 * len(self._tokens), self._length + len(tokens)), dtype=np.int64)
            grown[: self._length] = self._tokens[: self._length]
            self._tokens = grown
        self._tokens[self._length : self._length + len(tokens)] = tokens
        self._length += len(tokens)

    def predict(self, end: int | None = None, start: int = 0) -> CopyPrediction | None:
        """What follows the ``max_order``..``min_order`` tokens before ``end`` (default: all seen), from
        their occurrences within ``tokens[start:end]``: the longest order that occurred wins."""
        end = self._length if end is None else end
        seq = self._tokens[start:end]
        s = self.settings
        n = len(seq)
        if n < 2:
            return None
        # occurrences of the last token that a token follows, then those of ever longer contexts among them
        # (extended backwards at the hits only: a long context costs its hits, not a pass over the text)
        ends = np.flatnonzero(seq[: n - 1] == seq[n - 1])
        order, found = 1, ends
        while len(ends) and order < min(s.max_order, n - 1) and seq[n - 1 - order] != SEPARATOR:
            ends = ends[ends >= order]
            ends = ends[seq[ends - order] == seq[n - 1 - order]]
            if len(ends):
                order, found = order + 1, ends
        follows = seq[found + 1]
        follows = follows[follows != SEPARATOR]
        if order < s.min_order or not len(follows):
            return None
        ids, counts = np.unique(follows, return_counts=True)
        return CopyPrediction(ids, counts / counts.sum(), order, len(follows))


def mix_probability(model_prob, prediction: CopyPrediction | None, target: int, settings: CopySettings) -> float:
    """p(target) under the mixture, from the network's p(target)."""
    if prediction is None:
        return float(model_prob)
    lam = prediction.mixture_weight(settings)
    at = np.flatnonzero(prediction.token_ids == target)
    copied = float(prediction.probs[at[0]]) if len(at) else 0.0
    return (1 - lam) * float(model_prob) + lam * copied


def mix_scores(logprobs: torch.Tensor, prediction: CopyPrediction | None, settings: CopySettings) -> torch.Tensor:
    """Log-probabilities of the mixture from the network's (``-inf`` where a token is not allowed: the copy
    model's share goes only to allowed tokens, renormalized; none allowed: the network's alone)."""
    if prediction is None:
        return logprobs
    ids = torch.from_numpy(prediction.token_ids).to(logprobs.device)
    copied = torch.from_numpy(prediction.probs).to(logprobs)
    allowed = torch.isfinite(logprobs[ids])
    if not bool(allowed.any()):
        return logprobs
    copied = torch.where(allowed, copied, torch.zeros_like(copied))
    copied = copied / copied.sum()
    lam = prediction.mixture_weight(settings)
    # log((1 - lam) p + lam c): only the copied tokens need the sum; the rest is a shift in log space
    mixed = logprobs + math.log1p(-lam)
    mixed[ids] = torch.log((1 - lam) * logprobs[ids].exp() + lam * copied)
    return mixed
