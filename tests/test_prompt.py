import torch

from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
from hirope_lsp.completion.postprocess import finish, stop_policy
from hirope_lsp.hierarchy.document import Change, Document
from hirope_lsp.model.loading import FimFormat, load_model
from hirope_lsp.workspace.index import WorkspaceIndex

TEXT = "import os\n\n\ndef a():\n    return 1\n\n\ndef b():\n    return os.path.join('x', 'y')\n" * 20


def tokenizer():
    return load_model(None, device="cpu")[1]


def builder(order="spm", budget=400, **kw):
    tok = tokenizer()
    fim = FimFormat("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", order, "<|file_sep|>")
    return tok, PromptBuilder(tok, fim, ContextSettings(budget_tokens=budget, **kw))


def test_positions_increase_and_units_follow_the_syntax():
    tok, b = builder(budget=10000)
    doc = Document("file:///w/m.py", TEXT, language_id="python")
    built = b.build(doc, 40, 4)
    units, token = built.positions[:, 0], built.positions[:, 1]
    assert torch.equal(token, torch.arange(len(built.token_ids)))
    assert bool((units[1:] >= units[:-1]).all()), "unit indices never decrease along the prompt"
    # the file's 80 definitions (and special tokens, suffix/prefix split) give many units
    assert int(units[-1]) > 40
    ids = built.token_ids
    suf, pre, mid = (tok.convert_tokens_to_ids(t) for t in ("<|fim_suffix|>", "<|fim_prefix|>", "<|fim_middle|>"))
    assert ids[0] == suf and ids[-1] == mid and pre in ids, "suffix first, then prefix, then middle"
    assert tok.decode(ids[ids.index(pre) + 1 : -1]) == built.prefix_text


def test_budget_is_kept_and_the_prefix_start_is_stable_while_typing():
    tok, b = builder(budget=300)
    doc = Document("file:///w/m.py", TEXT, language_id="python")
    line = 150
    first = b.build(doc, line, 0)
    assert len(first.token_ids) <= 300
    starts = {first.prefix_start}
    for k, ch in enumerate("value = compute(1)"):
        doc.apply_changes([Change(ch, ((line, k), (line, k)))], k + 2)
        kept_starts = dict(b._prefix_starts)
        built = b.build(doc, line, k + 1)
        assert len(built.token_ids) <= 300
        starts.add(built.prefix_start)
        # what the builder re-tokenized only in part equals a builder without memory (same kept start)
        _, fresh = builder(budget=300)
        fresh._prefix_starts = kept_starts
        again = fresh.build(doc, line, k + 1)
        assert built.token_ids == again.token_ids and torch.equal(built.positions, again.positions)
    assert len(starts) == 1, "the kept prefix does not slide on every keystroke"


def test_psm_layout_and_plain_text_units():
    tok, b = builder(order="psm", budget=2000, fixed_unit=16)
    doc = Document("file:///w/notes.txt", "word " * 200)
    built = b.build(doc, 0, 500)
    assert built.token_ids[0] == tok.convert_tokens_to_ids("<|fim_prefix|>")
    units = built.positions[:, 0]
    assert bool((units[1:] >= units[:-1]).all()) and int(units[-1]) >= 6


def test_cross_file_definitions_of_names_near_the_cursor(tmp_path):
    (tmp_path / "helpers.py").write_text("def clamp(value, low, high):\n    return max(low, min(value, high))\n")
    (tmp_path / "other.py").write_text("def unrelated():\n    pass\n")
    index = WorkspaceIndex([tmp_path])
    index.scan()
    tok, b = builder(budget=1000)
    doc = Document((tmp_path / "main.py").as_uri(), "from helpers import clamp\n\nx = clamp(", language_id="python")
    built = b.build(doc, 2, 10, index)
    assert built.context_names == ["clamp"]
    assert "return max(low, min(value, high))" in tok.decode(built.token_ids)
    assert "unrelated" not in tok.decode(built.token_ids)
    # names imported anywhere in the file count, even far above the cursor and indented
    far = "def main():\n    from helpers import clamp\n" + "    pass\n" * 80 + "    y = "
    doc = Document((tmp_path / "main.py").as_uri(), far, language_id="python")
    assert b.build(doc, 82, 8, index).context_names == ["clamp"]
    # a definition edited on disk is read again, not served from what was encoded before
    (tmp_path / "helpers.py").write_text("def clamp(value, low, high):\n    return sorted((low, value, high))[1]\n")
    index.scan()
    assert "sorted((low, value, high))" in tok.decode(b.build(doc, 82, 8, index).token_ids)


