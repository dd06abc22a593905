"""Where does the needed information lie?  Completion, perplexity and a keystroke replay split by
that, on held-out packages, for HiRoPE, truncation and HiRoPE with a prior against far keys.

Corpora: the held-out Python packages of ``research/sources.json`` (``held_out.python``), found
where they are installed.  ``tune`` (transformers) is where settings may be chosen, ``report``
(networkx) is where figures are reported; neither is in the default model's training data.  A
corpus is a package directory, and that directory is the workspace (a ``WorkspaceIndex`` over it),
so cross-file context in the prompt is real.

Cases (deterministic by seed), in files of the corpus, with the cursor at least ``train_length``
tokens into the file (so every case has text beyond the trained window):

- ``next-line``: the cursor after the indentation of a line (as an editor leaves it after Enter),
  the document cut there; the target is the rest of that line.
- ``fim``: a random span of 1-3 lines inside a function body removed, the cursor on the empty
  indented line left behind, the rest of the file after it as suffix; the target is the span.

Every case is classified by the identifiers of its target (length >= 3, strings and comments
removed, keywords, builtins, ``self``/``cls`` left out):

- ``near``: each occurs in the last ``train_length`` tokens before the cursor (for ``fim`` also:
  in the first ``train_length`` tokens after the span), or the target has none;
- ``far_file``: some occurs in the same file only beyond that (and none is of the kind below);
- ``other_file``: some occurs nowhere in the same file outside the target, but is defined at the top
  level (``def``, ``class``, an assignment at column 0) of another file of the package;
- ``unseen``: some occurs nowhere at all: not sampled.

A name the target binds (a ``def``/``class`` name, a parameter, an assignment or loop target) that
occurs nowhere else in the file is left out of the test: it is a choice the target makes, not
information it needs (else every ``def test_x(self):`` whose name some other file also defines would
count as ``other_file``).

Each split is sampled equally, at most a few cases per file per split so that many files count.

Methods, on the same cases, with the prompt the server builds (``PromptBuilder`` over the
workspace index, ``CompletionService`` for the stop rules and the clean-up):
``hirope`` (the prompt budget, hierarchical positions, no far bias), ``truncate`` (budget = the
trained length less ``TRUNCATE_MARGIN``, plain positions: what shipping tools do) and
``hirope+b`` / ``hirope+log:b`` / ``hirope+distance:b`` (HiRoPE with ``far_bias=b``, in that mode).

Perplexity: windows of 1x..32x the trained length (``evaluate.make_windows``), NLL of the last
``train_length`` tokens, over all of them and over the *far-copy* tokens apart (a token whose
bigram occurs earlier in the window, but only more than ``train_length`` tokens back).

Keystroke replay: a function of a held-out file typed character by character into a ``Document``
(as an editor sends changes), a suggestion asked for at word boundaries or every ``debounce``
characters (KV reuse on), accepted whole when the text to come starts with it, else counted as a
wrong suggestion shown.  Type-along (the server showing a suggestion's rest while the user types
it) is not modelled: it never turns a wrong suggestion into a right one.

Running: ``register_cli(subparsers)`` adds ``far`` (for ``hirope-lsp eval far``), ``run_cli(args)`` runs
it; until the CLI wires it, ``python -m hirope_lsp.research.far_eval [--quick] [options]``.  The full
run (both corpora, 300 cases per task and split, budgets 1,024 and 4,096, 1x-32x perplexity, four
replayed functions) takes hours on one CPU core (``--device cuda`` on a GPU); ``--quick`` (8 cases
per split on networkx, budget 1,024, 1x/4x perplexity, one 3-line replay) about a minute and a half.
Output: one JSON (every table, the settings, the model, the seed, the package versions) and a PNG.
"""

from __future__ import annotations

import argparse
import ast
import functools
import bisect
import builtins
import importlib.metadata
import importlib.util
import json
import keyword
import logging
import math
import random
import re
import statistics
import textwrap
import time
import zlib
from array import array
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..model.copying import CopySettings, parse_copies

log = logging.getLogger(__name__)

SPLITS = ("near", "far_file", "other_file")
TASKS = ("next-line", "fim")
ROLES = ("tune", "report")
DEFAULT_BUDGETS = (1024, 4096)
DEFAULT_BIASES = ("2",)
DEFAULT_LENGTHS_X = (1, 4, 16, 32)
TRUNCATE = "truncate"  # the baseline, not a position method: plain RoPE on a prompt cut to the trained length
TRUNCATE_MARGIN = 8  # as evaluate.eval_completion: the prompt and the first generated tokens fit the trained range
MAX_FILE_BYTES = 1024 * 1024
MIN_TARGET_CHARS = 8
MAX_NEW_TOKENS = {"next-line": 48, "fim": 64}
DEFAULT_OUT = Path("runs/far-eval")

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STRINGS_AND_COMMENTS = re.compile(r'("""|\'\'\')[\s\S]*?(?:\1|$)|"(?:\\.|[^"\\\n])*"?|\'(?:\\.|[^\'\\\n])*\'?|#[^\n]*')
IGNORED_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | {"self", "cls"}
TOP_LEVEL_DEFINITION = re.compile(
    r"^(?:async[ \t]+def|def|class)[ \t]+([A-Za-z_]\w*)|^([A-Za-z_]\w*)[ \t]*(?::[^=\n]*)?=(?!=)", re.MULTILINE)
WORD_CHAR = re.compile(r"[A-Za-z0-9_]")


# ---- corpora ----


def held_out_packages(sources: dict | None = None) -> dict[str, list[str]]:
    """``{"tune": [...], "report": [...]}``: the held-out Python packages of sources.json."""
    if sources is None:
        from .corpus import load_sources

        sources = load_sources()
    python = sources["held_out"]["python"]
    return {role: list(python.get(role, [])) for role in ROLES}


