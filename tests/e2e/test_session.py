"""Settings and workspace changes while the server runs, through the real server over stdio: each
reaches the live objects (index, watcher, model), and model loads that overlap end on the newest."""

import asyncio
import time

import pytest
import pytest_lsp
from e2e.data import SERVER
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from e2e.test_warming import start, status, wait_ready
from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.e2e


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, workspace):
    await start(lsp_client, workspace)
    yield
    await lsp_client.shutdown_session()


def configure(client, **hirope):
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"hirope": hirope}))


async def until(client, check, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await status(client)
        if check(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached: {state}")


async def test_max_file_bytes_and_watch_files_apply_while_running(client: LanguageClient):
    root = client.workspace_root
    (root / "big.py").write_text("def big():\n    return 1\n" * 200)  # ~5 KB
    configure(client, maxFileBytes=1_000_000)
    before = await until(client, lambda s: s["indexedFiles"] == 3 and s["watching"])
    configure(client, maxFileBytes=1000)  # big.py is over the limit now: rescanned without it
    await until(client, lambda s: s["indexedFiles"] == 2)
    configure(client, watchFiles=False)
    await until(client, lambda s: not s["watching"])
    (root / "new.py").write_text("def new():\n    return 2\n")
    await asyncio.sleep(1.0)
    assert (await status(client))["indexedFiles"] == 2  # nobody watches
    configure(client, watchFiles=True)
    await until(client, lambda s: s["watching"])
    (root / "newer.py").write_text("def newer():\n    return 3\n")
    await until(client, lambda s: s["indexedFiles"] >= 3)
    assert before["state"] == "ready"


async def test_a_folder_added_later_is_indexed_and_watched(client: LanguageClient, tmp_path_factory):
    extra = tmp_path_factory.mktemp("extra")
    (extra / "tools.py").write_text("def tool():\n    return 1\n")
    before = await until(client, lambda s: s["indexedFiles"] == 2)
    client.workspace_did_change_workspace_folders(types.DidChangeWorkspaceFoldersParams(
        event=types.WorkspaceFoldersChangeEvent(added=[types.WorkspaceFolder(uri=extra.as_uri(), name="extra")],
                                                removed=[])))
    await until(client, lambda s: s["indexedFiles"] == before["indexedFiles"] + 1)
    (extra / "more.py").write_text("def more():\n    return 2\n")  # seen by the watcher of the new folder
    await until(client, lambda s: s["indexedFiles"] == before["indexedFiles"] + 2)


async def test_overlapping_model_loads_end_on_the_newest(client: LanguageClient):
    configure(client, model=str(DEFAULT_MODEL_DIR), device="cpu")
    configure(client, model=None, device="cpu", dtype="float32")  # the next change before the first load ended
    state = await wait_ready(client)
    assert state["status"] == "ready: default on cpu (float32)"
    uri = (client.workspace_root / "geometry.py").as_uri()
    text = (client.workspace_root / "geometry.py").read_text()
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
    reply = await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(3, 0),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic)))
    assert isinstance(reply, types.InlineCompletionList)
    await asyncio.sleep(1.0)  # the superseded load finishing late changes nothing
    assert (await status(client))["status"] == "ready: default on cpu (float32)"
