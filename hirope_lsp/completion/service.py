"""A completion at a cursor: prompt on the caller's thread (it reads the live document),
generation on the engine, stop rules and clean-up after."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from ..hierarchy.document import Document
from ..model.engine import Engine, Generation, Prompt
from ..model.loading import knows_language, recommended_min_confidence, trained_languages
from ..workspace.index import WorkspaceIndex
from .prompt import BuiltPrompt, PromptBuilder
from .postprocess import StopPolicy, finish, repeats_line_above, stop_policy
from .syntax import statement_line

log = logging.getLogger(__name__)

STOP_RULES_CONTEXT_CHARS = 16 * 1024


@dataclass
class CompletionJob:
    """Everything the engine needs, detached from the live document."""

    uri: str
    version: int
    line: int
    character: int  # the cursor, in the document's position encoding
    prompt: Prompt
    policy: StopPolicy
    built: BuiltPrompt
    known_language: bool = True  # False: the model never saw this language; nothing is suggested


@dataclass
class CompletionResult:
    text: str  # to insert at the cursor ("" when there is nothing useful)
    job: CompletionJob
    generation: Generation
    hidden_by_gate: bool = False  # the stop rules left text, but its confidence was below the gate


class CompletionService:
    def __init__(self, engine: Engine, index: WorkspaceIndex | None, builder: PromptBuilder,
                 max_new_tokens: int = 64, multiline: str = "auto", min_confidence: float | None = None):
        self.engine = engine
        self.index = index
        self.builder = builder
        self.max_new_tokens = max_new_tokens
        self.multiline = multiline
        # mean log-probability per token below which nothing is shown; None: the model's recorded gate
        self.min_confidence = min_confidence
        self._card_gates: dict[str | None, float | None] = {}  # by language, read from the card once
        self.languages = trained_languages(engine.model)

    def confidence_gate(self, language: str | None = None) -> float | None:
        """The gate in force: the setting, else the one the model's card records for ``language`` (its
        own entry, else the card's), else none."""
        if self.min_confidence is not None:
            return self.min_confidence
        if language not in self._card_gates:
            self._card_gates[language] = recommended_min_confidence(self.engine.model, language)
        return self._card_gates[language]

    @classmethod
    def from_settings(cls, engine: Engine, index: WorkspaceIndex | None, settings) -> CompletionService:
        """The service the server and the command line run, from a ``config.Settings``."""
        return cls(engine, index, PromptBuilder(engine.tokenizer, engine.fim, settings.context),
                   settings.max_new_tokens, settings.multiline, settings.min_confidence)

    def prepare(self, doc: Document, line: int, character: int, builder: PromptBuilder | None = None,
                key: str | None = None) -> CompletionJob:
        """``builder`` and ``key``: another prompt budget (the session's short prompt) in a cache slot of its own."""
        builder = builder or self.builder
        built = builder.build(doc, line, character, self.index)
        cursor, _ = doc.offset_at(line, character)
        line, character = doc.position_at(cursor)  # clamped
        # the stop rules look at the cursor's lines, never at the whole of a huge document
        near = STOP_RULES_CONTEXT_CHARS
        policy = stop_policy(doc.text[max(0, cursor - near) : cursor], doc.text[cursor : cursor + near], self.multiline)
        policy.statement_head = statement_line(doc, line, cursor)
        # the document beyond the prompt, and the workspace's files, only where the copy model runs for the
        # document's language; from the service's own builder (its caches), whichever budget's builder made
        # the prompt
        copies = self.engine.copy_settings(doc.language).enabled
        history = self.builder.copy_history(doc, built) if copies and builder.settings.copy_document else ()
        if copies and builder.settings.copy_workspace and self.index is not None:
            history = np.concatenate([self.builder.workspace_history(doc, self.index),
                                      np.asarray(history, dtype=np.int64)])
        prompt = Prompt(key or doc.uri, built.token_ids, built.positions, built.cursor_unit, doc.language, history)
        return CompletionJob(doc.uri, doc.version, line, character, prompt, policy, built,
                             knows_language(self.languages, doc.language))

    def run(self, job: CompletionJob, cancelled: Callable[[], bool] | None = None, decode_seconds: float | None = None,
            chunk: int | None = None, ahead: bool = False,
            answer_by: Callable[[], float | None] | None = None) -> CompletionResult:
        if not job.known_language:
            log.info("completion %s v%d: the model was not trained on this language; nothing suggested",
                     job.uri, job.version)
            return CompletionResult("", job, Generation([], "", 0, 0, 0.0, "language"))
        prompt = job.prompt
        try:
            generation = self.engine.generate(prompt, self.max_new_tokens, job.policy.should_stop, cancelled,
                                              decode_seconds=decode_seconds, chunk=chunk, ahead=ahead,
                                              answer_by=answer_by)
        except torch.OutOfMemoryError:
            # degrade instead of failing: drop the kept KV state and retry with the last half of the prompt
            log.warning("out of memory for a %d-token prompt: cache cleared, retrying with half the context",
                        len(job.prompt.token_ids))
            self.engine.pool.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            prompt = shorter(job.prompt)
            generation = self.engine.generate(prompt, self.max_new_tokens, job.policy.should_stop, cancelled)
        text = finish(job.policy, generation.text, final=True) or ""
        branch = None if text.strip() else self.branch_point(job.policy, generation)
        if branch is not None:
            # the model's line was the line above again: its likeliest other line, from the least sure token on
            second = self.engine.generate(prompt, self.max_new_tokens, job.policy.should_stop, cancelled,
                                          decode_seconds=decode_seconds, chunk=chunk, ahead=ahead,
                                          answer_by=answer_by, forced=generation.token_ids[:branch],
                                          banned=(generation.token_ids[branch],))
            generation = replace(second, seconds=generation.seconds + second.seconds)
            text = finish(job.policy, generation.text, final=True) or ""
        if generation.stopped_by in ("length", "time") and job.policy.multiline:
            # cut off by the token or time limit: the block ends at its last whole line
            whole_lines = finish(job.policy, generation.text[: generation.text.rfind("\n") + 1], final=True) or ""
            text = whole_lines if whole_lines.strip() else text
        confidence = generation.confidence
        gate = self.confidence_gate(job.prompt.language)
        hidden = bool(text.strip()) and gate is not None and confidence is not None and confidence < gate
        if hidden:
            log.info("completion %s v%d: confidence %.2f below %.2f; nothing shown", job.uri, job.version,
                     confidence, gate)
            text = ""
        log.info("completion %s v%d: reused %d, computed %d tokens, %.0f ms, stop %s, %d chars",
                 job.uri, job.version, generation.reused_tokens, generation.computed_tokens,
                 generation.seconds * 1000, generation.stopped_by, len(text))
        return CompletionResult(text if text.strip() else "", job, generation, hidden)

    def branch_point(self, policy: StopPolicy, generation: Generation) -> int | None:
        """Where to branch off a continuation whose first line repeats the line above (the guard drops
        it, so nothing would be shown): its least confident token on that line; None for any other
        empty suggestion (nothing generated, or nothing left to add)."""
        first = generation.text.split("\n", 1)[0]
        if not first.strip() or not repeats_line_above(policy.line_before_cursor + first, policy.previous_line):
            return None
        ids = generation.token_ids
        text_of = [self.engine.tokenizer.decode(ids[: k + 1], skip_special_tokens=True) for k in range(len(ids))]
        healed = len(text_of[-1]) - len(generation.text) if text_of else 0  # the token healing backed off
        on_line = [k for k in range(len(ids)) if "\n" not in text_of[k][healed:]]
        if not on_line or len(generation.token_logprobs) < len(generation.token_ids):
            return None
        return min(on_line, key=lambda k: generation.token_logprobs[k])

    def complete(self, doc: Document, line: int, character: int) -> CompletionResult:
        return self.run(self.prepare(doc, line, character))


def shorter(prompt: Prompt) -> Prompt:
    """The last half of a prompt, its positions re-based to start at zero."""
    keep = max(1, len(prompt.token_ids) // 2)
    positions = prompt.positions[-keep:].clone()
    base = positions[0].clone()
    positions -= base
    unit = prompt.unit - base[:-1] if prompt.unit is not None else None
    return replace(prompt, key=prompt.key + "#short", token_ids=prompt.token_ids[-keep:], positions=positions,
                   unit=unit)
