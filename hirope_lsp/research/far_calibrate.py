"""Choose the prior against far keys (``far_bias``, ``far_bias_mode``) for one model on held-out code.

The prior is a number ``b`` subtracted from the score of every key at distance >= the window
(``constant``), or ``b * log(max(1, n_far / window))`` (``log``); see ``model/rope.py`` and the
section "Measured: what far context does to a small model" of docs/hirope.md: the best ``b``
depends on the model and the code, so it is chosen per model on a corpus nobody trained on (the
held-out tune package), or on the user's own workspace files (no labels needed: perplexity on files
already written).

Measure: for each context multiple (16x, 32x the trained length by default), windows of that many
tokens from the corpus (``evaluate.make_windows``: single long files first, then the files read in
path order as one repository); the perplexity of the last ``train_length`` tokens of each window
given the whole window before them, with HiRoPE positions and each (mode, b) of the grid, and the
same tokens truncated to the trained window (``evaluate.truncated_nll``).  Every setting sees the
same windows and the same target tokens: this is ``far_eval.perplexity_rows``, one row per
(setting, multiple), with far-copy tokens apart.

Choice: the setting with the lowest perplexity over all windows of all multiples (exp of the mean
NLL of every scored token: each window weighs the same, so it is the geometric mean of the windows'
perplexities); ties go to the smaller ``b`` (constant before log).  ``b = 0`` is HiRoPE as published.

Per layer (``per_layer=True``): from the chosen uniform ``b``, one pass over the layers, each layer's
value tried at ``b`` times each of ``layer_factors`` with the others held, the lowest kept where it
beats the setting so far; those rows join the table and the choice, and a tie goes to the uniform
setting.

    result = calibrate_far_bias(load_model(dir), files, multiples=(16, 32), windows=6)
    write_far_bias(model_dir, result)  # training.json["far_bias"], read by loading.recommended_far_bias

Command line: ``hirope-lsp calibrate far-bias --model DIR --corpus DIR [--multiples 16 32] [--windows N]
[--write]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .far_eval import MAX_FILE_BYTES, TRUNCATE, Corpus, MethodSpec, bias_text, parse_biases, perplexity_rows

log = logging.getLogger(__name__)

DEFAULT_CONSTANT = (0.0, 1.0, 2.0, 4.0, 8.0)
# log mode: b x log(n_far / W); at 16x-32x of the trained length log(n_far / W) is about 3.4-4.1
DEFAULT_LOG = (0.5, 1.0, 1.5)
# distance mode: b x log(1 + d / W) for each far key; the default model's choice was 1
DEFAULT_DISTANCE = (0.75, 1.0, 1.25)
DEFAULT_GRID = ",".join([f"{b:g}" for b in DEFAULT_CONSTANT] + [f"log:{b:g}" for b in DEFAULT_LOG]
                        + [f"distance:{b:g}" for b in DEFAULT_DISTANCE])
DEFAULT_MULTIPLES = (16.0, 32.0)
DEFAULT_WINDOWS = 6
CARD = "training.json"
CARD_KEY = "far_bias"
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "dist", "build", "target", "vendor"}


DEFAULT_LAYER_FACTORS = (0.0, 0.5, 1.5, 2.0)


@dataclass(frozen=True)
class Setting:
    value: float | tuple[float, ...]  # a tuple: one value per layer
    mode: str = "constant"  # constant, log or distance

    def __post_init__(self):
        value = tuple(float(v) for v in self.value) if isinstance(self.value, (list, tuple)) else float(self.value)
        if isinstance(value, tuple) and len(set(value)) == 1:
            value = value[0]  # the same value for every layer is the uniform setting
        object.__setattr__(self, "value", value)
        if value == 0:
            object.__setattr__(self, "mode", "constant")

    @property
    def label(self) -> str:
        return f"{self.mode}:{bias_text(self.value)}"

    @property
    def recorded(self) -> float | list[float]:
        """The value as the table and the card hold it (JSON: a list per layer)."""
        return list(self.value) if isinstance(self.value, tuple) else self.value

    @property
    def order(self) -> tuple:
        """Ties go to a uniform setting, then the smaller bias, then the constant mode."""
        per_layer = isinstance(self.value, tuple)
        return (per_layer, sum(self.value) if per_layer else self.value, self.mode != "constant")


def parse_grid(grid: str | list | tuple | None) -> list[Setting]:
    """``"0,1,2,log:1"`` (``far_eval.parse_biases``' syntax) or (value, mode) pairs -> settings, in order,
    duplicates dropped; ``log:0`` is ``constant:0`` (both are plain HiRoPE).  Always holds ``b = 0``."""
    if grid is None:
        grid = DEFAULT_GRID
    if isinstance(grid, (list, tuple)) and grid and all(isinstance(g, (list, tuple)) for g in grid):
        pairs = [(v, str(m)) for v, m in grid]
        for value, mode in pairs:
            parse_biases([f"{mode}:{bias_text(value)}"])  # the same checks (mode, finite, >= 0)
    else:
        pairs = parse_biases(grid)
    out: list[Setting] = [Setting(0.0)]
    for value, mode in pairs:
        s = Setting(value, mode)
        if s not in out:
            out.append(s)
    return out


def source_files(root: Path) -> list[Path]:
    """The source files of a corpus directory (or the file itself): the suffixes ``evaluate`` reads, none
    over ``far_eval.MAX_FILE_BYTES``, hidden, cache, vendored and build folders left out; sorted."""
    from .evaluate import SOURCE_SUFFIXES

    root = Path(root)
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix in SOURCE_SUFFIXES and not name.startswith("."):
                try:
                    if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
                        out.append(path)
                except OSError:
                    continue
    return sorted(out)


def _summary(rows: list[dict]) -> dict:
    """One setting's rows (one per multiple) -> the figures over all its windows."""
    tokens = sum(r["tokens"] for r in rows)
    nll = sum(r["tokens"] * math.log(r["ppl"]) for r in rows) / max(1, tokens)
    return {"ppl": math.exp(nll) if tokens else float("nan"), "tokens": tokens,
            "by_multiple": {f"{r['x']:g}": {"length": r["length"], "windows": r["windows"], "tokens": r["tokens"],
                                            "ppl": r["ppl"], "min": r["spread"]["min"], "max": r["spread"]["max"],
                                            "std": r["spread"]["std"], "ppl_far_copy": r["ppl_far_copy"],
                                            "far_copy_tokens": r["far_copy_tokens"], "seconds": r["seconds"]}
                            for r in rows}}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def choose(table: list[dict], tolerance: float = 1e-9) -> dict:
    """The row with the lowest ``ppl``; rows within ``tolerance`` (relative) of it tie, and of those a
    uniform setting before a per-layer one, then the smallest bias, then constant before log."""
    scored = [r for r in table if math.isfinite(r["ppl"])]
    if not scored:
        raise ValueError("no setting has a finite perplexity")
    best = min(r["ppl"] for r in scored)
    tied = [r for r in scored if r["ppl"] <= best * (1 + tolerance)]
    return min(tied, key=lambda r: Setting(r["value"], r["mode"]).order)


def _setting_row(setting: Setting, rows: list[dict]) -> dict:
    return {"setting": setting.label, "mode": setting.mode, "value": setting.recorded,
            **_summary([r for r in rows if r["method"] == setting.label])}


def refine_per_layer(measure, start: Setting, start_ppl: float, layers: int,
                     factors=DEFAULT_LAYER_FACTORS) -> list[dict]:
    """One pass over the layers from the uniform ``start`` (perplexity ``start_ppl``): each layer's value
    tried at ``start.value`` times each factor, the others held; kept where it lowers the perplexity so
    far.  ``measure(settings)`` returns their table rows; every row measured is returned."""
    if isinstance(start.value, tuple) or start.value == 0:
        return []
    current, best_ppl = [start.value] * layers, start_ppl
    rows: list[dict] = []
    for layer in range(layers):
        candidates: list[Setting] = []
        for factor in factors:
            value = list(current)
            value[layer] = round(start.value * factor, 6)
            setting = Setting(tuple(value), start.mode)
            if value != current and setting not in candidates:
                candidates.append(setting)
        measured = measure(candidates) if candidates else []
        rows += measured
        best = min((r for r in measured if math.isfinite(r["ppl"])), key=lambda r: r["ppl"], default=None)
        if best is not None and best["ppl"] < best_ppl:
            best_ppl = best["ppl"]
            current = list(best["value"]) if isinstance(best["value"], list) else [best["value"]] * layers
        log.info("per-layer far bias after layer %d: %s (ppl %.3f)", layer, bias_text(current), best_ppl)
    return rows


def calibrate_far_bias(loaded, files: list[Path], *, multiples=DEFAULT_MULTIPLES, windows: int = DEFAULT_WINDOWS,
                       grid=None, seed: int = 0, corpus_name: str | None = None, root: Path | None = None,
                       train_length: int | None = None, tolerance: float = 1e-9, per_layer: bool = False,
                       layer_factors=DEFAULT_LAYER_FACTORS, nested: bool = False) -> dict:
    """Perplexity of every (mode, b) of ``grid`` and of truncation on the same windows of ``files``, at
    each context multiple of the trained length (``nested``: every length's windows end on the same
    text, the longest one's last tokens); the setting chosen.  ``loaded``: ``load_model``'s
    (model, tokenizer, fim).  JSON-serialisable (NaN where a split has no token: see ``far_eval._finite``)."""
    from ..model.patch import trained_length
    from ..model.rope import default_window

    lm = loaded[0]
    L = trained_length(lm.config)
    if train_length is not None and train_length != L:
        raise ValueError(f"the model was trained at {L} tokens (its config), not {train_length}: the calibration "
                         "measures it at its own trained length")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no source files to calibrate on")
    multiples = tuple(float(x) for x in multiples)
    if not multiples or any(x <= 0 for x in multiples):
        raise ValueError(f"context multiples must be positive, got {multiples}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    settings = parse_grid(grid)
    root = Path(root) if root is not None else Path(os.path.commonpath([str(f.parent) for f in files]))
    name = corpus_name or root.name
    started = time.time()
    specs = [MethodSpec(TRUNCATE, TRUNCATE)] + [MethodSpec(s.label, "hirope", s.value, s.mode) for s in settings]
    corpus = Corpus("tune", name, root, files)
    rows = perplexity_rows(corpus, loaded, specs, multiples, windows, seed, nested=nested)
    if not rows:
        raise ValueError(f"{name}: no window of {int(min(multiples) * L)} tokens in {len(files)} files")
    measured = sorted({r["x"] for r in rows})
    table = [_setting_row(s, rows) for s in settings]
    if per_layer:
        uniform = choose(table, tolerance)

        def measure(candidates: list[Setting]) -> list[dict]:
            more = perplexity_rows(corpus, loaded, [MethodSpec(c.label, "hirope", c.value, c.mode) for c in candidates],
                                   multiples, windows, seed, nested=nested)
            return [_setting_row(c, more) for c in candidates]

        table += refine_per_layer(measure, Setting(uniform["value"], uniform["mode"]), uniform["ppl"],
                                  lm.config.num_hidden_layers, layer_factors)
    truncate = {"setting": "truncate", **_summary([r for r in rows if r["method"] == TRUNCATE])}
    for row in table:
        row["vs_truncate"] = row["ppl"] / truncate["ppl"] - 1
    chosen = choose(table, tolerance)
    plain = next(r for r in table if r["value"] == 0)
    return {"kind": "far-bias-calibration", "model": str(getattr(lm.config, "_name_or_path", "") or ""),
            "corpus": name, "root": str(root), "files": len(files), "train_length": L, "window": default_window(L),
            "multiples": [_number(x) for x in multiples if x in measured],
            "missing_multiples": [_number(x) for x in multiples if x not in measured],
            "windows": windows, "seed": seed, "nested": nested,
            "measure": f"ppl of the last {L} tokens of each window" + (", the same tokens at every length" if nested else ""),
            "grid": [{"mode": s.mode, "value": s.recorded} for s in settings],
            "table": table, "truncate": truncate,
            "chosen": {"value": chosen["value"], "mode": chosen["mode"], "setting": chosen["setting"],
                       "ppl": chosen["ppl"], "plain_hirope_ppl": plain["ppl"], "truncate_ppl": truncate["ppl"],
                       "beats_truncate": chosen["ppl"] < truncate["ppl"]},
            "seconds": time.time() - started}


# ---- the model card ----


def card_record(result: dict) -> dict:
    """What ``training.json["far_bias"]`` holds: the choice, where it was made, and the table behind it."""
    compact = lambda r: {"setting": r["setting"], "mode": r.get("mode"), "value": r.get("value"),  # noqa: E731
                         "ppl": r["ppl"], **{f"{x}x": {k: c[k] for k in ("ppl", "min", "max", "std", "windows")}
                                             for x, c in r["by_multiple"].items()}}
    return {"value": result["chosen"]["value"], "mode": result["chosen"]["mode"], "chosen_on": result["corpus"],
            "multiples": result["multiples"], "windows": result["windows"], "seed": result["seed"],
            "train_length": result["train_length"], "window": result["window"], "measure": result["measure"],
            "calibrated": time.strftime("%Y-%m-%d"),
            "table": [compact(r) for r in result["table"]] + [compact(result["truncate"])]}


def write_far_bias(model_dir: Path, result: dict) -> Path:
    """Record the choice in ``model_dir/training.json`` under ``far_bias``."""
    return write_card_entry(model_dir, CARD_KEY, card_record(result))


def calibration_target(args, corpora) -> Path | None:
    """The model directory a calibration command records in (``--model``, else the embedded model's), or
    None, with the reason on stderr, where ``--write`` has no local directory to write or a corpus is
    missing."""
    from ..model.loading import DEFAULT_MODEL_DIR

    model_dir = Path(args.model).expanduser() if args.model else DEFAULT_MODEL_DIR
    if args.write and not model_dir.is_dir():
        print(f"hirope-lsp: --write needs a local model directory, {args.model!r} is not one", file=sys.stderr)
        return None
    missing = [str(c) for c in corpora if not c.exists()]
    if missing:
        print(f"hirope-lsp: no such corpus {', '.join(missing)}", file=sys.stderr)
        return None
    return model_dir


def write_card_entry(model_dir: Path, key: str, record: dict, language: str | None = None) -> Path:
    """Set ``key`` of ``model_dir/training.json`` to ``record`` (the file's other keys kept; the file made if
    the model has none); with ``language``, set only that language's entry (``key.languages.<language>``,
    which documents of that language use instead of the record's own); without, the entries of languages
    chosen on their own stay (a record for every other language does not undo them).  Written whole to a
    temporary file first, then moved over."""
    from .far_eval import _finite

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is not a model directory: the choice is written to its {CARD}")
    card = model_dir / CARD
    data = json.loads(card.read_text()) if card.is_file() else {}
    current = data.get(key)
    languages = current.get("languages") if isinstance(current, dict) else None
    languages = languages if isinstance(languages, dict) else {}
    if language is not None:
        record = {**current, "languages": {**languages, language: record}} if isinstance(current, dict) \
            else {"languages": {language: record}}
    elif languages and "languages" not in record:
        record = {**record, "languages": languages}
    data[key] = _finite(record)
    tmp = card.with_name(card.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, card)
    return card


def add_language_flag(parser) -> None:
    parser.add_argument("--language", default=None,
                        help="record the choice for documents of this language only (e.g. javascript, go; the "
                             "corpus should be that language's code); default: for every language without its own")


def known_language(language: str | None) -> bool:
    """``--language``: none, or a language the server parses (else an error printed)."""
    from ..hierarchy.languages import SPECS

    if language is None or language in SPECS:
        return True
    print(f"hirope-lsp: unknown language {language!r} (one of: {', '.join(sorted(SPECS))})", file=sys.stderr)
    return False


# ---- output ----


def format_table(result: dict) -> str:
    """The table the command prints: per multiple ppl [min-max over windows] and std, then all, then the
    change against truncation; the chosen setting starred."""
    xs = [f"{x:g}" for x in result["multiples"]]
    L = result["train_length"]
    head = (f"far-bias calibration on {result['corpus']} ({result['files']} files), model trained at {L} tokens, "
            f"window {result['window']}; {result['measure']}, {result['windows']} windows per length, "
            f"seed {result['seed']}")
    chosen = result["chosen"]["setting"]
    rows = [result["truncate"]] + result["table"]
    body = []
    for row in rows:
        cells = [row["setting"] + (" *" if row["setting"] == chosen else "")]
        for x in xs:
            c = row["by_multiple"].get(x)
            cells.append("" if c is None else f"{c['ppl']:.2f} [{c['min']:.2f}-{c['max']:.2f}] ±{c['std']:.2f}")
        cells.append(f"{row['ppl']:.2f}")
        rel = row.get("vs_truncate")
        cells.append("" if rel is None else f"{100 * rel:+.1f}%")
        body.append(cells)
    titles = ["setting"] + [f"{x}x ({int(float(x) * L)}): ppl [min-max] ±std" for x in xs] + ["all", "vs truncate"]
    widths = [max(len(r[k]) for r in body + [titles]) for k in range(len(titles))]
    fmt = lambda cells: "  ".join(c.ljust(w) if k == 0 else c.rjust(w)  # noqa: E731
                                  for k, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [head, fmt(titles)] + [fmt(r) for r in body]
    c = result["chosen"]
    lines.append(f"chosen: {c['mode']} b={bias_text(c['value'])} (ppl {c['ppl']:.2f}; plain HiRoPE {c['plain_hirope_ppl']:.2f}, "
                 f"truncation {c['truncate_ppl']:.2f}){'' if c['beats_truncate'] else '; no setting beats truncation'}"
                 f"; {result['seconds']:.0f} s")
    if result["missing_multiples"]:
        lines.append(f"no window for {', '.join(f'{x:g}x' for x in result['missing_multiples'])}: corpus too short")
    return "\n".join(lines)


# ---- command line ----


def register_cli(subparsers) -> None:
    """Add ``far-bias`` to ``calibrate``'s subparsers."""
    p = subparsers.add_parser("far-bias", help="choose the prior against far keys for a model on held-out code "
                                               "(perplexity per (mode, b) and truncation on the same windows)")
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--corpus", type=Path, action="append", default=None,
                   help="held-out code: a directory or file (repeatable; default: the held-out tune package(s) of "
                        "research/sources.json, transformers)")
    p.add_argument("--multiples", type=float, nargs="+", default=list(DEFAULT_MULTIPLES),
                   help="context lengths as multiples of the trained length")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="windows per length")
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help="settings: numbers (constant mode), log:b and distance:b, comma-separated")
    p.add_argument("--nested", action="store_true",
                   help="every length scores the same last tokens with more context before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write the whole result here")
    p.add_argument("--write", action="store_true",
                   help="record the choice in the model directory's training.json (key far_bias)")
    p.add_argument("--per-layer", action="store_true",
                   help="then refine the chosen setting layer by layer (one pass; each layer at b times each "
                        "of --layer-factors)")
    p.add_argument("--layer-factors", default=",".join(f"{f:g}" for f in DEFAULT_LAYER_FACTORS),
                   help="comma-separated multiples of the uniform b tried for each layer")


