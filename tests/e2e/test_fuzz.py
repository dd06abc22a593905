"""Random editor sessions against the real server (short in CI; HIROPE_FUZZ_STEPS / HIROPE_FUZZ_SESSIONS
for long runs).  Invariants: no crash, no hang, every request answered, completions only for the
current document version and at a valid position, documents identical to the client's, memory bounded."""

import hashlib
import itertools
import os
import random
import re
import time

import pytest
from hirope_lsp.research.rawclient import RawClient

pytestmark = pytest.mark.e2e

STEPS = int(os.environ.get("HIROPE_FUZZ_STEPS", "120"))
SESSIONS = int(os.environ.get("HIROPE_FUZZ_SESSIONS", "1"))
PIECES = ["def f(x):\n    return x\n", "\r\n", "\n", "😀", "你好", "é", "    ", "(", ")", "x = 1", "class A:\n  pass\n",
          "\t", "'''", "{", "}", "// comment\n", "#include <x.h>\n", "ß" * 3, "\u200b", ""]
LANGS = [("python", ".py"), ("javascript", ".js"), ("go", ".go"), ("rust", ".rs"), ("plaintext", ".txt"), ("c", ".c")]
CACHE_MB = 64


def utf16_position(text: str, offset: int) -> dict:
    lines = re.split(r"(?<=\r\n)|(?<=\r)(?!\n)|(?<=\n)", text)
    start = 0
    for i, piece in enumerate(lines):
        if start + len(piece) > offset or i == len(lines) - 1:
            col = len(text[start:offset].encode("utf-16-le")) // 2
            return {"line": i, "character": col}
        start += len(piece)
    raise AssertionError("unreachable")


