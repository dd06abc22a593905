// VS Code itself cannot run here: this drives the real server with the same protocol library the
// extension uses (vscode-languageclient sits on vscode-languageserver-protocol), the same command and
// the same initializationOptions the extension builds, and VS Code's client capabilities for inline
// completion.  Run from editors/vscode with HIROPE_PYTHON set to the interpreter with hirope-lsp.
import { strict as assert } from "node:assert";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { pathToFileURL } from "node:url";
import {
  InitializeRequest,
  InlineCompletionRequest,
  InlineCompletionTriggerKind,
  StreamMessageReader,
  StreamMessageWriter,
  createProtocolConnection,
} from "vscode-languageserver-protocol/node";
import { ConfigReader, serverCommand, serverSettings } from "../settings";

const SOURCE = `import os


def read_lines(path):
    with open(path) as handle:
        return handle.read().splitlines()


def count_lines(path):
    return len(read_lines(`;

async function waitFor<T>(probe: () => Promise<T | undefined>, timeoutMs: number): Promise<T | undefined> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await probe();
    if (value !== undefined) {
      return value;
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return undefined;
}

async function main() {
  const settings: Record<string, unknown> = {
    pythonPath: process.env.HIROPE_PYTHON ?? "python3",
    maxNewTokens: 16,
    promptBudget: 1024,
    // a shared CPU decodes at ~140 ms/token: the default 400 ms target cuts decoding at 800 ms, at times
    // before the first token, and sends every request to the short fast-path prompt (which the warm
    // does not fill).  The protocol is under test here, not the latency policy.
    latencyTargetMs: 10000,
    // the embedded model's confidence gate hides most of its suggestions; the protocol needs one shown
    minConfidence: -100,
  };
  const config: ConfigReader = { get: <T>(key: string, fallback: T) => (key in settings ? (settings[key] as T) : fallback) };
  const { command, args } = serverCommand(config);
  const workspace = fs.mkdtempSync(path.join(os.tmpdir(), "hirope-vscode-"));
  const file = path.join(workspace, "lines.py");
  fs.writeFileSync(file, SOURCE);
  const server = spawn(command, args, { cwd: workspace, stdio: ["pipe", "pipe", "inherit"] });
  const connection = createProtocolConnection(new StreamMessageReader(server.stdout), new StreamMessageWriter(server.stdin));
  connection.listen();
  const folder = pathToFileURL(workspace).toString();
  const init = await connection.sendRequest(InitializeRequest.type, {
    processId: process.pid,
    rootUri: folder,
    workspaceFolders: [{ uri: folder, name: "ws" }],
    capabilities: {
      textDocument: {
        synchronization: { dynamicRegistration: true, didSave: true },
        inlineCompletion: { dynamicRegistration: true },
      },
      window: { workDoneProgress: true },
      workspace: { configuration: true, didChangeConfiguration: { dynamicRegistration: true }, workspaceFolders: true },
      general: { positionEncodings: ["utf-16"] },
    },
    initializationOptions: serverSettings(config),
  });
  assert.ok(init.capabilities.inlineCompletionProvider, "the server advertises inline completion");
  connection.onRequest("window/workDoneProgress/create", () => null);
  connection.onRequest("workspace/configuration", () => [{}]);
  await connection.sendNotification("initialized", {});
  const uri = pathToFileURL(file).toString();
  await connection.sendNotification("textDocument/didOpen", {
    textDocument: { uri, languageId: "python", version: 1, text: SOURCE },
  });
  const lines = SOURCE.split("\n");
  const position = { line: lines.length - 1, character: lines[lines.length - 1].length };
  // what the extension sends when the editor gets the focus or the cursor rests: the server prefills
  // that prompt in the background (once the model is loaded) and counts the job in hirope/status
  await connection.sendNotification("hirope/warm", { textDocument: { uri }, position });
  const warmed = await waitFor(async () => {
    const status = await connection.sendRequest<Record<string, unknown>>("hirope/status", {});
    // the prefill has finished: `warming` counts the jobs under way, or lists their documents
    const done = !status.warming || (Array.isArray(status.warming) && !status.warming.includes(uri));
    return typeof status.warmJobs === "number" && status.warmJobs >= 1 && done ? status : undefined;
  }, 180_000);
  assert.ok(warmed, "hirope/warm starts a warm job (hirope/status warmJobs >= 1)");
  console.log(`warm: ${warmed.warmJobs} job(s), ${warmed.warmedTokens} tokens warmed`);
  const result = await connection.sendRequest(InlineCompletionRequest.type, {
    textDocument: { uri },
    position,
    context: { triggerKind: InlineCompletionTriggerKind.Automatic },
  });
  const items = Array.isArray(result) ? result : result?.items ?? [];
  assert.ok(items.length > 0, "an inline completion comes back");
  const first = items[0];
  assert.equal(typeof first.insertText, "string");
  assert.ok((first.insertText as string).length > 0);
  assert.deepEqual(first.range?.start, position);
  console.log(`inline completion: ${JSON.stringify(first.insertText)}`);
  const after = await connection.sendRequest<Record<string, unknown>>("hirope/status", {});
  // warming also made the suggestion at the warmed cursor: the request is answered by it, without the model
  assert.ok(typeof warmed.suggestedAhead === "number" && warmed.suggestedAhead >= 1, "warming made the suggestion ahead");
  assert.equal(after.prefetchedAnswers, 1, "the completion is the suggestion made ahead");
  assert.equal(after.computedTokens, warmed.computedTokens, "the model computed nothing for the request");
  console.log(`answered by the suggestion made ahead (${warmed.warmedTokens} tokens warmed)`);
  await connection.sendRequest("shutdown");
  await connection.sendNotification("exit");
  connection.dispose();
  fs.rmSync(workspace, { recursive: true, force: true });
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
