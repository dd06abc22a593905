"""The copy model (what followed the last tokens where they occurred before) and its mixture into decoding."""

import math

import numpy as np
import pytest
import torch

from hirope_lsp.model.copying import CopyModel, CopySettings, mix_probability, mix_scores
from hirope_lsp.model.engine import Engine, EngineSettings, Prompt
from hirope_lsp.model.loading import load_model, recommended_copy
from hirope_lsp.model.rope import RopeMethodConfig, plain_positions

ON = CopySettings(weight=0.5, min_order=2)


def test_the_longest_context_that_occurred_wins():
    model = CopyModel([7, 1, 2, 3, 9, 4, 2, 3, 8, 5, 1, 2, 3], ON)
    first = model.predict()
    assert (first.order, first.count) == (3, 1)  # (1, 2, 3) once before, followed by 9
    assert first.token_ids.tolist() == [9] and first.probs.tolist() == [1.0]
    shorter = model.predict(end=8)  # ... 4, 2, 3: only (2, 3) occurred, followed by 9
    assert (shorter.order, shorter.count, shorter.token_ids.tolist()) == (2, 1, [9])
    both = CopyModel([2, 3, 9, 2, 3, 8, 2, 3], ON).predict()
    assert both.token_ids.tolist() == [8, 9] and both.probs.tolist() == [0.5, 0.5] and both.count == 2


def test_a_long_context_picks_the_one_place_it_continues_from():
    # (5, 6) is followed by 1 three times, but the last 6 tokens occurred once, followed by 2
    seq = [9, 8, 7, 4, 5, 6, 2] + [3, 5, 6, 1] * 3 + [9, 8, 7, 4, 5, 6]
    long = CopyModel(seq, CopySettings(weight=0.5)).predict()
    assert (long.order, long.count, long.token_ids.tolist()) == (6, 1, [2])
    assert long.mixture_weight(CopySettings(weight=0.5)) == 0.5 * 1 / 2  # past full_order: the full weight
    short = CopyModel(seq, CopySettings(weight=0.5, max_order=2)).predict()
    assert (short.order, short.count, short.token_ids.tolist(), short.probs.tolist()) == (2, 4, [1, 2], [0.75, 0.25])


def test_the_search_finds_what_a_naive_one_does():
    rng = np.random.default_rng(5)
    for trial in range(40):
        seq = rng.integers(0, 3 + trial % 4, 60).tolist()
        copy = CopySettings(weight=0.5, min_order=1 + trial % 3, max_order=(2, 4, 16)[trial % 3])
        for end in range(1, len(seq) + 1):
            got = CopyModel(seq, copy).predict(end=end)
            seen, want = seq[:end], None
            for order in range(min(copy.max_order, len(seen) - 1), copy.min_order - 1, -1):
                context = seen[len(seen) - order:]
                following = [seen[i + order] for i in range(len(seen) - order) if seen[i:i + order] == context]
                if following:
                    want = (order, len(following), sorted(set(following)))
                    break
            assert (None if got is None else (got.order, got.count, got.token_ids.tolist())) == want, (trial, end)


def test_what_the_copy_model_may_read_is_bounded():
    seq = [1, 2, 3, 9] + [0] * 20 + [1, 2, 3]
    model = CopyModel(seq, ON)
    assert model.predict().token_ids.tolist() == [9]
    assert model.predict(start=10) is None  # the occurrence lies before the span it may read
    assert CopyModel([5, 6], ON).predict() is None
    assert CopyModel([4, 1, 9, 1], CopySettings(weight=0.5, min_order=2)).predict() is None  # one token: not trusted
    assert CopyModel([4, 1, 9, 1], CopySettings(weight=0.5, min_order=1)).predict().token_ids.tolist() == [9]