def package_dir(name: str) -> Path:
    """Where an installed package lives (its directory), without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise LookupError(f"held-out package {name!r} is not installed; install it to evaluate on it")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    return Path(spec.origin).resolve().parent


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Corpus:
    role: str  # tune or report
    package: str
    root: Path
    files: list[Path]

    @property
    def name(self) -> str:
        return self.package


def corpus_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and "__pycache__" not in p.parts and p.stat().st_size <= MAX_FILE_BYTES)


def load_corpora(role: str = "both", sources: dict | None = None) -> list[Corpus]:
    packages = held_out_packages(sources)
    roles = ROLES if role == "both" else (role,)
    out = []
    for r in roles:
        for name in packages[r]:
            root = package_dir(name)
            out.append(Corpus(r, name, root, corpus_files(root)))
    return out


def read_file(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data[:8192]:
        return None
    return data.decode("utf-8", "replace")


# ---- identifiers and where they occur ----


def target_identifiers(target: str) -> list[str]:
    """The names a target needs: identifiers of 3+ characters outside strings and comments,
    keywords, builtins, dunders, ``self`` and ``cls`` left out; sorted, unique."""
    code = STRINGS_AND_COMMENTS.sub(" ", target)
    return sorted({w for w in IDENTIFIER.findall(code)
                   if len(w) >= 3 and w not in IGNORED_NAMES and not (w.startswith("__") and w.endswith("__"))})


def introduced_names(code: str) -> set[str]:
    """Names the code binds (def/class names, parameters, assignment and loop targets, ``as`` names,
    attributes assigned): what a target may introduce rather than use.  Empty when it does not parse
    on its own (an ``else:``, half a call)."""
    code = textwrap.dedent(code)
    tree = None
    for attempt in (code, code + "\n    pass", code + "\n        pass"):
        try:
            tree = ast.parse(attempt)
            break
        except (SyntaxError, ValueError):
            continue
    if tree is None:
        return set()
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            out.add(node.name)
    return out


def top_level_names(text: str) -> set[str]:
    """Names defined at the top level of a Python file: ``def``, ``class``, assignments at column 0."""
    return {a or b for a, b in TOP_LEVEL_DEFINITION.findall(text)}


def definition_map(files: list[Path], root: Path) -> dict[str, set[str]]:
    """Top-level name -> the files (relative to ``root``) that define it."""
    out: dict[str, set[str]] = {}
    for path in files:
        text = read_file(path)
        if text is None:
            continue
        rel = path.relative_to(root).as_posix()
        for name in top_level_names(text):
            out.setdefault(name, set()).add(rel)
    return out


class Occurrences:
    """Where each identifier of a text occurs (char offsets), for range queries."""

    def __init__(self, text: str):
        self.at: dict[str, list[int]] = {}
        for m in IDENTIFIER.finditer(text):
            self.at.setdefault(m.group(0), []).append(m.start())

    def within(self, word: str, lo: int, hi: int) -> bool:
        offsets = self.at.get(word)
        if not offsets or lo >= hi:
            return False
        k = bisect.bisect_left(offsets, lo)
        return k < len(offsets) and offsets[k] < hi


def classify(names: list[str], occ: Occurrences, near: list[tuple[int, int]], far: list[tuple[int, int]],
             defined_elsewhere: Callable[[str], bool], introduced: set[str] = frozenset()) -> tuple[str, list[str]]:
    """(split, the names that decided it) for a target's ``names``: char ranges of the file that count
    as near and as far (the target's own text in neither).  A name the target ``introduced`` (binds)
    that occurs nowhere else in the file is a choice the target makes, not information it needs: left out."""
    far_names, other_names, unseen = [], [], []
    for w in names:
        if any(occ.within(w, a, b) for a, b in near):
            continue
        if any(occ.within(w, a, b) for a, b in far):
            far_names.append(w)
        elif w in introduced:
            continue
        elif defined_elsewhere(w):
            other_names.append(w)
        else:
            unseen.append(w)
    if unseen:
        return "unseen", unseen
    if other_names:
        return "other_file", other_names
    if far_names:
        return "far_file", far_names
    return "near", []


# ---- cases ----


@dataclass
class Case:
    task: str  # next-line or fim
    split: str  # near, far_file, other_file (unseen: not sampled)
    path: str  # absolute path of the file
    rel: str  # relative to the corpus root
    line: int  # 0-based line of the cursor in the original file
    cursor: int  # char offset of the cursor in the original file (after the line's indentation)
    end: int  # char offset where the target ends in the original file
    resume: int  # fim: char offset where the suffix resumes (the line after the span); next-line: = end
    target: str
    names: list[str] = field(default_factory=list)  # the identifiers that decided the split
    tokens_before: int = 0
    group: int = 0

    def document_text(self, text: str) -> str:
        """The document the editor holds: cut at the cursor (next-line), or with the span removed and
        the cursor on the empty indented line it left (fim)."""
        if self.task == "next-line":
            return text[: self.cursor]
        return text[: self.cursor] + "\n" + text[self.resume :]


def _docstring_lines(tree: ast.AST) -> set[int]:
    """0-based lines of string statements (docstrings, bare strings)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.update(range(node.lineno - 1, (node.end_lineno or node.lineno)))
    return lines


def _function_bodies(tree: ast.AST) -> list[tuple[int, int]]:
    """0-based (first, last) lines of function bodies, their docstrings left out."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            if body:
                out.append((body[0].lineno - 1, (node.end_lineno or body[-1].lineno) - 1))
    return out


def file_cases(path: Path, text: str, token_starts: list[int], train_length: int,
               defined_elsewhere: Callable[[str], bool], rng: random.Random, root: Path | None = None,
               tasks=TASKS, min_prefix_tokens: int | None = None, fim_per_function: int = 3) -> list[Case]:
    """Every candidate case of one file, classified (``unseen`` ones included); ``token_starts``: the
    char offset where each token of the file starts (the model's tokenizer)."""
    min_prefix = train_length if min_prefix_tokens is None else min_prefix_tokens
    lines = text.split("\n")
    line_start = [0]
    for line in lines:
        line_start.append(line_start[-1] + len(line) + 1)
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        tree = None
    skip = _docstring_lines(tree) if tree is not None else set()
    occ = Occurrences(text)
    rel = path.relative_to(root).as_posix() if root is not None else path.name
    n_tokens = len(token_starts)

    def char_at_token(k: int) -> int:
        return token_starts[k] if 0 <= k < n_tokens else len(text)

    def make(task: str, n: int, last: int) -> Case | None:
        """A case whose target runs from line ``n`` (after its indentation) to the end of line ``last``."""
        raw = lines[n]
        cursor = line_start[n] + len(raw) - len(raw.lstrip())
        end = line_start[last] + len(lines[last].rstrip())
        target = text[cursor:end]
        if len(target.strip()) < MIN_TARGET_CHARS:
            return None
        tok_at = bisect.bisect_left(token_starts, cursor)
        if tok_at < min_prefix:
            return None
        near_from = char_at_token(tok_at - train_length) if tok_at >= train_length else 0
        near = [(near_from, cursor)]
        far = [(0, near_from)]
        resume = end
        if task == "fim":
            resume = min(len(text), line_start[last + 1]) if last + 1 < len(lines) else len(text)
            tok_after = bisect.bisect_left(token_starts, resume)
            near_to = char_at_token(tok_after + train_length)
            near.append((resume, near_to))
            far.append((near_to, len(text)))
        introduced = introduced_names(text[line_start[n] : end])
        split, names = classify(target_identifiers(target), occ, near, far, defined_elsewhere, introduced)
        return Case(task, split, str(path), rel, n, cursor, end, resume, target, names, tok_at)

    out: list[Case] = []
    if "next-line" in tasks:
        for n, raw in enumerate(lines):
            stripped = raw.strip()
            if n in skip or not stripped or stripped.startswith(("#", '"', "'")):
                continue
            case = make("next-line", n, n)
            if case is not None:
                out.append(case)
    if "fim" in tasks and tree is not None:
        for first, last in _function_bodies(tree):
            spans = set()
            for _ in range(fim_per_function):
                n = rng.randint(first, last)
                end_line = min(last, n + rng.randint(1, 3) - 1)
                if (n, end_line) in spans:
                    continue
                spans.add((n, end_line))
                span = lines[n : end_line + 1]
                if not span[0].strip() or any(i in skip for i in range(n, end_line + 1)) \
                        or span[0].strip().startswith("#"):
                    continue
                case = make("fim", n, end_line)
                if case is not None:
                    out.append(case)
    return out


def _group(rel: str, seed: int, groups: int) -> int:
    return zlib.crc32(f"{seed}:{rel}".encode()) % max(1, groups)


def sample_cases(corpus: Corpus, tokenizer, train_length: int, per_split: int, seed: int = 0, tasks=TASKS,
                 groups: int = 5, defs: dict[str, set[str]] | None = None, per_file: int | None = None,
                 min_prefix_tokens: int | None = None) -> tuple[list[Case], dict]:
    """``per_split`` cases for each (task, split), from files in an order fixed by ``seed``, at most
    ``per_file`` of a (task, split) from one file.  Returns the cases and counts of what was seen."""
    rng = random.Random(seed)
    defs = definition_map(corpus.files, corpus.root) if defs is None else defs
    per_file = per_file or max(2, math.ceil(per_split / 25))
    files = list(corpus.files)
    rng.shuffle(files)
    need = {(t, s): per_split for t in tasks for s in SPLITS}
    chosen: dict[tuple[str, str], list[Case]] = {key: [] for key in need}
    seen = {f"{t}/{s}": 0 for t in tasks for s in SPLITS + ("unseen",)}
    scanned = 0
    for path in files:
        if all(len(chosen[k]) >= need[k] for k in need):
            break
        text = read_file(path)
        if text is None:
            continue
        scanned += 1
        starts = [s for s, _ in _encode(tokenizer, text)[1]]
        if len(starts) <= (train_length if min_prefix_tokens is None else min_prefix_tokens):
            continue
        rel = path.relative_to(corpus.root).as_posix()
        elsewhere = lambda w, rel=rel: bool(defs.get(w, set()) - {rel})  # noqa: E731
        found = file_cases(path, text, starts, train_length, elsewhere, random.Random(f"{seed}:{rel}"),
                           corpus.root, tasks, min_prefix_tokens)
        buckets: dict[tuple[str, str], list[Case]] = {}
        for case in found:
            seen[f"{case.task}/{case.split}"] += 1
            buckets.setdefault((case.task, case.split), []).append(case)
        for key, cands in sorted(buckets.items()):
            if key not in need or len(chosen[key]) >= need[key]:
                continue
            rng.shuffle(cands)
            for case in cands[: min(per_file, need[key] - len(chosen[key]))]:
                case.group = _group(rel, seed, groups)
                chosen[key].append(case)
    cases = [c for key in sorted(chosen) for c in chosen[key]]
    short = {f"{t}/{s}": len(v) for (t, s), v in chosen.items() if len(v) < per_split}
    if short:
        log.warning("%s: fewer cases than asked (%d) for %s", corpus.name, per_split, short)
    return cases, {"files_scanned": scanned, "candidates": seen, "per_file": per_file}


def _encode(tokenizer, text: str):
    fast = getattr(tokenizer, "_tokenizer", None)
    if fast is not None:
        enc = fast.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


# ---- methods ----


@dataclass(frozen=True)
class MethodSpec:
    name: str
    method: str  # a position method's name, or TRUNCATE
    far_bias: float | tuple[float, ...] | None = 0.0  # None: the model card's; a tuple: one per layer
    far_bias_mode: str = "constant"
    prompt: str = "raw"  # a prompt variant: raw, or PROMPT_VARIANTS joined by "+" ("outline+similar")
    copy: CopySettings | None = field(default_factory=CopySettings)  # the copy model (off); None: the card's


def bias_text(value) -> str:
    """``2`` -> ``"2"``; a per-layer tuple ``(0, 0.75, 1.5)`` -> ``"0/0.75/1.5"``."""
    return "/".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:g}"


def parse_biases(text: str | list | tuple | None) -> list[tuple[float | tuple[float, ...], str]]:
    """``"2,4,log:1,distance:1"`` -> [(2.0, "constant"), (4.0, "constant"), (1.0, "log"), (1.0, "distance")];
    empty or ``none``: [].  ``log:0/0.75/1.5`` is one value per layer (a tuple)."""
    if text is None:
        return []
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out = []
    for item in items:
        if isinstance(item, (int, float)):
            out.append((float(item), "constant"))
            continue
        item = str(item).strip()
        if not item or item.lower() == "none":
            continue
        mode, _, value = item.rpartition(":")
        mode = mode or "constant"
        if mode not in ("constant", "log", "distance"):
            raise ValueError(f"far bias {item!r}: the mode is constant, log or distance (log:1.5)")
        numbers = [float(v) for v in value.split("/")]
        if any(not math.isfinite(n) or n < 0 for n in numbers):
            raise ValueError(f"far bias {item!r} must be a finite number >= 0 (or one per layer, 0/1/2)")
        out.append((numbers[0] if len(numbers) == 1 else tuple(numbers), mode))
    return out


# what a prompt variant changes in the server's ContextSettings
PROMPT_VARIANTS = {"outline": {"far_prompt": "outline"}, "similar": {"similar_code": True},
                   "document": {"copy_document": True}, "prompt-copy": {"copy_document": False}}


def prompt_context(variant: str) -> dict:
    """ContextSettings overrides of a variant such as ``outline+similar``; ``raw``: none."""
    out = {}
    for part in variant.split("+"):
        if part != "raw" and part not in PROMPT_VARIANTS:
            raise ValueError(f"unknown prompt variant {part!r}; choose raw or {', '.join(PROMPT_VARIANTS)} (joined by +)")
        out.update(PROMPT_VARIANTS.get(part, {}))
    return out


def method_specs(biases: list[tuple], methods=("hirope",), prompts=("raw",), copies=()) -> list[MethodSpec]:
    """Each method plain and with each far bias, and truncation; each of those with each prompt variant
    (``+outline`` in the name), and each of those also with each copy model mixed in (``+copy:0.8/1``; one
    that is off, ``0/1``, is left out: every row without one already runs it off)."""
    from ..model.methods import position_method
    from .evaluate import copy_label

    base = []
    for method in methods:
        base.append(MethodSpec(method, method))
        if position_method(method).windowed:
            for value, mode in biases:
                label = f"{method}+{bias_text(value)}" if mode == "constant" else f"{method}+{mode}:{bias_text(value)}"
                base.append(MethodSpec(label, method, value, mode))
    base.insert(1, MethodSpec(TRUNCATE, TRUNCATE))
    prompted = [spec if variant == "raw" else MethodSpec(f"{spec.name}+{variant}", spec.method, spec.far_bias,
                                                          spec.far_bias_mode, variant)
                for variant in prompts for spec in base]
    mixed = [c for c in copies if c.enabled]
    return [variant for spec in prompted
            for variant in [spec, *(replace(spec, name=copy_label(spec.name, c), copy=c) for c in mixed)]]


def select_rows(specs: list[MethodSpec], rows) -> list[MethodSpec]:
    """The specs named in ``rows`` (all when empty), in their usual order; an unknown name is an error."""
    if not rows:
        return specs
    names = [spec.name for spec in specs]
    unknown = [r for r in rows if r not in names]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; these settings give {', '.join(names)}")
    return [spec for spec in specs if spec.name in rows]


def rope_config(spec: MethodSpec, train_length: int, length: int, base=None):
    """``spec``'s method and prior on ``base``'s other settings (default: the shipped ones)."""
    from dataclasses import replace

    from .evaluate import method_config
    from ..model.rope import RopeMethodConfig

    base = replace(base or RopeMethodConfig(), far_bias=spec.far_bias, far_bias_mode=spec.far_bias_mode)
    return method_config(spec.method, train_length, length, base)


def corpus_index(root: Path):
    """A ``WorkspaceIndex`` over a corpus that does not change while it is evaluated (see CorpusIndex)."""
    from ..workspace.index import WorkspaceIndex

    class CorpusIndex(WorkspaceIndex):
        """The server's index, with each file's text and folder looked up once: the server's index reads
        and resolves them again for every definition on every prompt, which dominates prompt building in a
        package as big as transformers.  The prompts are the same; open documents still win."""

        def __init__(self, folders):
            self._texts: dict[Path, str | None] = {}
            self._folders: dict[str, Path | None] = {}
            super().__init__(folders)

        def add_folder(self, folder):
            self._folders = {}
            super().add_folder(folder)

        def folder_of(self, path):
            key = str(path)
            if key not in self._folders:
                self._folders[key] = super().folder_of(path)
            return self._folders[key]

        def text_of(self, path):
            path = Path(path)
            with self._lock:
                document = self.documents.get(path)
            if document is not None:
                return document.text
            if path not in self._texts:
                self._texts[path] = super().text_of(path)
            return self._texts[path]

    return CorpusIndex([root])


class BlockCache:
    """Token ids of cross-file definition blocks, shared by every PromptBuilder of a run.  The builder
    encodes every candidate definition of every name near the cursor on each prompt (thousands for
    ``forward`` in transformers) and keeps 1,024 in its own cache; a larger shared one (ids packed in
    arrays) gives the same prompts many times faster.  Only speed changes: without the builder's
    private ``_encode_block`` the builder is left as it is."""

    def __init__(self, maxsize: int = 65536):
        self.maxsize = maxsize
        self._encode = None
        self._cached = None

    def install(self, builder) -> None:
        if not (hasattr(builder, "_encode_block") and hasattr(builder, "_encode")):
            return
        if self._cached is None:
            encode = builder._encode
            self._cached = functools.lru_cache(maxsize=self.maxsize)(lambda block: array("I", encode(block)[0]))
        builder._encode_block = self._cached


def budget_of(spec: MethodSpec, budget: int, train_length: int) -> int:
    return train_length - TRUNCATE_MARGIN if spec.method == TRUNCATE else budget


@functools.cache
def inference_worker():
    """The one thread every model call of an evaluation runs on (the sessions' worker and the perplexity):
    torch on two threads that each ran parallel ops is about twice as slow on a small machine."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="hirope-eval")


class Completer:
    """The server's session for one method and budget, driven as an editor drives it: a case's document
    is opened (or its text replaced), completed at the cursor, and closed by ``reset``; KV reuse on, no
    work ahead, no typing along.  ``truncate`` is plain RoPE on a budget cut to the trained length."""

    def __init__(self, loaded, spec: MethodSpec, budget: int, index, max_new_tokens: int = 64,
                 blocks: BlockCache | None = None, context: dict | None = None, base=None, gate: bool = False):
        import asyncio

        from ..config import GATE_OFF, Settings
        from ..model.patch import trained_length
        from ..session import Session

        self.train_length = trained_length(loaded[0].config)
        self.spec = spec
        self.budget = budget_of(spec, budget, self.train_length)
        # the gate off: quality is measured on every suggestion (``calibrate confidence`` measures the gate);
        # on: the card's gate, what a user is shown (the replay)
        settings = Settings(max_new_tokens=max_new_tokens, watch_files=False, type_along=False, warm_ahead=False,
                            min_confidence=None if gate else GATE_OFF)
        settings.engine.rope = rope_config(spec, self.train_length, max(self.budget, self.train_length), base)
        settings.engine.measure_speed = False
        if spec.copy is not None:
            settings.engine.copy_weight, settings.engine.copy_min_order = spec.copy.weight, spec.copy.min_order
        settings.context.budget_tokens = self.budget
        for name, value in {**prompt_context(spec.prompt), **(context or {})}.items():
            setattr(settings.context, name, value)
        self.loop = asyncio.new_event_loop()
        self.session = Session(settings, loaded=loaded, index=index, worker=inference_worker())
        self.loop.run_until_complete(self._load())
        if blocks is not None:
            blocks.install(self.session.service.builder)
        self.prompt_tokens: list[int] = []
        self.last = None  # the last Suggestion (its confidence and raw model text)

    async def _load(self) -> None:
        self.session.load_model()
        await self.session.ready_service()

    def complete(self, doc, line: int, character: int, multiline: str = "auto",
                 max_new_tokens: int | None = None) -> str:
        from ..hierarchy.document import Change

        options = {"multiline": multiline}
        if max_new_tokens is not None:
            options["maxNewTokens"] = max_new_tokens
        problems = self.session.apply(options)
        if problems:
            raise ValueError("; ".join(problems))
        opened = self.session.documents.get(doc.uri)
        if opened is None:
            self.session.open(doc.uri, doc.text, doc.version, doc.language, doc.encoding)
        elif opened.text != doc.text or opened.version != doc.version:
            self.session.change(doc.uri, [Change(doc.text)], doc.version)
        self.last = self.loop.run_until_complete(self.session.complete(doc.uri, line, character))
        if self.last is None:
            raise RuntimeError(f"the session dropped the request for {doc.uri}")
        self.prompt_tokens.append(self.last.prompt_tokens)
        return self.last.text

    def reset(self, uri: str) -> None:
        """The editor closes ``uri``: its cache slot and prompt memory go."""
        self.session.close(uri)

    def close(self) -> None:
        self.session.shutdown()
        engine = self.session.service.engine
        engine.pool.clear()
        engine.handle.detach()
        self.loop.close()


def normalize(text: str, task: str) -> str:
    if task == "next-line":
        return text.strip("\n").split("\n")[0].strip()
    return "\n".join(line.rstrip() for line in text.strip().split("\n"))


def spread(values_by_group: dict[int, list[float]]) -> dict:
    means = [sum(v) / len(v) for _, v in sorted(values_by_group.items()) if v]
    if not means:
        return {"groups": 0}
    return {"groups": len(means), "min": min(means), "max": max(means),
            "std": statistics.pstdev(means) if len(means) > 1 else 0.0, "per_group": means}


def score_rows(corpus: str, method: str, budget: int, task: str, scored: list[tuple[Case, str]],
               seconds: float, prompt_tokens: list[int]) -> list[dict]:
    from .evaluate import edit_similarity

    rows = []
    for split in SPLITS + ("all",):
        part = [(c, p) for c, p in scored if c.task == task and (split == "all" or c.split == split)]
        if not part:
            continue
        ems, by_group = [], {}
        for c, p in part:
            truth, pred = normalize(c.target, task), normalize(p, task)
            ems.append(float(pred == truth))
            by_group.setdefault(c.group, []).append(100 * edit_similarity(pred, truth))
        es = [v for vs in by_group.values() for v in vs]
        rows.append({"corpus": corpus, "method": method, "budget": budget, "task": task, "split": split,
                     "cases": len(part), "exact_match": sum(ems) / len(ems), "edit_similarity": sum(es) / len(es),
                     "spread": spread(by_group),
                     "seconds_per_case": seconds / max(1, len([c for c, _ in scored if c.task == task])),
                     "mean_prompt_tokens": sum(prompt_tokens) / max(1, len(prompt_tokens))})
    return rows


def evaluate_cases(cases: list[Case], corpus: Corpus, loaded, index, specs: list[MethodSpec], budgets: list[int],
                   tasks=TASKS, keep_predictions: bool = False,
                   blocks: BlockCache | None = None) -> tuple[list[dict], list[dict]]:
    from ..hierarchy.document import Document

    texts: dict[str, str] = {}
    rows, predictions = [], []
    for spec in specs:
        for budget in (budgets[:1] if spec.method == TRUNCATE else budgets):
            completer = Completer(loaded, spec, budget, index, max(MAX_NEW_TOKENS.values()), blocks)
            try:
                for task in tasks:
                    t0 = time.time()
                    completer.prompt_tokens = []
                    scored = []
                    for k, case in enumerate(c for c in cases if c.task == task):
                        if case.path not in texts:
                            texts[case.path] = read_file(Path(case.path)) or ""
                        uri = Path(case.path).as_uri() + f"#{task}-{k}"
                        doc = Document(uri, case.document_text(texts[case.path]), language_id="python")
                        line, character = doc.position_at(case.cursor)
                        completer.reset(uri)
                        text = completer.complete(doc, line, character, "never" if task == "next-line" else "auto",
                                                  MAX_NEW_TOKENS[task])
                        completer.reset(uri)
                        scored.append((case, text))
                        if keep_predictions:
                            predictions.append({"method": spec.name, "budget": completer.budget, "task": task,
                                                "split": case.split, "file": case.rel, "line": case.line,
                                                "target": case.target, "predicted": text})
                    rows += score_rows(corpus.name, spec.name, completer.budget, task, scored, time.time() - t0,
                                       completer.prompt_tokens)
                    log.info("%s %s@%d %s: %s", corpus.name, spec.name, completer.budget, task,
                             " ".join(f"{r['split']} ES {r['edit_similarity']:.1f}" for r in rows[-4:]))
            finally:
                completer.close()
    return rows, predictions


# ---- perplexity, far-copy tokens apart ----


def far_copy_mask(ids: list[int], targets_from: int, distance: int) -> list[bool]:
    """For tokens ``targets_from..T-1``: True where the bigram (previous token, token) occurred earlier in
    the window, but only more than ``distance`` tokens back."""
    last: dict[tuple[int, int], int] = {}
    out = []
    for t in range(1, len(ids)):
        bigram = (ids[t - 1], ids[t])
        if t >= targets_from:
            seen = last.get(bigram)
            out.append(seen is not None and t - seen > distance)
        last[bigram] = t
    return out


def perplexity_rows(corpus: Corpus, loaded, specs: list[MethodSpec], lengths_x, windows: int, seed: int,
                    far_distance: int | None = None, nested: bool = False) -> list[dict]:
    """``nested``: every length's windows end on the same text (``evaluate.windows_by_length``)."""
    import torch

    from .evaluate import copied_nll, positions_for, token_nll, tokenize_files, truncated_nll, windows_by_length
    from ..model.copying import CopySettings
    from ..model.loading import recommended_copy
    from ..model.patch import attach, trained_length

    lm, tokenizer, fim = loaded
    L = trained_length(lm.config)
    card_copy = recommended_copy(lm, "python") or CopySettings()  # the far evaluation reads Python packages
    far_distance = far_distance or L
    longest = int(max(lengths_x) * L)
    rng = random.Random(seed)
    files = list(corpus.files)
    rng.shuffle(files)
    chosen, total = [], 0
    need = 2 * windows * longest
    for path in files:  # enough text for the windows, not the whole package
        if total >= need:
            break
        tokenized = tokenize_files(tokenizer, [path])
        if tokenized:
            chosen += tokenized
            total += len(tokenized[0].ids)
    chosen.sort(key=lambda f: str(f.path))  # make_windows reads repositories in path order
    sep = tokenizer.convert_tokens_to_ids(fim.file_separator) if fim.file_separator else tokenizer.eos_token_id
    rows = []
    by_length = windows_by_length(chosen, [int(x * L) for x in lengths_x], windows, seed, sep, nested)
    for x in lengths_x:
        length = int(x * L)
        wins = by_length[length]
        if not wins:
            log.warning("%s: no window of %d tokens", corpus.name, length)
            continue
        for spec in specs:
            t0 = time.time()
            all_nll, far_nll, rest_nll, per_window = [], [], [], []
            copy = card_copy if spec.copy is None else spec.copy
            for _, _, ids, keys in wins:
                ids_t = torch.tensor([ids], device=lm.device)
                # the copy model reads what the method reads: truncation its last window, the others all
                read, span = (ids[-2 * L :], L) if spec.method == TRUNCATE else (ids, None)
                if spec.method == TRUNCATE:
                    nll = truncated_nll(lm, ids_t[:, -2 * L :], L)
                else:
                    handle = attach(lm, rope_config(spec, L, length))
                    try:
                        nll = token_nll(handle, ids_t, positions_for(spec.method, keys, length))
                    finally:
                        handle.detach()
                if copy.enabled:
                    nll = copied_nll(read, nll.cpu(), copy, span)
                last = nll[-min(len(nll), L):].cpu().tolist()
                mask = far_copy_mask(ids, len(ids) - len(last), far_distance)
                all_nll += last
                far_nll += [v for v, m in zip(last, mask) if m]
                rest_nll += [v for v, m in zip(last, mask) if not m]
                per_window.append(math.exp(sum(last) / len(last)))
            ppl = lambda v: math.exp(sum(v) / len(v)) if v else float("nan")  # noqa: E731
            rows.append({"corpus": corpus.name, "method": spec.name, "length": length, "x": x, "windows": len(wins),
                         "tokens": len(all_nll), "ppl": ppl(all_nll), "far_copy_tokens": len(far_nll),
                         "ppl_far_copy": ppl(far_nll), "ppl_rest": ppl(rest_nll),
                         "spread": {"min": min(per_window), "max": max(per_window),
                                    "std": statistics.pstdev(per_window) if len(per_window) > 1 else 0.0},
                         "seconds": time.time() - t0})
            log.info("%s ppl %-12s %5d: all %.2f far-copy %.2f (%d)", corpus.name, spec.name, length, rows[-1]["ppl"],
                     rows[-1]["ppl_far_copy"], len(far_nll))
    return rows


# ---- keystroke replay ----


@dataclass
class ReplayStats:
    chars: int = 0  # characters of the typed sections
    typed: int = 0
    accepted: int = 0  # characters inserted by accepted suggestions
    shown: int = 0  # suggestions shown (non-empty)
    hidden: int = 0  # suggestions the confidence gate hid (never with the gate off)
    accepted_suggestions: int = 0
    wrong: int = 0  # shown, and the text to come does not start with them
    requests: int = 0
    seconds: float = 0.0

    def add(self, other: ReplayStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict:
        row = asdict(self)
        row["share_not_typed"] = self.accepted / self.chars if self.chars else 0.0
        row["wrong_per_100_chars"] = 100 * self.wrong / self.chars if self.chars else 0.0
        row["ms_per_request"] = 1000 * self.seconds / self.requests if self.requests else 0.0
        return row


def replay(uri: str, before: str, section: str, after: str,
           suggest: Callable[[object, int, int], str], debounce: int = 4,
           was_hidden: Callable[[], bool] = lambda: False) -> ReplayStats:
    """Type ``section`` after ``before`` character by character into a Document, asking ``suggest(doc, line,
    character)`` for a suggestion after a word boundary (the last typed character is not a letter, digit
    or underscore), after every ``debounce`` characters typed since the last request, and again right
    after an accepted suggestion.  A suggestion is accepted whole when the file's true text from the
    cursor (``section`` then ``after``) starts with it; else it counts as a wrong suggestion shown.
    ``was_hidden()``, asked after an empty one, says whether the confidence gate hid it."""
    from ..hierarchy.document import Change, Document

    doc = Document(uri, before, version=0, language_id="python")
    stats = ReplayStats(chars=len(section))
    to_come = section + after
    i, since, ask = 0, 0, True
    version = 0

    def insert(text: str) -> None:
        nonlocal version
        line, character = doc.position_at(len(doc.text))
        version += 1
        doc.apply_changes([Change(text, ((line, character), (line, character)))], version)

    while i < len(section):
        if ask or since >= debounce:
            since, ask = 0, False
            line, character = doc.position_at(len(doc.text))
            t0 = time.perf_counter()
            text = suggest(doc, line, character) or ""
            stats.seconds += time.perf_counter() - t0
            stats.requests += 1
            if not text.strip():
                stats.hidden += was_hidden()
            else:
                stats.shown += 1
                if to_come.startswith(text, i):
                    take = min(len(text), len(section) - i)
                    stats.accepted += take
                    stats.accepted_suggestions += 1
                    insert(section[i : i + take])
                    i += take
                    ask = True
                    continue
                stats.wrong += 1
        ch = section[i]
        insert(ch)
        stats.typed += 1
        i += 1
        since += 1
        if not WORD_CHAR.match(ch):
            ask = True
    return stats


def replay_sections(corpus: Corpus, tokenizer, train_length: int, count: int, lines: int, seed: int,
                    min_prefix_tokens: int | None = None) -> list[tuple[Path, int, int, int]]:
    """(file, start char, end char, start line): ``count`` functions of distinct files, each typed from its
    ``def`` line for up to ``lines`` lines, starting at least ``min_prefix_tokens`` tokens into the file."""
    rng = random.Random(seed + 1)
    files = list(corpus.files)
    rng.shuffle(files)
    min_prefix = train_length if min_prefix_tokens is None else min_prefix_tokens
    out = []
    for path in files:
        if len(out) >= count:
            break
        text = read_file(path)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        starts = [s for s, _ in _encode(tokenizer, text)[1]]
        line_start = [0]
        for line in text.split("\n"):
            line_start.append(line_start[-1] + len(line) + 1)
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and not n.decorator_list and (n.end_lineno or n.lineno) - n.lineno >= 2]
        funcs = [n for n in funcs if bisect.bisect_left(starts, line_start[n.lineno - 1]) >= min_prefix]
        if not funcs:
            continue
        node = rng.choice(funcs)
        first = node.lineno - 1
        last = min((node.end_lineno or node.lineno) - 1, first + lines - 1)
        out.append((path, line_start[first], min(len(text), line_start[last + 1]), first))
    return out


def replay_rows(corpus: Corpus, loaded, index, specs: list[MethodSpec], budgets: list[int], sections,
                debounce: int, max_new_tokens: int, blocks: BlockCache | None = None, gate: bool = True) -> list[dict]:
    """Each row's sections typed through the server's session; ``gate``: the card's confidence gate decides
    what is shown, as for a user (off: every suggestion is shown)."""
    rows = []
    for spec in specs:
        for budget in (budgets[:1] if spec.method == TRUNCATE else budgets):
            completer = Completer(loaded, spec, budget, index, max_new_tokens, blocks, gate=gate)
            total = ReplayStats()
            try:
                for path, start, end, _ in sections:
                    text = read_file(path) or ""
                    uri = path.as_uri()
                    completer.reset(uri)

                    try:
                        total.add(replay(uri, text[:start], text[start:end], text[end:], completer.complete, debounce,
                                         lambda: completer.last.hidden_by_gate))
                    finally:
                        completer.reset(uri)
            finally:
                completer.close()
            row = {"corpus": corpus.name, "method": spec.name, "budget": completer.budget, "sections": len(sections),
                   "gate": gate}
            row.update(total.summary())
            rows.append(row)
            log.info("%s replay %s@%d: %.1f%% not typed, %.1f wrong / 100 chars, %d shown, %d hidden", corpus.name,
                     spec.name, completer.budget, 100 * row["share_not_typed"], row["wrong_per_100_chars"], row["shown"],
                     row["hidden"])
    return rows


# ---- the whole evaluation ----


@dataclass
class FarEvalSettings:
    corpus: str = "both"  # tune, report or both
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    biases: tuple = DEFAULT_BIASES  # "2", "log:1", ...
    methods: tuple[str, ...] = ("hirope",)  # position methods compared (with truncation always)
    prompts: tuple[str, ...] = ("raw",)  # prompt variants: raw, outline, similar, outline+similar
    copies: tuple[CopySettings, ...] = ()  # copy models: each method also with each mixed in
    rows: tuple[str, ...] = ()  # only these rows (method names as reported); empty: all
    cases: int = 300  # per (task, split)
    tasks: tuple[str, ...] = TASKS
    lengths_x: tuple[float, ...] = DEFAULT_LENGTHS_X
    windows: int = 6  # perplexity windows per length
    replay_sections: int = 4
    replay_lines: int = 12
    replay_max_new_tokens: int = 64  # the server's default
    debounce: int = 4
    replay_gate: bool = True  # the replay shows what the card's confidence gate shows, as the server does
    groups: int = 5
    seed: int = 0
    model: str | None = None
    device: str = "cpu"
    quick: bool = False
    keep_predictions: bool = False

    @classmethod
    def quick_settings(cls, **overrides) -> FarEvalSettings:
        base = dict(corpus="report", budgets=(1024,), biases=DEFAULT_BIASES, cases=8, lengths_x=(1, 4), windows=2,
                    replay_sections=1, replay_lines=3, replay_max_new_tokens=24, debounce=6, groups=5, quick=True)
        base.update(overrides)
        return cls(**base)


def run(settings: FarEvalSettings) -> dict:
    import torch

    from ..model.loading import load_model
    from ..model.patch import trained_length
    started = time.time()
    loaded = load_model(settings.model, device=settings.device, dtype="float32")
    lm, tokenizer, _ = loaded
    L = trained_length(lm.config)
    specs = select_rows(method_specs(parse_biases(list(settings.biases)), settings.methods, settings.prompts,
                                     settings.copies), settings.rows)
    corpora = load_corpora(settings.corpus)
    report = {"kind": "far-eval", "model": settings.model or "default", "train_length": L, "seed": settings.seed,
              "settings": {**asdict(settings), "truncate_budget": L - TRUNCATE_MARGIN,
                           "methods": [asdict(s) for s in specs], "far_copy_distance": L,
                           "max_new_tokens": MAX_NEW_TOKENS, "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
              "corpora": [], "completion": [], "perplexity": [], "replay": []}
    for corpus in corpora:
        t0 = time.time()
        index = corpus_index(corpus.root)
        indexed = index.scan()
        blocks = BlockCache()
        defs = definition_map(corpus.files, corpus.root)
        cases, counts = sample_cases(corpus, tokenizer, L, settings.cases, settings.seed, settings.tasks,
                                     settings.groups, defs)
        prepared = time.time() - t0
        rows, predictions = evaluate_cases(cases, corpus, loaded, index, specs, list(settings.budgets),
                                           settings.tasks, settings.keep_predictions, blocks)
        report["completion"] += rows
        raw_specs = [spec for spec in specs if spec.prompt == "raw"]  # perplexity reads raw windows
        report["perplexity"] += inference_worker().submit(perplexity_rows, corpus, loaded, raw_specs, settings.lengths_x,
                                                          settings.windows, settings.seed).result()
        sections = replay_sections(corpus, tokenizer, L, settings.replay_sections, settings.replay_lines,
                                   settings.seed)
        report["replay"] += replay_rows(corpus, loaded, index, specs, list(settings.budgets), sections,
                                        settings.debounce, settings.replay_max_new_tokens, blocks, settings.replay_gate)
        entry = {"role": corpus.role, "package": corpus.package, "version": package_version(corpus.package),
                 "root": str(corpus.root), "files": len(corpus.files), "indexed_files": indexed,
                 "cases": {f"{t}/{s}": sum(1 for c in cases if c.task == t and c.split == s)
                           for t in settings.tasks for s in SPLITS},
                 "sampling": counts, "replay_sections": [{"file": str(p.relative_to(corpus.root)), "line": ln,
                                                          "chars": e - s} for p, s, e, ln in sections],
                 "prepare_seconds": prepared, "seconds": time.time() - t0}
        if settings.keep_predictions:
            entry["predictions"] = predictions
        report["corpora"].append(entry)
    report["seconds"] = time.time() - started
    return report


# ---- output ----


def _finite(value):
    """NaN and infinities (a split with no token) as null: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=2, default=str, allow_nan=False))


def plot(report: dict, out: Path) -> None:
    """Per corpus: ES by split for each method and budget (next-line, fim), and perplexity by length,
    all tokens (solid) and far-copy tokens (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = [c["package"] for c in report["corpora"]] or sorted({r["corpus"] for r in report["completion"]})
    tasks = [t for t in TASKS if any(r["task"] == t for r in report["completion"])]
    cols = len(tasks) + 1
    fig, axes = plt.subplots(max(1, len(corpora)), cols, figsize=(5.2 * cols, 4.2 * max(1, len(corpora))),
                             squeeze=False)
    for row, corpus in enumerate(corpora):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            rows = [r for r in report["completion"] if r["corpus"] == corpus and r["task"] == task]
            series = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
            splits = [s for s in SPLITS + ("all",) if any(r["split"] == s for r in rows)]
            width = 0.8 / max(1, len(series))
            for k, (method, budget) in enumerate(series):
                cells = {r["split"]: r for r in rows if r["method"] == method and r["budget"] == budget}
                xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(splits))]
                ys = [cells[s]["edit_similarity"] if s in cells else 0 for s in splits]
                lo = [cells[s]["spread"].get("min", y) if s in cells else y for s, y in zip(splits, ys)]
                hi = [cells[s]["spread"].get("max", y) if s in cells else y for s, y in zip(splits, ys)]
                err_lo = [y - v for y, v in zip(ys, lo)]
                err_hi = [v - y for y, v in zip(ys, hi)]
                ax.bar(xs, ys, width, label=f"{method} @{budget}", yerr=[err_lo, err_hi], capsize=2)
            ax.set_xticks(range(len(splits)))
            ax.set_xticklabels(splits)
            ax.set_ylabel("edit similarity (min-max over groups)")
            ax.set_title(f"{corpus}: {task}")
            ax.legend(fontsize=7)
        ax = axes[row][cols - 1]
        rows = [r for r in report["perplexity"] if r["corpus"] == corpus]
        for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["length"])
            color = f"C{k}"
            ax.plot([r["length"] for r in mine], [r["ppl"] for r in mine], marker="o", color=color,
                    label=f"{method} all")
            ax.plot([r["length"] for r in mine], [r["ppl_far_copy"] for r in mine], marker="x", linestyle="--",
                    color=color, label=f"{method} far-copy")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"ppl of the last {report['train_length']} tokens")
        ax.set_title(f"{corpus}: perplexity")
        ax.legend(fontsize=7)
    fig.suptitle(f"far-context evaluation, {report['model']} (trained at {report['train_length']} tokens)"
                 + (" - quick" if report["settings"].get("quick") else ""))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def print_report(report: dict) -> None:
    print(f"far-context evaluation, model {report['model']}, trained at {report['train_length']} tokens, "
          f"seed {report['seed']}, {report['seconds']:.0f} s")
    for c in report["corpora"]:
        print(f"  {c['role']}: {c['package']} {c['version']} ({c['files']} files), cases {c['cases']}")
    print(f"{'corpus':<13}{'task':<10}{'method':<14}{'budget':>7}" + "".join(f"{s:>22}" for s in SPLITS + ("all",)))
    keyed: dict[tuple, dict] = {}
    for r in report["completion"]:
        keyed.setdefault((r["corpus"], r["task"], r["method"], r["budget"]), {})[r["split"]] = r
    for (corpus, task, method, budget), cells in keyed.items():
        line = f"{corpus:<13}{task:<10}{method:<14}{budget:>7}"
        for s in SPLITS + ("all",):
            r = cells.get(s)
            cell = "" if r is None else "EM %.2f ES %5.1f±%-4.1f" % (r["exact_match"], r["edit_similarity"],
                                                                     r["spread"].get("std", 0))
            line += f"{cell:>22}"
        print(line)
    print(f"{'corpus':<13}{'method':<14}{'length':>7}{'ppl':>9}{'far-copy':>10}{'(n)':>6}{'rest':>9}")
    for r in report["perplexity"]:
        print(f"{r['corpus']:<13}{r['method']:<14}{r['length']:>7}{r['ppl']:>9.2f}{r['ppl_far_copy']:>10.2f}"
              f"{r['far_copy_tokens']:>6}{r['ppl_rest']:>9.2f}")
    print(f"{'corpus':<13}{'method':<14}{'budget':>7}{'not typed':>11}{'wrong/100':>10}{'shown':>7}{'hidden':>7}"
          f"{'ms/req':>8}")
    for r in report["replay"]:
        print(f"{r['corpus']:<13}{r['method']:<14}{r['budget']:>7}{100 * r['share_not_typed']:>10.1f}%"
              f"{r['wrong_per_100_chars']:>10.1f}{r['shown']:>7}{r['hidden']:>7}{r['ms_per_request']:>8.0f}")


