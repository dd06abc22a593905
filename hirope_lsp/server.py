"""LSP handlers (pygls 2): protocol in, calls out, results back.  No parsing or model logic here.

Edits run in order on the event loop.  A completion builds its prompt there (a snapshot of
the document) and hands it to the single inference worker; a newer request for the same
document supersedes it, ``$/cancelRequest`` stops it within one decoding step, and a
result for an older document version is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol

from . import __version__
from .completion.service import CompletionService
from .completion.typed_ahead import ShownSuggestions
from .config import Settings, apply_options
from .hierarchy.document import Change, Document
from .model.engine import Cancelled, Engine
from .model.loading import ModelLoadError
from .workspace.files import FilePolicy
from .workspace.index import WorkspaceIndex, uri_to_path
from .workspace.watcher import WorkspaceWatcher

log = logging.getLogger(__name__)

ENCODINGS = {types.PositionEncodingKind.Utf16: "utf-16", types.PositionEncodingKind.Utf8: "utf-8",
             types.PositionEncodingKind.Utf32: "utf-32"}


class HiropeProtocol(LanguageServerProtocol):
    """Answers requests whose parameters do not parse with InvalidParams instead of dropping them."""

    def structure_message(self, data):
        try:
            return super().structure_message(data)
        except Exception as err:
            if isinstance(data, dict) and "id" in data and "method" in data:
                self._send_response(data["id"], error=JsonRpcInvalidParams(
                    f"invalid parameters for {data.get('method')}: {err.__cause__ or err}").to_response_error())
            return SimpleNamespace(jsonrpc="invalid")  # handle_message ignores it


class RequestToken:
    def __init__(self):
        self._event = threading.Event()

    def cancel(self):
        self._event.set()

    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Suggestion:
    text: str
    uri: str
    line: int  # the cursor it is inserted at, in the document's position encoding
    character: int


class HiropeServer(LanguageServer):
    def __init__(self, settings: Settings | None = None):
        super().__init__("hirope-lsp", __version__, protocol_cls=HiropeProtocol)
        self.settings = settings or Settings()
        self.documents: dict[str, Document] = {}
        self.index = WorkspaceIndex(policy=FilePolicy(self.settings.max_file_bytes))
        self.watcher: WorkspaceWatcher | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hirope-inference")
        self.engine_future: asyncio.Future | None = None
        self.service: CompletionService | None = None
        self.latest: dict[str, RequestToken] = {}
        self.shown = ShownSuggestions()
        self.status = "starting"
        self.startup_problems: list[str] = []  # bad initializationOptions, shown once the client is initialized

    # ---- out-of-band errors ----

    def report_server_error(self, error, source):
        if isinstance(error, json.JSONDecodeError):
            # malformed JSON: JSON-RPC's parse error, id null (the request id cannot be known)
            self.protocol._send_data({"jsonrpc": "2.0", "id": None,
                                      "error": {"code": -32700, "message": f"Parse error: {error}"}})
            return
        super().report_server_error(error, source)

    def show(self, message: str, kind=types.MessageType.Warning) -> None:
        log.warning(message) if kind != types.MessageType.Info else log.info(message)
        self.window_show_message(types.ShowMessageParams(type=kind, message=f"hirope-lsp: {message}"))

    # ---- model and workspace in the background ----

    def encoding(self) -> str:
        return ENCODINGS.get(self.workspace.position_encoding, "utf-16")

    def start_background(self) -> None:
        loop = asyncio.get_running_loop()
        self.engine_future = loop.create_future()
        token = "hirope-lsp/loading"
        progress = bool(getattr(getattr(self.client_capabilities, "window", None), "work_done_progress", False))

        def report(kind, message):
            if not progress:
                return
            value = {"begin": types.WorkDoneProgressBegin(title="hirope-lsp", message=message),
                     "report": types.WorkDoneProgressReport(message=message),
                     "end": types.WorkDoneProgressEnd(message=message)}[kind]
            getattr(self.work_done_progress, kind)(token, value)

        async def run():
            if progress:
                try:
                    await self.work_done_progress.create_async(token)
                except Exception:
                    pass
            report("begin", "loading model")
            try:
                engine = await loop.run_in_executor(self.worker, Engine, self.settings.engine)
            except (ModelLoadError, ValueError, RuntimeError) as err:
                self.status = f"error: {err}"
                self.show(str(err), types.MessageType.Error)
                report("end", "model failed to load")
                self.engine_future.set_exception(ModelLoadError(str(err)))
                self.engine_future.exception()  # retrieved: no "never retrieved" warning
                return
            self.service = CompletionService.from_settings(engine, self.index, self.settings)
            self.status = f"ready: {engine.description}"
            log.info("model ready: %s", engine.description)
            report("report", "indexing workspace")
            files = await loop.run_in_executor(None, self.index.scan)
            log.info("indexed %d files", files)
            report("end", f"ready: {engine.description}, {files} files indexed")
            self.engine_future.set_result(engine)
            if self.settings.watch_files and self.index.folders:
                self.watcher = WorkspaceWatcher(self.index)
                self.watcher.start()

        asyncio.ensure_future(run())

    async def service_ready(self) -> CompletionService:
        if self.engine_future is None:
            raise JsonRpcInvalidParams("the server is not initialized")
        try:
            await asyncio.shield(self.engine_future)
        except ModelLoadError as err:
            raise RuntimeError(f"no model: {err}") from err
        return self.service

    # ---- documents ----

    def document(self, uri: str) -> Document:
        doc = self.documents.get(uri)
        if doc is None:
            raise JsonRpcInvalidParams(f"unknown document {uri}: it was not opened with textDocument/didOpen")
        return doc

    def check_position(self, doc: Document, position: types.Position) -> None:
        if position.line < 0 or position.character < 0:
            raise JsonRpcInvalidParams(f"negative position {position.line}:{position.character}")
        if position.line >= doc.line_count:
            raise JsonRpcInvalidParams(
                f"position {position.line}:{position.character} is past the end of {doc.uri} ({doc.line_count} lines)")
        content = doc.line_text(position.line)
        width = doc.position_at(int(doc.line_char[position.line]) + len(content))[1]  # in the document's encoding
        if position.character > width:
            raise JsonRpcInvalidParams(
                f"position {position.line}:{position.character} is past the end of line {position.line} ({width})")

    def supersede(self, uri: str, token: RequestToken | None = None) -> None:
        """Cancel the request in flight for ``uri`` (Neovim does not cancel its older requests)."""
        previous = self.latest.pop(uri, None)
        if previous is not None:
            previous.cancel()
        if token is not None:
            self.latest[uri] = token

    async def completion_text(self, uri: str, position: types.Position) -> Suggestion | None:
        """The suggestion for the cursor; None when superseded or stale."""
        doc = self.document(uri)
        self.check_position(doc, position)
        cursor, cursor_byte = doc.offset_at(position.line, position.character)
        rest = self.shown.rest(doc, cursor_byte) if self.settings.type_along else None
        if rest is not None:
            self.supersede(uri)
            log.info("completion %s v%d: typed along the last suggestion, %d chars left", uri, doc.version, len(rest))
            return Suggestion(rest, uri, *doc.position_at(cursor))
        service = await self.service_ready()
        doc = self.document(uri)  # it may have changed or closed while the model loaded
        self.check_position(doc, position)
        job = service.prepare(doc, position.line, position.character)
        token = RequestToken()
        self.supersede(uri, token)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.worker, service.run, job, token.cancelled)
        except asyncio.CancelledError:
            token.cancel()
            raise
        except Cancelled:
            return None
        finally:
            if self.latest.get(uri) is token:
                del self.latest[uri]
        current = self.documents.get(uri)
        if current is None or current.version != job.version:
            log.info("dropping a completion for %s v%d: the document moved on", uri, job.version)
            return None
        self.shown.remember(current, current.offset_at(job.line, job.character)[1], result.text)
        return Suggestion(result.text, uri, job.line, job.character)


SERVER_HANDLERS = []


def handler(method, options=None):
    def register(fn):
        SERVER_HANDLERS.append((method, options, fn))
        return fn
    return register


@handler(types.INITIALIZE)
def initialize(ls: HiropeServer, params: types.InitializeParams):
    ls.settings, problems = apply_options(ls.settings, params.initialization_options)
    ls.index.policy = FilePolicy(ls.settings.max_file_bytes)
    for folder in params.workspace_folders or []:
        path = uri_to_path(folder.uri)
        if path is not None:
            ls.index.add_folder(path)
    if not ls.index.folders and params.root_uri:
        path = uri_to_path(params.root_uri)
        if path is not None:
            ls.index.add_folder(path)
    ls.startup_problems = problems


@handler(types.INITIALIZED)
def initialized(ls: HiropeServer, params: types.InitializedParams):
    for problem in ls.startup_problems:
        ls.show(problem)
    ls.start_background()


@handler(types.SHUTDOWN)
def shutdown(ls: HiropeServer, params):
    if ls.watcher is not None:
        ls.watcher.stop()
    for token in ls.latest.values():
        token.cancel()


@handler(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: HiropeServer, params: types.DidOpenTextDocumentParams):
    item = params.text_document
    doc = Document(item.uri, item.text, item.version, item.language_id, ls.encoding())
    ls.documents[item.uri] = doc
    path = uri_to_path(item.uri)
    if path is not None and ls.index.folder_of(path) is not None:
        ls.index.open_document(doc)


@handler(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: HiropeServer, params: types.DidChangeTextDocumentParams):
    doc = ls.documents.get(params.text_document.uri)
    if doc is None:
        log.warning("change for unknown document %s ignored", params.text_document.uri)
        return
    changes = []
    for change in params.content_changes:
        if isinstance(change, types.TextDocumentContentChangePartial):
            r = change.range
            changes.append(Change(change.text, ((r.start.line, r.start.character), (r.end.line, r.end.character))))
        else:
            changes.append(Change(change.text))
    doc.apply_changes(changes, params.text_document.version)
    ls.index.document_changed(doc)
    token = ls.latest.get(doc.uri)
    if token is not None:
        token.cancel()  # its result would be for an older version


@handler(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: HiropeServer, params: types.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.documents.pop(uri, None)
    ls.shown.forget(uri)
    ls.index.close_document(uri)
    if ls.service is not None:
        ls.service.engine.pool.drop(uri)
        ls.service.builder.forget(uri)


@handler(types.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: HiropeServer, params: types.DidSaveTextDocumentParams):
    pass  # the open document already holds the text; the disk copy is re-read when it closes


@handler(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)
def did_change_watched_files(ls: HiropeServer, params: types.DidChangeWatchedFilesParams):
    kinds = {types.FileChangeType.Created: "created", types.FileChangeType.Changed: "modified",
             types.FileChangeType.Deleted: "deleted"}
    for event in params.changes:
        path = uri_to_path(event.uri)
        if path is None:
            continue
        if ls.watcher is not None:
            ls.watcher.debouncer.notify(path, kinds.get(event.type, "modified"))
        elif event.type == types.FileChangeType.Deleted:
            ls.index.remove_file(path)
        else:
            ls.index.update_file(path)


@handler(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
def did_change_workspace_folders(ls: HiropeServer, params: types.DidChangeWorkspaceFoldersParams):
    for folder in params.event.removed:
        path = uri_to_path(folder.uri)
        if path is not None:
            ls.index.remove_folder(path)
    for folder in params.event.added:
        path = uri_to_path(folder.uri)
        if path is not None:
            ls.index.add_folder(path)
    if params.event.added:
        asyncio.get_running_loop().run_in_executor(None, ls.index.scan)


@handler(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(ls: HiropeServer, params: types.DidChangeConfigurationParams):
    options = params.settings
    if isinstance(options, dict) and isinstance(options.get("hirope"), dict) and "model" not in options:
        options = options["hirope"]  # the section as vscode-languageclient sends it: {"hirope": {...}}
    old = ls.settings
    ls.settings, problems = apply_options(old, options)
    for problem in problems:
        ls.show(problem)
    if ls.settings != old:
        ls.shown.clear()  # suggestions made under the old settings are not typed along with
    service = ls.service
    if service is None:
        return
    if (ls.settings.engine.model, ls.settings.engine.device, ls.settings.engine.dtype) != \
            (old.engine.model, old.engine.device, old.engine.dtype):
        ls.show("model settings changed: loading the new model", types.MessageType.Info)
        ls.service = None
        ls.start_background()
        return
    if ls.settings.engine.rope != old.engine.rope:
        ls.worker.submit(service.engine.reconfigure_rope, ls.settings.engine.rope)
    service.engine.pool.enabled = ls.settings.engine.reuse_cache
    service.engine.pool.budget_bytes = ls.settings.engine.cache_budget_mb << 20
    service.builder.settings = ls.settings.context
    service.max_new_tokens = ls.settings.max_new_tokens
    service.multiline = ls.settings.multiline
    service.min_confidence = ls.settings.min_confidence


@handler(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(ls: HiropeServer, params: types.InlineCompletionParams):
    found = await ls.completion_text(params.text_document.uri, params.position)
    if found is None or not found.text:
        return types.InlineCompletionList(items=[])
    at = types.Position(found.line, found.character)
    return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=found.text, range=types.Range(at, at))])


@handler(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "(", " "]))
async def completion(ls: HiropeServer, params: types.CompletionParams):
    """Fallback for clients without inline completion: one item carrying the completion."""
    found = await ls.completion_text(params.text_document.uri, params.position)
    if found is None or not found.text:
        return types.CompletionList(is_incomplete=True, items=[])
    text, line, character = found.text, found.line, found.character
    doc = ls.documents[found.uri]
    line_text = doc.line_text(line)
    cursor_cp = len(doc.text[int(doc.line_char[line]) : doc.offset_at(line, character)[0]])
    word_start = cursor_cp
    while word_start > 0 and (line_text[word_start - 1].isalnum() or line_text[word_start - 1] == "_"):
        word_start -= 1
    word = line_text[word_start:cursor_cp]
    start_char = doc.position_at(int(doc.line_char[line]) + word_start)[1]
    edit_range = types.Range(types.Position(line, start_char), types.Position(line, character))
    first_line = text.split("\n", 1)[0]
    item = types.CompletionItem(
        label=(word + first_line).strip()[:80] or text.strip()[:80],
        kind=types.CompletionItemKind.Text,
        detail="hirope-lsp",
        filter_text=word + first_line,
        text_edit=types.TextEdit(range=edit_range, new_text=word + text),
        insert_text_format=types.InsertTextFormat.PlainText,
        sort_text="0",
    )
    return types.CompletionList(is_incomplete=True, items=[item])


@handler("hirope/status")
def status(ls: HiropeServer, params):
    service = ls.service
    counters = service.engine.pool.counters if service is not None else None
    return {
        "status": ls.status,
        "documents": len(ls.documents),
        "indexedFiles": len(ls.index.files),
        "cacheBytes": service.engine.pool.total_bytes() if service is not None else 0,
        "reusedTokens": counters.reused_tokens if counters else 0,
        "computedTokens": counters.computed_tokens if counters else 0,
    }


@handler("hirope/documentState")
def document_state(ls: HiropeServer, params):
    """The server's view of a document (version and a digest of its text): lets clients and tests
    check that nothing the user typed was lost or altered."""
    uri = params.uri if hasattr(params, "uri") else (params or {}).get("uri")
    doc = ls.document(uri)
    return {"version": doc.version, "sha1": hashlib.sha1(doc.text.encode("utf-8")).hexdigest(), "lines": doc.line_count}


def create_server(settings: Settings | None = None) -> HiropeServer:
    server = HiropeServer(settings)
    for method, options, fn in SERVER_HANDLERS:
        server.feature(method, options)(fn) if options is not None else server.feature(method)(fn)
    return server


def serve(tcp: str | None = None, settings: Settings | None = None) -> None:
    # pygls reads each header line and body through a thread of its own; with the default 5 ms switch
    # interval the generating thread holds it off for that long per line: $/cancelRequest reached the
    # reply in 4.5 ms (p50), 1.2 ms with this
    sys.setswitchinterval(0.0005)
    server = create_server(settings)
    if tcp:
        host, _, port = tcp.rpartition(":")
        server.start_tcp(host or "127.0.0.1", int(port))
    else:
        server.start_io()

