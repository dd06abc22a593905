import * as vscode from "vscode";
import { LanguageClient, LanguageClientOptions, ServerOptions, TransportKind } from "vscode-languageclient/node";
import { ServerStatus, serverCommand, serverSettings, statusText } from "./settings";

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem | undefined;
let statusTimer: NodeJS.Timeout | undefined;
const output = vscode.window.createOutputChannel("HiRoPE", { log: true });

function config() {
  return vscode.workspace.getConfiguration("hirope");
}

async function start(context: vscode.ExtensionContext): Promise<void> {
  const { command, args } = serverCommand(config());
  const serverOptions: ServerOptions = { command, args, transport: TransportKind.stdio };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    initializationOptions: serverSettings(config()),
    outputChannel: output,
    synchronize: { configurationSection: "hirope" },
  };
  client = new LanguageClient("hirope", "HiRoPE", serverOptions, clientOptions);
  try {
    await client.start();
  } catch (err) {
    showStatus(undefined, `could not start \`${command} ${args.join(" ")}\`: ${err}`);
    return;
  }
  context.subscriptions.push(client);
  pollStatus();
}

function showStatus(status: ServerStatus | undefined, error?: string) {
  if (!statusItem) {
    return;
  }
  const { text, tooltip } = statusText(status, error);
  statusItem.text = text;
  statusItem.tooltip = tooltip;
  statusItem.show();
}

function pollStatus() {
  if (statusTimer) {
    clearInterval(statusTimer);
  }
  const poll = async () => {
    if (!client || !client.isRunning()) {
      return;
    }
    try {
      showStatus(await client.sendRequest<ServerStatus>("hirope/status", {}));
    } catch (err) {
      showStatus(undefined, `${err}`);
    }
  };
  void poll();
  statusTimer = setInterval(poll, 5000);
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = "hirope.showOutput";
  context.subscriptions.push(statusItem, output);
  showStatus(undefined);
  context.subscriptions.push(
    vscode.commands.registerCommand("hirope.restart", async () => {
      if (client) {
        await client.stop();
        client = undefined;
      }
      await start(context);
    }),
    vscode.commands.registerCommand("hirope.showOutput", () => output.show()),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration("hirope.serverCommand") || event.affectsConfiguration("hirope.pythonPath")) {
        void vscode.commands.executeCommand("hirope.restart");
      }
    }),
  );
  await start(context);
}

export async function deactivate(): Promise<void> {
  if (statusTimer) {
    clearInterval(statusTimer);
  }
  if (client) {
    await client.stop();
  }
}