def test_stop_rules():
    single = stop_policy("x = compute(", ")\nprint(x)\n")
    assert not single.multiline
    assert finish(single, "a, b)\nprint(x)") == "a, b"  # the closing bracket already follows the cursor
    assert single.should_stop("a)\n") and not single.should_stop("a, b")
    block = stop_policy("def f(x):", "\n\nprint(f(1))\n")
    assert block.multiline
    assert finish(block, "\n    y = x + 1\n    return y\nprint(f(1))\n") == "\n    y = x + 1\n    return y"
    assert finish(block, "\n    y = x\n\n\nprint(f(1))\n") == "\n    y = x"
    assert finish(stop_policy("x = ", ""), "   \n") == ""
    never = stop_policy("def f(x):", "", mode="never")
    assert finish(never, "\n    return x") == ""


def test_incremental_prefix_tokens_equal_tokenizing_the_whole_text():
    import random

    from hirope_lsp.completion.tokens import IncrementalEncoder
    from hirope_lsp.research.train import stdlib_files

    tok = tokenizer()
    whole = lambda text: tuple(map(list, (tok(text, add_special_tokens=False, return_offsets_mapping=True)[k]  # noqa: E731
                                          for k in ("input_ids", "offset_mapping"))))
    encoded_chars = []
    encode_text = PromptBuilder(tok, FimFormat(None, None, None, "psm", None))._encode

    def encode(text):
        encoded_chars.append(len(text))
        return encode_text(text)

    encoder = IncrementalEncoder(encode)
    assert encoder.rules, "the embedded tokenizer splits at line boundaries"
    encoded_chars.clear()
    text = next(p for p in stdlib_files() if p.name == "argparse.py").read_text()[:20000]
    rng = random.Random(3)
    cursor, prefix_chars = 15000, 0
    for step in range(400):
        # typing at a cursor, with some deletions, newlines, multi-byte text and jumps elsewhere
        choice = rng.random()
        if choice < 0.05:
            cursor = rng.randrange(1, len(text))
        elif choice < 0.2 and cursor > 0:
            cut = rng.randint(1, 3)
            text, cursor = text[: cursor - cut] + text[cursor:], max(0, cursor - cut)
        else:
            piece = rng.choice(["a", "b", " ", "(", ")", ":", "\n    ", "\n", "é", "😀", "中", "\r\n", "x = 1\n"])
            text, cursor = text[:cursor] + piece + text[cursor:], cursor + len(piece)
        prefix = text[:cursor]
        prefix_chars += len(prefix)
        ids, offsets = encoder("doc", prefix)
        expected_ids, expected_offsets = whole(prefix)
        assert list(ids) == expected_ids, f"step {step}"
        assert [tuple(o) for o in offsets] == [tuple(o) for o in expected_offsets], f"step {step}"
    assert sum(encoded_chars) < 0.2 * prefix_chars, "only the end of the prefix is tokenized again"


def test_single_line_python_completion_is_cut_back_to_valid_syntax():
    from hirope_lsp.completion.syntax import cut_to_valid_line, statement_line

    source = "class C:\n    def f(self):\n        y = g(1,\n              2)\n        return 2 * self.\n"
    doc = Document("file:///w/c.py", source, language_id="python")
    assert statement_line(doc, 4, source.index("self.\n") + 5) == "return 2 * self."
    assert statement_line(doc, 3, source.index("2)")) is None, "a continuation line inside brackets"
    assert statement_line(Document("file:///w/c.js", "return a.", language_id="javascript"), 0, 9) is None
    assert cut_to_valid_line("return 2 * self.", "radius = False") == "radius"
    assert cut_to_valid_line("return 2 * self.", "radius") == "radius"
    assert cut_to_valid_line("x = compute(", "a, b", ")") == "a, b"
    assert cut_to_valid_line("x = compute(", "a, b) + [c", ")") == "a, b"
    assert cut_to_valid_line("elif x", " > 0:") == " > 0:", "a statement that needs the lines after it is kept"
    assert cut_to_valid_line("return total", " +") == " +", "nothing shorter parses either: kept"
    policy = stop_policy("        return 2 * self.", "\n")
    policy.statement_head = "return 2 * self."
    assert finish(policy, "radius = False\n") == "radius"


