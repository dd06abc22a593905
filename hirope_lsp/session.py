"""A running server's state and what happens to it: settings, open documents and their cursors,
the workspace index and its watcher, the model's lifecycle (loading / ready / failed), requests in
flight, suggestions shown, and work done ahead of the user (warming prompts, the suggestion at a
warmed cursor and the one after an accept).  No LSP types here: the adapter in ``server.py`` translates.

Threads: everything here runs on the event loop except what is handed to the single inference
worker (model calls) or the default executor (scanning folders).  A request waiting for the worker
preempts warming between two layers of a prefill chunk; so does the warming of the document the user
is in, another document's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .completion.prompt import PromptBuilder
from .completion.service import CompletionJob, CompletionService
from .completion.typed_ahead import DocumentState, ShownSuggestions
from .config import Settings, apply_options
from .hierarchy.document import Change, Document
from .model.engine import Cancelled, Engine
from .model.loading import ModelLoadError
from .workspace.files import FilePolicy
from .workspace.index import WorkspaceIndex, uri_to_path
from .workspace.watcher import WorkspaceWatcher

log = logging.getLogger(__name__)

EXPECTED_NEW_TOKENS = 12  # a typical suggestion's length, for the decoding share of the latency target
MIN_FAST_BUDGET = 64
WARM_CHUNK_SECONDS = 0.1  # warming gives the worker back this often (a request waits at most one layer of a chunk)
PREFETCHED_PER_DOCUMENT = 4
JOIN_POLL_SECONDS = 0.02  # a request waiting for work ahead looks this often whether it was superseded
IDLE_SECONDS = 0.3  # a pause in requests this long counts as the user resting (warming resumes)
# a pause this long after an answer starts the suggestion for after accepting it: long enough that a
# keystroke's request right after the answer (typing on) comes first, short enough to finish while the
# user reads (~0.6 s); 0.3 s left it half done at the accept (replay: accept p50 128 ms against 20 ms)
PREFETCH_PAUSE_SECONDS = 0.1


class BadRequest(ValueError):
    """The client asked about something that does not exist (unknown document, position past the end)."""


class RequestToken:
    def __init__(self):
        self._event = threading.Event()

    def cancel(self):
        self._event.set()

    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Cursor:
    """One cursor of one request, made once: the document snapshot's offsets and its encoding's position."""

    line: int
    character: int  # in the document's position encoding, clamped to the line
    offset: int  # code points
    byte: int

    @classmethod
    def at(cls, doc: Document, line: int, character: int) -> Cursor:
        offset, byte = doc.offset_at(line, character)
        line, character = doc.position_at(offset)
        return cls(line, character, offset, byte)


@dataclass
class Suggestion:
    text: str
    uri: str
    line: int  # the cursor it is inserted at, in the document's position encoding
    character: int
    source: str = "model"  # model | typed-along | prefetched
    prompt_tokens: int = 0  # of the prompt the model read (0: answered without it)
    ms: float = 0.0  # the model's time
    confidence: float | None = None  # mean log-probability per generated token
    raw: str = ""  # what the model wrote, before the stop rules and clean-up
    hidden_by_gate: bool = False  # text is empty because the confidence gate hid what the stop rules left


@dataclass
class AheadWork:
    """A suggestion being made ahead: for which state of a document, and its text once made."""

    source: bytes
    cursor: int  # byte offset
    done: asyncio.Future  # the text ("" where the model has nothing to say); None: stopped before the end
    answer_by: float | None = None  # time.perf_counter() by which its decoding ends: a request waits for it


@dataclass
class PendingPrefetch:
    """The suggestion to make for the document once the suggestion just given is accepted."""

    accepted: Document  # that version with the suggestion inserted
    at: Cursor  # after the inserted suggestion
    warm_full: bool  # the suggestion came from a short prompt: the full one warms after
    suggestion_chars: int  # the accepted suggestion's length, ending at ``at``

    def reachable(self) -> Callable[[Document], bool]:
        """Whether a live document can still become the accepted one: the text before the suggestion, a start of
        the suggestion (none: the answered state, the user reading), then the text after it."""
        target, length = self.accepted.text, self.suggestion_chars
        start = self.at.offset - length
        seen: dict[int | None, bool] = {}

        def on_the_way(doc: Document) -> bool:
            if doc.version not in seen:  # asked between every two layers: compare the texts once per version
                typed = len(doc.text) - (len(target) - length)
                seen.clear()
                seen[doc.version] = (0 <= typed <= length and doc.text.startswith(target[: start + typed])
                                     and doc.text.endswith(target[start + length :]))
            return seen[doc.version]
        return on_the_way


@dataclass
class WarmingCounters:
    jobs: int = 0
    preempted: int = 0
    fast_answers: int = 0  # requests answered with the short prompt while the full one warmed
    prefetched_answers: int = 0  # requests answered by a suggestion kept from before (made ahead, or asked before)
    suggested_ahead: int = 0  # suggestions made ahead of a request, run to their end (empty ones too)


@dataclass
class Session:
    settings: Settings = field(default_factory=Settings)
    show: Callable[[str, str], None] = lambda message, kind: None  # (message, "info" | "warning" | "error")
    progress: Callable[[str, str], None] = lambda kind, message: None  # ("begin" | "report" | "end", message)
    # what an evaluation hands in instead: a model already loaded (model, tokenizer, fim), an index
    # already scanned, the thread its other model calls run on
    loaded: tuple | None = None
    index: WorkspaceIndex | None = None
    worker: ThreadPoolExecutor | None = None

    def __post_init__(self):
        self.documents: dict[str, Document] = {}
        self.cursors: dict[str, tuple[int, int]] = {}  # the last cursor a client showed for a document
        self.active: str | None = None
        if self.index is None:
            self.index = WorkspaceIndex(policy=FilePolicy(self.settings.max_file_bytes))
        self.watcher: WorkspaceWatcher | None = None
        if self.worker is None:
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hirope-inference")
        self.state = "starting"  # loading | ready | failed
        self.status = "starting"
        self.service: CompletionService | None = None
        self.fast_builder: PromptBuilder | None = None
        self._ready: asyncio.Future | None = None
        self._loads = 0
        self.latest: dict[str, RequestToken] = {}
        self.shown = ShownSuggestions()  # typing along what is on screen
        # suggestions made ahead: after an accept, at a warmed cursor (a short prompt's, then the full one's)
        self.prefetched = ShownSuggestions(answers_at_start=True, keep=PREFETCHED_PER_DOCUMENT)
        self.waiting = 0  # requests queued for or running on the worker
        self.last_request = 0.0  # event-loop time the newest request was handed to the worker, or ended
        self.warming: dict[str, RequestToken] = {}
        self.ahead: dict[str, AheadWork] = {}  # the suggestion being made ahead per document
        self.joined: list[AheadWork] = []  # work ahead that requests wait for (all other work ahead yields)
        self.warm_tokens: dict[str, RequestToken] = {}  # documents whose prompt warming is under way
        # the prefetch after an accept, per document: it starts once the user pauses (never between two
        # keystrokes) and the document's prompt warming, if any, is over
        self.pending_prefetch: dict[str, PendingPrefetch] = {}
        # documents whose last warming a request stopped: they warm on in small chunks (a stop mid-chunk
        # throws the chunk away; large ones would make no progress while requests keep coming)
        self.warming_stopped: set[str] = set()
        self.prefetch_waiters: set[str] = set()  # documents with a task waiting for that pause
        self.fast_budgets: dict[str, int] = {}  # the short prompt's budget last used per document
        self.warm_counters = WarmingCounters()
        self._tasks: set[asyncio.Task] = set()

    # ---- life cycle ----

    def add_folders(self, uris: list[str]) -> None:
        for uri in uris:
            path = uri_to_path(uri)
            if path is not None:
                self.index.add_folder(path)

    def start(self) -> asyncio.Task:
        """After the client is initialized: load the model, index and watch the workspace (the task)."""
        self.load_model()
        return self._spawn(self._index_workspace())

    async def _index_workspace(self) -> None:
        # watch before scanning: a file written while the scan runs is seen by one or the other (watching
        # after it lost files saved between the two)
        self._restart_watcher()
        files = await asyncio.get_running_loop().run_in_executor(None, self.index.scan)
        log.info("indexed %d files", files)

    def _restart_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.settings.watch_files and self.index.folders:
            self.watcher = WorkspaceWatcher(self.index)
            self.watcher.start()

    def load_model(self) -> None:
        """(Re)load the model in the background; a newer load wins over one still running."""
        loop = asyncio.get_running_loop()
        self._loads += 1
        load_id = self._loads
        previous = self._ready
        self._ready = loop.create_future()
        if previous is not None and not previous.done():
            previous.set_result(None)  # its waiters look again and find this load
        self.state, self.status, self.service = "loading", "loading", None
        self.pool_cancel_all()

        async def run():
            self.progress("begin", "loading model")
            try:
                engine = await loop.run_in_executor(self.worker, Engine, self.settings.engine, self.loaded)
            except (ModelLoadError, ValueError, RuntimeError) as err:
                if load_id != self._loads:
                    return
                self.state, self.status = "failed", f"error: {err}"
                self.show(str(err), "error")
                self.progress("end", "model failed to load")
                self._ready.set_exception(ModelLoadError(str(err)))
                self._ready.exception()  # retrieved: no "never retrieved" warning
                return
            if load_id != self._loads:  # a newer load started meanwhile: this engine is not used
                log.info("a model load was superseded; discarding %s", engine.description)
                return
            self.service = CompletionService.from_settings(engine, self.index, self.settings)
            self.fast_builder = PromptBuilder(engine.tokenizer, engine.fim, self.settings.context)
            self.state, self.status = "ready", f"ready: {engine.description}"
            log.info("model ready: %s", engine.description)
            self.progress("end", f"ready: {engine.description}")
            self._ready.set_result(engine)
            self.warm(self.active)

        self._spawn(run())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def ready_service(self) -> CompletionService:
        while True:
            future = self._ready
            if future is None:
                raise BadRequest("the server is not initialized")
            try:
                await asyncio.shield(future)
            except ModelLoadError as err:
                raise RuntimeError(f"no model: {err}") from err
            if future is self._ready:
                return self.service

    def shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self.pool_cancel_all()

    def pool_cancel_all(self) -> None:
        for token in [*self.latest.values(), *self.warming.values()]:
            token.cancel()

    # ---- settings ----

    def apply(self, options) -> list[str]:
        """Apply client options to the live objects; returns a message per rejected option."""
        old = self.settings
        self.settings, problems = apply_options(old, options)
        new = self.settings
        if new == old:
            return problems
        self.shown.clear()  # suggestions made under the old settings are not typed along with
        self.prefetched.clear()
        if new.max_file_bytes != old.max_file_bytes:
            self.index.policy = FilePolicy(new.max_file_bytes)
            if self._ready is not None:
                self._spawn(self._index_workspace())  # files now in or out of bounds
        elif new.watch_files != old.watch_files and self._ready is not None:
            self._restart_watcher()
        service = self.service
        if self._ready is None:
            return problems  # not started: the settings apply when it starts
        engine_keys = lambda s: (s.engine.model, s.engine.device, s.engine.dtype, s.engine.trust_remote_code,  # noqa: E731
                                 s.engine.allow_download)
        if engine_keys(new) != engine_keys(old) or service is None:
            if engine_keys(new) != engine_keys(old):
                self.show("model settings changed: loading the new model", "info")
                self.load_model()
            return problems
        engine = service.engine
        if new.engine.rope != old.engine.rope:
            self.worker.submit(engine.reconfigure_rope, new.engine.rope)
        engine.settings.lookup_tokens = new.engine.lookup_tokens
        engine.settings.copy_weight, engine.settings.copy_min_order = new.engine.copy_weight, new.engine.copy_min_order
        engine.pool.enabled = new.engine.reuse_cache
        engine.pool.budget_bytes = new.engine.cache_budget_mb << 20
        service.builder.settings = new.context
        self.fast_builder.settings = new.context
        service.max_new_tokens = new.max_new_tokens
        service.multiline = new.multiline
        service.min_confidence = new.min_confidence
        self.warm(self.active)
        return problems

    # ---- documents ----

    def open(self, uri: str, text: str, version: int, language: str | None, encoding: str) -> None:
        doc = Document(uri, text, version, language, encoding)
        self.documents[uri] = doc
        path = uri_to_path(uri)
        if path is not None and self.index.folder_of(path) is not None:
            self.index.open_document(doc)
        if uri in self.cursors:
            self.warm(uri)

    def change(self, uri: str, changes: list[Change], version: int) -> None:
        doc = self.documents.get(uri)
        if doc is None:
            log.warning("change for unknown document %s ignored", uri)
            return
        doc.apply_changes(changes, version)
        self.index.document_changed(doc)
        token = self.latest.get(uri)
        if token is not None:
            token.cancel()  # its result would be for an older version

    def close(self, uri: str) -> None:
        self.documents.pop(uri, None)
        self.cursors.pop(uri, None)
        self.fast_budgets.pop(uri, None)
        if self.active == uri:
            self.active = None
        self.shown.forget(uri)
        self.prefetched.forget(uri)
        self.index.close_document(uri)
        self.pending_prefetch.pop(uri, None)
        self.warming_stopped.discard(uri)
        warming = self.warming.get(uri)
        if warming is not None:
            warming.cancel()  # stops before the next layer (the chunk in hand is dropped), then leaves ``warming``
        if self.service is not None:
            for key in (uri, fast_key(uri)):
                self.service.engine.pool.drop(key)
            self.service.builder.forget(uri)
            self.fast_builder.forget(uri)

    def files_changed(self, events: list[tuple[Path, str]]) -> None:
        """Changes the client saw on disk: ``(path, created | modified | deleted)``."""
        for path, kind in events:
            if self.watcher is not None:
                self.watcher.debouncer.notify(path, kind)
            elif kind == "deleted":
                self.index.remove_file(path)
            else:
                self.index.update_file(path)

    def folders_changed(self, added: list[str], removed: list[str]) -> None:
        for uri in removed:
            path = uri_to_path(uri)
            if path is not None:
                self.index.remove_folder(path)
        self.add_folders(added)
        if self._ready is not None:
            if added:
                self._spawn(self._index_workspace())  # watches the new folders too, then scans
            elif removed:
                self._restart_watcher()

    def document(self, uri: str) -> Document:
        doc = self.documents.get(uri)
        if doc is None:
            raise BadRequest(f"unknown document {uri}: it was not opened with textDocument/didOpen")
        return doc

    def check_position(self, doc: Document, line: int, character: int) -> None:
        if line < 0 or character < 0:
            raise BadRequest(f"negative position {line}:{character}")
        if line >= doc.line_count:
            raise BadRequest(f"position {line}:{character} is past the end of {doc.uri} ({doc.line_count} lines)")
        content = doc.line_text(line)
        width = doc.position_at(int(doc.line_char[line]) + len(content))[1]  # in the document's encoding
        if character > width:
            raise BadRequest(f"position {line}:{character} is past the end of line {line} ({width})")

    def supersede(self, uri: str, token: RequestToken | None = None) -> None:
        """Cancel the request in flight for ``uri`` (Neovim does not cancel its older requests)."""
        previous = self.latest.pop(uri, None)
        if previous is not None:
            previous.cancel()
        if token is not None:
            self.latest[uri] = token

    # ---- completion ----

    async def complete(self, uri: str, line: int, character: int) -> Suggestion | None:
        """The suggestion for the cursor; None when superseded or stale."""
        doc = self.document(uri)
        self.check_position(doc, line, character)
        self.cursors[uri], self.active = (line, character), uri
        cursor = Cursor.at(doc, line, character)
        ahead = self._answer_without_model(doc, cursor)
        if ahead is not None:
            return ahead
        joined, suggestion = await self._join_ahead(doc, cursor)
        if joined:
            return suggestion
        service = await self.ready_service()
        doc = self.document(uri)  # it may have changed or closed while the model loaded
        self.check_position(doc, line, character)
        cursor = Cursor.at(doc, line, character)
        job = service.prepare(doc, cursor.line, cursor.character)
        job, fast = self._fit_to_latency(service, doc, cursor, job)
        token = RequestToken()
        self.supersede(uri, token)
        result = await self._run(service, job, token.cancelled, decode_seconds=self._decode_seconds())
        if self.latest.get(uri) is token:
            del self.latest[uri]
        if result is None:
            return None
        current = self.documents.get(uri)
        if current is None or current.version != job.version:
            log.info("dropping a completion for %s v%d: the document moved on", uri, job.version)
            return None
        self.shown.remember(current, cursor.byte, result.text)
        if self.settings.warm_ahead:  # asked again in this state (a cursor resting, a re-trigger): the same answer
            self.prefetched.remember(current, cursor.byte, result.text, short=fast)
        if fast:
            self.warm_counters.fast_answers += 1
        self._prefetch_after_accept(current, cursor, result.text, warm_full=fast)
        return Suggestion(result.text, uri, job.line, job.character, prompt_tokens=len(job.prompt.token_ids),
                          ms=result.generation.seconds * 1000, confidence=result.generation.confidence,
                          raw=result.generation.text, hidden_by_gate=result.hidden_by_gate)

    async def _join_ahead(self, doc: Document, cursor: Cursor) -> tuple[bool, Suggestion | None]:
        """Where the suggestion for exactly this state is being made ahead, wait for it instead of starting
        over (the request does not stop it); (whether it answers, the answer: None when superseded or stale)."""
        work = self.ahead.get(doc.uri)
        if work is None or (work.source, work.cursor) != (doc.source, cursor.byte):
            return False, None
        token = RequestToken()
        self.supersede(doc.uri, token)
        version = doc.version
        # the request is answered within the latency target, with what the suggestion has by then
        answer_by = time.perf_counter() + self.settings.latency_target_ms / 1000
        work.answer_by = answer_by if work.answer_by is None else min(work.answer_by, answer_by)
        self.joined.append(work)
        try:
            while not work.done.done() and not token.cancelled():
                await asyncio.wait({work.done}, timeout=JOIN_POLL_SECONDS)
        finally:
            self.joined.remove(work)
            if self.latest.get(doc.uri) is token:
                del self.latest[doc.uri]
        current = self.documents.get(doc.uri)
        if token.cancelled() or current is None or current.version != version:
            return True, None  # superseded, or the document moved on
        if work.done.result() is None:
            return False, None  # stopped before its end (a request for another document): the model answers
        answer = self._answer_without_model(current, cursor)
        if answer is None:  # made but not kept (a document too large to keep with it): its text answers
            self.warm_counters.prefetched_answers += 1
            answer = Suggestion(work.done.result(), doc.uri, cursor.line, cursor.character, "prefetched")
        return True, answer

    def _yield_to_requests(self, work: AheadWork | None = None) -> bool:
        """Whether work ahead (``work``, if it is a suggestion being made) should stop for a request: one
        waits for the worker, or waits for other work ahead."""
        return self.waiting > 0 or any(joined is not work for joined in self.joined)

    def _yield_to_active(self, uri: str) -> bool:
        """Whether warming ``uri`` should stop for the document the user is in now: its prompt waits to be
        warmed (opened, switched to).  The other document's warming goes on once that one's is done."""
        active = self.active
        return active is not None and active != uri and active in self.warm_tokens

    def _answer_without_model(self, doc: Document, cursor: Cursor) -> Suggestion | None:
        found = self.shown.answer(doc, cursor.byte) if self.settings.type_along else None
        source = "typed-along"
        if found is None and self.settings.warm_ahead:
            # typing along a suggestion kept ahead is typing along too: only where the user wants that
            found, source = self.prefetched.answer(doc, cursor.byte, self.settings.type_along), "prefetched"
        if found is None:
            return None
        rest, short = found
        self.supersede(doc.uri)
        self.last_request = asyncio.get_running_loop().time()  # a keystroke too: the user has not paused
        log.info("completion %s v%d: %s, %d chars", doc.uri, doc.version, source, len(rest))
        if source == "prefetched":
            self.warm_counters.prefetched_answers += 1
            self.shown.remember(doc, cursor.byte, rest)
            # a short prompt's answer: the full prompt still warms once the user pauses
            self._prefetch_after_accept(doc, cursor, rest, warm_full=short)
        return Suggestion(rest, doc.uri, cursor.line, cursor.character, source)

    def _decode_seconds(self) -> float | None:
        """With work ahead, decoding stops (with the tokens in hand) after twice the latency target."""
        return 2 * self.settings.latency_target_ms / 1000 if self.settings.warm_ahead else None

    def _fit_to_latency(self, service: CompletionService, doc: Document, cursor: Cursor,
                        job: CompletionJob) -> tuple[CompletionJob, bool]:
        """The full prompt when what is not cached of it prefills within the latency target; else, where
        the suffix comes last, the full prompt with its suffix cut to what does (a keystroke moves all of
        the suffix, never what warming computed before it); else the longest shorter prompt (a power of
        two of tokens) that does, kept in a slot of its own, as long as it has less left to compute than
        the full one."""
        engine = service.engine
        target = max(0.0, self.settings.latency_target_ms / 1000 - EXPECTED_NEW_TOKENS * engine.speed.decode_s)
        missing = len(job.prompt.token_ids) - engine.reusable_tokens(job.prompt)
        budget = self.settings.context.budget_tokens
        if not self.settings.warm_ahead or missing * engine.speed.prefill_s <= target or missing <= MIN_FAST_BUDGET \
                or budget <= MIN_FAST_BUDGET:
            return job, False
        affordable = max(MIN_FAST_BUDGET, engine.speed.prefill_tokens_within(target))
        cut = _with_suffix_cut(engine, job, len(job.prompt.token_ids) - missing, affordable)
        if cut is not None:
            log.info("completion %s: the %d-token prompt cut to %d tokens while its suffix warms", doc.uri,
                     len(job.prompt.token_ids), len(cut.prompt.token_ids))
            return cut, True
        # the last short budget first: while typing, its slot holds all but the newest keystroke
        candidates = [b for b in [self.fast_budgets.get(doc.uri)] if b is not None and b < budget]
        while budget > MIN_FAST_BUDGET:
            budget = max(MIN_FAST_BUDGET, 1 << ((budget - 1).bit_length() - 1))  # the power of two below
            candidates.append(budget)
        for budget in candidates:
            self.fast_builder.settings = _with_budget(self.settings.context, budget)
            fast = service.prepare(doc, cursor.line, cursor.character, builder=self.fast_builder,
                                   key=fast_key(doc.uri))
            fast_missing = len(fast.prompt.token_ids) - engine.reusable_tokens(fast.prompt)
            if fast_missing * engine.speed.prefill_s <= target:
                break
        self.fast_budgets[doc.uri] = budget
        if fast_missing >= missing:
            return job, False
        log.info("completion %s: %d-token prompt while the %d-token one warms", doc.uri,
                 len(fast.prompt.token_ids), len(job.prompt.token_ids))
        return fast, True

    async def _run(self, service: CompletionService, job: CompletionJob, cancelled, decode_seconds=None):
        """Run a request on the worker ahead of any warming; None when cancelled."""
        loop = asyncio.get_running_loop()
        self.waiting += 1
        self.last_request = loop.time()
        try:
            return await loop.run_in_executor(self.worker, lambda: service.run(job, cancelled, decode_seconds))
        except Cancelled:
            return None
        finally:
            self.waiting -= 1
            self.last_request = loop.time()  # a pause counts from the end of the request

    # ---- work ahead ----

    def point(self, uri: str, line: int, character: int) -> None:
        """The client shows where the cursor is (opened, focused, moved, idle): warm its prompt."""
        self.check_position(self.document(uri), line, character)
        self.cursors[uri], self.active = (line, character), uri
        self.warm(uri)

    def warm(self, uri: str | None) -> None:
        """Prefill ``uri``'s prompt at its last cursor in the background, unless a request is waiting."""
        if uri is None or not self.settings.warm_ahead or self.state != "ready" or uri not in self.cursors:
            return
        token = self.warm_tokens[uri] = self._claim_work_ahead(uri)
        self._spawn(self._warm(uri, token))

    def _claim_work_ahead(self, uri: str) -> RequestToken:
        """A token for new work ahead on ``uri``; the work it replaces (an older cursor's) is cancelled."""
        previous = self.warming.pop(uri, None)
        if previous is not None:
            previous.cancel()
        token = self.warming[uri] = RequestToken()
        return token

    async def _warm(self, uri: str, token: RequestToken) -> None:
        preempted, computed, for_active = [False], None, [False]
        try:
            computed = await self._warm_once(uri, token, preempted, for_active)
        except Exception:
            log.exception("warming %s failed", uri)
        finally:
            resumes = computed is not None and preempted[0] and not token.cancelled()
            if not resumes:
                self._release_work_ahead(uri, token)
            mine = self.warm_tokens.get(uri) is token  # else newer work ahead replaced this warming
            if mine:
                del self.warm_tokens[uri]
            pending = self.pending_prefetch.get(uri)
            if mine and pending is not None:  # then the warming again where a request stopped it
                if uri in self.prefetch_waiters:
                    pending.warm_full |= resumes  # the waiter launches it once the user pauses
                else:
                    self._launch_prefetch(uri, warm_full=resumes)
        if computed is None:
            return
        if resumes:
            self.warm_counters.preempted += 1
            if not for_active[0]:  # requests keep coming: small chunks
                self.warming_stopped.add(uri)
            self._spawn(self._warm_when_idle(uri, token))  # the document stays in ``warming`` meanwhile
        log.info("warmed %s: %d tokens", uri, computed)

    async def _warm_once(self, uri: str, token: RequestToken, preempted: list[bool],
                         for_active: list[bool]) -> int | None:
        service, doc = self.service, self.documents.get(uri)
        if service is None or doc is None or token.cancelled():
            return None
        line, character = self.cursors[uri]
        try:
            self.check_position(doc, line, character)
        except BadRequest:
            return None
        job = service.prepare(doc, line, character)
        if not job.known_language:
            return None
        engine = service.engine

        def stop() -> bool:  # called on the worker between chunks and layers
            if self._yield_to_requests():
                preempted[0] = True
            elif self._yield_to_active(uri):
                preempted[0] = for_active[0] = True
            return token.cancelled() or preempted[0]

        self.warm_counters.jobs += 1
        state, cursor = DocumentState.of(doc), Cursor.at(doc, line, character)  # the job's state: doc changes in place

        def answered(full_only: bool = False) -> bool:
            return self.prefetched.covers(state, cursor.byte, full_only) or self.shown.covers(state, cursor.byte)

        short, is_short = self._fit_to_latency(service, doc, cursor, job)
        if is_short and not answered():  # a pause soon after is answered at once, by the short prompt's suggestion
            await self._suggest_ahead(service, state, cursor, short, token, short=True, live=True)
        chunk = self._warm_chunk(engine, small=uri in self.warming_stopped)
        computed = await asyncio.get_running_loop().run_in_executor(
            self.worker, engine.prefill, job.prompt, stop, chunk)
        if not preempted[0]:
            self.warming_stopped.discard(uri)
        if engine.is_warm(job.prompt) and not stop() and not answered(full_only=True):
            await self._suggest_ahead(service, state, cursor, job, token, live=True)  # replaces the short one's
        return computed

    @staticmethod
    def _warm_chunk(engine: Engine, small: bool = False) -> int:
        """Tokens per warming forward: a request waits for what is left of the layer in hand (prefill stops
        between layers), so a chunk may take a layer's share of ``WARM_CHUNK_SECONDS`` per layer; a large
        chunk makes better use of the cores than many small ones (a 0.5B model on two cores: 64 tokens
        cost ~1.5x as much per token as 256).  ``small``: ``WARM_CHUNK_SECONDS`` in all, after a stop."""
        layers = len(engine.layers) if engine.layers and not small else 1
        affordable = engine.speed.prefill_tokens_within(WARM_CHUNK_SECONDS * layers)
        return max(MIN_FAST_BUDGET, min(engine.settings.prefill_chunk, affordable))

    async def _warm_when_idle(self, uri: str, token: RequestToken) -> None:
        """Warm ``uri`` again once no request came for ``IDLE_SECONDS``: while the user types, warming
        chunks would only stand between the keystrokes' requests and the worker; and, for a document the
        user left, once the one they are in has warmed. ``token`` holds the document's place in
        ``warming`` meanwhile; other work ahead claiming it ends the wait."""
        wanted = lambda: self.warming.get(uri) is token and not token.cancelled()  # noqa: E731
        paused = await self._until_user_pauses(wanted)
        while paused and self._yield_to_active(uri):  # the document the user is in warms first
            await asyncio.sleep(IDLE_SECONDS)
            paused = await self._until_user_pauses(wanted)
        self._release_work_ahead(uri, token)
        if paused:
            self.warm(uri)

    async def _until_user_pauses(self, wanted: Callable[[], bool], pause: float = IDLE_SECONDS) -> bool:
        """Wait until no request ran for ``pause`` seconds; False as soon as ``wanted()`` is not."""
        loop = asyncio.get_running_loop()
        while wanted():
            idle = loop.time() - self.last_request
            if self.waiting == 0 and idle >= pause:
                return True
            await asyncio.sleep(max(0.01, pause - idle))
        return False

    def _release_work_ahead(self, uri: str, token: RequestToken) -> None:
        if self.warming.get(uri) is token:
            del self.warming[uri]

    def _prefetch_after_accept(self, doc: Document, cursor: Cursor, text: str, warm_full: bool = False) -> None:
        """Compute the suggestion that follows ``text`` once the user accepts it, at idle priority;
        ``warm_full``: then, once the user pauses, the full prompt (``text`` came from a short one)."""
        if not self.settings.warm_ahead or self.service is None:
            return
        if not text:
            self.pending_prefetch.pop(doc.uri, None)
            if warm_full:
                self._spawn(self._warm_when_idle(doc.uri, self._claim_work_ahead(doc.uri)))
            return
        accepted = doc.with_insertion(cursor.offset, text)
        at = Cursor.at(accepted, *accepted.position_at(cursor.offset + len(text)))
        if self.prefetched.covers(accepted, at.byte):
            self.pending_prefetch.pop(doc.uri, None)
            return
        self.pending_prefetch[doc.uri] = PendingPrefetch(accepted, at, warm_full, len(text))
        if doc.uri not in self.prefetch_waiters:
            self.prefetch_waiters.add(doc.uri)
            self._spawn(self._prefetch_when_idle(doc.uri))

    async def _prefetch_when_idle(self, uri: str) -> None:
        """A user reads a suggestion before accepting it: the prefetch waits for that pause, so that it never
        stands between keystrokes and the worker while the user types on."""
        try:
            await self._until_user_pauses(lambda: uri in self.pending_prefetch, PREFETCH_PAUSE_SECONDS)
        finally:
            self.prefetch_waiters.discard(uri)
        warming = self.warm_tokens.get(uri)
        if uri in self.pending_prefetch and (warming is None or warming.cancelled()):
            self._launch_prefetch(uri)  # else the warming under way serves every request: it goes first, this after

    def _launch_prefetch(self, uri: str, warm_full: bool = False) -> None:
        pending = self.pending_prefetch.pop(uri)
        warm_full = pending.warm_full or warm_full
        current = self.documents.get(uri)
        if current is None or not self.settings.warm_ahead:
            return
        if not pending.reachable()(current):
            # the user typed away: the state the prefetch was for will not come; the full prompt still warms
            if warm_full:
                self._spawn(self._warm_when_idle(uri, self._claim_work_ahead(uri)))
            return
        if self.prefetched.covers(pending.accepted, pending.at.byte):  # made meanwhile (a warming at that cursor)
            return
        self._spawn(self._prefetch(pending, self._claim_work_ahead(uri), warm_full))

    async def _prefetch(self, pending: PendingPrefetch, token: RequestToken, warm_full: bool) -> None:
        accepted, at = pending.accepted, pending.at
        made = False
        try:
            service = self.service
            if service is None or token.cancelled():
                return
            job, short = self._fit_to_latency(service, accepted, at, service.prepare(accepted, at.line, at.character))
            await self._suggest_ahead(service, DocumentState.of(accepted), at, job, token, short=short,
                                      reachable=pending.reachable())  # typed away from it: stopped
            made = True
        except Exception:
            log.exception("prefetching after %s failed", accepted.uri)
        finally:
            if not (made and warm_full):
                self._release_work_ahead(accepted.uri, token)
        if made and warm_full:
            await self._warm_when_idle(accepted.uri, token)  # the document stays in ``warming`` meanwhile

    async def _suggest_ahead(self, service: CompletionService, state: DocumentState, cursor: Cursor,
                             job: CompletionJob, token: RequestToken, short: bool = False, live: bool = False,
                             reachable: Callable[[Document], bool] | None = None) -> None:
        """Make the suggestion for the document in ``state`` at ``cursor`` before it is asked for, at idle
        priority (a request for anything else stops it between two model steps; ``live``: the state is
        the document's now, and the suggestion stops once it changes); a request that finds the document
        in that state is answered by it."""
        loop = asyncio.get_running_loop()
        work = self.ahead[state.uri] = AheadWork(state.source, cursor.byte, loop.create_future())

        def moved_on() -> bool:
            current = self.documents.get(state.uri)
            return (current is None or (live and current.version != state.version)
                    or (reachable is not None and not reachable(current)))

        stop = lambda: token.cancelled() or self._yield_to_requests(work) or moved_on()  # noqa: E731
        # a suggestion's prefill stops only between its forwards: chunks of WARM_CHUNK_SECONDS
        chunk = max(MIN_FAST_BUDGET, service.engine.speed.prefill_tokens_within(WARM_CHUNK_SECONDS))
        text = None
        try:
            result = await loop.run_in_executor(
                self.worker, lambda: service.run(job, stop, self._decode_seconds(), chunk, ahead=True,
                                                 answer_by=lambda: work.answer_by))
            text = result.text
        except Cancelled:
            return
        finally:
            if self.ahead.get(state.uri) is work:
                del self.ahead[state.uri]
            work.done.set_result(text)  # a request waiting for it resumes after what follows
        self.warm_counters.suggested_ahead += 1
        if not moved_on():
            self.prefetched.remember(state, cursor.byte, text, short=short)

    # ---- reports ----

    def report(self) -> dict:
        service = self.service
        counters = service.engine.pool.counters if service is not None else None
        speed = service.engine.speed if service is not None else None
        return {
            "status": self.status,
            "state": self.state,
            "documents": len(self.documents),
            "indexedFiles": len(self.index.files),
            "cacheBytes": service.engine.pool.total_bytes() if service is not None else 0,
            "reusedTokens": counters.reused_tokens if counters else 0,
            "computedTokens": counters.computed_tokens if counters else 0,
            "warmedTokens": counters.warmed_tokens if counters else 0,
            "warmedUsedTokens": counters.warmed_used_tokens if counters else 0,
            "warming": sorted({*self.warming, *self.pending_prefetch}),  # documents with work ahead to do
            "warmJobs": self.warm_counters.jobs,
            "warmPreempted": self.warm_counters.preempted,
            "fastAnswers": self.warm_counters.fast_answers,
            "prefetchedAnswers": self.warm_counters.prefetched_answers,
            "suggestedAhead": self.warm_counters.suggested_ahead,
            "prefillMsPerToken": speed.prefill_s * 1000 if speed else None,
            "decodeMsPerToken": speed.decode_s * 1000 if speed else None,
            "watching": self.watcher is not None,
        }


def fast_key(uri: str) -> str:
    return uri + "#fast"


def _with_budget(context, budget: int):
    return dataclasses.replace(context, budget_tokens=budget)


def _with_suffix_cut(engine: Engine, job: CompletionJob, cached: int, affordable: int) -> CompletionJob | None:
    """``job`` with as much of its suffix as leaves ``affordable`` tokens to compute, given the ``cached``
    ones; None where the prompt does not end with its suffix and middle token (suffix-prefix-middle, no
    fill-in-the-middle), or where even without its suffix more is left to compute."""
    ids = job.prompt.token_ids
    suffix_start = engine.prefix_end(ids) + 1  # after the suffix's marker
    if suffix_start >= len(ids):  # the suffix comes first, or there is none
        return None
    cut_at = cached + affordable - 1  # what is cached, then what prefills in time (the middle token included)
    if cut_at < suffix_start or cut_at >= len(ids) - 1:
        return None
    positions = job.prompt.positions
    middle = positions[cut_at - 1 : cut_at] + 1  # a unit of its own, the next token
    cut = dataclasses.replace(job.prompt, token_ids=ids[:cut_at] + ids[-1:],
                              positions=torch.cat([positions[:cut_at], middle]))
    return dataclasses.replace(job, prompt=cut)
