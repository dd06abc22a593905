"""A bare JSON-RPC client over the server's stdio, as an editor talks to it: for benchmarks, and for tests of
what a well-behaved client library cannot send (malformed JSON, wrong parameter types, exact cancellation)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time


def first_suggestion(reply: dict) -> str:
    """The first item's text of an ``inlineCompletion`` reply ("" for none); LSP allows a bare item list, an
    ``InlineCompletionList`` or null as the result."""
    result = reply.get("result") or []
    items = result if isinstance(result, list) else result.get("items") or []
    return items[0]["insertText"] if items else ""


class RawClient:
    def __init__(self, args: list[str] | None = None, cwd: str | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "hirope_lsp", "serve", *(args or [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.messages: queue.Queue = queue.Queue()
        self.notifications: list[dict] = []
        self.responses: dict = {}
        self.arrived: dict = {}  # response id -> time.monotonic() of arrival
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.stderr_lines: list[str] = []

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode("utf-8", "replace"))

    def _read(self):
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                if line.strip() == b"":
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = out.read(length)
            msg = json.loads(body)
            if "id" in msg and "method" not in msg:
                self.arrived[msg["id"]] = time.monotonic()  # when the response came in (clients order by it)
            self.messages.put(msg)

    def send_raw(self, body: bytes) -> None:
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def send(self, payload: dict) -> None:
        self.send_raw(json.dumps(payload).encode())

    def request(self, method: str, params) -> int:
        self._next_id += 1
        self.send({"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params})
        return self._next_id

    def notify(self, method: str, params) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def response(self, request_id, timeout: float = 120.0) -> dict:
        if request_id in self.responses:
            return self.responses.pop(request_id)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if "method" in msg:
                if "id" in msg:  # a request from the server (progress, configuration): answer it
                    self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
                else:
                    self.notifications.append(msg)
                continue
            if msg.get("id") == request_id:
                return msg
            self.responses[msg.get("id")] = msg  # a response to another request, kept for its caller
        raise TimeoutError(f"no response to {request_id} within {timeout} s")

    def call(self, method: str, params, timeout: float = 120.0) -> dict:
        return self.response(self.request(method, params), timeout)

    def initialize(self, root_uri: str | None = None, options: dict | None = None, capabilities: dict | None = None):
        result = self.call("initialize", {"processId": os.getpid(), "rootUri": root_uri,
                                          "capabilities": capabilities or {}, "initializationOptions": options or {},
                                          "workspaceFolders": [{"uri": root_uri, "name": "ws"}] if root_uri else None})
        self.notify("initialized", {})
        return result

    def close(self):
        try:
            self.call("shutdown", None, timeout=30)
            self.notify("exit", None)
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
