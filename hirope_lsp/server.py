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
from pathlib import Path
from types import SimpleNamespace

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol

from . import __version__
from .config import Settings
from .hierarchy.document import Change
from .session import BadRequest, Session, Suggestion
from .workspace.index import uri_to_path

log = logging.getLogger(__name__)

ENCODINGS = {types.PositionEncodingKind.Utf16: "utf-16", types.PositionEncodingKind.Utf8: "utf-8",
             types.PositionEncodingKind.Utf32: "utf-32"}


class HiropeProtocol(LanguageServerProtocol):
    """Answers requests whose parameters do not parse with InvalidParams instead of dropping them, and forgets
    a handled message once its handler is done."""

    def _execute_handler(self, msg_id, handler, callback, args=None, kwargs=None):
        super()._execute_handler(msg_id, handler, callback, args, kwargs)
        # pygls 2.1 files a notification's handler under a fresh id and removes it only for requests: every
        # didChange would stay in _request_futures for the server's life (a Future with its Condition, RLock
        # and deque, ~18 allocated blocks per keystroke in the soak)
        future = self._request_futures.get(msg_id)
        if future is not None:
            future.add_done_callback(lambda done: self._forget(msg_id, done))

    def _forget(self, msg_id, future) -> None:
        if self._request_futures.get(msg_id) is future:
            del self._request_futures[msg_id]

    def structure_message(self, data):
        try:
            return super().structure_message(data)
        except Exception as err:
            if isinstance(data, dict) and "id" in data and "method" in data:
                self._send_response(data["id"], error=JsonRpcInvalidParams(
                    f"invalid parameters for {data.get('method')}: {err.__cause__ or err}").to_response_error())
            return SimpleNamespace(jsonrpc="invalid")  # handle_message ignores it


class HiropeServer(LanguageServer):
    """The pygls side: messages and progress to the client; all state lives in ``self.session``."""

    def __init__(self, settings: Settings | None = None):
        super().__init__("hirope-lsp", __version__, protocol_cls=HiropeProtocol)
        self.session = Session(settings or Settings(), show=self.show, progress=self.report_progress)
        self.startup_problems: list[str] = []  # bad initializationOptions, shown once the client is initialized
        self._progress_token: str | None = None

    # ---- out-of-band errors ----

    def report_server_error(self, error, source):
        if isinstance(error, json.JSONDecodeError):
            # malformed JSON: JSON-RPC's parse error, id null (the request id cannot be known)
            self.protocol._send_data({"jsonrpc": "2.0", "id": None,
                                      "error": {"code": -32700, "message": f"Parse error: {error}"}})
            return
        super().report_server_error(error, source)

    def show(self, message: str, kind: str = "warning") -> None:
        level = {"info": types.MessageType.Info, "warning": types.MessageType.Warning,
                 "error": types.MessageType.Error}[kind]
        log.warning(message) if kind != "info" else log.info(message)
        self.window_show_message(types.ShowMessageParams(type=level, message=f"hirope-lsp: {message}"))

    def report_progress(self, kind: str, message: str) -> None:
        if self._progress_token is None:
            return
        value = {"begin": types.WorkDoneProgressBegin(title="hirope-lsp", message=message),
                 "report": types.WorkDoneProgressReport(message=message),
                 "end": types.WorkDoneProgressEnd(message=message)}[kind]
        getattr(self.work_done_progress, kind)(self._progress_token, value)

    async def create_progress(self) -> None:
        if not getattr(getattr(self.client_capabilities, "window", None), "work_done_progress", False):
            return
        token = "hirope-lsp/loading"
        try:
            await self.work_done_progress.create_async(token)
            self._progress_token = token
        except Exception:
            pass

    def encoding(self) -> str:
        return ENCODINGS.get(self.workspace.position_encoding, "utf-16")

    async def suggestion(self, uri: str, position: types.Position) -> Suggestion | None:
        try:
            return await self.session.complete(uri, position.line, position.character)
        except BadRequest as err:
            raise JsonRpcInvalidParams(str(err)) from err


SERVER_HANDLERS = []


def handler(method, options=None):
    def register(fn):
        SERVER_HANDLERS.append((method, options, fn))
        return fn
    return register


@handler(types.INITIALIZE)
def initialize(ls: HiropeServer, params: types.InitializeParams):
    session = ls.session
    ls.startup_problems = session.apply(params.initialization_options)
    session.add_folders([folder.uri for folder in params.workspace_folders or []])
    if not session.index.folders and params.root_uri:
        session.add_folders([params.root_uri])


