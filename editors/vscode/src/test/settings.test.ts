import { strict as assert } from "node:assert";
import { test } from "node:test";
import { ConfigReader, serverCommand, serverSettings, statusText } from "../settings";

function reader(values: Record<string, unknown>): ConfigReader {
  return { get: <T>(key: string, fallback: T) => (key in values ? (values[key] as T) : fallback) };
}

test("the default command runs the server module with the configured python", () => {
  assert.deepEqual(serverCommand(reader({ pythonPath: "/venv/bin/python" })), {
    command: "/venv/bin/python",
    args: ["-m", "hirope_lsp", "serve"],
  });
  assert.deepEqual(serverCommand(reader({})).args, ["-m", "hirope_lsp", "serve"]);
});

test("a configured server command wins", () => {
  assert.deepEqual(serverCommand(reader({ serverCommand: ["hirope-lsp", "serve", "--device", "cuda"] })), {
    command: "hirope-lsp",
    args: ["serve", "--device", "cuda"],
  });
});

test("settings mirror the server's names and leave unset values to the server", () => {
  const out = serverSettings(reader({ model: "/models/qwen", promptBudget: 8192, "positions.window": 512, dtype: "" }));
  assert.deepEqual(out, { model: "/models/qwen", promptBudget: 8192, hirope: { window: 512 } });
  assert.deepEqual(serverSettings(reader({})), {});
  assert.deepEqual(serverSettings(reader({ typeAlong: false })), { typeAlong: false }, "false is a value, not unset");
});

test("the status bar tells loading, ready and errors apart", () => {
  assert.match(statusText(undefined).text, /sync~spin/);
  const ready = statusText({ status: "ready: default on cpu (float32)", indexedFiles: 3, reusedTokens: 90, computedTokens: 10 });
  assert.match(ready.tooltip, /default on cpu/);
  assert.match(ready.tooltip, /90% reused/);
  assert.match(statusText({ status: "error: model not found" }).text, /error/);
  assert.match(statusText(undefined, "spawn python3 ENOENT").tooltip, /ENOENT/);
});
