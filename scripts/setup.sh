#!/usr/bin/env bash
# Create .venv with everything hirope-lsp needs. Torch comes first and pinned: an
# unpinned torch would pull a multi-GB CUDA build (set TORCH_SPEC to choose another).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "hirope-lsp installed in $(pwd)/.venv"
