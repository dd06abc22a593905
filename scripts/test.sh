#!/usr/bin/env bash
# The test suite (CPU). GPU-only tests are marked `gpu` and skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
