// Pure mapping from the extension's settings to the server's command and configuration
// (no `vscode` import, so it is unit-tested in plain node).
import * as fs from "node:fs";
import * as path from "node:path";

export interface ConfigReader {
  get<T>(key: string, defaultValue: T): T;
}

export interface ServerCommand {
  command: string;
  args: string[];
}

export function serverCommand(config: ConfigReader): ServerCommand {
  const custom = config.get<string[]>("serverCommand", []);
  if (custom.length > 0) {
    return { command: custom[0], args: custom.slice(1) };
  }
  return { command: config.get<string>("pythonPath", "python3") || "python3", args: ["-m", "hirope_lsp", "serve"] };
}

type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

// The editor's own settings (hirope.pythonPath, hirope.serverCommand, hirope.trace.server); every other
// contributed setting is the server's.  package.json's contributions are written from the server's
// hirope_lsp/config.py (`python -m hirope_lsp.settings_schema`), so they are the one list read here.
export const CLIENT_ONLY_KEYS = ["pythonPath", "serverCommand", "trace"];

function contributedKeys(): string[] {
  const manifest = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "package.json"), "utf8"));
  return Object.keys(manifest.contributes.configuration.properties).map((key) => key.replace(/^hirope\./, ""));
}

// The server's settings under the "hirope" section, as read with config.get: "promptBudget",
// "positions.window", ...
export const SERVER_KEYS = contributedKeys().filter((key) => !CLIENT_ONLY_KEYS.includes(key.split(".")[0]));

// The server's settings (camelCase, as in initializationOptions; positions.* as the "hirope" object);
// unset values are left out so the server keeps its own defaults.
export function serverSettings(config: ConfigReader): { [key: string]: Json } {
  const out: { [key: string]: Json } = {};
  const positions: { [key: string]: Json } = {};
  for (const key of SERVER_KEYS) {
    const value = config.get<Json | undefined>(key, undefined);
    if (value === undefined || value === null) {
      continue;
    }
    if (key.startsWith("positions.")) {
      positions[key.slice("positions.".length)] = value;
    } else if (value !== "") {
      out[key] = value;
    }
  }
  if (Object.keys(positions).length > 0) {
    out.hirope = positions;
  }
  return out;
}

export interface ServerStatus {
  status: string;
  documents?: number;
  indexedFiles?: number;
  cacheBytes?: number;
  reusedTokens?: number;
  computedTokens?: number;
}

// Status bar text and tooltip for a status answer (or an error message).
export function statusText(status: ServerStatus | undefined, error?: string): { text: string; tooltip: string } {
  if (error) {
    return { text: "$(error) HiRoPE", tooltip: `hirope-lsp: ${error}` };
  }
  if (!status || status.status === "starting") {
    return { text: "$(sync~spin) HiRoPE", tooltip: "hirope-lsp: loading the model and indexing the workspace" };
  }
  if (status.status.startsWith("error")) {
    return { text: "$(error) HiRoPE", tooltip: `hirope-lsp: ${status.status}` };
  }
  const model = status.status.replace(/^ready: /, "");
  const reused = status.reusedTokens ?? 0;
  const total = reused + (status.computedTokens ?? 0);
  const share = total > 0 ? ` · ${Math.round((100 * reused) / total)}% reused` : "";
  return {
    text: "$(sparkle) HiRoPE",
    tooltip: `hirope-lsp: ${model} · ${status.indexedFiles ?? 0} files indexed${share}`,
  };
}
