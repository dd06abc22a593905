"""Keep the workspace index current: watchdog events and LSP didChangeWatchedFiles, debounced."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .files import walk_sources
from .index import WorkspaceIndex

log = logging.getLogger(__name__)


class Debouncer:
    """Collects changed paths and applies them to the index once ``delay`` seconds pass without news."""

    def __init__(self, index: WorkspaceIndex, delay: float = 0.2, on_flush=None):
        self.index = index
        self.delay = delay
        self.on_flush = on_flush
        self._pending: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.flushed = threading.Event()

    def notify(self, path: Path, kind: str) -> None:
        """``kind``: created, modified, deleted."""
        with self._lock:
            self._pending[Path(path)] = kind
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay, self.flush)
            self._timer.daemon = True
            self._timer.start()
            self.flushed.clear()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._timer = None
        for path, kind in pending.items():
            try:
                if kind == "deleted":
                    self.index.remove_file(path)
                    for child in [p for p in self.index.files if path in p.parents]:
                        self.index.remove_file(child)  # a deleted directory
                elif path.is_dir():
                    if kind == "created":
                        for folder in self.index.folders:
                            if folder == path or folder in path.parents:
                                for child in walk_sources(path):
                                    self.index.update_file(child)
                else:
                    self.index.update_file(path)
            except Exception:  # one bad path must not stop the others
                log.exception("updating the index for %s failed", path)
        if self.on_flush is not None and pending:
            self.on_flush(list(pending))
        self.flushed.set()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


class _Handler(FileSystemEventHandler):
    def __init__(self, debouncer: Debouncer):
        self.debouncer = debouncer

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed", "closed_no_write"):
            return
        src = Path(event.src_path if isinstance(event.src_path, str) else event.src_path.decode())
        if event.event_type == "moved":
            dest = Path(event.dest_path if isinstance(event.dest_path, str) else event.dest_path.decode())
            self.debouncer.notify(src, "deleted")
            self.debouncer.notify(dest, "created")
        elif event.event_type == "deleted":
            self.debouncer.notify(src, "deleted")
        else:
            self.debouncer.notify(src, "created" if event.event_type == "created" else "modified")


class WorkspaceWatcher:
    """Watches every folder of an index with watchdog; ``stop()`` to end."""

    def __init__(self, index: WorkspaceIndex, delay: float = 0.2, on_flush=None):
        self.debouncer = Debouncer(index, delay, on_flush)
        self.observer = Observer()
        self.observer.daemon = True
        for folder in index.folders:
            self.observer.schedule(_Handler(self.debouncer), str(folder), recursive=True)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.debouncer.cancel()
        self.observer.stop()
        self.observer.join(timeout=5)
