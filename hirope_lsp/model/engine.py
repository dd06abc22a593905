"""The model side: load, attach the position method, prefill with KV reuse, greedy decoding
with stop rules and cancellation.  Knows tensors, never LSP or tree-sitter."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from .cache import CacheCounters, KVCachePool
from .copying import CopyModel, CopySettings, mix_scores
from .loading import load_model, recommended_copy
from .lookup import PromptLookup
from .patch import attach, cut_layers, decoder_layers, trained_length
from .rope import RopeMethodConfig

# after healed text that ends in spaces or tabs (the cursor behind indentation, or after "x = "), the next
# token starts with none of these, nor is it the end: no deeper indentation, no blank line and no empty
# suggestion where the cursor asks for a line
INDENT_CHARS = (" ", "\t")
BLANK_STARTS = INDENT_CHARS + ("\n", "\r")
MAX_HEALED_TOKENS = 4  # whitespace tokens backed off at most, the cursor's indentation and the lines before

log = logging.getLogger(__name__)


LOOKUP_PROMPT_TOKENS = 2048  # drafts are looked for in the prompt's end (indexing all of a long one costs)


class _StoppedBetweenLayers(Exception):
    """Raised by a decoder layer's pre-hook when a prefill chunk is to stop before that layer."""


class Cancelled(Exception):
    """The request was cancelled or superseded while the model worked on it."""


@dataclass(kw_only=True)
class EngineSettings:
    model: str | None = None  # directory or hub id; None: the embedded default model
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_download: bool = False
    rope: RopeMethodConfig = field(default_factory=RopeMethodConfig)
    cache_budget_mb: int = 1024
    reuse_cache: bool = True
    prefill_chunk: int = 1024
    measure_speed: bool = True  # time a short prompt at load (how much prompt a latency target affords)
    # draft tokens from prompt lookup checked per decoding forward; 0 (one token each): on two CPU cores a
    # step of 5 rows costs ~1.6 single ones and 24 tokens took 14 steps, no faster (README, Benchmarks)
    lookup_tokens: int = 0
    # the copy model mixed into each step's distribution (model/copying.py): its most weight (0: off; None:
    # the model card's, else off) and the shortest context it trusts
    copy_weight: float | None = None
    copy_min_order: int | None = None


@dataclass
class Prompt:
    key: str  # cache slot (one per document)
    token_ids: list[int]
    positions: torch.Tensor  # [T, levels] int64; the last level is the token index
    # the unit generated tokens belong to (the cursor's, all levels but the token's); None: the last token's
    unit: torch.Tensor | None = None
    language: str | None = None  # the document's (settings the model's card records per language)
    copy_history: Sequence[int] = ()  # tokens the copy model reads before the prompt's (an int64 array)


@dataclass
class Speed:
    """Seconds per token this model takes on this machine, prefilling and decoding (running means)."""

    prefill_s: float = 1e-3
    decode_s: float = 1e-2
    prefill_samples: int = 0
    decode_samples: int = 0
    weight: float = 0.3

    def _mean(self, current: float, sample: float, count: int) -> float:
        return sample if count == 0 else current + self.weight * (sample - current)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 16:  # short chunks measure the call's overhead, not the model
            self.prefill_s = self._mean(self.prefill_s, seconds / tokens, self.prefill_samples)
            self.prefill_samples += 1

    def record_decode(self, steps: int, seconds: float) -> None:
        if steps > 0:
            self.decode_s = self._mean(self.decode_s, seconds / steps, self.decode_samples)
            self.decode_samples += 1

    def prefill_tokens_within(self, seconds: float) -> int:
        return max(0, int(seconds / self.prefill_s))


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    reused_tokens: int
    computed_tokens: int
    seconds: float
    stopped_by: str
    token_logprobs: list[float] = field(default_factory=list)  # the model's log-probability of each token it chose

    @property
    def confidence(self) -> float | None:
        """Mean log-probability per generated token (None when nothing was generated)."""
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else None