def test_extending_is_reading_the_whole_sequence():
    whole = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    grown = CopyModel(whole[:3], CopySettings(weight=0.5, min_order=1))
    for token in whole[3:]:
        grown.extend([token])
    fresh = CopyModel(whole, CopySettings(weight=0.5, min_order=1))
    for end in range(2, len(whole) + 1):
        a, b = grown.predict(end=end), fresh.predict(end=end)
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.order, a.count, a.token_ids.tolist(), a.probs.tolist()) == \
                   (b.order, b.count, b.token_ids.tolist(), b.probs.tolist())


def test_the_mixture_is_a_distribution_that_keeps_disallowed_tokens_out():
    scores = torch.randn(10, generator=torch.Generator().manual_seed(0))
    scores[3] = float("-inf")  # e.g. token healing allows only some tokens
    logprobs = torch.log_softmax(scores, dim=-1)
    prediction = CopyModel([1, 2, 3, 1, 2, 5, 1, 2], ON).predict()  # 3 and 5 followed (1, 2)
    mixed = mix_scores(logprobs, prediction, ON)
    assert math.isclose(float(mixed.exp().sum()), 1.0, rel_tol=1e-5)
    assert mixed[3] == float("-inf")
    lam = ON.weight * 2 / 3 * 2 / 4  # two occurrences of a context of 2 tokens (of at most 4)
    # 3 is not allowed: 5 takes all of the copy model's share
    assert math.isclose(float(mixed[5].exp()), (1 - lam) * float(logprobs[5].exp()) + lam, rel_tol=1e-5)
    assert torch.equal(mix_scores(logprobs, None, ON), logprobs)
    # where every copied token is allowed, the same probability as the perplexity evaluation computes
    free = torch.log_softmax(torch.randn(10, generator=torch.Generator().manual_seed(1)), dim=-1)
    for token in (3, 5, 0):
        assert math.isclose(mix_probability(float(free[token].exp()), prediction, token, ON),
                            float(mix_scores(free, prediction, ON)[token].exp()), rel_tol=1e-5)
    nothing_allowed = torch.full((10,), float("-inf"))
    nothing_allowed[0] = 0.0
    assert torch.equal(mix_scores(nothing_allowed, prediction, ON), nothing_allowed)


@pytest.fixture(scope="module")
def loaded():
    return load_model(None, device="cpu", dtype="float32")


def _prompt(engine, ids):
    return Prompt("file:///w/copy.py", ids, plain_positions(len(ids))[0])


def test_decoding_copies_a_run_seen_far_back_when_the_copy_model_weighs_enough(loaded):
    tokenizer = loaded[1]
    vocab = len(tokenizer)
    rng = np.random.default_rng(0)
    run = rng.integers(300, vocab - 300, 12).tolist()  # tokens no text makes: the network cannot guess them
    ids = run + rng.integers(300, vocab - 300, 200).tolist() + run[:4]
    rope = RopeMethodConfig(window=64)
    off = Engine(EngineSettings(rope=rope, measure_speed=False, copy_weight=0.0), loaded=loaded)
    plain = off.generate(_prompt(off, ids), max_new_tokens=6, heal=False, suppress_eos=True)
    assert plain.token_ids != run[4:10]
    on = Engine(EngineSettings(rope=rope, measure_speed=False, copy_weight=0.9, copy_min_order=2), loaded=loaded)
    copied = on.generate(_prompt(on, ids), max_new_tokens=6, heal=False, suppress_eos=True)
    assert copied.token_ids == run[4:10]
    assert all(lp <= 0 for lp in copied.token_logprobs) and copied.confidence > plain.confidence


def test_the_default_model_card_sets_the_copy_model_and_settings_override_it(loaded):
    engine = Engine(EngineSettings(measure_speed=False), loaded=loaded)
    card = recommended_copy(loaded[0])
    assert engine.copy_settings() == (card or CopySettings())
    engine.settings.copy_weight, engine.settings.copy_min_order = 0.2, 3
    assert engine.copy_settings() == CopySettings(weight=0.2, min_order=3)
    engine.settings.copy_weight = 1.5
    with pytest.raises(ValueError):
        engine.copy_settings()


