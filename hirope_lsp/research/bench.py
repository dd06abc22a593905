"""Benchmarks that print figures (never timing asserts).

Each attention measurement runs in a fresh child process so that its peak
memory (max RSS on CPU, max allocated on CUDA) belongs to it alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from ..config import GATE_OFF


def _bench_model(device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device).eval()


def _attention_child(method: str, length: int, repeats: int, device: str, query_chunk: int = 1024,
                     far_bias: dict | None = None) -> dict:
    import resource

    import torch

    from ..model.patch import attach
    from ..model.rope import RopeMethodConfig, fixed_unit_positions

    torch.set_grad_enabled(False)
    model = _bench_model(device)
    ids = torch.randint(0, 4096, (1, length), device=device)
    positions = fixed_unit_positions(length, 128)
    handle = attach(model, RopeMethodConfig(method=method, window=256, split=0.4, query_chunk=query_chunk,
                                            **(far_bias or {})))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        # logits of the last token only, as a completion server needs
        handle.forward(ids, positions, logits_to_keep=1)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"method": method, "length": length, "seconds": min(times[1:]), "peak_mib": round(peak, 1)}


def bench_attention(lengths: list[int], repeats: int = 2, device: str = "cpu", query_chunk: int = 256,
                    rounds: int = 2, **far_bias) -> dict:
    """Forward time (best run) and peak memory of plain RoPE and HiRoPE per length, each in a fresh
    process; the two alternate for ``rounds`` rounds so that drift in the machine's speed hits both.
    ``far_bias``/``far_bias_mode`` keywords go to HiRoPE's configuration."""
    rows = []
    print(f"{'length':>7} {'rope s':>8} {'hirope s':>9} {'time x':>7} {'rope MiB':>9} {'hirope MiB':>11}")
    for length in lengths:
        row = {"length": length}
        for _ in range(rounds):
            for method in ("rope", "hirope"):
                out = subprocess.run(
                    [sys.executable, "-m", "hirope_lsp.research.bench", "attention-child", method, str(length), str(repeats),
                     device, str(query_chunk), json.dumps(far_bias)],
                    capture_output=True, text=True, check=True,
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
                row[f"{method}_seconds"] = min(result["seconds"], row.get(f"{method}_seconds", float("inf")))
                row[f"{method}_peak_mib"] = max(result["peak_mib"], row.get(f"{method}_peak_mib", 0.0))
        row["time_ratio"] = row["hirope_seconds"] / row["rope_seconds"]
        rows.append(row)
        print(f"{length:>7} {row['rope_seconds']:>8.3f} {row['hirope_seconds']:>9.3f} {row['time_ratio']:>7.2f} "
              f"{row['rope_peak_mib']:>9.1f} {row['hirope_peak_mib']:>11.1f}", flush=True)
    return {"device": device, "query_chunk": query_chunk, **far_bias,
            "model": "llama 4x256, 4 heads of 64, trained length 512, window 256, 128-token units", "rows": rows}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "attention-child":
        method, length, repeats, device = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        far = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
        print(json.dumps(_attention_child(method, length, repeats, device, int(sys.argv[6]), far)))


def _rss_mib(pid: int | str = "self") -> float:
    import os

    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _insert(client, uri: str, version: int, line: int, character: int, text: str) -> None:
    """A didChange that types ``text`` at a cursor, as an editor sends it."""
    at = {"line": line, "character": character}
    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version},
                                             "contentChanges": [{"range": {"start": at, "end": at}, "text": text}]})


def _p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def _ten_thousand_lines(lines: int) -> str:
    """Real code: standard library modules concatenated up to ``lines`` lines."""
    from .train import read_text, stdlib_files

    parts, count = [], 0
    for path in stdlib_files():
        if path.parent.name in ("test", "tests"):
            continue
        text = read_text(path)
        if text is None:
            continue
        parts.append(text)
        count += text.count("\n")
        if count >= lines:
            break
    return "".join(parts)