class Engine:
    def __init__(self, settings: EngineSettings, loaded=None):
        self.settings = settings
        if loaded is None:
            loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype,
                                trust_remote_code=settings.trust_remote_code, allow_download=settings.allow_download)
        self.model, self.tokenizer, self.fim = loaded
        self.device = next(self.model.parameters()).device
        self.handle = attach(self.model, settings.rope)
        self.train_length = trained_length(self.model.config)
        self.layers = decoder_layers(self.model)  # where a warming chunk may stop (None: between chunks only)
        self.pool = KVCachePool(self.model.config, settings.cache_budget_mb << 20, settings.reuse_cache)
        self.lock = threading.Lock()  # one inference at a time
        self._token_texts: list[str] | None = None
        self._healing: dict[tuple[str, bool], torch.Tensor] = {}  # text still to write -> ids that fit it
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        for name in ("<|endoftext|>", "<|file_sep|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|im_end|>"):
            tid = self.tokenizer.get_vocab().get(name)
            if tid is not None:
                self.eos_ids.add(tid)
        self._card_copies: dict[str | None, CopySettings | None] = {}  # by language, read from the card once
        self.speed = Speed()
        if settings.measure_speed:
            self.measure_speed()

    def measure_speed(self, tokens: int = 256, steps: int = 4) -> Speed:
        """Prefill and decode a throwaway prompt (twice: the first call pays one-time set-up)."""
        vocab = min(len(self.tokenizer), self.model.config.vocab_size)
        ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        positions = torch.stack([torch.zeros(tokens, dtype=torch.long), torch.arange(tokens)], dim=1)
        for attempt in range(2):
            self.speed = Speed()
            try:
                self.generate(Prompt("#speed", ids, positions), steps, heal=False, suppress_eos=True)
            finally:
                self.pool.drop("#speed")
        self.pool.counters = CacheCounters()  # the probe is not a request
        log.info("speed on %s: prefill %.2f ms/token, decode %.1f ms/token", self.device,
                 self.speed.prefill_s * 1000, self.speed.decode_s * 1000)
        return self.speed

    def token_texts(self) -> list[str]:
        """The text of every token on its own (built once; used for token healing)."""
        if self._token_texts is None:
            self._token_texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        return self._token_texts

    def heal(self, ids: list[int], positions: torch.Tensor):
        """Token healing: a prompt cut at the cursor ends on a token the model rarely saw there (a bare
        newline before indentation, half a word).  Back off that token and let the first generated tokens
        write its text again, split as the model likes (``healing_allowed``).  Returns (ids, positions,
        healed text, the ids allowed first)."""
        special = set(self.tokenizer.all_special_ids)
        at = len(ids) - 1
        if at >= 0 and ids[at] in special:
            at = self.prefix_end(ids) - 1  # a fill-in-the-middle prompt: heal the prefix's last token
        if at < 1 or ids[at] in special:
            return ids, positions, "", None
        texts = self.token_texts()
        removed = texts[ids[at]]
        if not removed or "\ufffd" in removed:
            return ids, positions, "", None
        start = at
        if removed[-1] in INDENT_CHARS and not removed.strip():
            # indentation after a blank line ends on "\n\n" + "  ", where the model's split is "\n\n " + " var":
            # the whole run of whitespace is backed off
            while (start > 1 and at - start < MAX_HEALED_TOKENS - 1 and ids[start - 1] not in special
                   and texts[ids[start - 1]] and not texts[ids[start - 1]].strip()):
                start -= 1
            removed = "".join(texts[i] for i in ids[start : at + 1])
        allowed = self.healing_allowed(removed)
        if allowed is None or len(allowed) <= 1:
            return ids, positions, "", None
        new_ids = ids[:start] + ids[at + 1 :]
        tail = positions[at + 1 :].clone()
        tail[:, -1] -= at + 1 - start
        return new_ids, torch.cat([positions[:start], tail]), removed, allowed

    def healing_allowed(self, healed: str, written: str = "") -> torch.Tensor | None:
        """The tokens that may come next while ``written`` of the ``healed`` text is written again: those
        that start with the rest, and those the rest starts with (then the next step writes what is left).
        A cursor after 8 spaces of indentation ends the prompt on "\n" + 8 spaces, where the model's own
        split of that line is "\n" + 7 spaces, then " self": only tokens that start with the backed-off
        text would indent the line too deep.  Where the healed text ends in spaces or tabs (indentation, a
        space after ``=``), no more of them follow it: the first line is never indented deeper than the
        cursor.  None: no constraint (the healed text is written, and one token more)."""
        rest = healed[len(written):]
        blank_end = healed[-1:] in INDENT_CHARS
        if len(written) > len(healed) or (not rest and not blank_end):
            return None
        allowed = self._healing.get((rest, blank_end))
        if allowed is None:  # a scan of the whole vocabulary: once per distinct text
            special = set(self.tokenizer.all_special_ids)

            def fits(t: str) -> bool:
                if rest.startswith(t):
                    return bool(t)
                return t.startswith(rest) and not (blank_end and t[len(rest):][:1] in BLANK_STARTS)

            allowed = torch.tensor([i for i, t in enumerate(self.token_texts()) if i not in special and fits(t)],
                                   dtype=torch.long)
            self._healing[(rest, blank_end)] = allowed
        return allowed

    def prefix_end(self, ids: list[int]) -> int:
        """Where the prefix of a fill-in-the-middle prompt ends: before its middle token (suffix first),
        or before the suffix's marker (prefix first, the suffix between it and the middle token)."""
        if self.fim.available and self.fim.order == "psm":
            marker = self.tokenizer.convert_tokens_to_ids(self.fim.suffix)
            if marker in ids:
                return len(ids) - 1 - ids[::-1].index(marker)
        return len(ids) - 1

    def recommended_copy(self, language: str | None = None) -> CopySettings | None:
        """What the model's card records for ``language`` (its own entry, else the card's), else None."""
        if language not in self._card_copies:
            self._card_copies[language] = recommended_copy(self.model, language)
        return self._card_copies[language]

    def copy_settings(self, language: str | None = None) -> CopySettings:
        """The copy model's settings: what the user set, else what the model's card records for the
        document's language, else off."""
        card = self.recommended_copy(language) or CopySettings()
        s = self.settings
        copy = CopySettings(weight=card.weight if s.copy_weight is None else s.copy_weight,
                            min_order=card.min_order if s.copy_min_order is None else s.copy_min_order)
        copy.validate()
        return copy

    def copy_model(self, ids: list[int], copy: CopySettings, history: Sequence[int] = ()) -> CopyModel:
        """The copy model over ``history`` (text beyond the prompt) and a prompt, the prefix last (what it is
        continued from): a fill-in-the-middle prompt's suffix and markers move before it."""
        end = self.prefix_end(ids) if ids and ids[-1] in self.tokenizer.all_special_ids else len(ids)
        return CopyModel(np.concatenate([np.asarray(history, dtype=np.int64),
                                         np.asarray(ids[end:] + ids[:end], dtype=np.int64)]), copy)

    @property
    def description(self) -> str:
        name = self.settings.model or "default"
        return f"{name} on {self.device} ({str(next(self.model.parameters()).dtype).replace('torch.', '')})"

    def reconfigure_rope(self, rope: RopeMethodConfig) -> None:
        # refuse a bad configuration before the working one is detached (the model stays patched)
        rope.validate(num_layers=self.model.config.num_hidden_layers)
        with self.lock:
            self.handle.detach()
            self.handle = attach(self.model, rope)
            self.settings.rope = rope
            self.pool.clear()

    def levelled(self, positions: torch.Tensor) -> torch.Tensor:
        """Prompt positions ``(unit, token)`` as the attached method takes them: the token index alone
        for one level."""
        positions = positions.to(torch.long)
        return positions[:, -1:] if getattr(self.handle.cfg, "levels", 2) == 1 else positions

    def reusable_tokens(self, prompt: Prompt) -> int:
        """How much of ``prompt`` the kept KV state already holds (as ``generate`` would heal it)."""
        return self._reusable(prompt)[0]

    def is_warm(self, prompt: Prompt) -> bool:
        """Whether the kept KV state holds all of ``prompt`` that warming computes (a request recomputes
        the last token anyway)."""
        reusable, length = self._reusable(prompt)
        return reusable >= length - 1

    def _reusable(self, prompt: Prompt) -> tuple[int, int]:
        """(tokens of ``prompt`` the kept KV state holds, the prompt's length), both as healed."""
        ids, positions, _, _ = self.heal(prompt.token_ids, self.levelled(prompt.positions))
        return self.pool.reusable(prompt.key, ids, positions), len(ids)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, cancelled: Callable[[], bool] | None = None, chunk: int | None = None) -> int:
        """Warm the KV state with ``prompt`` ahead of a request, ``chunk`` tokens at a time, stopping when
        ``cancelled()`` or once the cache budget is full; what was computed is kept.  ``cancelled()`` is also
        asked before each decoder layer: a request waits for one layer of a chunk, not the whole chunk, and
        the chunk's part is dropped.  Returns the number of tokens computed."""
        cancelled = cancelled or (lambda: False)
        chunk = chunk or self.settings.prefill_chunk
        ids, positions, _, _ = self.heal(prompt.token_ids, self.levelled(prompt.positions))
        target = len(ids) - 1  # a request recomputes the last token anyway (it needs its logits)
        if target <= 0 or not self.pool.enabled:
            return 0
        with self.lock:
            slot, done = self.pool.acquire(prompt.key, ids, positions, warming=True)
            start = done
            hooks = self._stop_before_layers(cancelled)
            try:
                pos_all = positions.unsqueeze(0).to(self.device)
                while done < target and not cancelled():
                    room = self.pool.room_tokens()  # never compute what the budget cannot keep
                    if room == 0:
                        break
                    b = min(target, done + chunk, done + room)
                    t0 = time.perf_counter()
                    try:
                        self.handle.forward(torch.tensor([ids[done:b]], device=self.device), pos_all[:, :b],
                                            cache=slot.cache, use_cache=True, logits_to_keep=1)
                    except _StoppedBetweenLayers:
                        cut_layers(slot.cache, done)
                        if slot.far_keys is not None:
                            slot.far_keys.truncate(done)
                        break
                    self.speed.record_prefill(b - done, time.perf_counter() - t0)
                    self.pool.record_warmed(slot, done, b)
                    done = b
            finally:
                for hook in hooks:
                    hook.remove()
                self.pool.release(slot, ids[:done], positions[:done])
        return done - start

    def _stop_before_layers(self, cancelled: Callable[[], bool]) -> list:
        def check(module, args):
            if cancelled():
                raise _StoppedBetweenLayers()

        return [layer.register_forward_pre_hook(check) for layer in self.layers or ()]

    @torch.inference_mode()
    def generate(self, prompt: Prompt, max_new_tokens: int,
                 should_stop: Callable[[str], bool] | None = None,
                 cancelled: Callable[[], bool] | None = None, heal: bool = True,
                 decode_seconds: float | None = None, suppress_eos: bool = False, chunk: int | None = None,
                 ahead: bool = False, forced: Sequence[int] = (), banned: Collection[int] = (),
                 answer_by: Callable[[], float | None] | None = None) -> Generation:
        """Greedy continuation of ``prompt``; ``should_stop(text)`` ends it early, ``cancelled()`` aborts
        (raising Cancelled) between any two model steps; after ``decode_seconds`` of decoding, or once
        ``time.perf_counter()`` passes ``answer_by()`` (read at every step: a request waiting for the
        suggestion sets it), it stops with the tokens in hand.  ``ahead``: a suggestion computed before it is asked
        for (its prompt counts as warmed, not as a request's).  ``forced``: the first tokens generated,
        whatever the model would choose (fed at once, as a draft), then greedy without the ``banned`` ones
        at the step after them: another branch of an earlier continuation."""
        cancelled = cancelled or (lambda: False)
        start = time.perf_counter()
        ids, positions = prompt.token_ids, self.levelled(prompt.positions)
        if not ids:
            raise ValueError("empty prompt")
        healed, allowed = "", None
        if heal:
            ids, positions, healed, allowed = self.heal(ids, positions)
        with self.lock:
            slot, reused = self.pool.acquire(prompt.key, ids, positions, warming=ahead)
            try:
                logits = None
                pos_all = positions.unsqueeze(0).to(self.device)
                prefill_start = time.perf_counter()
                chunk = chunk or self.settings.prefill_chunk
                for a in range(reused, len(ids), chunk):
                    if cancelled():
                        raise Cancelled()
                    b = min(len(ids), a + chunk)
                    logits = self.handle.forward(torch.tensor([ids[a:b]], device=self.device), pos_all[:, :b],
                                                 cache=slot.cache, use_cache=True, logits_to_keep=1).logits
                    slot.token_ids, slot.positions = ids[:b], positions[:b]  # kept if what follows is cancelled
                self.speed.record_prefill(len(ids) - reused, time.perf_counter() - prefill_start)
                # the prompt is cached now: keep it even if decoding is cancelled
                slot.token_ids, slot.positions = list(ids), positions.clone()
                out: list[int] = []
                logprobs: list[float] = []
                stopped_by = None
                # generated tokens continue the cursor's unit, after the prompt's last token
                unit = positions[-1, :-1] if prompt.unit is None or positions.shape[1] == 1 else prompt.unit.to(torch.long)
                token = int(positions[-1, -1])
                # the prompt's positions, then those of every token that may be generated (a step slices them)
                steps = torch.arange(token + 1, token + 1 + max(0, max_new_tokens)).unsqueeze(1)
                generated = torch.cat([unit.expand(len(steps), -1), steps], dim=1).unsqueeze(0).to(self.device)
                all_positions = torch.cat([pos_all, generated], dim=1)
                # drafts change what is fed at once: not where the rotary follows the input's length
                drafts = self.settings.lookup_tokens and not (self.handle.method.factor_from_input or self.handle.dynamic)
                lookup = PromptLookup(ids[-LOOKUP_PROMPT_TOKENS:], self.settings.lookup_tokens) if drafts else None
                forced = list(forced)[:max_new_tokens]
                rows, draft = logits[0, -1:], []  # rows[i] scores the token after draft[:i]
                copy = self.copy_settings(prompt.language)
                copier = self.copy_model(ids, copy, prompt.copy_history) if copy.enabled else None
                decode_start = time.perf_counter()
                while stopped_by is None and max_new_tokens > 0:
                    if cancelled():
                        raise Cancelled()
                    for i in range(len(rows)):
                        scores = rows[i]
                        if allowed is not None:
                            masked = torch.full_like(scores, float("-inf"))
                            masked[allowed] = scores[allowed]
                            scores = masked
                        if suppress_eos:
                            scores = scores.clone()
                            scores[list(self.eos_ids)] = float("-inf")
                        scores = torch.log_softmax(scores.float(), dim=-1)
                        if copier is not None:
                            scores = mix_scores(scores, copier.predict(), copy)
                        if len(out) == len(forced) and banned:
                            unbanned = scores.clone()
                            unbanned[list(banned)] = float("-inf")
                            scores = unbanned if bool(torch.isfinite(unbanned).any()) else scores
                        next_id = forced[len(out)] if len(out) < len(forced) else int(scores.argmax())
                        if next_id in self.eos_ids:
                            stopped_by = "eos"
                            break
                        out.append(next_id)
                        if copier is not None:
                            copier.extend([next_id])
                        logprobs.append(float(scores[next_id]))
                        written = self.tokenizer.decode(out, skip_special_tokens=True)
                        text = written[len(healed):]
                        allowed = self.healing_allowed(healed, written) if healed else None
                        if should_stop is not None and should_stop(text):
                            stopped_by = "rule"
                        elif len(out) == max_new_tokens:
                            stopped_by = "length"
                        elif _past(decode_start, decode_seconds, answer_by):
                            stopped_by = "time"
                        if stopped_by is not None or i >= len(draft) or draft[i] != next_id:
                            break  # the rows after a wrong draft token score a text that is not there
                    if stopped_by is not None:
                        break
                    if len(out) < len(forced):
                        draft = forced[len(out):] if drafts else []
                    elif lookup is not None:
                        lookup.extend(out[lookup.added:])
                        draft = lookup.propose()[: max_new_tokens - len(out)]
                    # the cache holds the prompt and every chosen token but the last: feed it and the draft
                    slot.truncate(len(ids) + len(out) - 1)
                    feed = [out[-1]] + draft
                    rows = self.handle.forward(torch.tensor([feed], device=self.device),
                                               all_positions[:, : len(ids) + len(out) - 1 + len(feed)],
                                               cache=slot.cache, use_cache=True).logits[0]
                self.speed.record_decode(max(0, len(out) - 1), time.perf_counter() - decode_start)
                if stopped_by is None:
                    stopped_by = "length"
            finally:
                self.pool.release(slot, slot.token_ids or ids[:reused], slot.positions if slot.positions is not None
                                  else positions[:reused])
                if ahead:
                    self.pool.record_warmed(slot, reused, min(len(slot.token_ids), len(ids) - 1))
        text = self.tokenizer.decode(out, skip_special_tokens=True)[len(healed):]
        return Generation(out, text, reused, len(ids) - reused, time.perf_counter() - start, stopped_by, logprobs)


def _past(decode_start: float, decode_seconds: float | None, answer_by: Callable[[], float | None] | None) -> bool:
    """Whether decoding is out of time: ``decode_seconds`` after it started, or past the moving deadline."""
    now = time.perf_counter()
    if decode_seconds is not None and now - decode_start > decode_seconds:
        return True
    deadline = answer_by() if answer_by is not None else None
    return deadline is not None and now > deadline
