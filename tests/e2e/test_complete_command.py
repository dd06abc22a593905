"""``hirope-lsp complete FILE --line L --character C``: one suggestion through the server's session, run as a
user runs it (a subprocess, the embedded model); the suggestion on stdout, the prompt's size on stderr, and
exit status 2 with one clear line for what it cannot do."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# the last line on stderr: "[default on cpu (float32); prompt 30 tokens, 32 ms, confidence -0.55 (gate -0.625)]"
# (the confidence where the model wrote something)
FOOTER = re.compile(r"^\[(?P<engine>[^\]]+); prompt (?P<tokens>\d+) tokens, (?P<ms>\d+) ms"
                    r"(, confidence (?P<confidence>-?[\d.]+) \((no gate|gate (?P<gate>-?[\d.e+-]+))\))?\]$", re.M)

SHAPES = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return "
MAIN = "from helpers import clamp\n\n\ndef scale(value):\n    return clamp("  # the cursor after 'clamp(': 4:17
HELPERS = ('def clamp(value, low, high):\n    """Limit value to the range low..high."""\n'
           "    return max(low, min(value, high))\n")


def complete(path: Path, line: int, character: int, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hirope_lsp", "complete", str(path), "--line", str(line),
                           "--character", str(character), *options],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def prompt_tokens(run: subprocess.CompletedProcess) -> int:
    assert run.returncode == 0, run.stderr
    found = FOOTER.search(run.stderr)
    assert found, f"no '[... prompt N tokens, M ms]' line on stderr:\n{run.stderr}"
    return int(found["tokens"])


def assert_refused(run: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, nothing on stdout, a one-line ``hirope-lsp: ...`` message naming the problem."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert run.stdout == ""
    assert "Traceback" not in run.stderr, run.stderr
    messages = [line for line in run.stderr.splitlines() if line.startswith("hirope-lsp: ")]
    assert len(messages) == 1, run.stderr
    for word in words:
        assert word in messages[0], messages[0]


def test_prints_the_suggestion_and_the_prompt_size(tmp_path: Path):
    path = tmp_path / "shapes.py"
    path.write_text(SHAPES, encoding="utf-8")
    run = complete(path, 5, 11, "--min-confidence", "-100")  # the gate off: whatever the model's confidence
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n") and run.stdout.strip(), f"a suggestion after 'return ': {run.stdout!r}"
    found = FOOTER.search(run.stderr)
    assert found, run.stderr
    assert found["engine"].startswith("default on "), found["engine"]
    tokens = int(found["tokens"])
    assert 10 < tokens < 100, f"the whole (short) file is the prompt: {tokens} tokens"
    assert int(found["ms"]) >= 0
    assert found["confidence"] is not None and float(found["confidence"]) <= 0, "the suggestion's mean log-probability"
    assert float(found["gate"]) == -100, "the gate asked for"


def test_a_suggestion_below_the_confidence_gate_is_not_printed_and_stderr_says_why(tmp_path: Path):
    path = tmp_path / "shapes.py"
    path.write_text(SHAPES, encoding="utf-8")
    run = complete(path, 5, 11, "--min-confidence", "-0.000001")  # no greedy suggestion is this sure
    assert run.returncode == 0, run.stderr
    assert run.stdout == "\n"
    assert "nothing shown: the suggestion's confidence" in run.stderr and "below the gate -1e-06" in run.stderr
    assert FOOTER.search(run.stderr), run.stderr
    assert_refused(complete(path, 5, 11, "--min-confidence", "0.5"), "--min-confidence", "0 or below")


def test_a_missing_file_exits_2(tmp_path: Path):
    run = complete(tmp_path / "no_such_file.py", 0, 0)
    assert_refused(run, "cannot read", "no_such_file.py")


@pytest.mark.parametrize(("line", "character", "says"), [(9, 0, "past the end of file://"),
                                                         (4, 40, "past the end of line 4 (17)")],
                         ids=["line", "character"])
def test_a_position_past_the_end_exits_2(tmp_path: Path, line, character, says):
    path = tmp_path / "main.py"
    path.write_text(MAIN, encoding="utf-8")  # 5 lines, the last 17 characters long
    run = complete(path, line, character)
    assert_refused(run, f"position {line}:{character}", says)


def test_a_model_directory_that_does_not_exist_exits_2(tmp_path: Path):
    path = tmp_path / "shapes.py"
    path.write_text(SHAPES, encoding="utf-8")
    missing = tmp_path / "no-such-model"
    run = complete(path, 5, 11, "--model", str(missing))
    assert_refused(run, str(missing), "does not exist")


def test_workspace_definitions_reach_the_prompt(tmp_path: Path):
    """--workspace: ``clamp`` is used at the cursor and defined in a workspace file outside the file's folder;
    its definition goes into the prompt."""
    (tmp_path / "src").mkdir()
    (tmp_path / "lib").mkdir()
    main = tmp_path / "src" / "main.py"
    main.write_text(MAIN, encoding="utf-8")
    (tmp_path / "lib" / "helpers.py").write_text(HELPERS, encoding="utf-8")
    alone = prompt_tokens(complete(main, 4, 17))  # the default workspace: src/, where nothing defines clamp
    with_workspace = prompt_tokens(complete(main, 4, 17, "--workspace", str(tmp_path)))
    assert with_workspace >= alone + 20, (alone, with_workspace)


def test_the_default_workspace_is_the_files_folder(tmp_path: Path):
    (tmp_path / "elsewhere").mkdir()
    main = tmp_path / "main.py"
    main.write_text(MAIN, encoding="utf-8")
    (tmp_path / "helpers.py").write_text(HELPERS, encoding="utf-8")
    default = prompt_tokens(complete(main, 4, 17))  # the file's folder, with helpers.py
    elsewhere = prompt_tokens(complete(main, 4, 17, "--workspace", str(tmp_path / "elsewhere")))
    assert default >= elsewhere + 20, (elsewhere, default)
