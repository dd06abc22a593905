"""One settings tree for the server: defaults, initializationOptions, didChangeConfiguration, CLI.

Client keys are camelCase (``promptBudget``); unknown keys and bad values are reported and the
default is kept, never fatal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

from .completion.context import ContextSettings
from .model.engine import EngineSettings
from .model.rope import METHODS, RopeMethodConfig

MULTILINE_MODES = ("auto", "always", "never")


@dataclass(kw_only=True)
class Settings:
    engine: EngineSettings = field(default_factory=EngineSettings)
    context: ContextSettings = field(default_factory=ContextSettings)
    max_new_tokens: int = 64
    multiline: str = "auto"
    max_file_bytes: int = 1024 * 1024
    watch_files: bool = True
    type_along: bool = True  # typing a suggestion's start answers with its rest, without the model
    # mean log-probability per token below which a suggestion is not shown (None: all are shown)
    min_confidence: float | None = None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


OPTIONAL_NUMBER = (int, float, type(None))


# client key -> (object path, attribute, type check)
def _schema():
    rows = {
        "model": ("engine", "model", (str, type(None))),
        "device": ("engine", "device", str),
        "dtype": ("engine", "dtype", str),
        "trustRemoteCode": ("engine", "trust_remote_code", bool),
        "allowDownload": ("engine", "allow_download", bool),
        "cacheBudgetMb": ("engine", "cache_budget_mb", int),
        "reuseCache": ("engine", "reuse_cache", bool),
        "promptBudget": ("context", "budget_tokens", int),
        "crossFile": ("context", "cross_file", bool),
        "maxNewTokens": ("", "max_new_tokens", int),
        "multiline": ("", "multiline", str),
        "maxFileBytes": ("", "max_file_bytes", int),
        "watchFiles": ("", "watch_files", bool),
        "typeAlong": ("", "type_along", bool),
        "minConfidence": ("", "min_confidence", OPTIONAL_NUMBER),
    }
    for f in fields(RopeMethodConfig):
        if f.name in ("extra",):
            continue
        kind = {"int": int, "float": (int, float), "str": str}.get(str(f.type).split(" |")[0], (int, float, str))
        rows["hirope." + _camel(f.name)] = ("engine.rope", f.name, (kind, type(None)) if "None" in str(f.type) else kind)
    # a number, or a list with one per layer (its length is checked against the model when it is attached)
    rows["hirope.farBias"] = ("engine.rope", "far_bias", NUMBER_OR_LIST)
    return rows


NUMBER_OR_LIST = (int, float, list)


SCHEMA = _schema()


# the editor's own settings, in the whole section VS Code sends on a change: not the server's
CLIENT_ONLY_KEYS = frozenset({"pythonPath", "serverCommand", "trace"})
# where VS Code's settings nest the position method (hirope.positions.*) and the server's own (hirope.*)
POSITION_GROUPS = frozenset({"hirope", "positions"})


def _flatten(options: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in options.items():
        if not prefix and key in CLIENT_ONLY_KEYS:
            continue
        if isinstance(value, dict) and not prefix and key in POSITION_GROUPS:
            flat.update(_flatten(value, "hirope."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_options(settings: Settings, options: dict | None) -> tuple[Settings, list[str]]:
    """A copy of ``settings`` with client options applied, and a message per rejected option."""
    new = copy.deepcopy(settings)
    problems: list[str] = []
    if options is None:
        return new, problems
    if not isinstance(options, dict):
        return new, [f"settings must be an object, got {type(options).__name__}"]
    if isinstance(options.get("hirope"), bool):  # "hirope": false turns it off (plain RoPE)
        options = {**options, "hirope": {"method": "hirope" if options["hirope"] else "rope"}}
    for key, value in _flatten(options).items():
        if key not in SCHEMA:
            problems.append(f"unknown setting {key!r} ignored")
            continue
        path, attr, kind = SCHEMA[key]
        if value is None and not (isinstance(kind, tuple) and type(None) in kind):
            continue  # a setting the client leaves unset (VS Code sends null): the server's default stays
        if isinstance(value, bool) and kind in (int, (int, float), NUMBER_OR_LIST, OPTIONAL_NUMBER):
            problems.append(f"setting {key!r}: expected a number, got {value!r}")
            continue
        if not isinstance(value, kind):
            problems.append(f"setting {key!r}: {value!r} has the wrong type")
            continue
        target = new
        for part in filter(None, path.split(".")):
            target = getattr(target, part)
        old = getattr(target, attr)
        setattr(target, attr, value)
        error = _check(new)
        if error:
            setattr(target, attr, old)
            problems.append(f"setting {key!r}: {error}; keeping {old!r}")
    return new, problems


def _check(s: Settings) -> str | None:
    try:
        s.engine.rope.validate()
    except ValueError as err:
        return str(err)
    if s.multiline not in MULTILINE_MODES:
        return f"multiline must be one of {', '.join(MULTILINE_MODES)}"
    if s.engine.rope.method not in METHODS:
        return "unknown method"
    if s.max_new_tokens <= 0 or s.max_new_tokens > 4096:
        return "maxNewTokens must be between 1 and 4096"
    if s.min_confidence is not None and s.min_confidence > 0:
        return "minConfidence is a mean log-probability per token: 0 or below"
    if s.context.budget_tokens < 32:
        return "promptBudget must be at least 32 tokens"
    if s.engine.cache_budget_mb < 0:
        return "cacheBudgetMb must not be negative"
    if s.max_file_bytes <= 0:
        return "maxFileBytes must be positive"
    return None