# ---- command line ----


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``far`` to ``eval``'s subparsers: ``hirope-lsp eval far [--quick] ...``."""
    p = subparsers.add_parser("far", help="completion, perplexity and keystroke replay split by where the needed "
                                          "information lies (near / same file far / other file), on held-out packages")
    p.add_argument("--quick", action="store_true",
                   help="smoke test (CI, about a minute on one core): 8 cases per split, one corpus (networkx, the "
                        "smaller, unless --corpus tune), the smallest budget, 2 windows at 1x and 4x, one short "
                        "replay section; a check that it runs, never figures to choose settings by")
    p.add_argument("--corpus", choices=("tune", "report", "both"), default="both",
                   help="held-out corpus: tune (settings are chosen here), report (figures come from here), or both")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="prompt budgets in tokens")
    p.add_argument("--biases", default=",".join(DEFAULT_BIASES),
                   help="far biases to compare as hirope+b: numbers (constant mode) or log:b; 'none' for none")
    p.add_argument("--methods", default="hirope", help="position methods compared with truncation (hirope-fixed: "
                                                       "fixed blocks instead of syntax units)")
    p.add_argument("--prompts", default="raw", help="prompt variants compared: raw, outline (the far part as an "
                                                     "outline), similar (similar code), document / prompt-copy (the "
                                                     "copy model reads the file beyond the prompt / only the prompt; "
                                                     "raw: the server's default), joined by + (outline+similar)")
    p.add_argument("--copy", default="", help="copy models, each a row per method with it mixed in: WEIGHT/MIN_ORDER, "
                                              "comma-separated (every row without it runs the copy model off)")
    p.add_argument("--rows", default="", help="only these rows, by the names the report gives them (e.g. "
                                              "truncate,hirope+log:0.75+copy:0.8/1), comma-separated; default all")
    p.add_argument("--cases", type=int, default=None, help="cases per (task, split) (default 300; quick 8)")
    p.add_argument("--tasks", default=",".join(TASKS), help="next-line, fim or both")
    p.add_argument("--lengths-x", default=",".join(map(str, DEFAULT_LENGTHS_X)),
                   help="perplexity window lengths, multiples of the trained length")
    p.add_argument("--windows", type=int, default=None, help="perplexity windows per length (default 6; quick 2)")
    p.add_argument("--replay-sections", type=int, default=None, help="functions typed in the replay (default 4)")
    p.add_argument("--replay-lines", type=int, default=None, help="lines typed per function (default 12)")
    p.add_argument("--debounce", type=int, default=None, help="ask for a suggestion every N characters within a word")
    p.add_argument("--replay-gate", choices=("on", "off"), default="on",
                   help="on: the replay shows what the card's confidence gate lets through, as the server does; "
                        "off: every suggestion (completion is always scored gate off)")
    p.add_argument("--groups", type=int, default=5, help="groups of files for the spread across windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--predictions", action="store_true", help="keep every prediction in the JSON")
    p.add_argument("--json", type=Path, default=None, help=f"report file (default {DEFAULT_OUT}/far_eval[_quick].json)")
    p.add_argument("--plot", type=Path, default=None, help=f"plot file (default {DEFAULT_OUT}/far_eval[_quick].png)")
    return p


