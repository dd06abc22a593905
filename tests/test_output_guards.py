"""What the user is never shown: suggestions in a language the model never saw, or below the
confidence gate (the setting, else the one recorded with the model)."""

import json
import shutil

import pytest

from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
from hirope_lsp.config import GATE_OFF
from hirope_lsp.completion.service import CompletionService
from hirope_lsp.hierarchy.document import Document
from hirope_lsp.model.engine import Engine, EngineSettings, Generation
from hirope_lsp.model.loading import DEFAULT_MODEL_DIR, knows_language


@pytest.fixture(scope="module")
def python_only_service(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model") / "python-only"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    card = json.loads((model_dir / "training.json").read_text())
    (model_dir / "training.json").write_text(json.dumps({**card, "languages": ["python", "typescript"]}))
    engine = Engine(EngineSettings(model=str(model_dir), device="cpu"))
    return CompletionService(engine, None, PromptBuilder(engine.tokenizer, engine.fim, ContextSettings(budget_tokens=256)),
                             max_new_tokens=8)


def test_no_suggestion_in_a_language_the_model_was_not_trained_on(python_only_service):
    c_file = Document("file:///w/main.c", "int add(int a, int b) {\n    return ", language_id="c")
    result = python_only_service.complete(c_file, 1, 11)
    assert result.text == "" and result.generation.stopped_by == "language" and not result.hidden_by_gate
    assert result.generation.computed_tokens == 0, "the model is not run"
    py_file = Document("file:///w/main.py", "def add(a, b):\n    return ", language_id="python")
    result = python_only_service.complete(py_file, 1, 11)
    assert result.generation.stopped_by != "language" and result.generation.computed_tokens > 0


def test_language_families_and_models_without_a_card():
    assert knows_language(frozenset({"typescript"}), "typescriptreact")
    assert not knows_language(frozenset({"python"}), None), "plain text is not a trained language"
    assert knows_language(None, "c"), "a model without our training card may know any language"


def test_confidence_gate_hides_suggestions_below_the_threshold():
    engine = Engine(EngineSettings(device="cpu"))
    builder = PromptBuilder(engine.tokenizer, engine.fim, ContextSettings(budget_tokens=256))
    doc = Document("file:///w/geometry.py", "import math\n\n\ndef area(radius):\n    return math.", language_id="python")
    ungated = CompletionService(engine, None, builder, max_new_tokens=6, min_confidence=GATE_OFF).complete(doc, 4, 16)
    assert ungated.text and not ungated.hidden_by_gate
    confidence = ungated.generation.confidence
    assert confidence is not None and confidence < 0
    assert len(ungated.generation.token_logprobs) == len(ungated.generation.token_ids)
    strict = CompletionService(engine, None, builder, max_new_tokens=6, min_confidence=confidence / 2)
    hidden = strict.complete(doc, 4, 16)
    assert hidden.text == "" and hidden.hidden_by_gate, "the CLI and the log say why nothing is shown"


def test_the_gate_recorded_with_the_model_applies_while_the_setting_is_unset(tmp_path):
    model_dir = tmp_path / "gated"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    doc = Document("file:///w/geometry.py", "import math\n\n\ndef area(radius):\n    return math.", language_id="python")

    def service(record, setting=None):
        card = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
        card["min_confidence"] = record
        (model_dir / "training.json").write_text(json.dumps(card))
        engine = Engine(EngineSettings(model=str(model_dir), device="cpu", measure_speed=False))
        builder = PromptBuilder(engine.tokenizer, engine.fim, ContextSettings(budget_tokens=256))
        return CompletionService(engine, None, builder, max_new_tokens=6, min_confidence=setting)

    shown = service(None).complete(doc, 4, 16)
    assert shown.text, "no gate recorded: everything is shown"
    strict = shown.generation.confidence / 2
    gated = service({"value": strict, "chosen_on": "test"})
    assert gated.confidence_gate() == strict and gated.complete(doc, 4, 16).text == ""
    overridden = service({"value": strict}, setting=GATE_OFF)
    assert overridden.confidence_gate() == GATE_OFF and overridden.complete(doc, 4, 16).text == shown.text
    for bad in ({"value": 0.5}, {"value": "high"}, {"value": True}, [strict], {"chosen_on": "x"}):
        assert service(bad).confidence_gate() is None, bad
    per_language = service({"value": GATE_OFF, "languages": {"python": {"value": strict}, "go": {"value": 0.5}}})
    assert per_language.confidence_gate("python") == strict and per_language.complete(doc, 4, 16).text == ""
    assert per_language.confidence_gate("javascript") == GATE_OFF, "no entry: the record's own"
    assert per_language.confidence_gate("go") == GATE_OFF, "a bad entry: the record's own"


def test_the_gate_chosen_is_the_highest_that_still_shows_the_share_of_useful_suggestions():
    from hirope_lsp.research.confidence_calibrate import choose_gate

    def shown(similarity, confidence):
        return {"predicted": "x = 1", "edit_similarity": similarity, "confidence": confidence}

    predictions = ([shown(0.9, -0.3), shown(0.7, -0.6), shown(0.6, -0.9), shown(0.55, -1.6), shown(0.8, -0.4)]
                   + [shown(0.1, -0.5), shown(0.2, -1.0), shown(0.3, -1.2), shown(0.0, -2.0)]
                   + [{"predicted": "", "edit_similarity": 0.0, "confidence": None}])
    choice = choose_gate(predictions, keep_useful=0.8)
    assert (choice["useful"], choice["wrong"]) == (5, 4)
    # -0.875 shows 3 of 5 useful (0.6); -0.9 is not on the grid: -1.0 is the highest showing 4 of 5
    assert choice["chosen"]["threshold"] == -1.0
    assert choice["chosen"]["useful_kept"] == 0.8 and choice["chosen"]["wrong_hidden"] == 0.5
    assert choose_gate(predictions, keep_useful=1.0)["chosen"]["threshold"] == -1.625
    with pytest.raises(ValueError):
        choose_gate([shown(0.1, -0.5)])


def test_the_benchmark_counts_a_repeated_line_as_the_guard_sees_one():
    from hirope_lsp.research.evaluate import repeats_line

    assert repeats_line("x = f(a)", "def g():\n    x = f(a)\n    ")
    assert repeats_line("count = count", "def g():\n    ")
    assert not repeats_line("}", "\t\tif ok {\n\t\t\treturn\n\t\t}\n\t")  # the end of an outer block
    assert not repeats_line("y = f(a)", "def g():\n    x = f(a)\n    ")


def test_calibrate_confidence_for_one_language_keeps_the_cards_own_gate(tmp_path, capsys):
    import json

    from hirope_lsp import cli
    from hirope_lsp.model.loading import load_model, recommended_min_confidence
    from tiny_models import calibration_setup

    model, corpus = calibration_setup(tmp_path)
    before = json.loads((model / "training.json").read_text()).get("min_confidence")
    argv = ["calibrate", "confidence", "--model", str(model), "--corpus", str(corpus), "--samples", "8",
            "--prompt-x", "1", "--keep-useful", "0.5", "--write"]
    assert cli.main(argv + ["--language", "cobol"]) == 2
    assert "unknown language 'cobol'" in capsys.readouterr().err
    assert cli.main(argv + ["--language", "go"]) == 0, capsys.readouterr().err
    record = json.loads((model / "training.json").read_text())["min_confidence"]
    before = before or {}
    assert {k: v for k, v in record.items() if k != "languages"} == \
           {k: v for k, v in before.items() if k != "languages"}, "the card's own gate is kept"
    entry = record["languages"]["go"]
    assert {k: v for k, v in record["languages"].items() if k != "go"} == \
           {k: v for k, v in before.get("languages", {}).items() if k != "go"}, "other languages' gates are kept"
    lm, _, _ = load_model(str(model), device="cpu", dtype="float32")
    assert recommended_min_confidence(lm, "go") == entry["value"]
    assert recommended_min_confidence(lm, "python") == (before or {}).get("value")


@pytest.fixture(scope="module")
def default_engine():
    return Engine(EngineSettings(device="cpu", measure_speed=False))


def ungated_service(engine: Engine, max_new_tokens: int) -> CompletionService:
    builder = PromptBuilder(engine.tokenizer, engine.fim, ContextSettings(budget_tokens=256))
    return CompletionService(engine, None, builder, max_new_tokens=max_new_tokens, min_confidence=GATE_OFF)


def test_a_line_that_repeats_the_one_above_gives_way_to_the_models_next_best_line(default_engine):
    engine = default_engine
    service = ungated_service(engine, 16)
    text = "class A:\n    def __init__(self, a, b):\n        self.a = a\n        "
    doc = Document("file:///w/a.py", text, language_id="python")
    job = service.prepare(doc, 3, 8)
    greedy = engine.generate(job.prompt, 16, job.policy.should_stop)
    assert greedy.text.split("\n")[0].strip() == "self.a = a", "the premise: greedy writes the line above again"
    point = service.branch_point(job.policy, greedy)
    assert point is not None and point > 0, "the branch is at the least sure token, after the shared 'self.'"
    shown = service.run(service.prepare(doc, 3, 8))
    first = shown.text.split("\n")[0].strip()
    assert first and first != "self.a = a", shown.text
    assert shown.generation.token_ids[:point] == greedy.token_ids[:point]
    assert shown.generation.token_ids[point] != greedy.token_ids[point]
    # no branch where nothing was generated, nor where the line is new (emptied by another rule)
    assert service.branch_point(job.policy, Generation([], "", 0, 0, 0.0, "eos")) is None
    other = engine.tokenizer.encode("self.b = b", add_special_tokens=False)
    assert service.branch_point(job.policy, Generation(other, "self.b = b", 0, 0, 0.0, "rule",
                                                       [-1.0] * len(other))) is None


def test_a_block_cut_by_the_token_limit_ends_at_its_last_whole_line(default_engine):
    service = ungated_service(default_engine, 12)
    text = "def f(a):\n    x = a + 1\n    y = x + 1\n    z = y + 1\n    "
    doc = Document("file:///w/f.py", text, language_id="python")
    shown = service.complete(doc, 4, 4)
    raw = shown.generation.text
    assert shown.generation.stopped_by == "length" and raw.count("\n") >= 1, "the premise: cut mid-block"
    partial = raw.rsplit("\n", 1)[1]
    assert partial.strip() and not shown.text.rstrip().endswith(partial.strip()), (raw, shown.text)
    assert shown.text.strip() and raw.startswith(shown.text.rstrip()), "whole lines of what was written"
