"""The settings are declared once (hirope_lsp/config.py SETTINGS); everything else agrees with them:
the VS Code contributions and the README table (written by `python -m hirope_lsp.settings_schema`),
the extension's initializationOptions and the whole section vscode-languageclient sends on a change."""

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hirope_lsp import settings_schema
from hirope_lsp.config import (CLIENT_ONLY_KEYS, MULTILINE_MODES, SCHEMA, SERVER_SETTINGS, SETTINGS, Settings,
                               apply_options)
from hirope_lsp.model.methods import method_names
from hirope_lsp.model.rope import FAR_BIAS_MODES, TOKEN_INDEX_MODES, RopeMethodConfig

ROOT = Path(__file__).resolve().parents[1]
VSCODE = ROOT / "editors" / "vscode"


def _package() -> dict:
    return json.loads((VSCODE / "package.json").read_text(encoding="utf-8"))


def _contributed() -> dict:
    return _package()["contributes"]["configuration"]["properties"]


def test_package_json_and_readme_are_what_the_settings_write():
    for path, (committed, written) in settings_schema.outputs().items():
        assert committed == written, f"{path.name} is not current: run `{settings_schema.COMMAND}`"
    assert settings_schema.main(["--check"]) == 0


def test_every_setting_is_declared_once_and_reaches_an_attribute():
    keys = [s.key for s in SETTINGS]
    assert len(keys) == len(set(keys))
    targets = [s.target for s in SETTINGS if s.target]
    assert len(targets) == len(set(targets))
    assert set(SCHEMA) == set(SERVER_SETTINGS)
    assert CLIENT_ONLY_KEYS == {"pythonPath", "serverCommand", "trace"}
    defaults = Settings()
    for s in SERVER_SETTINGS.values():
        owner, attr = s.owner(defaults)
        assert hasattr(owner, attr), s.key
        assert s.doc and "\n" not in s.doc, s.key
        value = s.default()
        assert value is None and "null" in s.types or isinstance(value, s.kind), (s.key, value)
        assert s.problem(value) is None, s.key
    # every position method field is a client setting (as hirope.<camelCase>), and every plain field of Settings
    rope = {s.target.removeprefix("engine.rope.") for s in SERVER_SETTINGS.values()
            if s.target.startswith("engine.rope.")}
    assert rope == {f.name for f in dataclasses.fields(RopeMethodConfig)} - {"extra"}
    top = {s.target for s in SERVER_SETTINGS.values() if "." not in s.target}
    assert top == {f.name for f in dataclasses.fields(Settings)} - {"engine", "context"}
    for s in SERVER_SETTINGS.values():
        leaf = s.target.rsplit(".", 1)[-1]
        camel = leaf.split("_")[0] + "".join(p.title() for p in leaf.split("_")[1:])
        if s.target.startswith("engine.rope."):
            assert s.key == f"hirope.{camel}", s.key


def test_vscode_contributions_match_the_settings():
    contributed = _contributed()
    assert list(contributed) == [s.vscode_key for s in SETTINGS]
    for s in SETTINGS:
        spec = contributed[s.vscode_key]
        types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        assert set(types) == set(s.types) | ({"null"} if s.editor_null else set()), s.key
        expected = None if s.editor_null else s.default()
        assert spec["default"] == expected and type(spec["default"]) is type(expected), s.key
        assert spec.get("enum", []) == list(s.enum), s.key
        assert spec.get("minimum") == s.minimum and spec.get("maximum") == s.maximum, s.key
        assert spec["description"] == s.doc
    # the choices are the server's own
    assert set(contributed["hirope.positions.method"]["enum"]) == set(method_names())
    assert contributed["hirope.positions.farBiasMode"]["enum"] == list(FAR_BIAS_MODES)
    assert contributed["hirope.positions.tokenIndex"]["enum"] == list(TOKEN_INDEX_MODES)
    assert contributed["hirope.multiline"]["enum"] == list(MULTILINE_MODES)
    assert contributed["hirope.warmAhead"] == {
        "type": "boolean", "default": True, "description": SERVER_SETTINGS["warmAhead"].doc}
    latency = contributed["hirope.latencyTargetMs"]
    assert (latency["type"], latency["default"], latency["minimum"], latency["maximum"]) == ("integer", 400, 50, 10000)


