"""The replay on the 0.5B-shaped random model, work ahead on only: python scripts/replay_big_ahead.py OUT.json
[LATENCY_TARGET_MS] (default 1200; the server's own default is 400)."""
import json, sys, tempfile
from pathlib import Path
from hirope_lsp.research.replay import _print, random_model_like_qwen_05b, run_replay, workspace_files
target_ms = int(sys.argv[2]) if len(sys.argv) > 2 else 1200
picked = workspace_files(6)[:2]
with tempfile.TemporaryDirectory(prefix="hirope-qwen05b-") as tmp:
    path = random_model_like_qwen_05b(Path(tmp))
    result = run_replay(picked, str(path), True, 1500, 4096, latency_target_ms=target_ms, wait_full=True)
    _print("0.5B-shaped model, work ahead on", result, 1500)
Path(sys.argv[1]).write_text(json.dumps(result, indent=2))
