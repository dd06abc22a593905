// extension.ts against a fake `vscode` (./fakeVscode): which editor events send hirope/warm, and when.
import { strict as assert } from "node:assert";
import { after, before, beforeEach, mock, test } from "node:test";
import { document, editor, fake } from "./fakeVscode";
import { WARM_DELAY_MS, activate, deactivate } from "../extension";

const file = document("file:///ws/lines.py");

function warms() {
  return fake.notifications.filter((n) => n.method === "hirope/warm").map((n) => n.params);
}

function at(uri: string, line: number, character: number) {
  return { textDocument: { uri }, position: { line, character } };
}

let atStart: unknown[] = [];

before(async () => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval"] });
  fake.activeTextEditor = editor(file, 9, 28);
  await activate({ subscriptions: [] } as never);
  atStart = warms();
});

after(async () => {
  await deactivate();
  mock.timers.reset();
});

beforeEach(() => {
  fake.notifications.length = 0;
  fake.running = true;
  fake.config = {};
});

test("the active editor is warmed once the client has started", () => {
  assert.deepEqual(atStart, [at("file:///ws/lines.py", 9, 28)]);
});

test("a newly active editor is warmed at once, one the client does not sync is not", () => {
  const other = editor(document("untitled:Untitled-1"), 0, 3);
  fake.activeTextEditor = other;
  fake.activeEditorChanged.fire(other);
  assert.deepEqual(warms(), [at("untitled:Untitled-1", 0, 3)]);
  const log = editor(document("output:extension-output-hirope"), 4, 0);
  fake.activeTextEditor = log;
  fake.activeEditorChanged.fire(log);
  fake.activeEditorChanged.fire(undefined);
  assert.equal(warms().length, 1);
});

test("the cursor is warmed where it rests, once, after the delay", () => {
  const doc = document("file:///ws/rest.py");
  fake.activeTextEditor = editor(doc, 0, 0);
  for (const character of [1, 2, 3]) {
    const moved = editor(doc, 0, character);
    fake.activeTextEditor = moved;
    fake.selectionChanged.fire({ textEditor: moved });
    mock.timers.tick(WARM_DELAY_MS - 50);
  }
  assert.deepEqual(warms(), [], "no warm while the cursor moves");
  mock.timers.tick(50);
  assert.deepEqual(warms(), [at("file:///ws/rest.py", 0, 3)]);
  fake.selectionChanged.fire({ textEditor: fake.activeTextEditor });
  mock.timers.tick(WARM_DELAY_MS);
  assert.equal(warms().length, 1, "the same spot again is not warmed twice");
});

test("a selection change in an editor without the focus is ignored", () => {
  fake.activeTextEditor = editor(document("file:///ws/a.py"), 0, 0);
  fake.selectionChanged.fire({ textEditor: editor(document("file:///ws/b.py"), 1, 1) });
  mock.timers.tick(WARM_DELAY_MS);
  assert.deepEqual(warms(), []);
});

test("switching editors drops the pending rest", () => {
  const first = editor(document("file:///ws/first.py"), 2, 2);
  fake.activeTextEditor = first;
  fake.selectionChanged.fire({ textEditor: first });
  const second = editor(document("file:///ws/second.py"), 5, 0);
  fake.activeTextEditor = second;
  fake.activeEditorChanged.fire(second);
  mock.timers.tick(WARM_DELAY_MS);
  assert.deepEqual(warms(), [at("file:///ws/second.py", 5, 0)]);
});

test("resting where a suggestion was just asked for does not warm (the request prefilled it)", async () => {
  const provide = fake.clientOptions?.middleware?.provideInlineCompletionItems;
  assert.ok(provide, "the client's middleware sees inline completion requests");
  const doc = document("file:///ws/typed.py", 7);
  const typed = editor(doc, 3, 12);
  fake.activeTextEditor = typed;
  const next = mock.fn(() => []);
  await provide(doc, typed.selection.active, {}, {}, next);
  assert.equal(next.mock.callCount(), 1, "the request goes on to the server");
  fake.selectionChanged.fire({ textEditor: typed });
  mock.timers.tick(WARM_DELAY_MS);
  assert.deepEqual(warms(), []);
  const edited = editor(document("file:///ws/typed.py", 8), 3, 12);
  fake.activeTextEditor = edited;
  fake.selectionChanged.fire({ textEditor: edited });
  mock.timers.tick(WARM_DELAY_MS);
  assert.deepEqual(warms(), [at("file:///ws/typed.py", 3, 12)], "a newer version of the text is warmed");
});

test("nothing is sent, and nothing throws, while the client is not running", async () => {
  fake.running = false;
  const stopped = editor(document("file:///ws/stopped.py"), 1, 0);
  fake.activeTextEditor = stopped;
  assert.doesNotThrow(() => fake.activeEditorChanged.fire(stopped));
  fake.selectionChanged.fire({ textEditor: stopped });
  assert.doesNotThrow(() => mock.timers.tick(WARM_DELAY_MS));
  assert.deepEqual(warms(), []);
  fake.running = true;
  fake.rejectSends = true; // stopping between the check and the send
  const late = editor(document("file:///ws/late.py"), 2, 0);
  fake.activeTextEditor = late;
  fake.activeEditorChanged.fire(late);
  await new Promise<void>((resolve) => setImmediate(resolve)); // the rejection is handled, not thrown
  fake.rejectSends = false;
});

test("hirope.warmAhead false turns it off", () => {
  fake.config = { warmAhead: false };
  const off = editor(document("file:///ws/off.py"), 1, 0);
  fake.activeTextEditor = off;
  fake.activeEditorChanged.fire(off);
  fake.selectionChanged.fire({ textEditor: off });
  mock.timers.tick(WARM_DELAY_MS);
  assert.deepEqual(warms(), []);
});