def test_readme_table_lists_every_server_setting_with_its_default():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index(settings_schema.TABLE_START):readme.index(settings_schema.TABLE_END)]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    assert [r[0].removeprefix("| `").removesuffix("`") for r in rows] == list(SERVER_SETTINGS)
    shown = {r[0].strip("| `"): r[1] for r in rows}
    assert shown["promptBudget"] == "4096" and shown["typeAlong"] == "`true`" and shown["multiline"] == "`auto`"
    assert shown["warmAhead"] == "`true`" and shown["latencyTargetMs"] == "400"
    assert "Range 50 to 10000" in table


def test_ranges_and_choices_are_what_the_server_checks():
    """package.json's minimum/maximum/enum are enforced the same by the server (the editor's UI only warns)."""
    for s in SERVER_SETTINGS.values():
        step = 1 if s.types[0] == "integer" else 0.5
        for bound, outside in ((s.minimum, -step), (s.maximum, step)):
            if bound is None:
                continue
            value = int(bound) if s.types[0] == "integer" else float(bound)
            settings, problems = apply_options(Settings(), _nest(s.key, value))
            assert problems == [] and s.get(settings) == value, (s.key, value, problems)
            settings, problems = apply_options(Settings(), _nest(s.key, value + outside))
            assert len(problems) == 1 and s.get(settings) == s.default(), (s.key, value + outside, problems)
        for choice in s.enum:
            settings, problems = apply_options(Settings(), _nest(s.key, choice))
            assert problems == [] and s.get(settings) == choice, (s.key, choice)
        if s.enum and not s.open_enum:
            settings, problems = apply_options(Settings(), _nest(s.key, "no-such-choice"))
            assert len(problems) == 1 and s.get(settings) == s.default(), (s.key, problems)
    # the device takes what torch does, beyond the editor's list
    assert apply_options(Settings(), {"device": "cuda:1"}) [0].engine.device == "cuda:1"


def _nest(key: str, value) -> dict:
    head, _, leaf = key.partition(".")
    return {head: {leaf: value}} if leaf else {key: value}


def _sample(s):
    """A valid value for ``s`` other than its default."""
    default = s.default()
    if s.enum:
        return next(c for c in s.enum if c != default)
    if "boolean" in s.types:
        return not default
    if "string" in s.types:
        return "/models/coder"
    integer = "integer" in s.types
    if default is None and not integer and s.minimum is not None and s.maximum is not None:
        value = (s.minimum + s.maximum) / 2  # a fraction's range may be narrower than 1
    elif default is None:
        value = s.minimum + 1 if s.minimum is not None else s.maximum - 1 if s.maximum is not None else 64
    else:
        value = default + 1 if s.maximum is None or default + 1 <= s.maximum else default - 1
    return int(value) if integer else float(value)


def _vscode_section(values: dict) -> dict:
    """What vscode-languageclient sends on didChangeConfiguration with synchronize.configurationSection
    "hirope": workspace.getConfiguration().get("hirope"), every contributed setting with the user's value
    or its default, nested at the dots (extractSettingsInformation in its configuration.js)."""
    section: dict = {}
    for key, spec in _contributed().items():
        *parents, leaf = key.removeprefix("hirope.").split(".")
        node = section
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = values.get(key, spec["default"])
    return {"hirope": section}


def test_the_whole_section_vscode_sends_on_a_change_applies_every_setting():
    payload = _vscode_section({})
    section = payload["hirope"]
    assert isinstance(section, dict) and "model" not in payload  # the server takes the section out of it
    assert {"pythonPath", "serverCommand", "trace", "positions", "warmAhead", "latencyTargetMs"} <= set(section)
    settings, problems = apply_options(Settings(), section)
    assert problems == [] and settings == Settings(), "the contributed defaults are the server's"

    # every setting changed at once, but tokenIndex: its other value (restart) needs the two levels that
    # levels' other value (1) takes away; it is changed alone below
    samples = {s.vscode_key: _sample(s) for s in SERVER_SETTINGS.values() if s.key != "hirope.tokenIndex"}
    samples.update({"hirope.pythonPath": "/opt/venv/bin/python", "hirope.serverCommand": ["hirope-lsp", "serve"],
                    "hirope.trace.server": "verbose"})
    settings, problems = apply_options(Settings(), _vscode_section(samples)["hirope"])
    assert problems == []
    for s in SERVER_SETTINGS.values():
        if s.key != "hirope.tokenIndex":
            assert s.get(settings) == samples[s.vscode_key] != s.default(), s.key
    assert (settings.warm_ahead, settings.latency_target_ms) == (False, 401)
    settings, problems = apply_options(Settings(), _vscode_section({"hirope.positions.tokenIndex": "restart"})["hirope"])
    assert problems == [] and settings.engine.rope.token_index == "restart"
    # a per-layer far bias and the user's nulls (the server's own default stays)
    settings, problems = apply_options(Settings(), _vscode_section({"hirope.positions.farBias": [1, 0.5]})["hirope"])
    assert problems == [] and settings.engine.rope.far_bias == [1, 0.5]