def safe_offset(text: str, offset: int) -> int:
    if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n":
        offset -= 1
    return offset


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_session(workspace, seed: int, steps: int) -> dict:
    rng = random.Random(seed)
    client = RawClient(cwd=str(workspace))
    stats = {"steps": 0, "requests": 0, "answered": 0, "completions": 0, "non_empty": 0, "divergent": 0, "typed_along": 0,
             "stale_results": 0, "overtaken": 0, "max_rss_mib": 0.0}
    try:
        client.initialize(workspace.as_uri(), {"maxNewTokens": 4, "promptBudget": 512, "cacheBudgetMb": CACHE_MB})
        docs: dict[str, dict] = {}
        pending: dict[int, dict] = {}
        # the server reads messages in the order they were sent: an edit sent before a request whose
        # answer arrived before a completion's had been read by the server when it answered
        sent = itertools.count()
        edits: dict[str, list[int]] = {}  # uri -> sequence numbers of its changes and closing
        request_seq: dict[int, int] = {}
        probes: list[int] = []

        def answer(request_id, timeout=120):
            reply = client.response(request_id, timeout)
            stats["answered"] += 1
            return reply

        def check_completion(reply, info):
            stats["completions"] += 1
            if "error" in reply:
                assert reply["error"]["code"] in (-32800, -32602), reply
                return
            items = reply["result"]["items"]
            if items:
                stats["non_empty"] += 1
                doc = docs.get(info["uri"])
                if doc is not None and doc["version"] == info["version"]:
                    doc["shown"] = (info["version"], info["offset"], items[0]["insertText"])
                arrived = client.arrived[reply["id"]]
                read_up_to = max((request_seq[q] for q, t in client.arrived.items() if t < arrived and q in request_seq),
                                 default=-1)
                mine = request_seq[reply["id"]]
                if any(mine < edit < read_up_to for edit in edits.get(info["uri"], [])):
                    stats["stale_results"] += 1  # the server had read a newer edit and still answered
                elif docs.get(info["uri"], {}).get("version") != info["version"]:
                    stats["overtaken"] += 1  # an edit still unread by the server when it answered
                assert items[0]["range"]["start"] == info["position"]

        for step in range(steps):
            stats["steps"] += 1
            action = rng.choices(["open", "change", "close", "complete", "cancel", "config", "disk", "save", "along"],
                                 [2, 10, 1, 5, 2, 1, 1, 1, 2])[0]
            along = None
            if action == "along":  # type the start of the suggestion shown last, as a user accepting it does
                uri = rng.choice(list(docs)) if docs else None
                shown = docs[uri].get("shown") if uri else None
                if not shown or shown[0] != docs[uri]["version"] or len(shown[2]) < 2 or "\r" in shown[2][:2]:
                    continue
                along = (uri, shown[1], shown[2][: rng.choice([1, 2])])
                stats["typed_along"] += 1
            if action == "open" or not docs:
                lang, ext = rng.choice(LANGS)
                uri = (workspace / f"doc{step}{ext}").as_uri()
                text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40)))
                docs[uri] = {"text": text, "version": 1}
                client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": lang, "version": 1,
                                                                        "text": text}})
            elif action == "change":
                uri = rng.choice(list(docs))
                doc = docs[uri]
                changes = []
                for _ in range(rng.choice([1, 1, 2, 3])):
                    text = doc["text"]
                    a = safe_offset(text, rng.randrange(0, len(text) + 1))
                    b = safe_offset(text, min(len(text), a + rng.choice([0, 0, 1, 3, 10])))
                    new = rng.choice(PIECES)
                    changes.append({"range": {"start": utf16_position(text, a), "end": utf16_position(text, b)},
                                    "text": new})
                    doc["text"] = text[:a] + new + text[b:]
                doc["version"] += 1
                edits.setdefault(uri, []).append(next(sent))
                client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": doc["version"]},
                                                         "contentChanges": changes})
                if rng.random() < 0.5:  # answered on the event loop at once: shows how far the server has read
                    probe = client.request("hirope/documentState", {"uri": uri})
                    request_seq[probe] = next(sent)
                    probes.append(probe)
                    stats["requests"] += 1
            elif action == "close":
                uri = rng.choice(list(docs))
                del docs[uri]
                edits.setdefault(uri, []).append(next(sent))
                client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
            elif action in ("complete", "cancel", "along"):
                uri = along[0] if along else rng.choice(list(docs))
                doc = docs[uri]
                if along:
                    _, offset, typed = along
                    text = doc["text"]
                    doc["text"], doc["version"] = text[:offset] + typed + text[offset:], doc["version"] + 1
                    edits.setdefault(uri, []).append(next(sent))
                    position = utf16_position(text, offset)
                    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": doc["version"]},
                                                             "contentChanges": [{"range": {"start": position, "end": position},
                                                                                 "text": typed}]})
                    offset += len(typed)
                else:
                    offset = safe_offset(doc["text"], rng.randrange(0, len(doc["text"]) + 1))
                position = utf16_position(doc["text"], offset)
                rid = client.request("textDocument/inlineCompletion", {"textDocument": {"uri": uri},
                                                                       "position": position, "context": {"triggerKind": 2}})
                stats["requests"] += 1
                request_seq[rid] = next(sent)
                pending[rid] = {"uri": uri, "version": doc["version"], "position": position, "offset": offset}
                if action == "cancel":
                    client.notify("$/cancelRequest", {"id": rid})
                if rng.random() < 0.5 or len(pending) > 4:
                    for rid, info in list(pending.items()):
                        check_completion(answer(rid), info)
                        del pending[rid]
            elif action == "config":
                client.notify("workspace/didChangeConfiguration", {"settings": {"hirope": {
                    "maxNewTokens": rng.choice([2, 4, 6]), "multiline": rng.choice(["auto", "never", "bogus"])}}})
            elif action == "disk":
                path = workspace / f"disk{rng.randrange(5)}.py"
                if path.exists() and rng.random() < 0.5:
                    path.unlink()
                else:
                    path.write_text(f"def on_disk_{step}():\n    return {step}\n")
            elif action == "save":
                uri = rng.choice(list(docs))
                client.notify("textDocument/didSave", {"textDocument": {"uri": uri}})
            if step % 10 == 0:
                stats["max_rss_mib"] = max(stats["max_rss_mib"], rss_mib(client.proc.pid))
        for rid, info in pending.items():
            check_completion(answer(rid), info)
        for probe in probes:
            reply = answer(probe, 60)
            assert "result" in reply, reply
        # every document the server holds is the client's, character for character
        for uri, doc in docs.items():
            state = client.call("hirope/documentState", {"uri": uri}, timeout=60)["result"]
            digest = hashlib.sha1(doc["text"].encode("utf-8")).hexdigest()
            if state["version"] != doc["version"] or state["sha1"] != digest:
                stats["divergent"] += 1
        status = client.call("hirope/status", {}, timeout=60)["result"]
        stats["cache_bytes"] = status["cacheBytes"]
        stats["max_rss_mib"] = max(stats["max_rss_mib"], rss_mib(client.proc.pid))
        assert client.proc.poll() is None, "the server is alive"
    finally:
        client.close()
    return stats


def test_fuzzed_sessions(workspace, capsys):
    started = time.time()
    totals = []
    for session in range(SESSIONS):
        stats = run_session(workspace, seed=1000 + session, steps=STEPS)
        totals.append(stats)
        assert stats["answered"] == stats["requests"], "every request answered"
        assert stats["divergent"] == 0, "documents identical to the client's"
        assert stats["stale_results"] == 0, "no completion for a version older than the server had read"
        assert stats["cache_bytes"] <= CACHE_MB << 20, "KV cache within its budget"
        assert stats["max_rss_mib"] < 3000
    with capsys.disabled():
        print(f"\nfuzz: {len(totals)} sessions, {sum(t['steps'] for t in totals)} steps, "
              f"{sum(t['requests'] for t in totals)} requests ({sum(t['typed_along'] for t in totals)} after typing along a "
              f"suggestion), all answered, 0 stale "
              f"({sum(t['overtaken'] for t in totals)} overtaken by edits the server had not read yet), 0 divergent; "
              f"max RSS {max(t['max_rss_mib'] for t in totals):.0f} MiB; {time.time() - started:.0f} s")