def test_a_bad_card_record_is_ignored(tmp_path, loaded):
    for record in ({"weight": 2}, {"weight": "x"}, {"min_order": 2}, [0.3], {"weight": 0.3, "min_order": True}):
        assert recommended_copy(_card_model(tmp_path, record)) is None, record
    assert recommended_copy(_card_model(tmp_path, {"weight": 0.3, "min_order": 3})) == CopySettings(weight=0.3, min_order=3)


def test_a_weight_is_chosen_only_when_it_gains_enough():
    from hirope_lsp.research.copy_calibrate import choose_copy

    rows = [{"method": "hirope+copy:0/1", "edit_similarity": 24.0}, {"method": "hirope+copy:0.3/1", "edit_similarity": 24.3},
            {"method": "hirope+copy:0.5/1", "edit_similarity": 25.1}]
    assert choose_copy({"results": rows}, 0.5)["chosen"] is rows[2]
    assert choose_copy({"results": rows}, 2.0)["chosen"] is rows[0], "a gain below --min-gain keeps it off"
    assert choose_copy({"results": rows[:1]}, 0.5)["chosen"] is rows[0]


def test_calibrate_copy_writes_the_card_the_server_reads(tmp_path, capsys):
    import json

    from hirope_lsp import cli
    from tiny_models import PYTHON_HELPERS, calibration_setup

    model, corpus = calibration_setup(tmp_path, text=PYTHON_HELPERS + "def main():\n    return helper_3(1)\n")
    argv = ["calibrate", "copy", "--model", str(model), "--corpus", str(corpus), "--samples", "4", "--prompt-x", "1",
            "--grid", "0.5/1", "--min-gain", "-100", "--json", str(tmp_path / "copy.json")]
    assert cli.main(argv + ["--write"]) == 0
    out = capsys.readouterr().out
    assert "hirope+copy:0/1" in out and "hirope+copy:0.5/1" in out and "<- chosen" in out
    record = json.loads((model / "training.json").read_text())["copy"]
    assert (record["weight"], record["min_order"], record["chosen_on"]) == (0.5, 1, "corpus")
    assert set(record["grid"]) == {"hirope+copy:0/1", "hirope+copy:0.5/1"}
    lm, _, _ = load_model(str(model), device="cpu", dtype="float32")
    assert recommended_copy(lm) == CopySettings(weight=0.5, min_order=1)
    assert cli.main(["calibrate", "copy", "--corpus", str(corpus), "--grid", "2/1"]) == 2
    assert cli.main(["calibrate", "copy", "--corpus", str(tmp_path / "none")]) == 2
    assert "hirope-lsp:" in capsys.readouterr().err


def _reference_copy_probability(seen: list[int], target: int, copy: CopySettings, p_model: float) -> float:
    """The mixture's p(target) counted by hand: the longest context of the last tokens that occurred
    before in ``seen`` (with a token after it), what followed each occurrence."""
    for order in range(min(copy.max_order, len(seen) - 1), copy.min_order - 1, -1):
        context = seen[len(seen) - order:]
        following = [seen[i + order] for i in range(len(seen) - order) if seen[i:i + order] == context]
        if following:
            lam = copy.weight * len(following) / (len(following) + 1) * min(1, order / copy.full_order)
            return (1 - lam) * p_model + lam * following.count(target) / len(following)
    return p_model


def test_perplexity_with_the_copy_model_matches_counting_by_hand():
    from hirope_lsp.research.evaluate import copied_nll

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, 80).tolist()  # a small alphabet: contexts recur at every order
    nll = torch.tensor(rng.uniform(0.5, 3.0, len(ids) - 1))
    copy = CopySettings(weight=0.6, min_order=1)
    for span in (None, 20):
        mixed = copied_nll(ids, nll, copy, span)
        for t in range(1, len(ids)):
            seen = ids[max(0, t - span) if span else 0:t]
            expected = -math.log(_reference_copy_probability(seen, ids[t], copy, math.exp(-float(nll[t - 1]))))
            assert math.isclose(float(mixed[t - 1]), expected, rel_tol=1e-6), (span, t)
    repeated = rng.integers(0, 50, 20).tolist() * 3
    flat = torch.full((len(repeated) - 1,), 2.0, dtype=torch.float64)
    assert float(copied_nll(repeated, flat, copy, None)[25:].max()) < 2.0, "text seen before is copied"


