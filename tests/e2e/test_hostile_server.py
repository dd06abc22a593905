"""Heavy hostile inputs through the real server: a 50 MB document, a workspace of 100,000 files,
binary and non-UTF-8 files, a symlink loop.  Marked slow (minutes); run with `-m slow`."""

import os
import time

import pytest
from hirope_lsp.research.rawclient import RawClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_fifty_megabyte_document_and_a_huge_workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    many = ws / "many"
    many.mkdir()
    for i in range(100_000):
        (many / f"f{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    (ws / "blob.bin").write_bytes(os.urandom(4096) + b"\x00")
    (ws / "latin1.py").write_bytes(b"# caf\xe9\n")
    os.symlink(ws, ws / "loop")
    client = RawClient(cwd=str(ws))
    try:
        client.initialize(ws.as_uri(), {"maxNewTokens": 4, "promptBudget": 512})
        big = "x = 1\n" * (50 * 1024 * 1024 // 6)
        uri = (ws / "big.py").as_uri()
        start = time.time()
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": big}})
        reply = client.call("textDocument/inlineCompletion", {"textDocument": {"uri": uri},
                                                              "position": {"line": 4_000_000, "character": 0},
                                                              "context": {"triggerKind": 2}}, timeout=600)
        assert "result" in reply, reply
        print(f"50 MB document: completion answered {time.time() - start:.1f} s after didOpen")
        deadline = time.time() + 600
        while time.time() < deadline:
            status = client.call("hirope/status", {}, timeout=60)["result"]
            if status["indexedFiles"] >= 100_000:
                break
            time.sleep(2)
        assert status["indexedFiles"] >= 100_000
        print(f"100,000-file workspace indexed; server still serving: {status['status']}")
    finally:
        client.close()
