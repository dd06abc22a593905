"""The copy model reading the workspace (copyWorkspace): which files, in what order, within what budget;
kept while nothing changes; never the file being completed; and decoding copies from it."""

from pathlib import Path

import pytest

from hirope_lsp.completion import workspace_copy
from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
from hirope_lsp.completion.service import CompletionService
from hirope_lsp.completion.workspace_copy import workspace_texts
from hirope_lsp.hierarchy.document import Change, Document
from hirope_lsp.model.copying import SEPARATOR, CopyModel, CopySettings
from hirope_lsp.model.engine import Engine, EngineSettings
from hirope_lsp.model.loading import load_model
from hirope_lsp.workspace.index import WorkspaceIndex, path_to_uri

ON = CopySettings(weight=0.5, min_order=1)

ALIKE = "def route_table(app):\n    app.register('orders', handle_orders, retries=3)\n"
UNLIKE = "import os\nprint(os.getcwd())\n"
CURRENT = "def routes(app):\n    app.register('users', handle_users, retries=3)\n    app.register('orders', "


@pytest.fixture(scope="module")
def loaded():
    return load_model(None, device="cpu", dtype="float32")


def test_a_separator_is_never_predicted_and_no_context_runs_across_it():
    seq = [5, 6, 7, SEPARATOR, 9, 5, 6]
    prediction = CopyModel(seq, ON).predict()
    assert prediction.token_ids.tolist() == [7] and prediction.order == 2
    ends_a_text = CopyModel([1, 2, 3, SEPARATOR, 8, 3], ON).predict()
    assert ends_a_text is None, "3 was followed only by the end of a text: nothing to copy"
    mixed = CopyModel([3, 4, SEPARATOR, 3, SEPARATOR, 3], ON).predict()
    assert mixed.token_ids.tolist() == [4] and mixed.count == 1


def _workspace(root: Path) -> WorkspaceIndex:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "alike.py").write_text(ALIKE)
    (root / "pkg" / "unlike.py").write_text(UNLIKE)
    (root / "pkg" / "sub" / "elsewhere.py").write_text(ALIKE + "# not a sibling\n")
    (root / "pkg" / "current.py").write_text(CURRENT + "handle_orders, retries=3)  # the answer, on disk\n")
    index = WorkspaceIndex([root])
    index.scan()
    return index


def test_the_neighbours_most_alike_first_within_the_budget_never_the_file_itself(tmp_path):
    index = _workspace(tmp_path)
    here = tmp_path / "pkg" / "current.py"
    texts = workspace_texts(here, CURRENT, index)
    assert [p.name for p, _ in texts] == ["alike.py", "unlike.py"], "siblings only, the most alike first"
    assert [p.name for p, _ in workspace_texts(here, CURRENT, index, budget_chars=len(ALIKE) + 5)] == ["alike.py"]
    assert [p.name for p, _ in workspace_texts(here, CURRENT, index, budget_chars=len(UNLIKE) + 5)] == ["unlike.py"], \
        "a file that does not fit is skipped, a smaller one still read"
    linked = tmp_path / "link"
    linked.symlink_to(tmp_path / "pkg")
    assert [p.name for p, _ in workspace_texts(linked / "current.py", CURRENT, index)] == ["alike.py", "unlike.py"], \
        "the file on disk stays out however its path is spelled"


def test_a_large_neighbour_is_read_up_to_a_line_end(tmp_path, monkeypatch):
    monkeypatch.setattr(workspace_copy, "MAX_WORKSPACE_FILE_CHARS", 100)
    index = _workspace(tmp_path)
    (tmp_path / "pkg" / "alike.py").write_text("".join(f"line_{n} = {n}\n" for n in range(100)))
    index.update_file(tmp_path / "pkg" / "alike.py")
    text = dict(workspace_texts(tmp_path / "pkg" / "current.py", CURRENT, index))[(tmp_path / "pkg" / "alike.py").resolve()]
    assert text.startswith("line_0 = 0\n") and text.endswith("\n") and len(text) <= 100


def _service(loaded, index, **context):
    builder = PromptBuilder(loaded[1], loaded[2], ContextSettings(budget_tokens=256, **context))
    engine = Engine(EngineSettings(measure_speed=False, copy_weight=0.8), loaded=loaded)
    return CompletionService(engine, index, builder, max_new_tokens=12), builder


def test_the_history_holds_the_neighbours_and_is_chosen_again_only_when_one_changes(tmp_path, loaded):
    index = _workspace(tmp_path)
    uri = path_to_uri(tmp_path / "pkg" / "current.py")
    doc = Document(uri, CURRENT, version=1, language_id="python")
    index.open_document(doc)
    service, builder = _service(loaded, index, copy_workspace=True)
    line, character = doc.position_at(len(CURRENT))
    history = service.prepare(doc, line, character).prompt.copy_history
    text = loaded[1].decode([t for t in history.tolist() if t != SEPARATOR])
    assert ALIKE in text and UNLIKE in text and "the answer, on disk" not in text
    assert int((history == SEPARATOR).sum()) == 2, "one separator after each file"

    end = doc.position_at(len(doc.text))
    doc.apply_changes([Change("x", (end, end))], 2)
    index.document_changed(doc)
    assert builder.workspace_history(doc, index) is builder.workspace_history(doc, index)
    kept = builder._workspace[uri][1]
    service.prepare(doc, *doc.position_at(len(doc.text)))
    assert builder._workspace[uri][1] is kept, "typing in the document keeps the choice"

    other = Document(path_to_uri(tmp_path / "pkg" / "alike.py"), ALIKE + "EDITED_IN_THE_EDITOR = 1\n", version=5,
                     language_id="python")
    index.open_document(other)
    edited = loaded[1].decode([t for t in builder.workspace_history(doc, index).tolist() if t != SEPARATOR])
    assert "EDITED_IN_THE_EDITOR" in edited, "an open neighbour is read as the editor holds it"

    off, _ = _service(loaded, index, copy_workspace=False)
    assert "register" not in loaded[1].decode(off.prepare(doc, line, character).prompt.copy_history.tolist()), \
        "off: the history is the document alone"
    assert ContextSettings().copy_workspace, "on by default"


def test_decoding_copies_a_line_only_a_neighbouring_file_holds(tmp_path, loaded):
    line_text = "    app.register('orders', handle_orders_v2, retries=17, backoff=3.25)\n"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "routes_old.py").write_text("def old_routes(app):\n" + line_text * 2)
    current = "def routes(app):\n    app.register('orders', "
    index = WorkspaceIndex([tmp_path])
    index.scan()
    doc = Document(path_to_uri(tmp_path / "pkg" / "routes.py"), current, language_id="python")
    line, character = doc.position_at(len(current))
    suggestions = {}
    for on in (False, True):
        service, _ = _service(loaded, index, copy_workspace=on, cross_file=False)
        suggestions[on] = service.run(service.prepare(doc, line, character)).generation.text
    assert suggestions[True].startswith("handle_orders_v2, retries=17"), suggestions
    assert "retries=17" not in suggestions[False], suggestions
