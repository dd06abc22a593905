"""What the editors and the README say about the settings, written from ``config.SETTINGS``.

``python -m hirope_lsp.settings_schema`` rewrites the VS Code contributions
(``contributes.configuration.properties`` in editors/vscode/package.json, the rest of that file is
left as it is) and the settings table in README.md (between the markers below);
``--check`` only says whether they are current (exit status 1 when not).  The tests run the check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import SETTINGS, Setting, _num

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_JSON = ROOT / "editors" / "vscode" / "package.json"
README = ROOT / "README.md"
COMMAND = "python -m hirope_lsp.settings_schema"
TABLE_START = f"<!-- the settings table is written from hirope_lsp/config.py by `{COMMAND}` -->"
TABLE_END = "<!-- end of the settings table -->"


def vscode_property(setting: Setting) -> dict:
    """The JSON schema VS Code contributes for one setting."""
    types = list(setting.types) + (["null"] if setting.editor_null and "null" not in setting.types else [])
    spec: dict = {"type": types[0] if len(types) == 1 else types}
    if setting.items is not None:
        spec["items"] = setting.items
    if setting.enum:
        spec["enum"] = list(setting.enum)
    if setting.enum_docs:
        spec["enumDescriptions"] = list(setting.enum_docs)
    spec["default"] = None if setting.editor_null else setting.default()
    for name in ("minimum", "maximum"):
        value = getattr(setting, name)
        if value is not None:
            spec[name] = int(value) if float(value).is_integer() else value
    spec["description"] = setting.doc
    return spec


def vscode_properties() -> dict[str, dict]:
    return {s.vscode_key: vscode_property(s) for s in SETTINGS}


def _inline(value) -> str:
    """JSON on one line, objects spaced as package.json writes them: { "type": "string" }."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{json.dumps(k)}: {_inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def render_package_json(text: str) -> str:
    """``text`` (package.json) with its configuration properties written from the settings."""
    data = json.loads(text)
    data["contributes"]["configuration"]["properties"]  # the place must exist (KeyError otherwise)
    anchor = text.index('"configuration"')
    key_at = text.index('"properties"', anchor)
    start = text.index("{", key_at)
    _, end = json.JSONDecoder().raw_decode(text, start)
    line_start = text.rindex("\n", 0, key_at) + 1
    indent = text[line_start:key_at]
    inner = indent + "  "
    lines = [f"{inner}{json.dumps(key)}: {_inline(spec)}" for key, spec in vscode_properties().items()]
    block = "{\n" + ",\n".join(lines) + "\n" + indent + "}"
    out = text[:start] + block + text[end:]
    json.loads(out)
    return out


def _shown_default(setting: Setting) -> str:
    if setting.shown_default is not None:
        return setting.shown_default
    value = setting.default()
    if isinstance(value, bool):
        return f"`{json.dumps(value)}`"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, (int, float)):
        return str(value)
    return f"`{json.dumps(value)}`"


def _shown_range(setting: Setting) -> str:
    low, high = (None if v is None else _num(v) for v in (setting.minimum, setting.maximum))
    if low is not None and high is not None:
        return f" Range {low} to {high}."
    if low is not None:
        return f" At least {low}."
    return f" At most {high}." if high is not None else ""


def readme_table() -> str:
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        if s.target is None:
            continue
        doc = s.doc.replace("|", "\\|") + _shown_range(s)
        rows.append(f"| `{s.key}` | {_shown_default(s)} | {doc} |")
    return "\n".join(rows)


def render_readme(text: str) -> str:
    """``text`` (README.md) with the table between the markers written from the settings."""
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END, start)
    return text[:start] + "\n" + readme_table() + "\n" + text[end:]


def outputs() -> dict[Path, tuple[str, str]]:
    """Each written file: (committed text, text as written from the settings)."""
    package = PACKAGE_JSON.read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    return {PACKAGE_JSON: (package, render_package_json(package)), README: (readme, render_readme(readme))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for path, (old, new) in outputs().items():
        if old != new:
            stale.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    for path in stale:
        print(f"{path.relative_to(ROOT)}: {'not current; run ' + COMMAND if check else 'written'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