def test_suggestions_never_repeat_a_phrase_the_line_above_or_themselves():
    ret = stop_policy("def add(a, b):\n    return ", "\n")
    assert finish(ret, "(a + b)(a + b)(a + b)(a + b)") == "(a + b)"
    assert ret.should_stop("(a + b)(a + b)(a + b)"), "generation stops as soon as a phrase loops"
    assert not ret.should_stop("(a + b)(a + b)")
    assert finish(ret, "[0, 0, 0, 0]") == "[0, 0, 0, 0]", "short repeated items are code, not a loop"
    member = stop_policy("class A:\n    def f(self):\n        self.line_offset = 0\n        self.", "\n")
    assert finish(member, "line_offset = self.line_offset") == "", "a name assigned to itself"
    assert finish(member, "line_offset = 0") == "", "the line above, again"
    assert finish(member, "line_offset += 1") == "line_offset += 1"
    call = stop_policy("def f(ids, mask):\n    return model(\n        input_ids=input_ids,\n        ", "\n")
    assert finish(call, "attention_mask=attention_mask,") == "attention_mask=attention_mask,", "a keyword argument"
    assert finish(call, "input_ids=input_ids,") == "", "the line above, again"
    first = stop_policy("    out = self.layer(\n        ", "\n")
    assert finish(first, "hidden_states=hidden_states") == "hidden_states=hidden_states"
    statement = stop_policy("def f(self):\n    x = 1\n    ", "\n")
    assert finish(statement, "y = y") == "", "outside an argument list it is a name assigned to itself"
    loop = stop_policy("func f(xs []int) {\n\tfor _, v := range xs {\n\t\t", "\n")
    assert finish(loop, "v := v") == "v := v", "Go: a new v per iteration, not a no-op"
    assert finish(loop, "v = v") == ""
    block = stop_policy("def f():", "\n")
    assert finish(block, "\n    x = 1\n    y = 2\n    x = 1\n    z = 3\n") == "\n    x = 1\n    y = 2"
    assert finish(block, "\n    a()\n    )\n    )\n") == "\n    a()\n    )\n    )", "closing lines are not repeats"


# ---- the far part as an outline ----

CLASS_TEXT = "import os\n\n\nclass Shape:\n    sides = 4\n\n" + "".join(
    f"    def area_{k}(self, width,\n               height=2):\n        '''ü {k}'''\n        total = width * height\n"
    f"        return total + {k}\n\n" for k in range(60)) + "\ndef main():\n    shape = Shape()\n    print(shape.\n"


def test_the_outline_keeps_signatures_and_drops_far_bodies():
    tok, b = builder(budget=600, far_prompt="outline", near_tokens=120)
    doc = Document("file:///w/shape.py", CLASS_TEXT, language_id="python")
    line = CLASS_TEXT.count("\n") - 1
    built = b.build(doc, line, len("    print(shape."))
    assert len(built.token_ids) <= 600
    pre = tok.convert_tokens_to_ids("<|fim_prefix|>")
    text = tok.decode(built.token_ids[built.token_ids.index(pre) + 1 : -1])
    far, near = text[: len(text) - len(built.prefix_text)], built.prefix_text
    assert near.endswith("    print(shape.") and text.endswith(near)
    assert "def area_40(self, width,\n               height=2):\n        ...\n" in far, "the signature, a body elided"
    assert far.count("total = width") <= 1, "far bodies are dropped (but the one the raw text starts in)"
    assert far.count("def area_") > 20, "the outline holds far more signatures than the raw text would"
    raw_tok, raw = builder(budget=600)
    raw_text = raw_tok.decode(raw.build(doc, line, len("    print(shape.")).token_ids)
    assert raw_text.count("def area_") < 15


def test_outline_tokens_take_the_unit_of_their_function():
    tok, b = builder(budget=600, far_prompt="outline", near_tokens=120)
    doc = Document("file:///w/shape.py", CLASS_TEXT, language_id="python")
    built = b.build(doc, CLASS_TEXT.count("\n") - 1, 4)
    units = built.positions[:, 0]
    assert bool((units[1:] >= units[:-1]).all())
    pieces = [tok.decode([t]) for t in built.token_ids]
    # an elided body ("...") is in its header's unit, the next signature starts a new one
    at = next(i for i, p in enumerate(pieces) if "..." in p)
    header = max(i for i in range(at) if "def" in pieces[i])
    after = next(i for i in range(at + 1, len(pieces)) if "def" in pieces[i])
    assert units[header] == units[at] < units[after]