def bench_hierarchy(lines: int = 10000, keystrokes: int = 300, index_root=None) -> dict:
    import statistics
    import sysconfig
    from pathlib import Path

    from ..hierarchy.document import Change, Document
    from ..workspace.files import FilePolicy
    from ..workspace.index import WorkspaceIndex

    text = _ten_thousand_lines(lines)
    text = "\n".join(text.split("\n")[:lines]) + "\n"
    doc = Document("file:///bench/big.py", text, language_id="python")
    # type statements inside the function in the middle of the file, character by character, as a user does
    line = doc.line_count // 2
    while not doc.line_text(line).strip():
        line += 1
    content = doc.line_text(line)
    indent = content[: len(content) - len(content.lstrip())]
    typed = "".join(f"\n{indent}value_{k} = compute(alpha, beta[{k}])  # typed" for k in range(20))
    times, catch_up, full = [], [], []
    ln, col = line, len(content)
    for i in range(keystrokes):
        ch = typed[i % len(typed)]
        start = time.perf_counter()
        doc.apply_changes([Change(ch, ((ln, col), (ln, col)))], i + 1)
        times.append(time.perf_counter() - start)
        ln, col = (ln + 1, 0) if ch == "\n" else (ln, col + 1)
        if i % 5 == 4:  # a completion request reads the hierarchy (editors debounce ~200 ms: several keys)
            start = time.perf_counter()
            doc.units
            catch_up.append(time.perf_counter() - start)
        if i % 10 == 0:
            start = time.perf_counter()
            Document("file:///bench/full.py", doc.text, language_id="python").units
            full.append(time.perf_counter() - start)
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    keystroke = {
        "lines": doc.line_count,
        "bytes": len(doc.source),
        "keystrokes": keystrokes,
        "median_ms": ms(times),
        "p95_ms": sorted(times)[int(0.95 * len(times))] * 1000,
        "catch_up_median_ms": ms(catch_up),
        "catch_up_p95_ms": sorted(catch_up)[int(0.95 * len(catch_up))] * 1000,
        "full_parse_median_ms": ms(full),
        "units": len(doc.units),
    }
    keystroke["catch_up_speedup_vs_full"] = keystroke["full_parse_median_ms"] / keystroke["catch_up_median_ms"]
    print(f"{keystroke['lines']}-line file, {keystrokes} keystrokes typed in a function body:\n"
          f"  keystroke (text, lines, tree edit): median {keystroke['median_ms']:.3f} ms, p95 {keystroke['p95_ms']:.3f} ms\n"
          f"  catch-up at a request every 5 keys (incremental reparse, definitions, units): median "
          f"{keystroke['catch_up_median_ms']:.2f} ms, p95 {keystroke['catch_up_p95_ms']:.2f} ms\n"
          f"  full parse + definitions + units: median {keystroke['full_parse_median_ms']:.1f} ms "
          f"({keystroke['catch_up_speedup_vs_full']:.0f}x the catch-up)", flush=True)

    root = Path(index_root) if index_root else Path(sysconfig.get_paths()["stdlib"])
    rss_before = _rss_mib()
    start = time.perf_counter()
    policy = FilePolicy(exclude=("site-packages/", "dist-packages/") if index_root is None else ())
    index = WorkspaceIndex([root], policy)
    files = index.scan()
    seconds = time.perf_counter() - start
    rss_after = _rss_mib()
    indexing = {
        "root": str(root),
        "files": files,
        "symbols": index.symbol_count(),
        "seconds": seconds,
        "rss_mib": rss_after,
        "rss_growth_mib": rss_after - rss_before,
        "kib_per_file": (rss_after - rss_before) * 1024 / max(1, files),
    }
    print(f"indexed {files} files ({indexing['symbols']} symbols) under {root} in {seconds:.1f} s; "
          f"process RSS {rss_after:.0f} MiB (+{indexing['rss_growth_mib']:.0f} MiB, "
          f"{indexing['kib_per_file']:.1f} KiB per file)", flush=True)
    return {"keystroke": keystroke, "indexing": indexing}