def _card_model(tmp_path, copy_record):
    import json

    card = tmp_path / "training.json"
    card.write_text(json.dumps({"copy": copy_record}))

    class Config:
        _name_or_path = str(tmp_path)

    class Model:
        config = Config()

    return Model()


def test_the_card_records_a_copy_model_per_language(tmp_path, caplog):
    lm = _card_model(tmp_path, {"weight": 0.8, "min_order": 1, "languages": {
        "javascript": {"weight": 0, "min_order": 1}, "go": {"weight": 0.5, "min_order": 2}, "rust": {"weight": 7}}})
    assert recommended_copy(lm) == recommended_copy(lm, "python") == CopySettings(weight=0.8, min_order=1)
    assert recommended_copy(lm, "javascript") == CopySettings(weight=0.0, min_order=1)
    assert recommended_copy(lm, "go") == CopySettings(weight=0.5, min_order=2)
    assert recommended_copy(lm, "rust") == CopySettings(weight=0.8, min_order=1), "a bad entry: the card's own"
    assert recommended_copy(lm, "typescript") == recommended_copy(lm, "typescriptreact") == \
           CopySettings(weight=0.0, min_order=1), "no TypeScript entry: JavaScript's"
    assert "rust copy model" in caplog.text
    only = _card_model(tmp_path, {"languages": {"go": {"weight": 0.5, "min_order": 2}}})
    caplog.clear()
    assert recommended_copy(only, "go") == CopySettings(weight=0.5, min_order=2)
    assert recommended_copy(only, "python") is None and recommended_copy(only) is None
    assert "ignoring" not in caplog.text, "a card with only per-language entries is not a bad record"


def test_decoding_uses_the_copy_model_of_the_prompts_language(tmp_path, loaded):
    import json
    import shutil

    from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    card = json.loads((model / "training.json").read_text())
    card["copy"] = {"weight": 0.0, "min_order": 1, "languages": {"javascript": {"weight": 0.9, "min_order": 2}}}
    (model / "training.json").write_text(json.dumps(card))
    mine = load_model(str(model), device="cpu", dtype="float32")
    vocab = len(mine[1])
    rng = np.random.default_rng(0)
    run = rng.integers(300, vocab - 300, 12).tolist()
    ids = run + rng.integers(300, vocab - 300, 200).tolist() + run[:4]
    engine = Engine(EngineSettings(rope=RopeMethodConfig(window=64), measure_speed=False), loaded=mine)
    positions = plain_positions(len(ids))[0]
    as_js = engine.generate(Prompt("file:///w/a.js", ids, positions, language="javascript"), max_new_tokens=6,
                            heal=False, suppress_eos=True)
    as_py = engine.generate(Prompt("file:///w/a.py", ids, positions, language="python"), max_new_tokens=6,
                            heal=False, suppress_eos=True)
    assert as_js.token_ids == run[4:10], "javascript's entry turns the copy model on"
    assert as_py.token_ids != run[4:10], "python has no entry: the card's own weight, off"
    engine.settings.copy_weight = 0.0
    assert engine.copy_settings("javascript") == CopySettings(weight=0.0, min_order=2), "the user's setting wins"