def test_the_outline_stays_put_while_typing_near_the_cursor():
    tok, b = builder(budget=600, far_prompt="outline", near_tokens=120)
    doc = Document("file:///w/shape.py", CLASS_TEXT, language_id="python")
    line = CLASS_TEXT.count("\n") - 1
    first = b.build(doc, line, len("    print(shape."))
    doc.apply_changes([Change("are", ((line, 16), (line, 16)))], 2)
    second = b.build(doc, line, 19)
    common = next(i for i, (x, y) in enumerate(zip(first.token_ids, second.token_ids)) if x != y)
    assert common >= len(first.token_ids) - len(tok(first.prefix_text)["input_ids"]) - 2, \
        "only the raw prefix's end changes: the outline before it is reused from the cache"


def test_brace_languages_keep_the_closing_line():
    text = "import x from 'y';\n\n" + "".join(
        f"function f{k}(a, b) {{\n  const c = a + b;\n  return c * {k};\n}}\n\n" for k in range(80)) + "f1("
    tok, b = builder(budget=500, far_prompt="outline", near_tokens=80)
    doc = Document("file:///w/m.js", text, language_id="javascript")
    built = b.build(doc, text.count("\n"), 3)
    decoded = tok.decode(built.token_ids)
    assert "function f60(a, b) {\n  ...\n}\n" in decoded and "return c * 60" not in decoded


# ---- similar code from neighbouring files ----


def similar_setup(tmp_path, text):
    """The workspace in ``tmp_path`` indexed, ``text`` as mine.py there, a builder with similar code on."""
    index = WorkspaceIndex([tmp_path])
    index.scan()
    tok, b = builder(budget=1000, similar_code=True)
    return tok, b, Document((tmp_path / "mine.py").as_uri(), text, language_id="python"), index


def test_similar_code_from_a_sibling_file_is_in_the_prompt(tmp_path):
    pattern = "    response = client.fetch(url, timeout=timeout)\n    payload = response.json()\n" \
              "    items = payload['items']\n    return [Item(**raw) for raw in items]\n"
    (tmp_path / "other.py").write_text("import json\n\n\ndef load_users(client, url, timeout):\n" + pattern
                                       + "\n\ndef unrelated():\n    return 42\n" * 30)
    (tmp_path / "far_away").mkdir()
    (tmp_path / "far_away" / "copy.py").write_text("def load_x(client, url, timeout):\n" + pattern)
    tok, b, doc, index = similar_setup(
        tmp_path, "def load_orders(client, url, timeout):\n    response = client.fetch(url, timeout=timeout)\n    ")
    built = b.build(doc, 2, 4, index)
    decoded = tok.decode(built.token_ids)
    assert "# other.py\n" in decoded and "payload = response.json()" in decoded
    assert "far_away" not in decoded, "only open documents and the cursor file's folder are searched"
    _, plain = builder(budget=1000)
    assert "payload" not in tok.decode(plain.build(doc, 2, 4, index).token_ids), "off by default"


def test_similar_code_stays_while_the_cursor_stays_in_its_unit(tmp_path):
    (tmp_path / "other.py").write_text("def f(a, b):\n    total = a + b\n    scaled = total * 2\n    return scaled\n")
    tok, b, doc, index = similar_setup(tmp_path, "def g(a, b):\n    total = a + b\n    ")
    first = b.build(doc, 2, 4, index)
    doc.apply_changes([Change("unrelated_name = 1\n    ", ((2, 4), (2, 4)))], 2)
    second = b.build(doc, 3, 4, index)
    assert "scaled = total" in tok.decode(first.token_ids)
    prefix = tok.convert_tokens_to_ids("<|fim_suffix|>")
    assert first.token_ids[: first.token_ids.index(prefix)] == second.token_ids[: second.token_ids.index(prefix)]


def test_an_empty_brace_function_keeps_its_closing_line():
    from hirope_lsp.completion.skeleton import outline_pieces, outline_text

    text = "function f() {\n}\n\nfunction g(a) {\n  return a;\n}\n\nx"
    doc = Document("file:///w/m.js", text, language_id="javascript")
    outline = outline_text(doc, outline_pieces(doc, len(text) - 1))
    assert outline.startswith("function f() {\n}\n"), "an empty body: nothing to drop"
    assert "function g(a) {\n  ...\n}\n" in outline


def test_the_outline_is_the_raw_text_where_the_whole_file_fits():
    tok, b = builder(budget=2000, far_prompt="outline", near_tokens=100)
    text = CLASS_TEXT.split("    def area_8")[0] + "\ndef main():\n    x = Shape()\n    x."
    doc = Document("file:///w/small.py", text, language_id="python")
    decoded = tok.decode(b.build(doc, text.count("\n"), 6).token_ids)
    assert "total = width" in decoded.split("def area_1(")[0], "no body is dropped while everything fits"
