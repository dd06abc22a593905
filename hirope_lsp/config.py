"""One settings tree for the server: defaults, initializationOptions, didChangeConfiguration, CLI.

Client keys are camelCase (``promptBudget``); unknown keys and bad values are reported and the
default is kept, never fatal.

Every client setting is declared once, as a row of ``SETTINGS``: its wire name, where it lands in
``Settings``, its JSON type, range or choices, and a one-line doc; its default is the owning
dataclass's (``Settings``, ``EngineSettings``, ``ContextSettings``, ``RopeMethodConfig``).  ``SCHEMA``
and the range and choice checks come from the rows, and so do the VS Code contributions
(editors/vscode/package.json) and the README's settings table: ``python -m hirope_lsp.settings_schema``
rewrites both, and tests/test_settings_source.py fails when what is committed is not what it writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .completion.prompt import FAR_PROMPTS, ContextSettings
from .model.engine import EngineSettings
from .model.methods import REGISTRY as POSITION_METHODS
from .model.rope import FAR_BIAS_MODES, TOKEN_INDEX_MODES, RopeMethodConfig

MULTILINE_MODES = ("auto", "always", "never")


GATE_OFF = -100.0  # a minConfidence that shows every suggestion (a mean log-probability per token)


@dataclass(kw_only=True)
class Settings:
    engine: EngineSettings = field(default_factory=EngineSettings)
    context: ContextSettings = field(default_factory=ContextSettings)
    max_new_tokens: int = 64
    multiline: str = "auto"
    max_file_bytes: int = 1024 * 1024
    watch_files: bool = True
    type_along: bool = True  # typing a suggestion's start answers with its rest, without the model
    # mean log-probability per token below which a suggestion is not shown (None: the gate the model's card
    # records, none for a model without one)
    min_confidence: float | None = None
    warm_ahead: bool = True  # prefill the active document's prompt in the background, before it is asked for
    latency_target_ms: int = 400  # a cold request's prompt is cut to what is prefilled in this time


JSON_TYPES = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "array": list,
              "null": type(None)}


@dataclass(frozen=True)
class Setting:
    """One client setting, declared once (see the module doc)."""

    # wire name: "promptBudget"; "hirope.window" is "window" in the client's "hirope" object, and
    # VS Code's hirope.positions.window
    key: str
    target: str | None  # attribute path in Settings ("context.budget_tokens"); None: the editor's own setting
    type: str | tuple[str, ...]  # JSON type(s): string, boolean, integer, number, array, null
    doc: str  # one line: the VS Code description and the README's meaning
    enum: tuple = ()  # the values the server takes
    open_enum: bool = False  # the enum is the editor's list to pick from; the server takes other values too
    enum_docs: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    items: dict | None = None  # JSON schema of an array's items
    editor_null: bool = False  # the editor's default is null, "the server's own"; null keeps the value
    shown_default: str | None = None  # the README's words for the default where its value does not say it
    client_default: object = None  # default of an editor-only setting (the server's come from Settings)

    @property
    def types(self) -> tuple[str, ...]:
        return (self.type,) if isinstance(self.type, str) else tuple(self.type)

    @property
    def kind(self) -> type | tuple:
        """The Python types the server takes (JSON null only where None is a value, not "unset")."""
        kinds = tuple(JSON_TYPES[t] for t in self.types)
        return kinds[0] if len(kinds) == 1 else kinds

    @property
    def number(self) -> bool:
        """A number and not a boolean: JSON true must not pass as 1."""
        return "boolean" not in self.types and bool({"integer", "number"} & set(self.types))

    @property
    def vscode_key(self) -> str:
        """The key under VS Code's settings (positions.* for the position method's)."""
        key = "positions." + self.key.removeprefix("hirope.") if self.key.startswith("hirope.") else self.key
        return "hirope." + key

    def owner(self, settings: Settings):
        """The object holding this setting's attribute, and the attribute's name."""
        *path, attr = self.target.split(".")
        target = settings
        for part in path:
            target = getattr(target, part)
        return target, attr

    def get(self, settings: Settings):
        target, attr = self.owner(settings)
        return getattr(target, attr)

    def default(self):
        return self.client_default if self.target is None else self.get(Settings())

    def problem(self, value) -> str | None:
        """Why ``value`` is out of this setting's range or choices, or None."""
        if self.enum and not self.open_enum and value is not None and value not in self.enum:
            return f"{self.key} must be one of {', '.join(map(str, self.enum))}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                return f"{self.key} must be between {_num(low)} and {_num(high)}"
            return f"{self.key} must be at least {_num(low)}" if low is not None else \
                f"{self.key} must be {_num(high)} or below"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SETTINGS: tuple[Setting, ...] = (
    # the editor's own (VS Code's; the whole section it sends on a change carries them)
    Setting(key="pythonPath", target=None, type="string", client_default="python3",
            doc="Python interpreter with hirope-lsp installed (runs `python -m hirope_lsp serve`)."),
    Setting(key="serverCommand", target=None, type="array", items={"type": "string"}, client_default=[],
            doc="Command (and arguments) that starts the server; overrides hirope.pythonPath when set."),
    # the server's
    Setting(key="model", target="engine.model", type=("string", "null"), shown_default="embedded model",
            doc="HuggingFace model directory or hub id; null: the embedded default model."),
    Setting(key="device", target="engine.device", type="string", enum=("auto", "cpu", "cuda", "mps"),
            open_enum=True, doc="Where the model runs (or e.g. cuda:1); auto: cuda, then mps, then cpu."),
    Setting(key="dtype", target="engine.dtype", type="string", enum=("auto", "float32", "float16", "bfloat16"),
            open_enum=True, doc="Weight precision; auto: bfloat16 on CUDA (float16 without bf16 support), "
                                "float16 on MPS, float32 on CPU (bfloat16 for models of 100 M parameters or more "
                                "on a CPU with bfloat16 instructions, ~1.7x faster there)."),
    Setting(key="allowDownload", target="engine.allow_download", type="boolean",
            doc="Allow downloading a hub model id that is not in the local cache (otherwise offline)."),
    Setting(key="trustRemoteCode", target="engine.trust_remote_code", type="boolean",
            doc="Run the model repository's own Python code (only for models you trust)."),
    Setting(key="promptBudget", target="context.budget_tokens", type="integer", minimum=32,
            doc="Prompt size in tokens; HiRoPE lets it exceed the model's training length."),
    Setting(key="maxNewTokens", target="max_new_tokens", type="integer", minimum=1, maximum=4096,
            doc="Most tokens generated per suggestion."),
    Setting(key="multiline", target="multiline", type="string", enum=MULTILINE_MODES,
            doc="Multi-line suggestions: auto when the cursor opens a block or sits on an empty line; "
                "always; never."),
    Setting(key="crossFile", target="context.cross_file", type="boolean",
            doc="Add definitions from other workspace files of names used near the cursor."),
    Setting(key="similarCode", target="context.similar_code", type="boolean",
            doc="Add the windows of code most like the lines before the cursor from open documents and the "
                "cursor file's folder (half of the cross-file share)."),
    Setting(key="copyDocument", target="context.copy_document", type="boolean",
            doc="The copy model (copyWeight) also reads the document beyond the prompt: the text before the "
                "kept prefix (up to 64 KiB) and after the kept suffix (16 KiB); no attention cost."),
    Setting(key="copyWorkspace", target="context.copy_workspace", type="boolean",
            doc="The copy model (copyWeight) also reads the workspace's neighbouring files (open documents, "
                "the cursor file's folder), the most alike first, up to 256 KiB; no attention cost."),
    Setting(key="farPrompt", target="context.far_prompt", type="string", enum=FAR_PROMPTS,
            doc="The file far from the cursor: raw text as far as the budget goes, or its outline (imports, "
                "class headers, signatures; function bodies dropped) before nearTokens of raw text."),
    Setting(key="nearTokens", target="context.near_tokens", type=("integer", "null"), minimum=16,
            shown_default="½ prefix", doc="With the outline: raw tokens kept before the cursor; null: half the "
                                          "prefix's budget."),
    Setting(key="lookupTokens", target="engine.lookup_tokens", type="integer", minimum=0, maximum=16,
            doc="Draft tokens copied from the text already seen (prompt lookup) and checked in one step while "
                "decoding; the suggestion is the same, in fewer steps. 0: one token per step."),
    Setting(key="copyWeight", target="engine.copy_weight", type=("number", "null"), minimum=0, maximum=0.95,
            shown_default="the model's", editor_null=True,
            doc="Most of each next-token distribution taken from a copy model of the prompt (what followed the "
                "last few tokens where they occurred before, anywhere in the file or workspace context): names "
                "seen far away get copied; 0: off; null: the value the model's card records for the "
                "document's language (else the card's own), else 0."),
    Setting(key="copyMinOrder", target="engine.copy_min_order", type=("integer", "null"), minimum=1, maximum=4,
            shown_default="the model's", editor_null=True,
            doc="Shortest run of tokens whose earlier occurrences the copy model trusts; null: the model's card "
                "(for the document's language, as for copyWeight), else 1."),
    Setting(key="cacheBudgetMb", target="engine.cache_budget_mb", type="integer", minimum=0,
            doc="Memory in MiB for KV state kept between requests (across documents, the least recently "
                "used goes first)."),
    Setting(key="reuseCache", target="engine.reuse_cache", type="boolean",
            doc="Reuse the KV state of a document's last prompt, so a keystroke computes only what changed."),
    Setting(key="maxFileBytes", target="max_file_bytes", type="integer", minimum=1, shown_default="1 MiB",
            doc="Workspace files larger than this (in bytes) are not indexed."),
    Setting(key="watchFiles", target="watch_files", type="boolean",
            doc="Watch the workspace folders and keep the index of their files current."),
    Setting(key="typeAlong", target="type_along", type="boolean",
            doc="Typing the start of a suggestion answers with its rest at once, without running the model."),
    Setting(key="minConfidence", target="min_confidence", type=("number", "null"), maximum=0,
            shown_default="the model's", doc="Hide suggestions whose mean log-probability per token is below this "
                                             "(e.g. -1.5); null: the gate chosen for the model (the embedded model "
                                             "records one; other models show all); -100 shows all."),
    Setting(key="warmAhead", target="warm_ahead", type="boolean",
            doc="Prefill the prompt of the active document, and make its suggestion, in the background before it is asked for."),
    Setting(key="latencyTargetMs", target="latency_target_ms", type="integer", minimum=50, maximum=10000,
            doc="A cold request's prompt is cut to what this machine prefills within this time; the full prompt "
                "is warmed in the background."),
    # the position method (the client's "hirope" object; VS Code's hirope.positions.*)
    Setting(key="hirope.method", target="engine.rope.method", type="string",
            enum=tuple(POSITION_METHODS),
            doc="Position method: " + ", ".join(m.summary for m in POSITION_METHODS.values()) + "."),
    Setting(key="hirope.window", target="engine.rope.window", type=("integer", "null"), minimum=1,
            shown_default="½ training length",
            doc="Distances below this keep plain RoPE positions; null: half the model's training length."),
    Setting(key="hirope.split", target="engine.rope.split", type=("number", "null"), minimum=0, maximum=1,
            shown_default="theory", doc="Share of rotary pairs on the token level; null: log_base(L/2π) from "
                                        "the model (HiRoPE theory)."),
    Setting(key="hirope.tokenIndex", target="engine.rope.token_index", type="string", enum=TOKEN_INDEX_MODES,
            doc="global: one token index over the whole prompt; restart: the index within each unit."),
    Setting(key="hirope.levels", target="engine.rope.levels", type="integer", minimum=1, maximum=2,
            doc="Position levels: 2 is unit and token (the paper), 1 is the token index alone (plain RoPE); "
                "the server's prompts have no deeper hierarchy."),
    Setting(key="hirope.trainLength", target="engine.rope.train_length", type=("integer", "null"),
            shown_default="the model's", doc="The model's training length; null: read from the model's config."),
    Setting(key="hirope.unitSize", target="engine.rope.unit_size", type="integer", minimum=1,
            doc="hirope-fixed: every unitSize tokens are a unit."),
    Setting(key="hirope.groupSize", target="engine.rope.group_size", type="integer", minimum=1,
            doc="self-extend: neighbour tokens per group."),
    Setting(key="hirope.factor", target="engine.rope.factor", type=("number", "null"), minimum=1,
            shown_default="none", doc="ntk / yarn: context extension factor; null: 1 (no extension)."),
    Setting(key="hirope.queryChunk", target="engine.rope.query_chunk", type="integer", minimum=1,
            doc="Query rows per attention pass: bounds the memory of a long prompt's prefill."),
    # a number, or a list with one per layer (its length is checked against the model when it is attached)
    Setting(key="hirope.farBias", target="engine.rope.far_bias", type=("number", "array", "null"), minimum=0,
            items={"type": "number", "minimum": 0}, editor_null=True, shown_default="the model's",
            doc="Prior against far keys: subtracted from the attention score of every key at distance ≥ window "
                "(0: plain HiRoPE; larger: far context must match sharply to be used); a list: one value per "
                "model layer; null: the value (and mode) the model's card records from calibration on held-out "
                "code, else 0."),
    Setting(key="hirope.farBiasMode", target="engine.rope.far_bias_mode", type="string", enum=FAR_BIAS_MODES,
            enum_docs=("farBias as given", "farBias × log(max(1, n_far / window)), n_far the far keys a query "
                                           "sees: grows with the context, 0 until they outnumber the window",
                       "farBias × log(1 + d / window) for the key at token distance d: each key's own, whatever lies "
                       "beyond it"),
            doc="How the far bias is applied: constant, growing with the log of the far keys per window, or "
                "with the log of each key's distance per window."),
    Setting(key="trace.server", target=None, type="string", enum=("off", "messages", "verbose"), client_default="off",
            doc="Trace the protocol between VS Code and the server in the output channel."),
)

SERVER_SETTINGS = {s.key: s for s in SETTINGS if s.target is not None}

# client key -> (object path, attribute, type check)
SCHEMA = {s.key: (s.target.rpartition(".")[0], s.target.rpartition(".")[2], s.kind) for s in SERVER_SETTINGS.values()}


# the editor's own settings, in the whole section VS Code sends on a change: not the server's
CLIENT_ONLY_KEYS = frozenset(s.key.split(".")[0] for s in SETTINGS if s.target is None)
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
        setting = SERVER_SETTINGS.get(key)
        if setting is None:
            problems.append(f"unknown setting {key!r} ignored")
            continue
        kind = setting.kind
        if value is None and "null" not in setting.types:
            continue  # a setting the client leaves unset (VS Code sends null): the server's default stays
        if isinstance(value, bool) and setting.number:
            problems.append(f"setting {key!r}: expected a number, got {value!r}")
            continue
        if not isinstance(value, kind):
            problems.append(f"setting {key!r}: {value!r} has the wrong type")
            continue
        target, attr = setting.owner(new)
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
    for setting in SERVER_SETTINGS.values():
        error = setting.problem(setting.get(s))
        if error:
            return error
    return None
