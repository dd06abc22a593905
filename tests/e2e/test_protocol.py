"""Protocol edge cases over raw stdio: malformed input, cancellation, superseded requests."""

import pytest
from e2e.data import GEOMETRY
from hirope_lsp.config import GATE_OFF
from hirope_lsp.research.rawclient import RawClient

pytestmark = pytest.mark.e2e


@pytest.fixture
def raw(workspace):
    client = RawClient(cwd=str(workspace))
    # the confidence gate off: the tests need the suggestion whatever the model thinks of it
    client.initialize(workspace.as_uri(), {"maxNewTokens": 48, "promptBudget": 1024, "minConfidence": GATE_OFF})
    client.workspace = workspace
    yield client
    client.close()


def open_geometry(raw) -> str:
    uri = (raw.workspace / "geometry.py").as_uri()
    raw.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                         "text": GEOMETRY}})
    return uri


def inline_params(uri, line, character):
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 2}}


def test_malformed_json_gets_a_parse_error(raw):
    raw.send_raw(b'{"jsonrpc": "2.0", "id": 5, "method": "textDocument/inlineCompletion", "params": {')
    reply = raw.response(None, timeout=30)
    assert reply["error"]["code"] == -32700
    assert raw.call("hirope/status", {})["result"]["status"]  # still serving


def test_wrong_parameter_types_get_invalid_params(raw):
    reply = raw.call("textDocument/inlineCompletion", {"textDocument": {"uri": 42}, "position": "here"}, timeout=30)
    assert reply["error"]["code"] == -32602
    reply = raw.call("textDocument/inlineCompletion", None, timeout=30)
    assert "error" in reply
    assert raw.call("hirope/status", {})["result"]["status"]


def test_unknown_method_gets_method_not_found(raw):
    reply = raw.call("textDocument/teleport", {}, timeout=30)
    assert reply["error"]["code"] == -32601


def test_cancel_request_is_answered(raw):
    uri = open_geometry(raw)
    raw.call("textDocument/inlineCompletion", inline_params(uri, 13, 33))  # the model is loaded and warm
    request = raw.request("textDocument/inlineCompletion", inline_params(uri, 13, 33))
    raw.notify("$/cancelRequest", {"id": request})
    reply = raw.response(request)
    assert "result" in reply or reply["error"]["code"] == -32800


def test_handled_notifications_are_forgotten(raw):
    """A server typed into for hours must not keep every keystroke's handler (pygls 2.1 did)."""
    uri = open_geometry(raw)
    for version in range(2, 302):
        raw.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version}, "contentChanges": [
            {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "#"}]})
    raw.notify("textDocument/didSave", {"textDocument": {"uri": uri}})
    raw.call("textDocument/inlineCompletion", inline_params(uri, 13, 33))
    status = raw.call("hirope/status", {})["result"]
    assert status["handling"] <= 3, f"{status['handling']} handled messages still held after 300 keystrokes"
    state = raw.call("hirope/documentState", {"uri": uri})["result"]
    assert state["version"] == 301, "every keystroke applied"


def test_superseded_requests_are_all_answered_and_only_the_current_version_completes(raw):
    uri = open_geometry(raw)
    first = raw.request("textDocument/inlineCompletion", inline_params(uri, 13, 33))
    raw.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [
        {"range": {"start": {"line": 13, "character": 33}, "end": {"line": 13, "character": 33}}, "text": "r"}]})
    second = raw.request("textDocument/inlineCompletion", inline_params(uri, 13, 34))
    third = raw.request("textDocument/inlineCompletion", inline_params(uri, 13, 34))
    replies = [raw.response(r) for r in (first, second, third)]
    assert all("result" in r for r in replies), replies
    assert replies[0]["result"]["items"] == [], "a result for version 1 is never returned after the edit"
    assert replies[1]["result"]["items"] == [], "superseded by the third request"
    items = replies[2]["result"]["items"]
    assert len(items) == 1, "the current request completes (the model suggests after 'selfr')"
    assert items[0]["insertText"].strip()
    assert items[0]["range"]["start"] == {"line": 13, "character": 34}
    state = raw.call("hirope/documentState", {"uri": uri})["result"]
    assert state["version"] == 2


def test_missing_model_is_reported_and_requests_get_errors(workspace):
    client = RawClient(cwd=str(workspace))
    try:
        client.initialize(workspace.as_uri(), {"model": str(workspace / "no-such-model")})
        uri = (workspace / "geometry.py").as_uri()
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": GEOMETRY}})
        reply = client.call("textDocument/inlineCompletion", inline_params(uri, 13, 33), timeout=60)
        assert "does not exist" in reply["error"]["message"]
        shown = [n for n in client.notifications if n.get("method") == "window/showMessage"]
        assert any("does not exist" in n["params"]["message"] for n in shown)
        assert client.call("hirope/status", {})["result"]["status"].startswith("error")
    finally:
        client.close()


def test_tcp_transport(workspace):
    import json
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "hirope_lsp", "serve", "--tcp", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=60)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"processId": None, "rootUri": None, "capabilities": {}}}).encode()
        conn.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while b"inlineCompletionProvider" not in data:
            chunk = conn.recv(65536)
            assert chunk, "the server closed the connection"
            data += chunk
        assert b'"id": 1' in data or b'"id":1' in data
        conn.close()
    finally:
        proc.kill()
        proc.wait()
