"""What users feel: a replay of an editing session against the real server over stdio, with the
pauses an editor leaves (Neovim's 200 ms debounce), timed from the pause to the suggestion.

Per file of a real workspace: open it with the cursor mid-statement (the client says where with
``hirope/warm``, as our plugins do), rest 1 s, ask; type a few characters, each request after the
debounce; accept the suggestion after reading it and ask at once (the editor's next request); jump
far in the file, rest, type, ask; at the end switch back to the first file.  Run with work ahead
on and off (today's behaviour) in the same run, and with a model of Qwen2.5-Coder-0.5B's shape
(random weights: speed does not depend on them).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ..config import GATE_OFF
from .rawclient import first_suggestion

DEBOUNCE_S = 0.2  # Neovim's and our plugin's wait after a keystroke before asking
KEY_S = 0.08  # between keystrokes of a word
OPEN_REST_S = 1.0
READ_S = 0.6  # reading a suggestion before accepting it
QWEN_05B_SHAPE = dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                      num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True)


def workspace_files(count: int, min_tokens: int = 2500, max_tokens: int = 4000) -> list[Path]:
    """Standard-library modules of about 3,000 tokens (the issue's file size), by size in bytes."""
    from .train import stdlib_files

    picked = []
    for path in stdlib_files():
        size = path.stat().st_size
        if min_tokens * 3.5 <= size <= max_tokens * 3.5 and "test" not in path.parts and path.name != "__init__.py":
            picked.append(path)
        if len(picked) == count:
            break
    return picked


def _mid_statement(text: str, fraction: float) -> tuple[str, int, int]:
    """The text with one line cut mid-statement (the user is writing it) near ``fraction`` of the file."""
    lines = text.split("\n")
    start = int(len(lines) * fraction)
    for i in list(range(start, len(lines))) + list(range(0, start)):
        stripped = lines[i].strip()
        if len(stripped) > 12 and lines[i].startswith("    ") and not stripped.startswith(("#", '"', "'")):
            for mark in ("(", " = ", "."):
                at = lines[i].find(mark)
                if at > 0:
                    cut = at + len(mark)
                    lines[i] = lines[i][:cut]
                    return "\n".join(lines), i, cut
    raise ValueError("no statement to cut")


def random_model_like_qwen_05b(out: Path) -> Path:
    """A Qwen2 model of Qwen2.5-Coder-0.5B's shape with random weights and the default tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from ..model.loading import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), **QWEN_05B_SHAPE)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class Replay:
    def __init__(self, client, root: Path, wait_full: bool = False):
        self.client, self.root, self.wait_full = client, root, wait_full
        self.events: list[dict] = []
        self.versions: dict[str, int] = {}
        self.first: tuple[str, int, int] | None = None  # where the session switches back to at the end
        self.full_context_s: list[float] = []  # from opening a file until its full prompt is warm

    def _ask(self, kind: str, uri: str, line: int, character: int) -> str:
        start = time.perf_counter()
        reply = self.client.call("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 2}}, timeout=600)
        ms = (time.perf_counter() - start) * 1000
        text = first_suggestion(reply)
        self.events.append({"kind": kind, "ms": ms, "chars": len(text)})
        return text

    def _edit(self, uri: str, line: int, character: int, text: str) -> None:
        from .bench import _insert

        self.versions[uri] += 1
        _insert(self.client, uri, self.versions[uri], line, character, text)

    def _point(self, uri: str, line: int, character: int) -> None:
        self.client.notify("hirope/warm", {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})

    def run_file(self, path: Path) -> None:
        text, line, col = _mid_statement(path.read_text(encoding="utf-8"), 0.6)
        uri = (self.root / path.name).as_uri()
        self.versions[uri] = 1
        self.client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                     "text": text}})
        opened = time.perf_counter()
        self._point(uri, line, col)  # the plugin: the buffer is entered with the cursor here
        time.sleep(OPEN_REST_S)
        suggestion = self._ask("open", uri, line, col)
        if self.wait_full:
            while uri in self.client.call("hirope/status", {}, timeout=600)["result"]["warming"]:
                time.sleep(0.1)
            self.full_context_s.append(time.perf_counter() - opened)
        for ch in "x_":  # a few keys, then the debounce
            time.sleep(KEY_S)
            self._edit(uri, line, col, ch)
            col += 1
        time.sleep(DEBOUNCE_S)
        suggestion = self._ask("type", uri, line, col)
        if suggestion:
            time.sleep(READ_S)
            self._edit(uri, line, col, suggestion)  # accepted: inserted as the editor inserts it
            *above, last = suggestion.split("\n")
            line, col = (line + len(above), len(last)) if above else (line, col + len(suggestion))
            self._ask("accept", uri, line, col)
        lines = text.split("\n")
        jump = max(0, int(len(lines) * 0.25))
        jump_col = len(lines[jump])
        self._point(uri, jump, jump_col)  # the cursor rests after the jump
        time.sleep(OPEN_REST_S)
        self._edit(uri, jump, jump_col, "\n" + " " * (len(lines[jump]) - len(lines[jump].lstrip())))
        time.sleep(DEBOUNCE_S)
        self._ask("jump", uri, jump + 1, len(lines[jump]) - len(lines[jump].lstrip()))
        if self.first is None:
            self.first = (uri, line, col)

    def switch_back(self) -> None:
        uri, line, col = self.first
        self._point(uri, line, col)
        time.sleep(OPEN_REST_S)
        self._ask("switch", uri, line, col)


def _summary(events: list[dict], target_ms: float) -> dict:
    out = {}
    for kind in ("open", "type", "accept", "jump", "switch", "all"):
        ms = [e["ms"] for e in events if kind in ("all", e["kind"])]
        if ms:
            out[kind] = {"n": len(ms), "p50_ms": statistics.median(ms),
                         "p95_ms": sorted(ms)[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)],
                         "within_target": sum(m <= target_ms for m in ms) / len(ms)}
    return out


def run_replay(files: list[Path], model: str | None, warm_ahead: bool, target_ms: float, budget: int,
               latency_target_ms: int, wait_full: bool = False) -> dict:
    from .rawclient import RawClient

    root = Path(tempfile.mkdtemp(prefix="hirope-replay-"))
    for path in files:
        shutil.copy(path, root / path.name)
    client = RawClient()
    try:
        # the confidence gate off: the accepts (and prefetches) that follow a shown suggestion are timed
        options = {"warmAhead": warm_ahead, "promptBudget": budget, "latencyTargetMs": latency_target_ms,
                   "minConfidence": GATE_OFF, **({"model": model} if model else {})}
        client.initialize(root.as_uri(), options)
        for _ in range(6000):
            state = client.call("hirope/status", {}, timeout=600)["result"]
            if state["state"] in ("ready", "failed"):
                break
            time.sleep(0.05)
        assert state["state"] == "ready", state
        replay = Replay(client, root, wait_full and warm_ahead)
        for path in files:
            replay.run_file(path)
        replay.switch_back()
        status = client.call("hirope/status", {}, timeout=600)["result"]
    finally:
        client.close()
        shutil.rmtree(root, ignore_errors=True)
    unused = status["warmedTokens"] - status["warmedUsedTokens"]
    return {"events": replay.events, "summary": _summary(replay.events, target_ms), "status": status,
            "full_context_s": replay.full_context_s,
            "warm_unused_tokens": unused,
            "warm_unused_cpu_s": unused * (status["prefillMsPerToken"] or 0) / 1000}


def _print(name: str, result: dict, target_ms: float) -> None:
    print(f"{name}:")
    print(f"  {'event':>7} {'n':>3} {'p50 ms':>8} {'p95 ms':>8} {f'<= {target_ms:.0f} ms':>10}")
    for kind, row in result["summary"].items():
        print(f"  {kind:>7} {row['n']:>3} {row['p50_ms']:>8.0f} {row['p95_ms']:>8.0f} {row['within_target']:>10.0%}")
    s = result["status"]
    print(f"  warmed {s['warmedTokens']} tokens, {s['warmedUsedTokens']} used by a request; unused warming "
          f"~{result['warm_unused_cpu_s']:.1f} s of CPU; {s['fastAnswers']} short-prompt answers, "
          f"{s['prefetchedAnswers']} answered by one of {s['suggestedAhead']} suggestions made ahead; prefill {s['prefillMsPerToken']:.2f} ms/token, "
          f"decode {s['decodeMsPerToken']:.1f} ms/token")
    if result["full_context_s"]:
        print("  full prompt warm " + ", ".join(f"{t:.1f}" for t in result["full_context_s"]) + " s after opening")


def bench_replay(files: int = 6, target_ms: float = 150, budget: int = 4096, latency_target_ms: int = 400,
                 model: str | None = None, big: bool = False, big_files: int = 2, json_path: Path | None = None) -> dict:
    """The replay with work ahead on and off on the default (or given) model; ``big``: also on a random
    model of Qwen2.5-Coder-0.5B's shape, fewer files, with 1.5 s as the target."""
    picked = workspace_files(files)
    results = {"files": [p.name for p in picked], "target_ms": target_ms}
    for warm_ahead in (True, False):
        name = "ahead" if warm_ahead else "no-ahead"
        results[name] = run_replay(picked, model, warm_ahead, target_ms, budget, latency_target_ms)
        _print(f"{model or 'default model'}, work ahead {'on' if warm_ahead else 'off'}", results[name], target_ms)
    on, off = results["ahead"]["summary"], results["no-ahead"]["summary"]
    for kind in ("open", "accept", "all"):
        if kind in on and kind in off:
            print(f"  {kind}: p50 {off[kind]['p50_ms']:.0f} -> {on[kind]['p50_ms']:.0f} ms "
                  f"({off[kind]['p50_ms'] / max(on[kind]['p50_ms'], 1e-3):.1f}x)")
    if big:
        with tempfile.TemporaryDirectory(prefix="hirope-qwen05b-") as tmp:
            path = random_model_like_qwen_05b(Path(tmp))
            big_target = 1500
            for warm_ahead in (True, False):
                name = "big-ahead" if warm_ahead else "big-no-ahead"
                results[name] = run_replay(picked[:big_files], str(path), warm_ahead, big_target, budget,
                                           latency_target_ms=1200, wait_full=True)
                _print(f"0.5B-shaped model, work ahead {'on' if warm_ahead else 'off'}", results[name], big_target)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    return results