def test_the_extension_lists_the_same_editor_only_settings():
    source = (VSCODE / "src" / "settings.ts").read_text(encoding="utf-8")
    listed = re.search(r"CLIENT_ONLY_KEYS = \[([^\]]*)\]", source).group(1)
    assert set(re.findall(r'"([^"]+)"', listed)) == CLIENT_ONLY_KEYS


# Runs the extension's real settings.ts (transpiled by its own typescript) in node, with a reader that
# answers as VS Code's workspace.getConfiguration("hirope").get does: the user's value, else the default.
NODE_SCRIPT = r"""
const fs = require("fs"), path = require("path");
const [tsPath, srcPath, packagePath, dir, overridesJson] = process.argv.slice(1);
const ts = require(tsPath);
const js = ts.transpileModule(fs.readFileSync(srcPath, "utf8"), { compilerOptions: {
  module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true } }).outputText;
fs.mkdirSync(path.join(dir, "out"), { recursive: true });
fs.copyFileSync(packagePath, path.join(dir, "package.json"));
fs.writeFileSync(path.join(dir, "out", "settings.js"), js);
const { serverSettings } = require(path.join(dir, "out", "settings.js"));
const properties = JSON.parse(fs.readFileSync(packagePath, "utf8")).contributes.configuration.properties;
const reader = (values) => ({ get: (key, fallback) => {
  const full = "hirope." + key;
  if (full in values) return values[full];
  return full in properties ? properties[full].default : fallback;
} });
process.stdout.write(JSON.stringify(JSON.parse(overridesJson).map((values) => serverSettings(reader(values)))));
"""


def _initialization_options(tmp_path, *overrides: dict) -> list[dict]:
    node = shutil.which("node")
    typescript = VSCODE / "node_modules" / "typescript"
    if node is None or not typescript.is_dir():
        pytest.skip("needs node and editors/vscode/node_modules (npm ci)")
    out = subprocess.run([node, "-e", NODE_SCRIPT, str(typescript), str(VSCODE / "src" / "settings.ts"),
                          str(VSCODE / "package.json"), str(tmp_path), json.dumps(list(overrides))],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_the_extensions_initialization_options_apply_without_problems(tmp_path):
    # tokenIndex's other value needs two levels (see above)
    samples = {s.vscode_key: _sample(s) for s in SERVER_SETTINGS.values() if s.key != "hirope.tokenIndex"}
    samples.update({"hirope.pythonPath": "/opt/venv/bin/python", "hirope.trace.server": "verbose"})
    defaults, custom, blank = _initialization_options(tmp_path, {}, samples, {"hirope.model": ""})
    positions = {s.key.removeprefix("hirope.") for s in SERVER_SETTINGS.values() if s.key.startswith("hirope.")}
    for sent in (defaults, custom, blank):
        assert set(sent) - {"hirope"} <= set(SERVER_SETTINGS) and set(sent.get("hirope", {})) <= positions
        assert not set(sent) & CLIENT_ONLY_KEYS
    # VS Code's defaults: every non-null one is sent, and they are the server's
    assert "warmAhead" in defaults and "latencyTargetMs" in defaults and "model" not in defaults
    assert "farBias" not in defaults["hirope"] and defaults["hirope"]["method"] == "hirope"
    settings, problems = apply_options(Settings(), defaults)
    assert problems == [] and settings == Settings()
    assert "model" not in blank  # an empty string is unset: the embedded model
    # a user's value for every setting reaches the server's attribute
    settings, problems = apply_options(Settings(), custom)
    assert problems == []
    for s in SERVER_SETTINGS.values():
        if s.key != "hirope.tokenIndex":
            assert s.get(settings) == samples[s.vscode_key], s.key