def run_cli(args) -> int:
    import torch

    from ..model.loading import ModelLoadError, load_model
    from .far_eval import _finite

    try:
        settings = parse_grid(args.grid)
    except ValueError as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    model_dir = calibration_target(args, args.corpus or [])
    if model_dir is None:
        return 2
    if args.corpus:
        roots = [c.resolve() for c in args.corpus]
    else:
        from .far_eval import load_corpora

        roots = [c.root for c in load_corpora("tune")]
    files = sorted({f for r in roots for f in source_files(r)})
    if not files:
        print(f"hirope-lsp: no source files in {', '.join(map(str, roots))}", file=sys.stderr)
        return 2
    name = "+".join(r.name for r in roots)
    root = roots[0] if len(roots) == 1 else Path(os.path.commonpath([str(r) for r in roots]))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_model(str(model_dir) if args.model else None, device=args.device, dtype="float32")
    except ModelLoadError as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    try:
        result = calibrate_far_bias(loaded, files, multiples=args.multiples, windows=args.windows,
                                    grid=[(s.value, s.mode) for s in settings], seed=args.seed, corpus_name=name,
                                    root=root, per_layer=args.per_layer, nested=args.nested,
                                    layer_factors=tuple(float(f) for f in args.layer_factors.split(",") if f.strip()))
    except ValueError as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(result), indent=2, allow_nan=False))
        print(f"wrote {args.json}")
    if args.write:
        card = write_far_bias(model_dir, result)
        print(f"recorded far_bias {result['chosen']['mode']} b={bias_text(result['chosen']['value'])} in {card}")
    return 0
