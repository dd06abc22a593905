import os
import time
from pathlib import Path

import pytest

from hirope_lsp.hierarchy.document import Change, Document
from hirope_lsp.workspace.files import FilePolicy, walk_sources
from hirope_lsp.workspace.index import WorkspaceIndex, path_to_uri
from hirope_lsp.workspace.watcher import WorkspaceWatcher


def make_tree(root: Path) -> None:
    (root / "pkg").mkdir()
    (root / "pkg" / "shapes.py").write_text("class Circle:\n    def area(self):\n        return 3\n")
    (root / "pkg" / "util.js").write_text("function helper(x) { return x; }\n")
    (root / "build").mkdir()
    (root / "build" / "generated.py").write_text("def generated():\n    pass\n")
    (root / "notes.log").write_text("log\n")
    (root / "keep.log").write_text("kept\n")
    (root / ".gitignore").write_text("build/\n*.log\n!keep.log\n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (root / "latin1.py").write_bytes(b"# caf\xe9\ndef latin():\n    pass\n")
    (root / "big.py").write_text("x = 1\n" * 2000)


def test_walk_honours_gitignore_binary_and_size(tmp_path):
    make_tree(tmp_path)
    index = WorkspaceIndex([tmp_path], FilePolicy(max_file_bytes=4096))
    index.scan()
    names = sorted(p.relative_to(tmp_path).as_posix() for p in index.files)
    assert names == [".gitignore", "keep.log", "latin1.py", "pkg/shapes.py", "pkg/util.js"]
    assert [s.path.name for s in index.lookup("Circle")] == ["shapes.py"]
    assert [s.kind for s in index.lookup("area")] == ["function"]
    assert [s.path.name for s in index.lookup("helper")] == ["util.js"]
    assert index.lookup("generated") == []
    assert index.lookup("latin"), "undecodable bytes are replaced, the rest of the file still indexed"


def test_symlink_loops_and_links_outside_are_cut(tmp_path):
    root = tmp_path / "ws"
    (root / "a").mkdir(parents=True)
    (root / "a" / "m.py").write_text("def m():\n    pass\n")
    os.symlink(root, root / "a" / "loop")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "s.py").write_text("def secret():\n    pass\n")
    os.symlink(outside, root / "out")
    os.symlink(outside / "s.py", root / "s_link.py")
    files = [p.relative_to(root).as_posix() for p in walk_sources(root)]
    assert files == ["a/m.py"]


def test_open_documents_win_over_disk(tmp_path):
    (tmp_path / "m.py").write_text("def on_disk():\n    pass\n")
    index = WorkspaceIndex([tmp_path])
    index.scan()
    path = (tmp_path / "m.py").resolve()
    doc = Document(path_to_uri(path), "def in_editor():\n    pass\n", language_id="python")
    index.open_document(doc)
    assert index.lookup("on_disk") == [] and index.lookup("in_editor")
    doc.apply_changes([Change("renamed", ((0, 4), (0, 13)))], 2)
    index.document_changed(doc)
    assert index.lookup("in_editor") == [] and index.lookup("renamed")
    index.update_file(path)  # a disk change while open does not override the editor
    assert index.lookup("on_disk") == [] and index.text_of(path) == doc.text
    index.close_document(doc.uri)
    assert index.lookup("on_disk") and index.lookup("renamed") == []


def test_outside_paths_are_not_indexed(tmp_path):
    ws, other = tmp_path / "ws", tmp_path / "other"
    ws.mkdir(), other.mkdir()
    (other / "x.py").write_text("def x():\n    pass\n")
    index = WorkspaceIndex([ws])
    assert not index.update_file(other / "x.py")
    assert index.text_of(other / "x.py") is None


def test_multi_root(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "one.py").write_text("def one():\n    pass\n")
    (b / "two.go").write_text("package b\n\nfunc Two() {}\n")
    index = WorkspaceIndex([a, b])
    assert index.scan() == 2
    assert index.lookup("one") and index.lookup("Two")
    index.remove_folder(b)
    assert index.lookup("Two") == []


def wait_for(condition, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_watchdog_keeps_index_current(tmp_path):
    (tmp_path / ".gitignore").write_text("ignored/\n")
    index = WorkspaceIndex([tmp_path])
    index.scan()
    watcher = WorkspaceWatcher(index, delay=0.05)
    watcher.start()
    try:
        f = tmp_path / "new.py"
        f.write_text("def created():\n    pass\n")
        assert wait_for(lambda: index.lookup("created"))
        f.write_text("def modified():\n    pass\n")
        assert wait_for(lambda: index.lookup("modified") and not index.lookup("created"))
        f.rename(tmp_path / "moved.py")
        assert wait_for(lambda: [s.path.name for s in index.lookup("modified")] == ["moved.py"])
        (tmp_path / "ignored").mkdir()
        (tmp_path / "ignored" / "hidden.py").write_text("def hidden():\n    pass\n")
        (tmp_path / "moved.py").unlink()
        assert wait_for(lambda: not index.lookup("modified"))
        time.sleep(0.3)
        assert index.lookup("hidden") == []
    finally:
        watcher.stop()
