"""copyWorkspace through the real server over stdio: a line written in a sibling file on disk, and one in
another open document, reach the suggestion through the copy model (on by default); with the setting off they do not."""

from pathlib import Path

import pytest
import pytest_lsp
from e2e.data import SERVER
from e2e.test_server import configure, inline, open_doc
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from hirope_lsp.config import GATE_OFF

pytestmark = pytest.mark.e2e

ON_DISK = "def old_routes(app):\n    app.register('orders', handle_orders_v2, retries=17, backoff=3.25)\n"
IN_THE_EDITOR = "def report_routes(app):\n    app.register('reports', render_quarterly_report, cache_minutes=45)\n"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "routes_old.py").write_text(ON_DISK, encoding="utf-8")
    return tmp_path


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, workspace):
    lsp_client.workspace_root = workspace
    params = types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"),
        root_uri=workspace.as_uri(),
        workspace_folders=[types.WorkspaceFolder(uri=workspace.as_uri(), name="ws")],
        initialization_options={"maxNewTokens": 24, "minConfidence": GATE_OFF,
                                "warmAhead": False, "typeAlong": False},
    )
    await lsp_client.initialize_session(params)
    yield
    await lsp_client.shutdown_session()


async def suggestion(client: LanguageClient, uri: str, text: str) -> str:
    last = text.split("\n")
    reply = await inline(client, uri, len(last) - 1, len(last[-1]))
    return reply.items[0].insert_text if reply.items else ""


async def test_a_neighbours_line_is_copied_only_with_copy_workspace(client: LanguageClient):
    root = client.workspace_root
    # another document open in the editor (not on disk), in another folder: open documents are neighbours too
    open_doc(client, (root / "scratch.py").as_uri(), IN_THE_EDITOR)
    uri = (root / "pkg" / "routes.py").as_uri()
    orders = "def routes(app):\n    app.register('orders', "
    open_doc(client, uri, orders)
    assert (await suggestion(client, uri, orders)).startswith("handle_orders_v2, retries=17"), "from the disk sibling"
    reports = orders + "handle_orders)\n    app.register('reports', "
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text=reports)]))
    assert (await suggestion(client, uri, reports)).startswith("render_quarterly_report"), "from the open document"

    configure(client, {"copyWorkspace": False})
    off = await suggestion(client, uri, reports)
    assert not off.startswith("render_quarterly_report"), off
