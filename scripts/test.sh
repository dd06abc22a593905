#!/usr/bin/env bash
# All tests on the CPU: the Python suite (unit, end-to-end over stdio, headless Neovim), then the
# VS Code extension's compile, lint, unit tests and end-to-end script. GPU-only tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
summary="$(mktemp)"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" | tee "$summary"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || exit "$status"
if command -v npm >/dev/null 2>&1 && [ -d editors/vscode/node_modules ]; then
  (
    cd editors/vscode
    npm run --silent compile
    npm run --silent lint
    npm test --silent
    HIROPE_PYTHON="$(pwd)/../../.venv/bin/python" npm run --silent e2e
  )
fi
# the Python suite's closing line again, last, for whoever reads only the end
tail -n 1 "$summary"
rm -f "$summary"