def _typing_file(min_tokens: int) -> tuple[str, int]:
    """A real standard-library file long enough for the prompt budget, and the line to type at."""
    from .train import stdlib_files

    for path in stdlib_files():
        if path.name in ("argparse.py", "typing.py", "inspect.py"):
            text = path.read_text(encoding="utf-8")
            lines = text.split("\n")
            return text, min(len(lines) - 1, max(200, min_tokens // 8))
    raise RuntimeError("no long standard library file found")


def _position_options(far_bias=None, far_bias_mode=None) -> dict:
    """Server settings for the far-bias options given (none: the server's defaults)."""
    given = {"farBias": far_bias, "farBiasMode": far_bias_mode}
    given = {k: v for k, v in given.items() if v is not None}
    return {"hirope": given} if given else {}


TYPING_RUNS = (("on", True, True, {}), ("on_lookup", True, True, {"lookupTokens": 4}),
               ("on_no_ahead", True, False, {}), ("on_no_copy", True, True, {"copyWeight": 0}),
               ("on_prompt_copy", True, True, {"copyDocument": False}), ("off", False, True, {}))


def _typing_block(name: str, reuse: bool, ahead: bool, extra: dict, keys: str, along_keys: int, settings: dict,
                  text: str, line: int, pause: float) -> dict:
    """One server: open the file, a cold request, then a request after each of ``keys`` (and, when
    ``along_keys``, type along the suggestion shown)."""
    from .rawclient import RawClient

    lines = text.split("\n")
    indent = lines[line][: len(lines[line]) - len(lines[line].lstrip())]
    client = RawClient()
    try:
        client.initialize(None, {**settings, "reuseCache": reuse, "warmAhead": ahead, **extra})
        uri = "file:///bench/typing.py"
        body = "\n".join(lines[:line] + [indent] + lines[line:])
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": body}})
        col = len(indent)
        params = lambda c: {"textDocument": {"uri": uri}, "position": {"line": line, "character": c},  # noqa: E731
                            "context": {"triggerKind": 2}}
        cold_start = time.perf_counter()
        client.call("textDocument/inlineCompletion", params(col), timeout=600)  # first prompt: cold
        cold_ms = (time.perf_counter() - cold_start) * 1000
        before = client.call("hirope/status", {})["result"]
        latencies, computed = [], []
        for k, ch in enumerate(keys):
            start = time.perf_counter()
            _insert(client, uri, k + 2, line, col, ch)
            col += 1
            reply = client.call("textDocument/inlineCompletion", params(col), timeout=600)
            latencies.append(time.perf_counter() - start)
            assert "result" in reply, (name, reply)
            status = client.call("hirope/status", {})["result"]
            computed.append(status["computedTokens"] - before["computedTokens"])
            before = status
            time.sleep(pause)
        along = None
        if along_keys:
            client.notify("workspace/didChangeConfiguration", {"settings": {"hirope": {"typeAlong": True}}})
            along = _type_along(client, uri, line, col, len(keys) + 2, along_keys, params)
    finally:
        client.close()
    return {"latencies": latencies, "computed": computed, "cold_ms": cold_ms, "reused": status["reusedTokens"],
            "total": status["reusedTokens"] + status["computedTokens"], "along": along}


def bench_typing(keystrokes: int = 40, budget: int = 4000, pause: float = 0.05, max_new_tokens: int = 8,
                 far_bias=None, far_bias_mode=None, model: str | None = None, rounds: int = 2) -> dict:
    """Type into a long file through the real server over stdio, a completion request after each key.

    Each row (KV reuse on; on with 4 lookup drafts per decoding step; on without work ahead, i.e. what the
    suggestions prefetched after each answer cost the next keystroke; on without the copy model; on with the
    copy model reading only the prompt, not the file beyond it; off:
    every keystroke through the model) types ``keystrokes`` keys in ``rounds`` blocks, a fresh server
    each, the rows in turn and in reverse order every other round (A B C, C B A, ...): a machine that
    drifts while the benchmark runs weighs on every row alike, not on the row that happened to run last."""
    import statistics

    text, line = _typing_file(budget)
    typed = "result = compute_total(values, weights)"
    keys = [typed[k % len(typed)] for k in range(keystrokes)]
    rounds = max(1, min(rounds, keystrokes))
    # the whole budget on every request (reuse at a fixed prompt size; work ahead is `bench replay`'s)
    settings = {"promptBudget": budget, "maxNewTokens": max_new_tokens, "crossFile": False, "watchFiles": False,
                "typeAlong": False, "latencyTargetMs": 10000, "minConfidence": GATE_OFF,
                **({"model": model} if model else {}), **_position_options(far_bias, far_bias_mode)}
    blocks: dict[str, list[dict]] = {name: [] for name, *_ in TYPING_RUNS}
    for r in range(rounds):
        share = "".join(keys[r * keystrokes // rounds : (r + 1) * keystrokes // rounds])
        order = TYPING_RUNS if r % 2 == 0 else TYPING_RUNS[::-1]
        for name, reuse, ahead, extra in order:
            along_keys = keystrokes // 2 if name == "on" and r == rounds - 1 else 0
            blocks[name].append(_typing_block(name, reuse, ahead, extra, share, along_keys, settings, text, line,
                                              pause))
    results = {}
    for name, reuse, *_ in TYPING_RUNS:
        latencies = [x for b in blocks[name] for x in b["latencies"]]
        computed = [x for b in blocks[name] for x in b["computed"]]
        results[name] = {
            "p50_ms": statistics.median(latencies) * 1000,
            "p95_ms": _p95(latencies) * 1000,
            "recomputed_per_key_median": statistics.median(computed),
            "recomputed_per_key_mean": statistics.mean(computed),
            "reuse_ratio": sum(b["reused"] for b in blocks[name]) / max(1, sum(b["total"] for b in blocks[name])),
            "prompt_tokens": statistics.median(computed) if not reuse else None,
            "cold_ms": statistics.median(b["cold_ms"] for b in blocks[name]),
            "p50_ms_per_round": [statistics.median(b["latencies"]) * 1000 for b in blocks[name]],
        }
    along = blocks["on"][-1]["along"]
    on, off = results["on"], results["off"]
    prompt_tokens = off["prompt_tokens"]
    on["reuse_per_key"] = 1 - on["recomputed_per_key_mean"] / max(1, prompt_tokens)
    results["speedup_p50"] = off["p50_ms"] / on["p50_ms"]
    results["lookup_speedup_p50"] = on["p50_ms"] / results["on_lookup"]["p50_ms"]
    results["copy_cost_p50"] = on["p50_ms"] / results["on_no_copy"]["p50_ms"]
    results["copy_document_cost_p50"] = on["p50_ms"] / results["on_prompt_copy"]["p50_ms"]
    results["work_ahead_cost_p50"] = on["p50_ms"] / results["on_no_ahead"]["p50_ms"]
    results["rounds"] = rounds
    results["along"] = along
    print(f"typing {keystrokes} keys into a {prompt_tokens:.0f}-token prompt (budget {budget}) in {rounds} rounds, "
          f"{max_new_tokens} new tokens at most per completion")
    print(f"{'reuse':>12} {'p50 ms':>8} {'p95 ms':>8} {'recomputed/key':>15} {'reused/key':>11}  p50 per round")
    for name, *_ in TYPING_RUNS:
        r = results[name]
        reused_share = 1 - r["recomputed_per_key_mean"] / max(1, prompt_tokens)
        per_round = " / ".join(f"{x:.0f}" for x in r["p50_ms_per_round"])
        print(f"{name:>12} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['recomputed_per_key_mean']:>15.1f} "
              f"{reused_share:>10.1%}  {per_round}")
    print(f"p50 speed-up with reuse: {results['speedup_p50']:.1f}x, with lookup drafts: "
          f"{results['lookup_speedup_p50']:.2f}x; with work ahead against without: "
          f"{results['work_ahead_cost_p50']:.2f}x; with the copy model against without: "
          f"{results['copy_cost_p50']:.2f}x, reading the whole file against the prompt only: "
          f"{results['copy_document_cost_p50']:.2f}x; cold first request {on['cold_ms']:.0f} ms")
    if along["keys"]:
        print(f"typing along the suggestion: {along['keys']} keys, p50 {along['p50_ms']:.1f} ms, "
              f"{along['model_runs']} of them ran the model")
    return results


def _type_along(client, uri: str, line: int, col: int, version: int, keystrokes: int, params) -> dict:
    """Type the shown suggestion's characters one by one (a user accepting it by typing)."""
    import statistics

    latencies, model_runs = [], 0
    reply = client.call("textDocument/inlineCompletion", params(col), timeout=600)
    for _ in range(keystrokes):
        items = reply["result"]["items"]
        text = items[0]["insertText"] if items else ""
        if not text or text[0] in "\r\n":
            break  # nothing (left) on this line to type along with
        computed = client.call("hirope/status", {})["result"]["computedTokens"]
        start = time.perf_counter()
        _insert(client, uri, version, line, col, text[0])
        version += 1
        col += len(text[0].encode("utf-16-le")) // 2
        reply = client.call("textDocument/inlineCompletion", params(col), timeout=600)
        latencies.append(time.perf_counter() - start)
        model_runs += client.call("hirope/status", {})["result"]["computedTokens"] != computed
    return {"keys": len(latencies), "model_runs": model_runs,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else None}


def bench_soak(requests: int = 10000, report_every: int = 500, cache_budget_mb: int = 64, far_bias=None,
               far_bias_mode=None, warm_ahead: bool = True, pause_every: int = 0, pause_s: float = 0.5,
               gate: bool = True) -> dict:
    """One long session through the real server: edits and a completion request after each, with
    RSS, KV-cache bytes and latency reported every ``report_every`` requests.  ``pause_every``: the user
    rests ``pause_s`` after every that many requests, so that work ahead runs too (without pauses it
    never starts: the next keystroke always comes first).  ``gate`` False: every suggestion is shown."""
    import random
    import statistics

    from ..hierarchy.document import LINE_BREAK
    from .rawclient import RawClient, first_suggestion

    text, _ = _typing_file(2000)
    lines = text.split("\n")[:1500]
    rng = random.Random(0)
    client = RawClient()
    rows = []
    try:
        client.initialize(None, {"promptBudget": 1024, "maxNewTokens": 4, "crossFile": False, "watchFiles": False,
                                 "cacheBudgetMb": cache_budget_mb, "warmAhead": warm_ahead,
                                 **({} if gate else {"minConfidence": GATE_OFF}),
                                 **_position_options(far_bias, far_bias_mode)})
        # four documents, typed into at a cursor each; the budget holds the KV state of about three
        uris = [f"file:///soak/doc{k}.py" for k in range(4)]
        versions, cursors, indents = {}, {}, {}
        for n, uri in enumerate(uris):
            versions[uri] = 1
            line = 400 + 200 * n
            while not lines[line].startswith("        ") or not lines[line].strip():
                line += 1  # the end of a statement inside a function body
            indents[uri] = lines[line][: len(lines[line]) - len(lines[line].lstrip())]
            cursors[uri] = [line, len(lines[line]), len(lines[line])]
            client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                    "text": "\n".join(lines)}})
        latencies, unanswered, errors, accepted = [], 0, 0, 0
        shown: dict[str, str] = {}  # each document's last suggestion, as the editor shows it
        rested_in = None  # the document the user rested in, reading its suggestion
        started = time.time()
        for k in range(1, requests + 1):
            accept = LINE_BREAK.split(shown.get(rested_in, ""), maxsplit=1)[0] if rested_in else ""
            uri = rested_in if accept else uris[0] if rng.random() < 0.7 else rng.choice(uris)  # mostly one buffer
            line, col, start = cursors[uri]
            # after a rest the suggestion's first line is accepted (as Tab inserts it); else words and operators,
            # a new statement line (same indentation) every 40 characters
            ch = accept or ("\n" + indents[uri] if col >= start + 40 else rng.choice("abcdefghij =+_"))
            accepted += bool(accept)
            versions[uri] += 1
            _insert(client, uri, versions[uri], line, col, ch)
            if ch.startswith("\n"):
                cursors[uri] = [line + 1, len(indents[uri]), len(indents[uri])]
            else:
                cursors[uri] = [line, col + len(ch.encode("utf-16-le")) // 2, start]
            line, col, _ = cursors[uri]
            t0 = time.perf_counter()
            shown[uri] = ""
            try:
                reply = client.call("textDocument/inlineCompletion", {"textDocument": {"uri": uri},
                                    "position": {"line": line, "character": col}, "context": {"triggerKind": 2}}, 120)
                errors += "error" in reply
                shown[uri] = first_suggestion(reply)
            except TimeoutError:
                unanswered += 1
            latencies.append(time.perf_counter() - t0)
            rested_in = None
            if pause_every and k % pause_every == 0:
                time.sleep(pause_s)
                rested_in = uri
            if k % report_every == 0:
                status = client.call("hirope/status", {})["result"]
                rss = _rss_mib(client.proc.pid)
                window = latencies[-report_every:]
                row = {"requests": k, "rss_mib": rss, "cache_mib": status["cacheBytes"] / 2**20,
                       "warmed_tokens": status["warmedTokens"], "warmed_used_tokens": status["warmedUsedTokens"],
                       "prefetched_answers": status["prefetchedAnswers"], "p50_ms": statistics.median(window) * 1000,
                       "p95_ms": _p95(window) * 1000, "elapsed_s": time.time() - started}
                rows.append(row)
                print(f"{k:>6} requests: RSS {rss:7.1f} MiB, KV cache {row['cache_mib']:6.1f} MiB "
                      f"(budget {cache_budget_mb}), p50 {row['p50_ms']:6.1f} ms, p95 {row['p95_ms']:6.1f} ms, "
                      f"warmed {row['warmed_tokens']} tokens ({row['warmed_used_tokens']} used), "
                      f"{row['prefetched_answers']} prefetched answers", flush=True)
        alive = client.proc.poll() is None
    finally:
        client.close()
    result = {"requests": requests, "unanswered": unanswered, "errors": errors, "server_alive": alive,
              "cache_budget_mib": cache_budget_mb, "warm_ahead": warm_ahead, "pause_every": pause_every,
              "pause_s": pause_s if pause_every else 0, "accepted": accepted, "rows": rows,
              "cache_within_budget": all(r["cache_mib"] <= cache_budget_mb for r in rows)}
    print(f"{requests} requests ({accepted} after accepting a suggestion): {unanswered} unanswered, {errors} errors, "
          f"server alive: {alive}, "
          f"KV cache within budget: {result['cache_within_budget']}; RSS {rows[0]['rss_mib']:.0f} -> "
          f"{rows[-1]['rss_mib']:.0f} MiB; p50 {rows[0]['p50_ms']:.0f} -> {rows[-1]['p50_ms']:.0f} ms")
    return result
