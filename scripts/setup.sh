#!/usr/bin/env bash
# Create .venv with everything hirope-lsp needs (and the VS Code extension's node modules when npm
# is there). Torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build
# (set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --pre -e '.[dev]'
if command -v npm >/dev/null 2>&1; then
  (cd editors/vscode && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "hirope-lsp installed in $(pwd)/.venv"
