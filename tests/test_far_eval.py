"""The far-context evaluation: held-out corpora, where a case's information lies, the keystroke
replay's accounting, and the quick mode end to end on the default model."""

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hirope_lsp.model.copying import CopySettings
from hirope_lsp.model.loading import DEFAULT_MODEL_DIR, load_model, recommended_copy
from hirope_lsp.research import far_eval as fe

SOURCES = Path(fe.__file__).parent / "sources.json"
TRAIN = 256  # the synthetic cases are built around this trained length
DEFAULT_TRAIN = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["max_position_embeddings"]


@pytest.fixture(scope="module")
def tokenizer():
    from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

    return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))


# ---- corpora ----


def test_held_out_corpora_are_the_tune_and_report_packages_of_sources_json():
    python = json.loads(SOURCES.read_text())["held_out"]["python"]
    assert fe.held_out_packages() == {"tune": python["tune"], "report": python["report"]}
    assert not set(python["tune"]) & set(python["report"]), "settings are chosen on one corpus, reported on another"
    corpora = fe.load_corpora("both")
    assert [c.package for c in corpora] == python["tune"] + python["report"]
    assert [c.role for c in corpora] == ["tune"] * len(python["tune"]) + ["report"] * len(python["report"])
    for c in corpora:
        assert c.root == fe.package_dir(c.package) and c.root.is_dir()
        assert len(c.files) > 50 and all(p.suffix == ".py" and c.root in p.parents for p in c.files)
    assert [c.package for c in fe.load_corpora("report")] == python["report"]


# ---- where the information lies ----


def test_target_identifiers_leave_out_strings_comments_keywords_builtins():
    names = fe.target_identifiers('result = helper_fn(value, "some words here") + len(items)  # trailing note')
    assert names == ["helper_fn", "items", "result", "value"]
    assert fe.target_identifiers("return self.x") == []
    assert fe.introduced_names("        total, count = compute(a)") >= {"total", "count"}
    assert fe.introduced_names("def method(self, graph, weight=None):") >= {"method", "graph", "weight"}
    assert fe.introduced_names("else:") == set()


def _workspace(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "helpers.py").write_text("def special_helper_fn(x):\n    return x + 1\n\n\nTABLE_OF_THINGS = {}\n")
    filler = "".join(f"def filler_{i}(a, b):\n    c = a * b + {i}\n    return c - a\n\n\n" for i in range(150))
    main = ("far_away_name = 3\n\n\n" + filler
            + "def target_fn(local_value):\n"
            "    local_total = local_value + 1\n"
            "    result = special_helper_fn(local_total)\n"
            "    again = far_away_name + local_total\n"
            "    return local_total * 2\n")
    (tmp_path / "main.py").write_text(main)
    return tmp_path / "main.py", main


def test_cases_are_classified_by_where_their_names_lie(tmp_path, tokenizer):
    path, text = _workspace(tmp_path)
    corpus = fe.Corpus("tune", "synthetic", tmp_path, fe.corpus_files(tmp_path))
    defs = fe.definition_map(corpus.files, corpus.root)
    assert defs["special_helper_fn"] == {"helpers.py"} and defs["TABLE_OF_THINGS"] == {"helpers.py"}
    starts = [s for s, _ in fe._encode(tokenizer, text)[1]]
    cases = fe.file_cases(path, text, starts, TRAIN, lambda w: bool(defs.get(w, set()) - {"main.py"}),
                          random.Random(0), tmp_path, tasks=("next-line",))
    by_target = {c.target: c for c in cases}
    other = by_target["result = special_helper_fn(local_total)"]
    far = by_target["again = far_away_name + local_total"]
    near = by_target["return local_total * 2"]
    assert (other.split, other.names) == ("other_file", ["special_helper_fn"])
    assert (far.split, far.names) == ("far_file", ["far_away_name"])
    assert far.tokens_before > 2000, "the name was last seen 2,000 tokens back"
    assert (near.split, near.names) == ("near", [])
    # the cut-off is the trained window: with a window as long as the file, the far name is near
    wide = fe.file_cases(path, text, starts, 4096, lambda w: False, random.Random(0), tmp_path,
                         tasks=("next-line",), min_prefix_tokens=0)
    assert {c.target: c.split for c in wide}["again = far_away_name + local_total"] == "near"
    # the document is cut at the cursor, after the line's indentation
    assert far.document_text(text).endswith("local_value + 1\n    result = special_helper_fn(local_total)\n    ")


