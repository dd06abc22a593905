// Stand-ins for the `vscode` module and vscode-languageclient's LanguageClient, so extension.ts runs in
// plain node: import this module before "../extension".  `fake` holds what the extension sees and sends.
import Module from "node:module";

type Listener<T> = (event: T) => void;

class Emitter<T> {
  private listeners: Listener<T>[] = [];
  event = (listener: Listener<T>) => {
    this.listeners.push(listener);
    return { dispose: () => (this.listeners = this.listeners.filter((l) => l !== listener)) };
  };
  fire(event: T) {
    this.listeners.forEach((listener) => listener(event));
  }
}

export interface FakeDocument {
  uri: { scheme: string; toString(): string };
  version: number;
}

export interface FakeEditor {
  document: FakeDocument;
  selection: { active: { line: number; character: number } };
}

export function document(uri: string, version = 1): FakeDocument {
  return { uri: { scheme: uri.slice(0, uri.indexOf(":")), toString: () => uri }, version };
}

export function editor(doc: FakeDocument, line: number, character: number): FakeEditor {
  return { document: doc, selection: { active: { line, character } } };
}

type InlineMiddleware = (document: unknown, position: unknown, context: unknown, token: unknown,
  next: (...args: unknown[]) => unknown) => unknown;

export const fake = {
  activeTextEditor: undefined as FakeEditor | undefined,
  activeEditorChanged: new Emitter<FakeEditor | undefined>(),
  selectionChanged: new Emitter<{ textEditor: FakeEditor }>(),
  config: {} as Record<string, unknown>,
  running: true,
  rejectSends: false,
  notifications: [] as { method: string; params: unknown }[],
  clientOptions: undefined as { middleware?: { provideInlineCompletionItems?: InlineMiddleware } } | undefined,
};

const disposable = { dispose: () => undefined };

const vscode = {
  window: {
    createOutputChannel: () => ({ debug: () => undefined, show: () => undefined, dispose: () => undefined }),
    createStatusBarItem: () => ({ show: () => undefined, dispose: () => undefined }),
    get activeTextEditor() {
      return fake.activeTextEditor;
    },
    onDidChangeActiveTextEditor: fake.activeEditorChanged.event,
    onDidChangeTextEditorSelection: fake.selectionChanged.event,
  },
  workspace: {
    getConfiguration: () => ({ get: (key: string, fallback: unknown) => (key in fake.config ? fake.config[key] : fallback) }),
    onDidChangeConfiguration: () => disposable,
  },
  commands: { registerCommand: () => disposable, executeCommand: async () => undefined },
  languages: {
    // the scheme filters extension.ts uses; 10 as VS Code scores an exact scheme match
    match: (selector: { scheme: string }[], doc: FakeDocument) =>
      selector.some((f) => f.scheme === doc.uri.scheme) ? 10 : 0,
  },
  StatusBarAlignment: { Left: 1, Right: 2 },
};

class LanguageClient {
  code2ProtocolConverter = {
    asTextDocumentIdentifier: (doc: FakeDocument) => ({ uri: doc.uri.toString() }),
    asPosition: (p: { line: number; character: number }) => ({ line: p.line, character: p.character }),
  };
  constructor(_id: string, _name: string, _server: unknown, clientOptions: typeof fake.clientOptions) {
    fake.clientOptions = clientOptions;
  }
  async start() {}
  async stop() {}
  dispose() {}
  isRunning() {
    return fake.running;
  }
  async sendRequest() {
    return { status: "ready: fake" };
  }
  sendNotification(method: string, params: unknown): Promise<void> {
    if (!fake.running || fake.rejectSends) {
      return Promise.reject(new Error("Client is not running"));
    }
    fake.notifications.push({ method, params });
    return Promise.resolve();
  }
}

const modules: Record<string, unknown> = {
  vscode,
  "vscode-languageclient/node": { LanguageClient, TransportKind: { stdio: 0 } },
};
const loader = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown };
const load = loader._load;
loader._load = (request: string, ...rest: unknown[]) =>
  request in modules ? modules[request] : Reflect.apply(load, Module, [request, ...rest]);
