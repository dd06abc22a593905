import * as vscode from "vscode";
import { LanguageClient, LanguageClientOptions, ServerOptions, TransportKind } from "vscode-languageclient/node";
import { ServerStatus, serverCommand, serverSettings, statusText } from "./settings";

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem | undefined;
let statusTimer: NodeJS.Timeout | undefined;
let warmTimer: NodeJS.Timeout | undefined;
const output = vscode.window.createOutputChannel("HiRoPE", { log: true });

// The documents the client syncs, and the ones it warms (vscode.languages.match against the same filters).
const documentSelector: { scheme: string }[] = [{ scheme: "file" }, { scheme: "untitled" }];
// How long the cursor rests before the server is told to prefill the prompt there.
export const WARM_DELAY_MS = 300;

// Where the server last saw the cursor (a hirope/warm or an inline completion request): its prompt is
// prefilled already, and warming it again would cancel the server's prefetch of the suggestion that
// follows the one on screen.
let lastSpot: { uri: string; version: number; line: number; character: number } | undefined;

function remember(document: vscode.TextDocument, position: vscode.Position) {
  lastSpot = { uri: document.uri.toString(), version: document.version, line: position.line, character: position.character };
}

function isLastSpot(document: vscode.TextDocument, position: vscode.Position): boolean {
  return (
    lastSpot !== undefined &&
    lastSpot.uri === document.uri.toString() &&
    lastSpot.version === document.version &&
    lastSpot.line === position.line &&
    lastSpot.character === position.character
  );
}

function config() {
  return vscode.workspace.getConfiguration("hirope");
}

async function start(context: vscode.ExtensionContext): Promise<void> {
  const { command, args } = serverCommand(config());
  const serverOptions: ServerOptions = { command, args, transport: TransportKind.stdio };
  const clientOptions: LanguageClientOptions = {
    documentSelector,
    initializationOptions: serverSettings(config()),
    outputChannel: output,
    synchronize: { configurationSection: "hirope" },
    middleware: {
      provideInlineCompletionItems: (document, position, context, token, next) => {
        remember(document, position);
        return next(document, position, context, token);
      },
    },
  };
  client = new LanguageClient("hirope", "HiRoPE", serverOptions, clientOptions);
  lastSpot = undefined; // a new server has seen no cursor
  try {
    await client.start();
  } catch (err) {
    showStatus(undefined, `could not start \`${command} ${args.join(" ")}\`: ${err}`);
    return;
  }
  context.subscriptions.push(client);
  pollStatus();
  warm(vscode.window.activeTextEditor);
}

// hirope/warm: the cursor is here, prefill its prompt in the background so the next suggestion is fast.
// Resting (the debounced cursor) skips the spot the server saw last; never throws.
function warm(editor: vscode.TextEditor | undefined, resting = false): void {
  if (!editor || !client || !client.isRunning() || !config().get<boolean>("warmAhead", true)) {
    return;
  }
  const { document } = editor;
  const position = editor.selection.active;
  if (vscode.languages.match(documentSelector, document) === 0 || (resting && isLastSpot(document, position))) {
    return;
  }
  try {
    const c2p = client.code2ProtocolConverter;
    const params = { textDocument: c2p.asTextDocumentIdentifier(document), position: c2p.asPosition(position) };
    remember(document, position);
    client.sendNotification("hirope/warm", params).catch((err) => output.debug(`hirope/warm not sent: ${err}`));
  } catch (err) {
    output.debug(`hirope/warm not sent: ${err}`);
  }
}

function cancelWarm() {
  if (warmTimer) {
    clearTimeout(warmTimer);
    warmTimer = undefined;
  }
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
    vscode.window.onDidChangeActiveTextEditor((editor) => {
      cancelWarm();
      warm(editor);
    }),
    vscode.window.onDidChangeTextEditorSelection((event) => {
      if (event.textEditor !== vscode.window.activeTextEditor) {
        return;
      }
      cancelWarm();
      warmTimer = setTimeout(() => {
        warmTimer = undefined;
        warm(event.textEditor, true);
      }, WARM_DELAY_MS);
    }),
    { dispose: cancelWarm },
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
  cancelWarm();
  if (client) {
    await client.stop();
  }
}
