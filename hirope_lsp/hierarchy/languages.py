"""Grammar registry: the per-language tree-sitter wheels and their tags queries.

Definitions come from each grammar's own ``TAGS_QUERY`` (``@definition.*``
captures); TypeScript's wheel ships its tags file beside the package and
extends JavaScript's, as upstream does.  Languages without a grammar here are
plain text (fixed-size units).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tree_sitter import Language, Parser, Query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LanguageSpec:
    name: str
    module: str
    function: str = "language"
    extensions: tuple[str, ...] = ()
    tags_from: tuple[str, ...] = ()  # modules whose TAGS_QUERY apply; "file:" reads queries/tags.scm


SPECS = {
    "python": LanguageSpec("python", "tree_sitter_python", extensions=(".py", ".pyi", ".pyw"), tags_from=("tree_sitter_python",)),
    "javascript": LanguageSpec("javascript", "tree_sitter_javascript", extensions=(".js", ".mjs", ".cjs", ".jsx"),
                               tags_from=("tree_sitter_javascript",)),
    "typescript": LanguageSpec("typescript", "tree_sitter_typescript", "language_typescript", (".ts", ".mts", ".cts"),
                               ("tree_sitter_javascript", "file:tree_sitter_typescript")),
    "typescriptreact": LanguageSpec("typescriptreact", "tree_sitter_typescript", "language_tsx", (".tsx",),
                                    ("tree_sitter_javascript", "file:tree_sitter_typescript")),
    "go": LanguageSpec("go", "tree_sitter_go", extensions=(".go",), tags_from=("tree_sitter_go",)),
    "rust": LanguageSpec("rust", "tree_sitter_rust", extensions=(".rs",), tags_from=("tree_sitter_rust",)),
    "java": LanguageSpec("java", "tree_sitter_java", extensions=(".java",), tags_from=("tree_sitter_java",)),
    "c": LanguageSpec("c", "tree_sitter_c", extensions=(".c", ".h"), tags_from=("tree_sitter_c",)),
    "cpp": LanguageSpec("cpp", "tree_sitter_cpp", extensions=(".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".c++", ".h++"),
                        tags_from=("tree_sitter_cpp",)),
}

# LSP language identifiers that name the same grammar
ALIASES = {"py": "python", "js": "javascript", "javascriptreact": "javascript", "ts": "typescript", "tsx": "typescriptreact",
           "c++": "cpp", "golang": "go", "rs": "rust"}

EXTENSION_TO_LANGUAGE = {ext: spec.name for spec in SPECS.values() for ext in spec.extensions}


@dataclass(frozen=True)
class Grammar:
    name: str
    language: Language
    tags: Query

    def parser(self) -> Parser:
        return Parser(self.language)


def _tags_source(source: str) -> str:
    if source.startswith("file:"):
        module = importlib.import_module(source[5:])
        path = Path(module.__file__).parent / "queries" / "tags.scm"
        return path.read_text(encoding="utf-8") if path.exists() else ""
    return getattr(importlib.import_module(source), "TAGS_QUERY", "")


@lru_cache(maxsize=None)
def grammar(name: str) -> Grammar | None:
    """The grammar for a language name or alias, or None for plain text."""
    name = ALIASES.get(name, name)
    spec = SPECS.get(name)
    if spec is None:
        return None
    try:
        module = importlib.import_module(spec.module)
        language = Language(getattr(module, spec.function)())
        tags = Query(language, "\n".join(_tags_source(s) for s in spec.tags_from))
    except Exception as err:  # a missing or broken wheel degrades to plain text
        log.warning("grammar for %s unavailable (%s); treating its files as plain text", name, err)
        return None
    return Grammar(name, language, tags)


def language_for_path(path: str | Path) -> str | None:
    return EXTENSION_TO_LANGUAGE.get(Path(path).suffix.lower())


def language_for_document(language_id: str | None, uri_or_path: str) -> str | None:
    """The grammar name from an LSP languageId, falling back to the file extension."""
    if language_id:
        name = ALIASES.get(language_id, language_id)
        if name in SPECS:
            return name
    return language_for_path(uri_or_path)