def test_fim_cases_remove_a_span_and_keep_the_suffix(tmp_path, tokenizer):
    path, text = _workspace(tmp_path)
    starts = [s for s, _ in fe._encode(tokenizer, text)[1]]
    cases = fe.file_cases(path, text, starts, TRAIN, lambda w: w == "special_helper_fn", random.Random(0), tmp_path,
                          tasks=("fim",), fim_per_function=20)
    assert cases and all(c.task == "fim" for c in cases)
    for c in cases:
        doc = c.document_text(text)
        assert 1 <= c.target.count("\n") + 1 <= 3
        assert doc == text[: c.cursor] + "\n" + text[c.resume :]
        assert text[c.cursor : c.end] == c.target
    splits = {c.target.split("\n")[0]: c.split for c in cases}
    if "result = special_helper_fn(local_total)" in splits:
        assert splits["result = special_helper_fn(local_total)"] == "other_file"


def test_sampling_is_equal_per_split_and_deterministic(tmp_path, tokenizer):
    _workspace(tmp_path)
    corpus = fe.Corpus("tune", "synthetic", tmp_path, fe.corpus_files(tmp_path))
    first, counts = fe.sample_cases(corpus, tokenizer, TRAIN, 1, seed=3, tasks=("next-line",))
    again, _ = fe.sample_cases(corpus, tokenizer, TRAIN, 1, seed=3, tasks=("next-line",))
    assert sorted(c.split for c in first) == sorted(fe.SPLITS)
    assert [(c.line, c.split) for c in first] == [(c.line, c.split) for c in again]
    assert counts["candidates"]["next-line/other_file"] >= 1


def test_far_copy_tokens_are_bigrams_seen_only_far_back():
    ids = [1, 2] + [9] * 10 + [1, 2, 3, 1, 2]
    # targets from index 12: token 13 (bigram 1,2 last at 1, 12 back) far; 14 new; 15 (3,1) new; 16 (1,2) near
    assert fe.far_copy_mask(ids, 12, 5) == [False, True, False, False, False]


def test_prompts_over_the_corpus_index_are_the_servers(tmp_path, tokenizer):
    from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
    from hirope_lsp.hierarchy.document import Document
    from hirope_lsp.model.loading import fim_format
    from hirope_lsp.workspace.index import WorkspaceIndex

    path, text = _workspace(tmp_path)
    fim = fim_format(tokenizer, None)
    cursor = text.index("    again")
    built = []
    for fast in (False, True):
        index = fe.corpus_index(tmp_path) if fast else WorkspaceIndex([tmp_path])
        index.scan()
        builder = PromptBuilder(tokenizer, fim, ContextSettings(budget_tokens=1024))
        if fast:
            fe.BlockCache().install(builder)
        doc = Document(path.as_uri(), text[:cursor], language_id="python")
        built.append(builder.build(doc, *doc.position_at(cursor), index))
    assert built[0].context_names == built[1].context_names == ["special_helper_fn"]
    assert built[0].token_ids == built[1].token_ids and torch.equal(built[0].positions, built[1].positions)


# ---- keystroke replay ----


def test_replay_accounting_with_a_known_suggestion():
    seen = []

    def suggest(doc, line, character):
        assert doc.position_at(len(doc.text)) == (line, character)
        seen.append(doc.text)
        if doc.text.endswith("x = "):
            return "foo(1)"  # right: the text to come starts with it
        if doc.text.endswith("y "):
            return "= 3"  # wrong: "= 2" comes
        return ""  # nothing shown

    stats = fe.replay("file:///w/a.py", "import os\n", "x = foo(1)\ny = 2\n", "", suggest, debounce=100)
    final = "import os\nx = foo(1)\ny = 2\n"
    assert all(final.startswith(text) for text in seen) and seen == sorted(seen, key=len), "typed in order"
    assert (stats.chars, stats.accepted, stats.typed) == (17, 6, 11)
    assert (stats.shown, stats.accepted_suggestions, stats.wrong, stats.requests) == (2, 1, 1, 9)
    row = stats.summary()
    assert math.isclose(row["share_not_typed"], 6 / 17) and math.isclose(row["wrong_per_100_chars"], 100 / 17)


def test_replay_debounce_and_suggestions_running_past_the_section():
    stats = fe.replay("file:///w/b.py", "", "abcdef", "", lambda doc, line, ch: "", debounce=2)
    assert stats.requests == 3 and stats.shown == 0 and stats.typed == 6  # at 0, after 'ab', after 'abcd'
    stats = fe.replay("file:///w/c.py", "", "ab", "cd\n", lambda doc, line, ch: "abcd" if not doc.text else "")
    assert (stats.accepted, stats.typed, stats.shown, stats.wrong) == (2, 0, 1, 0)