def test_a_completion_prompt_carries_its_documents_language(loaded):
    from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
    from hirope_lsp.completion.service import CompletionService, shorter
    from hirope_lsp.hierarchy.document import Document

    engine = Engine(EngineSettings(measure_speed=False), loaded=loaded)
    service = CompletionService(engine, None, PromptBuilder(loaded[1], loaded[2], ContextSettings(budget_tokens=256)),
                                max_new_tokens=2)
    for uri, language_id, language in (("file:///w/a.js", "javascript", "javascript"), ("file:///w/b.go", None, "go"),
                                       ("file:///w/c.py", "python", "python")):
        doc = Document(uri, "const x = 1;\n" * 40, language_id=language_id)
        job = service.prepare(doc, 20, 0)
        assert job.prompt.language == language and shorter(job.prompt).language == language


def test_calibrate_copy_for_one_language_keeps_the_cards_own_choice(tmp_path, capsys):
    import json

    from hirope_lsp import cli
    from tiny_models import calibration_setup

    body = "".join(f"function helper{k}(value) {{\n  const total = value * {k} + {k};\n  return total;\n}}\n\n"
                   for k in range(60))
    model, corpus = calibration_setup(tmp_path, "helpers.js", body + "module.exports = { helper3 };\n")
    before = json.loads((model / "training.json").read_text()).get("copy")
    argv = ["calibrate", "copy", "--model", str(model), "--corpus", str(corpus), "--samples", "4", "--prompt-x", "1",
            "--grid", "0.5/2", "--min-gain", "-100", "--language", "javascript", "--write"]
    assert cli.main(argv) == 0
    record = json.loads((model / "training.json").read_text())["copy"]
    assert {k: record.get(k) for k in ("weight", "min_order")} == \
           {k: (before or {}).get(k) for k in ("weight", "min_order")}, "the other languages' choice is kept"
    entry = record["languages"]["javascript"]
    assert {k: v for k, v in record["languages"].items() if k != "javascript"} == \
           {k: v for k, v in (before or {}).get("languages", {}).items() if k != "javascript"}, "others kept"
    assert (entry["weight"], entry["min_order"], entry["chosen_on"]) == (0.5, 2, "corpus")
    lm, _, _ = load_model(str(model), device="cpu", dtype="float32")
    assert recommended_copy(lm, "javascript") == CopySettings(weight=0.5, min_order=2)
    every_language = [a for a in argv if a not in ("--language", "javascript")]
    every_language[every_language.index("0.5/2")] = "0.3/1"
    assert cli.main(every_language) == 0
    record = json.loads((model / "training.json").read_text())["copy"]
    assert (record["weight"], record["min_order"]) == (0.3, 1)
    assert record["languages"]["javascript"] == entry, "a choice for every language keeps those made per language"
    capsys.readouterr()
    assert cli.main(argv[:-3] + ["--language", "cobol"]) == 2
    assert "unknown language 'cobol'" in capsys.readouterr().err


def test_decoding_copies_a_run_only_the_history_beyond_the_prompt_holds(loaded):
    tokenizer = loaded[1]
    rng = np.random.default_rng(1)
    run = rng.integers(300, len(tokenizer) - 300, 12).tolist()
    ids = rng.integers(300, len(tokenizer) - 300, 100).tolist() + run[:4]
    history = rng.integers(300, len(tokenizer) - 300, 50).tolist() + run
    engine = Engine(EngineSettings(rope=RopeMethodConfig(window=64), measure_speed=False, copy_weight=0.9,
                                   copy_min_order=2), loaded=loaded)
    without = engine.generate(_prompt(engine, ids), max_new_tokens=6, heal=False, suppress_eos=True)
    assert without.token_ids != run[4:10]
    engine.pool.clear()
    prompt = Prompt("file:///w/copy.py", ids, plain_positions(len(ids))[0], copy_history=history)
    with_history = engine.generate(prompt, max_new_tokens=6, heal=False, suppress_eos=True)
    assert with_history.token_ids == run[4:10], "copied from text the attention never saw"