@handler(types.INITIALIZED)
async def initialized(ls: HiropeServer, params: types.InitializedParams):
    for problem in ls.startup_problems:
        ls.show(problem)
    ls.session.start()
    await ls.create_progress()
    if ls.session.state == "loading":
        ls.report_progress("begin", "loading model")


@handler(types.SHUTDOWN)
def shutdown(ls: HiropeServer, params):
    ls.session.shutdown()


@handler(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: HiropeServer, params: types.DidOpenTextDocumentParams):
    item = params.text_document
    ls.session.open(item.uri, item.text, item.version, item.language_id, ls.encoding())


@handler(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: HiropeServer, params: types.DidChangeTextDocumentParams):
    changes = []
    for change in params.content_changes:
        if isinstance(change, types.TextDocumentContentChangePartial):
            r = change.range
            changes.append(Change(change.text, ((r.start.line, r.start.character), (r.end.line, r.end.character))))
        else:
            changes.append(Change(change.text))
    ls.session.change(params.text_document.uri, changes, params.text_document.version)


@handler(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: HiropeServer, params: types.DidCloseTextDocumentParams):
    ls.session.close(params.text_document.uri)


@handler(types.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: HiropeServer, params: types.DidSaveTextDocumentParams):
    pass  # the open document already holds the text; the disk copy is re-read when it closes


@handler(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)
def did_change_watched_files(ls: HiropeServer, params: types.DidChangeWatchedFilesParams):
    kinds = {types.FileChangeType.Created: "created", types.FileChangeType.Changed: "modified",
             types.FileChangeType.Deleted: "deleted"}
    events = [(path, kinds.get(event.type, "modified")) for event in params.changes
              if (path := uri_to_path(event.uri)) is not None]
    ls.session.files_changed(events)


@handler(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
def did_change_workspace_folders(ls: HiropeServer, params: types.DidChangeWorkspaceFoldersParams):
    ls.session.folders_changed([f.uri for f in params.event.added], [f.uri for f in params.event.removed])


@handler(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(ls: HiropeServer, params: types.DidChangeConfigurationParams):
    options = params.settings
    if isinstance(options, dict) and isinstance(options.get("hirope"), dict) and "model" not in options:
        options = options["hirope"]  # the section as vscode-languageclient sends it: {"hirope": {...}}
    for problem in ls.session.apply(options):
        ls.show(problem)


@handler(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(ls: HiropeServer, params: types.InlineCompletionParams):
    found = await ls.suggestion(params.text_document.uri, params.position)
    if found is None or not found.text:
        return types.InlineCompletionList(items=[])
    at = types.Position(found.line, found.character)
    return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=found.text, range=types.Range(at, at))])


@handler(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "(", " "]))
async def completion(ls: HiropeServer, params: types.CompletionParams):
    """Fallback for clients without inline completion: one item carrying the completion."""
    found = await ls.suggestion(params.text_document.uri, params.position)
    if found is None or not found.text:
        return types.CompletionList(is_incomplete=True, items=[])
    text, line, character = found.text, found.line, found.character
    doc = ls.session.documents[found.uri]
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


def _param(params, *names):
    """A field of a custom request's params (pygls hands them over as a namespace or a dict)."""
    value = params
    for name in names:
        value = getattr(value, name, None) if not isinstance(value, dict) else value.get(name)
    return value


@handler("hirope/warm")
def warm(ls: HiropeServer, params):
    """Where the cursor is, sent by our editor plugins when a document opens or gets the focus and when
    the cursor rests: the server prefills that prompt before a suggestion is asked for."""
    uri, line, character = (_param(params, "textDocument", "uri"), _param(params, "position", "line"),
                            _param(params, "position", "character"))
    if not isinstance(uri, str) or not isinstance(line, int) or not isinstance(character, int):
        log.warning("hirope/warm needs textDocument.uri and position.line/character; ignored")
        return
    try:
        ls.session.point(uri, line, character)
    except BadRequest as err:
        log.warning("hirope/warm ignored: %s", err)


@handler("hirope/status")
def status(ls: HiropeServer, params):
    # messages whose handler runs (this request among them): stays small on a healthy server
    return {**ls.session.report(), "handling": len(ls.protocol._request_futures)}


@handler("hirope/documentState")
def document_state(ls: HiropeServer, params):
    """The server's view of a document (version and a digest of its text): lets clients and tests
    check that nothing the user typed was lost or altered."""
    uri = params.uri if hasattr(params, "uri") else (params or {}).get("uri")
    try:
        doc = ls.session.document(uri)
    except BadRequest as err:
        raise JsonRpcInvalidParams(str(err)) from err
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

