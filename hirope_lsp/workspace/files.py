"""Which files of a workspace folder are source worth reading: .gitignore honoured,
size-limited, binary files skipped, symlink loops cut."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pathspec

log = logging.getLogger(__name__)

ALWAYS_SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache", ".venv", "node_modules"})
DEFAULT_MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FilePolicy:
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    exclude: tuple[str, ...] = ()  # gitignore-style patterns applied at every folder root


def is_binary(head: bytes) -> bool:
    return b"\x00" in head


def read_source(path: Path, policy: FilePolicy) -> str | None:
    """The file's text, or None (with a log line) when it is too big, binary or unreadable.

    Bytes that are not UTF-8 are replaced (U+FFFD) so the rest of the file still counts."""
    try:
        size = path.stat().st_size
        if size > policy.max_file_bytes:
            log.info("skipping %s: %d bytes is over the %d byte limit", path, size, policy.max_file_bytes)
            return None
        data = path.read_bytes()
    except OSError as err:
        log.info("skipping %s: %s", path, err)
        return None
    if is_binary(data[:8192]):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        log.info("%s is not valid UTF-8; undecodable bytes replaced", path)
        return data.decode("utf-8", "replace")


class IgnoreRules:
    """The .gitignore files from a folder root down to each directory."""

    def __init__(self, root: Path, exclude: tuple[str, ...] = ()):
        self.root = root
        self._specs: dict[Path, pathspec.PathSpec | None] = {}
        self._exclude = pathspec.GitIgnoreSpec.from_lines(exclude) if exclude else None

    def _spec(self, directory: Path) -> pathspec.PathSpec | None:
        if directory not in self._specs:
            spec = None
            gitignore = directory / ".gitignore"
            try:
                if gitignore.is_file():
                    spec = pathspec.GitIgnoreSpec.from_lines(gitignore.read_text(encoding="utf-8", errors="replace").splitlines())
            except OSError:
                spec = None
            self._specs[directory] = spec
        return self._specs[directory]

    def forget(self, directory: Path) -> None:
        self._specs.pop(directory, None)

    def ignored(self, path: Path, is_dir: bool = False) -> bool:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return True
        if any(part in ALWAYS_SKIPPED_DIRS for part in rel.parts[:-1]) or (is_dir and path.name in ALWAYS_SKIPPED_DIRS):
            return True
        # the deepest .gitignore that matches decides; check each ancestor's rules relative to it
        directory = self.root
        verdict = False
        if self._exclude is not None and self._exclude.match_file(rel.as_posix() + ("/" if is_dir else "")):
            return True
        for part in rel.parts[:-1] + ("",):
            spec = self._spec(directory)
            if spec is not None:
                sub = path.relative_to(directory).as_posix() + ("/" if is_dir else "")
                result = spec.check_file(sub)
                if result.include is not None:
                    verdict = result.include
            if not part:
                break
            directory = directory / part
        return verdict


def walk_sources(root: Path, rules: IgnoreRules | None = None):
    """Every non-ignored regular file under ``root`` (symlinks followed once; loops cut)."""
    rules = rules or IgnoreRules(root)
    root_real = os.path.realpath(root)
    seen: set[str] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            real = os.path.realpath(directory)
        except OSError:
            continue
        if real in seen:
            log.info("skipping %s: symlink loop or second link to %s", directory, real)
            continue
        if not _inside(real, root_real):
            log.info("skipping %s: it leads outside the workspace (%s)", directory, real)
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            log.info("cannot list %s: %s", directory, err)
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError:
                continue
            if is_dir:
                if not rules.ignored(path, is_dir=True):
                    stack.append(path)
            elif is_file and not rules.ignored(path):
                if entry.is_symlink() and not _inside(os.path.realpath(path), root_real):
                    log.info("skipping %s: it links outside the workspace", path)
                    continue
                yield path


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)