def test_the_copy_history_is_the_document_the_prompt_does_not_hold(loaded):
    from hirope_lsp.completion import prompt as prompt_module
    from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
    from hirope_lsp.completion.service import CompletionService
    from hirope_lsp.hierarchy.document import Document

    lines = [f"value_{n} = compute_{n}(argument_{n})" for n in range(400)]
    doc = Document("file:///w/long.py", "\n".join(lines) + "\n", language_id="python")
    engine = Engine(EngineSettings(measure_speed=False), loaded=loaded)

    def job(**context):
        builder = PromptBuilder(loaded[1], loaded[2], ContextSettings(budget_tokens=256, **context))
        return CompletionService(engine, None, builder, max_new_tokens=2).prepare(doc, 200, 0)

    assert len(job(copy_document=False).prompt.copy_history) == 0, "only the prompt when turned off"
    copy_off = Engine(EngineSettings(measure_speed=False, copy_weight=0.0), loaded=loaded)
    service = CompletionService(copy_off, None, PromptBuilder(loaded[1], loaded[2], ContextSettings(budget_tokens=256)), 2)
    assert len(service.prepare(doc, 200, 0).prompt.copy_history) == 0, "not read where the copy model is off"
    on = job()  # on by default
    history = loaded[1].decode(on.prompt.copy_history.tolist())
    held = on.built.prefix_text + on.built.suffix_text
    assert lines[0] in history and lines[399] in history, "the file's head and tail"
    assert lines[199] in held and lines[199] not in history, "not what the prompt already holds"
    assert len(history) + len(held) >= len(doc.text) - 1
    prompt_module.COPY_DOCUMENT_CHARS, saved = 2000, prompt_module.COPY_DOCUMENT_CHARS
    try:
        capped = loaded[1].decode(job(copy_document=True).prompt.copy_history.tolist())
    finally:
        prompt_module.COPY_DOCUMENT_CHARS = saved
    assert len(capped) <= 2500 and lines[0] not in capped, "a huge file: only what lies nearest the cursor"
    # the first piece goes on from where the suffix was cut; every other is a whole line
    assert all(line in lines for line in capped.split("\n")[1:] if line), "cut at line starts"


def test_a_jump_tokenizes_only_the_ends_of_the_document_beyond_the_prompt(loaded, monkeypatch):
    from hirope_lsp.completion import prompt as prompt_module
    from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
    from hirope_lsp.completion.service import CompletionService
    from hirope_lsp.hierarchy.document import Document

    monkeypatch.setattr(prompt_module, "COPY_PIECE_CHARS", 512)
    text = "".join(f"item_{n} = table[{n}]\n" for n in range(3000))
    for start, end, from_end in ((5, 20000, False), (7000, len(text), True), (100, 101, False)):
        pieces = PromptBuilder._pieces(text, start, end, from_end)
        assert pieces[0][0] == start and pieces[-1][1] == end
        assert all(b == c and text[b - 1] == "\n" for (_, b), (c, _) in zip(pieces, pieces[1:])), "cut after line breaks"
    cuts = lambda start, end, from_end=False: {a for a, _ in PromptBuilder._pieces(text, start, end, from_end)[1:]}  # noqa: E731
    assert cuts(0, 20000) - cuts(3333, 20000) <= {b for b in cuts(0, 20000) if b < 3900}, "the same grid"
    assert cuts(1000, 60000, True) - cuts(1000, 50000, True) <= {b for b in cuts(1000, 60000, True) if b > 49000}
    builder = PromptBuilder(loaded[1], loaded[2], ContextSettings(budget_tokens=256))
    service = CompletionService(Engine(EngineSettings(measure_speed=False), loaded=loaded), None, builder, 2)
    doc = Document("file:///w/table.py", text, language_id="python")
    service.prepare(doc, 2000, 0)
    first = builder._encode_beyond.cache_info().misses
    assert first > 20
    service.prepare(doc, 2100, 0)  # a jump of 100 lines
    # new are the pieces the head and the tail gain (100 lines each) and the ends: not the ~120 of a re-read
    assert builder._encode_beyond.cache_info().misses - first <= first // 5, "most pieces were read before"