def test_replay_counts_what_the_gate_hid_apart_from_what_was_shown():
    answers = iter(["", "", "zz", ""] + [""] * 20)
    hidden_flags = iter([True, False, True] + [False] * 20)  # asked only after an empty answer
    stats = fe.replay("file:///w/d.py", "", "a b c d", "", lambda doc, line, ch: next(answers), debounce=100,
                      was_hidden=lambda: next(hidden_flags))
    assert stats.requests == 4 and stats.shown == 1 and stats.wrong == 1 and stats.hidden == 2


def test_the_replay_completer_uses_the_cards_gate_and_scoring_turns_it_off():
    from hirope_lsp.config import GATE_OFF
    from hirope_lsp.model.loading import load_model, recommended_min_confidence
    from hirope_lsp.workspace.index import WorkspaceIndex

    loaded = load_model(None, device="cpu", dtype="float32")
    gates = {}
    for gate in (False, True):
        completer = fe.Completer(loaded, fe.MethodSpec("hirope", "hirope"), 1024, WorkspaceIndex([]), gate=gate)
        try:
            gates[gate] = completer.session.service.confidence_gate("python")
        finally:
            completer.close()
    card = recommended_min_confidence(loaded[0], "python")
    assert card is not None and card > GATE_OFF
    assert gates == {False: GATE_OFF, True: card}


def test_bias_lists_and_methods():
    assert fe.parse_biases("2, log:1.5,none,distance:1") == [(2.0, "constant"), (1.5, "log"), (1.0, "distance")]
    assert [m.name for m in fe.method_specs(fe.parse_biases("2,log:1,distance:1"))] == [
        "hirope", "truncate", "hirope+2", "hirope+log:1", "hirope+distance:1"]
    specs = fe.method_specs([(2.0, "constant")], ("hirope", "hirope-fixed", "ntk"), ("raw", "outline"))
    assert [m.name for m in specs] == [
        "hirope", "truncate", "hirope+2", "hirope-fixed", "hirope-fixed+2", "ntk",  # no far keys: no far bias
        "hirope+outline", "truncate+outline", "hirope+2+outline", "hirope-fixed+outline", "hirope-fixed+2+outline",
        "ntk+outline"]
    assert {s.prompt for s in specs[6:]} == {"outline"} and specs[8].far_bias == 2.0
    assert fe.prompt_context("outline+similar") == {"far_prompt": "outline", "similar_code": True}
    assert fe.prompt_context("raw") == {}
    with pytest.raises(ValueError, match="unknown prompt variant"):
        fe.prompt_context("skeleton")
    with pytest.raises(ValueError):
        fe.parse_biases("sqrt:2")
    with pytest.raises(ValueError):
        fe.parse_biases("-1")
    copies = (CopySettings(0.8, 1), CopySettings(0.5, 2))
    specs = fe.method_specs([(2.0, "constant")], ("hirope",), ("raw", "outline"), copies)
    assert [m.name for m in specs] == [
        "hirope", "hirope+copy:0.8/1", "hirope+copy:0.5/2", "truncate", "truncate+copy:0.8/1", "truncate+copy:0.5/2",
        "hirope+2", "hirope+2+copy:0.8/1", "hirope+2+copy:0.5/2", "hirope+outline", "hirope+outline+copy:0.8/1",
        "hirope+outline+copy:0.5/2", "truncate+outline", "truncate+outline+copy:0.8/1", "truncate+outline+copy:0.5/2",
        "hirope+2+outline", "hirope+2+outline+copy:0.8/1", "hirope+2+outline+copy:0.5/2"]
    assert specs[7] == fe.MethodSpec("hirope+2+copy:0.8/1", "hirope", 2.0, "constant", "raw", copies[0])
    assert specs[0].copy == CopySettings(), "without --copy a row runs the copy model off"
    off = fe.method_specs([], ("hirope",), ("raw",), (CopySettings(0.0, 1), CopySettings(0.8, 1)))
    assert [m.name for m in off] == ["hirope", "hirope+copy:0.8/1", "truncate", "truncate+copy:0.8/1"], \
        "--copy 0/1 is the plain rows again"
    kept = fe.select_rows(specs, ("hirope+2+copy:0.8/1", "truncate"))
    assert [m.name for m in kept] == ["truncate", "hirope+2+copy:0.8/1"], "the usual order, whatever --rows says"
    assert fe.select_rows(specs, ()) == specs
    with pytest.raises(ValueError, match="unknown rows.*hirope\\+3"):
        fe.select_rows(specs, ("hirope+3",))