def settings_from_args(args) -> FarEvalSettings:
    given = {}
    if args.cases is not None:
        given["cases"] = args.cases
    if args.windows is not None:
        given["windows"] = args.windows
    if args.replay_sections is not None:
        given["replay_sections"] = args.replay_sections
    if args.replay_lines is not None:
        given["replay_lines"] = args.replay_lines
    if args.debounce is not None:
        given["debounce"] = args.debounce
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    parse_biases(args.biases)  # raises ValueError on a bad one
    biases = tuple(b.strip() for b in args.biases.split(",") if b.strip() and b.strip().lower() != "none")
    from ..model.methods import method_names

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    prompts = tuple(f.strip() for f in args.prompts.split(",") if f.strip())
    if not methods or any(m not in method_names() for m in methods):
        raise ValueError(f"unknown methods {methods}; choose from {', '.join(method_names())}")
    for variant in prompts or ("",):
        prompt_context(variant)  # raises ValueError on an unknown one
    common = dict(biases=biases, tasks=tasks, groups=args.groups, seed=args.seed, model=args.model,
                  device=args.device, keep_predictions=args.predictions, methods=methods, prompts=prompts,
                  replay_gate=args.replay_gate == "on",
                  copies=parse_copies(args.copy), rows=tuple(r.strip() for r in args.rows.split(",") if r.strip()))
    # an unknown row raises here, before the model loads
    select_rows(method_specs(parse_biases(list(biases)), methods, prompts, common["copies"]), common["rows"])
    if args.quick:
        budgets = _ints(args.budgets)
        quick = dict(common, **given)
        quick["budgets"] = (min(budgets),) if budgets else (1024,)
        if args.corpus != "both":
            quick["corpus"] = args.corpus
        return FarEvalSettings.quick_settings(**quick)
    return FarEvalSettings(corpus=args.corpus, budgets=_ints(args.budgets), lengths_x=_floats(args.lengths_x),
                           **common, **given)


def run_cli(args) -> int:
    import sys

    import torch

    try:
        settings = settings_from_args(args)
    except ValueError as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = "far_eval_quick" if settings.quick else "far_eval"
    json_path = args.json or DEFAULT_OUT / f"{stem}.json"
    plot_path = args.plot or DEFAULT_OUT / f"{stem}.png"
    service_log = logging.getLogger("hirope_lsp.completion.service")
    level = service_log.level
    service_log.setLevel(max(logging.WARNING, level))  # a line per completion is the server's log, not this report's
    try:
        report = run(settings)
    finally:
        service_log.setLevel(level)
    save_json(report, json_path)
    plot(report, plot_path)
    print_report(report)
    print(f"wrote {json_path} and {plot_path}")
    return 0


def main(argv=None) -> int:
    """``python -m hirope_lsp.research.far_eval [--quick] ...`` until the CLI wires ``eval far``."""
    parser = argparse.ArgumentParser(prog="far_eval")
    sub = parser.add_subparsers(dest="eval", required=True)
    register_cli(sub)
    args = parser.parse_args(["far", *(argv if argv is not None else __import__("sys").argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
