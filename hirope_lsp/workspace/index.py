"""The workspace: its files on disk and the open documents over them, and a symbol index.

Thread-safe (the watchdog thread and the server loop both update it).  Open
documents always win over what is on disk: while a file is open its disk
events are noted but its definitions come from the open document.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..hierarchy.document import Document
from ..hierarchy.languages import grammar, language_for_path
from ..hierarchy.units import Definition, extract_definitions
from .files import FilePolicy, IgnoreRules, read_source, walk_sources

log = logging.getLogger(__name__)

_revisions = itertools.count(1)


@dataclass(frozen=True)
class Symbol:
    name: str
    kind: str
    path: Path
    start: int  # byte offsets in that file
    end: int


@dataclass
class FileEntry:
    path: Path
    language: str | None
    size: int
    definitions: list[Definition]
    revision: int = 0  # a new one each time the file is indexed again (what reads its text may cache on it)


def uri_to_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path))


def path_to_uri(path: Path) -> str:
    return path.resolve().as_uri()


class WorkspaceIndex:
    def __init__(self, folders: list[Path] | None = None, policy: FilePolicy | None = None):
        self.policy = policy or FilePolicy()
        self.folders: list[Path] = []
        self._rules: dict[Path, IgnoreRules] = {}
        self.files: dict[Path, FileEntry] = {}
        self._in_folder: dict[Path, set[Path]] = defaultdict(set)  # a directory -> its indexed files
        self.documents: dict[Path, Document] = {}
        self._symbols: dict[str, list[Symbol]] = defaultdict(list)
        self._doc_defs: dict[Path, list[Definition]] = {}  # an open document's definitions in the symbol table
        self._stale_docs: set[Path] = set()
        self._lock = threading.RLock()
        for folder in folders or []:
            self.add_folder(folder)

    # ---- folders ----

    def add_folder(self, folder: Path) -> None:
        folder = Path(folder).resolve()
        with self._lock:
            if folder not in self.folders:
                self.folders.append(folder)
                self._rules[folder] = IgnoreRules(folder, self.policy.exclude)

    def remove_folder(self, folder: Path) -> None:
        folder = Path(folder).resolve()
        with self._lock:
            if folder in self.folders:
                self.folders.remove(folder)
                self._rules.pop(folder, None)
                for path in [p for p in self.files if self.folder_of(p) is None]:
                    self._drop(path)

    def folder_of(self, path: Path) -> Path | None:
        """The workspace folder holding ``path``, or None when it lies outside every folder."""
        path = Path(path)
        try:
            path = path.resolve()
        except OSError:
            return None
        for folder in self.folders:
            if path == folder or folder in path.parents:
                return folder
        return None

    def is_indexable(self, path: Path) -> bool:
        folder = self.folder_of(path)
        if folder is None:
            return False
        return not self._rules[folder].ignored(Path(path).resolve())

    # ---- disk ----

    def scan(self) -> int:
        """Index every source file of every folder; returns the number of files indexed."""
        count = 0
        for folder in list(self.folders):
            for path in walk_sources(folder, self._rules[folder]):
                if self.update_file(path):
                    count += 1
        return count

    def update_file(self, path: Path) -> bool:
        """(Re)index one file from disk; False when it is not indexable (ignored, binary, too big, outside)."""
        path = Path(path).resolve()
        if path.name == ".gitignore":
            folder = self.folder_of(path)
            if folder is not None:
                self._rules[folder].forget(path.parent)
        if not self.is_indexable(path) or not path.is_file():
            self.remove_file(path)
            return False
        text = read_source(path, self.policy)
        if text is None:
            self.remove_file(path)
            return False
        language = language_for_path(path)
        source = text.encode("utf-8")
        definitions: list[Definition] = []
        g = grammar(language) if language else None
        if g is not None:
            try:
                definitions = extract_definitions(g, g.parser().parse(source))
            except Exception as err:  # a parser failure costs this file its symbols, nothing more
                log.warning("cannot parse %s: %s", path, err)
        with self._lock:
            self._drop(path)
            self.files[path] = FileEntry(path, language, len(source), definitions, next(_revisions))
            self._in_folder[path.parent].add(path)
            if path not in self.documents:
                self._add_symbols(path, definitions)
        return True

    def remove_file(self, path: Path) -> None:
        with self._lock:
            self._drop(Path(path))

    def _drop(self, path: Path) -> None:
        entry = self.files.pop(path, None)
        if entry is not None:
            siblings = self._in_folder.get(path.parent)
            siblings.discard(path)
            if not siblings:
                del self._in_folder[path.parent]
        if entry is not None and path not in self.documents:
            self._remove_symbols(path, entry.definitions)

    # ---- open documents ----

    def open_document(self, document: Document) -> None:
        path = uri_to_path(document.uri)
        if path is None:
            return
        with self._lock:
            entry = self.files.get(path)
            if entry is not None and path not in self.documents:
                self._remove_symbols(path, entry.definitions)
            self._remove_symbols(path, self._doc_defs.pop(path, []))
            self.documents[path] = document
            self._stale_docs.add(path)

    def document_changed(self, document: Document) -> None:
        """Note an edit; the document's symbols are refreshed when next looked up (no parse per keystroke)."""
        path = uri_to_path(document.uri)
        if path is not None:
            with self._lock:
                self._stale_docs.add(path)

    def close_document(self, uri: str) -> None:
        path = uri_to_path(uri)
        if path is None:
            return
        with self._lock:
            self.documents.pop(path, None)
            self._stale_docs.discard(path)
            self._remove_symbols(path, self._doc_defs.pop(path, []))
            entry = self.files.get(path)
            if entry is not None:
                self._add_symbols(path, entry.definitions)

    def _refresh_documents(self) -> None:
        for path in list(self._stale_docs):
            document = self.documents.get(path)
            if document is not None:
                self._remove_symbols(path, self._doc_defs.get(path, []))
                self._doc_defs[path] = document.definitions
                self._add_symbols(path, self._doc_defs[path])
        self._stale_docs.clear()

    # ---- symbols ----

    def _add_symbols(self, path: Path, definitions: list[Definition]) -> None:
        for d in definitions:
            if d.name:
                self._symbols[d.name].append(Symbol(d.name, d.kind, path, d.start, d.end))

    def _remove_symbols(self, path: Path, definitions: list[Definition]) -> None:
        for name in {d.name for d in definitions if d.name}:
            kept = [s for s in self._symbols.get(name, []) if s.path != path]
            if kept:
                self._symbols[name] = kept
            else:
                self._symbols.pop(name, None)

    def lookup(self, name: str) -> list[Symbol]:
        with self._lock:
            self._refresh_documents()
            return list(self._symbols.get(name, []))

    def symbol_count(self) -> int:
        with self._lock:
            self._refresh_documents()
            return sum(len(v) for v in self._symbols.values())

    def neighbours(self, path: Path | None, limit: int) -> list[Path]:
        """The files a user works across beside ``path``: open documents, then the indexed files in its
        folder (each sorted), never ``path`` itself; at most ``limit``."""
        itself = set()
        if path is not None:
            itself = {Path(path)}
            try:
                itself.add(Path(path).resolve())  # the index's keys are resolved; a document's path may not be
            except OSError:
                pass
        with self._lock:
            open_paths = sorted(self.documents)
            siblings = sorted({p for q in itself for p in self._in_folder.get(q.parent, ())})
        return [p for p in dict.fromkeys(open_paths + siblings) if p not in itself][:limit]

    def revision(self, path: Path) -> tuple | None:
        """Changes whenever ``text_of(path)`` may have: the open document's version, else the disk
        file's indexing; None for a file the index does not hold."""
        with self._lock:
            document = self.documents.get(path)
            if document is not None:
                return ("document", id(document), document.version)
            entry = self.files.get(path)
            return None if entry is None else ("disk", entry.revision)

    def text_of(self, path: Path) -> str | None:
        """Current text of a workspace file: the open document's if open, else the disk's."""
        path = Path(path)
        with self._lock:
            document = self.documents.get(path)
            if document is not None:
                return document.text
        if not self.is_indexable(path):
            return None
        return read_source(path, self.policy)