def _repeating_corpus(root: Path, seed: int = 0) -> fe.Corpus:
    """One file whose block of random assignments (about 700 tokens) repeats: in a window of twice the
    trained length, the last trained-length tokens can be copied only from farther back than that."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))  # noqa: E731
    block = "".join(f"{word()}_{word()} = {word()}({word()}, {rng.randrange(1000)})\n" for _ in range(28))
    (root / "pkg").mkdir()
    path = root / "pkg" / "repeats.py"
    path.write_text(block * 8)
    return fe.Corpus("report", "pkg", root, [path])


def test_perplexity_rows_mix_in_the_copy_model_as_the_method_reads(tmp_path):
    loaded = load_model(None, device="cpu", dtype="float32")
    corpus = _repeating_corpus(tmp_path)
    copy = CopySettings(0.8, 1)
    specs = fe.method_specs([], ("hirope",), ("raw",), (copy,))
    specs.append(fe.MethodSpec("hirope (card)", "hirope", copy=None))
    rows = {r["method"]: r for r in fe.perplexity_rows(corpus, loaded, specs, (2,), 1, 0)}
    assert set(rows) == {"hirope", "hirope+copy:0.8/1", "truncate", "truncate+copy:0.8/1", "hirope (card)"}
    assert all(r["far_copy_tokens"] > 100 for r in rows.values())
    assert rows["hirope+copy:0.8/1"]["ppl_far_copy"] < 0.5 * rows["hirope"]["ppl_far_copy"], "far text is copied"
    # truncation's copy model reads only what truncation reads: the far copies are out of its reach
    assert rows["truncate+copy:0.8/1"]["ppl_far_copy"] > rows["hirope+copy:0.8/1"]["ppl_far_copy"]
    card = recommended_copy(loaded[0]) or CopySettings()
    expected = rows["hirope+copy:0.8/1"] if card == copy else rows["hirope"] if not card.enabled else None
    if expected is not None:  # a copy of None is the card's copy model
        assert math.isclose(rows["hirope (card)"]["ppl"], expected["ppl"], rel_tol=1e-9)


def test_copy_option_reaches_the_settings():
    parser = argparse.ArgumentParser()
    fe.register_cli(parser.add_subparsers(dest="eval"))
    args = parser.parse_args(["far", "--quick", "--copy", "0.8/1,0.3"])
    assert fe.settings_from_args(args).copies == (CopySettings(0.8, 1), CopySettings(0.3, 1))
    with pytest.raises(ValueError, match="copy model '1.5/1'"):
        fe.settings_from_args(parser.parse_args(["far", "--copy", "1.5/1"]))


# ---- end to end ----


def test_quick_runs_end_to_end_on_the_default_model(tmp_path):
    parser = argparse.ArgumentParser()
    register = parser.add_subparsers(dest="eval")
    fe.register_cli(register)
    args = parser.parse_args(["far", "--quick", "--json", str(tmp_path / "far.json"),
                              "--plot", str(tmp_path / "far.png")])
    threads = torch.get_num_threads()
    try:
        assert fe.run_cli(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "far.json").read_text())
    assert report["model"] == "default" and report["seed"] == 0 and report["train_length"] == DEFAULT_TRAIN
    assert report["settings"]["quick"] and [c["package"] for c in report["corpora"]] == fe.held_out_packages()["report"]
    methods = {"hirope", "truncate", "hirope+2"}
    cells = {(r["method"], r["task"], r["split"]): r for r in report["completion"]}
    for method in methods:
        for task in fe.TASKS:
            for split in fe.SPLITS + ("all",):
                row = cells[(method, task, split)]
                assert row["cases"] > 0 and 0 <= row["edit_similarity"] <= 100 and 0 <= row["exact_match"] <= 1
                assert row["spread"]["min"] - 1e-9 <= row["edit_similarity"] <= row["spread"]["max"] + 1e-9
    assert cells[("truncate", "fim", "near")]["budget"] == DEFAULT_TRAIN - fe.TRUNCATE_MARGIN
    assert cells[("hirope", "fim", "near")]["budget"] == 1024
    ppl = {(r["method"], r["x"]): r for r in report["perplexity"]}
    assert {m for m, _ in ppl} == methods and {x for _, x in ppl} == {1, 4}
    assert all(math.isfinite(r["ppl"]) for r in ppl.values()) and ppl[("hirope", 4)]["far_copy_tokens"] > 0
    replay = {r["method"]: r for r in report["replay"]}
    assert set(replay) == methods
    for r in replay.values():
        assert r["typed"] + r["accepted"] == r["chars"] > 0 and r["wrong"] <= r["shown"] <= r["requests"]
        assert r["gate"] and r["shown"] + r["hidden"] <= r["requests"]
    assert (tmp_path / "far.png").stat().st_size > 10_000
