"""When to stop generating and what to show: end of line or statement, end of the block for
multi-line completions, never repeating the suffix, the line above or itself, nothing when
there is nothing useful."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .syntax import cut_to_valid_line

BLOCK_OPENERS = (":", "{", "(", "[", "=>", "->", " do", " then")
MAX_LINES = 12
# a phrase of at least 3 visible characters three times in a row: "(a + b)(a + b)(a + b)"
PHRASE_LOOP = re.compile(r"((?:\s*\S){3}.*?)\1{2,}")
LOOP_TAIL_CHARS = 120
# ``=`` only: Go's ``v := v`` declares a new ``v`` (a loop variable captured per iteration), not a no-op
SELF_ASSIGNMENT = re.compile(r"^\s*([\w.\[\]'\"]+)\s*=\s*\1\s*[;,]?\s*$")
TRIVIAL_LINE = re.compile(r"^[\s)\]};,:]*$")


@dataclass
class StopPolicy:
    multiline: bool
    indent: int  # indentation (columns) of the cursor's line
    suffix_line: str  # the rest of the cursor's line after the cursor
    next_lines: list[str]  # the first non-empty lines after the cursor's line
    statement_head: str | None = None  # Python: the line before the cursor when it starts a statement
    line_before_cursor: str = ""  # the cursor's line up to the cursor
    previous_line: str = ""  # the last non-empty line above the cursor's line

    def should_stop(self, text: str) -> bool:
        return finish(self, text, final=False) is not None


def _indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


def stop_policy(prefix: str, suffix: str, mode: str = "auto") -> StopPolicy:
    """``mode``: auto (multi-line when the cursor opens a block at the end of a line, or sits on an
    empty line), always, never."""
    current = prefix.rsplit("\n", 1)[-1]
    suffix_line, _, rest = suffix.partition("\n")
    opens = current.rstrip().endswith(BLOCK_OPENERS) and not suffix_line.strip()
    at_empty_line = not current.strip() and not suffix_line.strip() and bool(prefix.strip())
    multiline = {"always": True, "never": False}.get(mode, opens or at_empty_line)
    # the block ends at the first line indented no deeper than the opener (or than the empty line, minus one)
    indent = _indent(current) - 1 if at_empty_line and not opens else _indent(current)
    next_lines = [line for line in rest.split("\n") if line.strip()][:3]
    above = [line for line in prefix[: len(prefix) - len(current)].split("\n")[-40:] if line.strip()]
    return StopPolicy(multiline, indent, suffix_line, next_lines, line_before_cursor=current,
                      previous_line=above[-1] if above else "")


def finish(policy: StopPolicy, text: str, final: bool = True) -> str | None:
    """The text to show, cut at the first stop.  With ``final=False``: None while generation should
    go on.  With ``final=True``: the cleaned text (possibly empty: nothing useful)."""
    # while generating, a loop shows at the end: look only there (this runs once per token)
    start = 0 if final else max(0, len(text) - LOOP_TAIL_CHARS)
    loop = PHRASE_LOOP.search(text, start)
    if loop is not None:
        text = text[: loop.start() + len(loop.group(1))]
        if not final:
            return text
    lines = text.split("\n")
    cut: str | None = None
    if not policy.multiline:
        if len(lines) > 1:
            cut = lines[0]
    else:
        kept = [lines[0]]
        for line in lines[1:-1]:  # lines that have ended
            if line.strip() and _indent(line) <= policy.indent:
                cut = "\n".join(kept)  # dedent: the block is over
                break
            if policy.next_lines and line.strip() == policy.next_lines[0].strip():
                cut = "\n".join(kept)  # about to repeat the code after the cursor
                break
            if not TRIVIAL_LINE.match(line) and line.strip() in {k.strip() for k in kept}:
                cut = "\n".join(kept)  # a line the suggestion has already written
                break
            kept.append(line)
            if len(kept) > MAX_LINES:
                cut = "\n".join(kept)
                break
    if cut is None and not final:
        return None
    text = _clean(policy, text if cut is None else cut)
    if policy.statement_head is not None:
        text = cut_to_valid_line(policy.statement_head, text, policy.suffix_line.rstrip())
    return _without_repeats(policy, text)


def _without_repeats(policy: StopPolicy, text: str) -> str:
    """The suggestion up to its first line that copies the line above the cursor, or that
    assigns a name to itself; "" when that is the first line."""
    lines = text.split("\n")
    for k, line in enumerate(lines):
        full = policy.line_before_cursor + line if k == 0 else line
        if repeats_line_above(full, policy.previous_line if k == 0 else lines[k - 1]):
            return "\n".join(lines[:k]).rstrip()
    return text


def repeats_line_above(line: str, above: str) -> bool:
    """``line`` is ``above`` again or assigns a name to itself; closing brackets (the end of nested
    blocks) and blank lines are no repeat, nor ``name=name,`` in an argument list (a keyword argument
    passed on: ``above`` opens the call or ends with a comma)."""
    if TRIVIAL_LINE.match(line):
        return False
    if line.strip() == above.strip():
        return True
    in_arguments = above.rstrip().endswith(("(", ","))
    return bool(SELF_ASSIGNMENT.match(line)) and not in_arguments


def _clean(policy: StopPolicy, text: str) -> str:
    text = text.rstrip()
    if not policy.multiline:
        text = text.split("\n", 1)[0].rstrip()
    # do not repeat what already follows the cursor on its line
    tail = policy.suffix_line.strip()
    if tail and text.endswith(tail):
        text = text[: -len(tail)].rstrip()
    elif tail:
        for k in range(min(len(tail), len(text)), 0, -1):
            if text.endswith(tail[:k]) and tail[:k].strip() in (")", "]", "}", "):", '"', "'", ")]", "])", "))", ");"):
                text = text[:-k]
                break
    return text


def useful(text: str | None) -> bool:
    return bool(text and text.strip())
