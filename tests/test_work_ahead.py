"""The engine's side of working ahead, on the embedded default model: warming keeps what it computed
and a request reuses it, generated tokens take the cursor's unit, the measured speed, the deadline,
and the suggestion prefetched for after an accept."""

import time

import pytest
import torch

from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
from hirope_lsp.completion.typed_ahead import ShownSuggestions
from hirope_lsp.hierarchy.document import Document
from hirope_lsp.model.engine import Engine, EngineSettings, Prompt
from hirope_lsp.model.loading import load_model
from hirope_lsp.model.rope import RopeMethodConfig

SOURCE = "import os\n\n\n" + "".join(
    f"def f{k}(path):\n    '''Step {k}.'''\n    parts = os.path.split(path)\n    return parts[{k % 2}]\n\n\n"
    for k in range(40)) + "class Walker:\n    def run(self, path):\n        return self.\n"


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture
def engine(loaded):
    return Engine(EngineSettings(rope=RopeMethodConfig(window=64), prefill_chunk=128), loaded=loaded)


def built_at(engine, text, line, character, budget=1024):
    doc = Document("file:///w/m.py", text, language_id="python")
    return PromptBuilder(engine.tokenizer, engine.fim, ContextSettings(budget_tokens=budget)).build(doc, line, character)


def cursor_line(text):
    lines = text.split("\n")
    line = len(lines) - 2
    return line, len(lines[line])


def test_the_speed_is_measured_at_load_and_the_probe_is_not_counted(engine):
    assert 0 < engine.speed.prefill_s < 1 and 0 < engine.speed.decode_s < 10
    assert engine.speed.prefill_samples >= 1 and engine.speed.decode_samples >= 1
    assert engine.pool.counters.requests == 0 and engine.pool.counters.computed_tokens == 0
    assert "#speed" not in engine.pool.slots


def test_warming_in_chunks_is_reused_whole_by_the_request(engine):
    built = built_at(engine, SOURCE, *cursor_line(SOURCE))
    prompt = Prompt("doc", built.token_ids, built.positions, built.cursor_unit)
    assert engine.reusable_tokens(prompt) == 0
    computed = engine.prefill(prompt, chunk=100)
    assert computed == engine.reusable_tokens(prompt) > 300
    assert engine.pool.counters.warmed_tokens == computed and engine.pool.counters.requests == 0
    warm = engine.generate(prompt, 6)
    assert warm.computed_tokens == 1 and engine.pool.counters.warmed_used_tokens == computed
    engine.pool.clear()
    cold = engine.generate(prompt, 6)
    assert cold.reused_tokens == 0 and cold.text == warm.text  # warming changes nothing but the time


@pytest.mark.parametrize("stop_before_layer", [0, 1, 5], ids=["between-chunks", "after-one-layer", "before-last-layer"])
def test_warming_stops_between_layers_when_asked_and_keeps_its_whole_chunks(engine, loaded, stop_before_layer):
    """``cancelled()`` is asked before each chunk and before each of the model's layers: a stop inside the
    third chunk keeps the first two, and the request after it continues as from scratch."""
    built = built_at(engine, SOURCE, *cursor_line(SOURCE))
    prompt = Prompt("doc", built.token_ids, built.positions, built.cursor_unit)
    layers = len(engine.layers)
    assert layers == engine.model.config.num_hidden_layers > stop_before_layer
    per_chunk = 1 + layers  # the chunk's own check, then one per layer
    calls = []
    stop_at = 2 * per_chunk + 1 + stop_before_layer  # the third chunk's check, then its layers

    def cancelled():
        calls.append(1)
        return len(calls) > stop_at

    computed = engine.prefill(prompt, cancelled=cancelled, chunk=64)
    assert len(calls) == stop_at + 1, "it stopped at the first check that said so"
    assert computed == 128 and engine.reusable_tokens(prompt) == 128
    slot = engine.pool.slots["doc"]
    assert [layer.get_seq_length() for layer in slot.cache.layers] == [128] * layers
    assert slot.far_keys is not None and all(far.length <= 128 for far in slot.far_keys.keys.values())
    warm = engine.generate(prompt, 6)
    assert warm.reused_tokens == 128
    fresh = Engine(EngineSettings(rope=engine.settings.rope, reuse_cache=False), loaded=loaded)
    assert warm.token_ids == fresh.generate(prompt, 6).token_ids


def test_warming_stops_at_the_cache_budget(loaded):
    engine = Engine(EngineSettings(rope=RopeMethodConfig(window=64), cache_budget_mb=0), loaded=loaded)
    engine.pool.budget_bytes = 200_000  # a few hundred tokens of this model's KV state
    built = built_at(engine, SOURCE, *cursor_line(SOURCE))
    prompt = Prompt("doc", built.token_ids, built.positions)
    computed = engine.prefill(prompt, chunk=64)
    assert 0 < computed < len(built.token_ids) - 1
    assert engine.pool.total_bytes() <= engine.pool.budget_bytes
    assert engine.reusable_tokens(prompt) == computed, "it computed only what the budget keeps"


def test_generated_tokens_take_the_cursors_unit_not_the_middle_tokens(engine):
    text = SOURCE.replace("        return self.\n", "        return self.\n\n\ndef tail():\n    return 0\n")
    line = text.split("\n").index("        return self.")
    built = built_at(engine, text, line, len("        return self."))
    mid_unit = built.positions[-1, :-1]
    assert built.cursor_unit is not None and not torch.equal(built.cursor_unit, mid_unit)
    pre = engine.tokenizer.convert_tokens_to_ids("<|fim_prefix|>")
    assert torch.equal(built.cursor_unit, built.positions[len(built.token_ids) - 2, :-1])  # the prefix's last token
    assert built.token_ids.index(pre) < len(built.token_ids) - 2
    seen = []
    forward = engine.handle.forward
    engine.handle.forward = lambda ids, positions, **kw: seen.append((ids.shape[1], positions[0, -1].clone())) \
        or forward(ids, positions, **kw)
    engine.generate(Prompt("doc", built.token_ids, built.positions, built.cursor_unit), 4, heal=False,
                    suppress_eos=True)
    decoded = [p for n, p in seen if n == 1]  # the decoding steps' newest positions
    assert len(decoded) == 3 and all(torch.equal(p[:-1], built.cursor_unit) for p in decoded)
    assert [int(p[-1]) for p in decoded] == [len(built.token_ids) + k for k in range(len(decoded))]


def test_decoding_stops_after_its_time_with_the_tokens_in_hand(engine):
    built = built_at(engine, SOURCE, *cursor_line(SOURCE))
    gen = engine.generate(Prompt("doc", built.token_ids, built.positions), 32, decode_seconds=0.0)
    assert gen.stopped_by in ("time", "eos") and len(gen.token_ids) <= 1


def test_decoding_stops_once_a_deadline_set_while_it_runs_has_passed(engine):
    """A request that joins a suggestion being made ahead sets its deadline then: it is read at every step."""
    built = built_at(engine, SOURCE, *cursor_line(SOURCE))
    asked = []

    def answer_by():
        asked.append(1)
        return None if len(asked) < 3 else time.perf_counter() - 1  # set while the third token was decoded

    gen = engine.generate(Prompt("doc", built.token_ids, built.positions), 32, suppress_eos=True, answer_by=answer_by)
    assert gen.stopped_by == "time" and len(gen.token_ids) == 3
    free = engine.generate(Prompt("doc", built.token_ids, built.positions), 32, suppress_eos=True)
    assert free.token_ids[:3] == gen.token_ids and len(free.token_ids) > 3


def test_a_prefetched_suggestion_answers_once_the_document_reaches_its_state():
    ahead = ShownSuggestions(answers_at_start=True)
    accepted = Document("file:///w/m.py", "x = 1\nprint(x)\n")
    ahead.remember(accepted, len("x = 1\nprint(x)"), "\ny = 2")
    before = Document("file:///w/m.py", "x = 1\nprint(\n")  # not yet accepted: nothing
    assert ahead.rest(before, len("x = 1\nprint(")) is None
    assert ahead.rest(accepted, len("x = 1\nprint(x)")) == "\ny = 2"
    shown = ShownSuggestions()  # what is on screen answers only once its start is typed
    shown.remember(accepted, len("x = 1\nprint(x)"), "\ny = 2")
    assert shown.rest(accepted, len("x = 1\nprint(x)")) is None


def test_warming_chunks_take_a_layer_share_each_and_shrink_after_a_stop(engine):
    from hirope_lsp.session import MIN_FAST_BUDGET, WARM_CHUNK_SECONDS, Session

    engine.speed.prefill_s = WARM_CHUNK_SECONDS / 100  # 100 tokens per WARM_CHUNK_SECONDS
    layers = len(engine.layers)
    assert Session._warm_chunk(engine) == min(engine.settings.prefill_chunk, 100 * layers)
    assert Session._warm_chunk(engine, small=True) == max(MIN_FAST_BUDGET, 100)
    engine.speed.prefill_s = WARM_CHUNK_SECONDS / 10
    assert Session._warm_chunk(engine, small=True) == MIN_FAST_BUDGET


def test_a_pending_prefetch_stays_reachable_while_the_user_types_along_the_suggestion():
    from hirope_lsp.session import Cursor, PendingPrefetch

    before, suggestion, after = "def area(r):\n    return ", "radius ** 2", "\n\nprint(area(2))\n"
    accepted = Document("file:///w/a.py", before + suggestion + after, version=9)
    pending = PendingPrefetch(accepted, Cursor.at(accepted, 1, len("    return ") + len(suggestion)), False,
                              len(suggestion))
    reachable = pending.reachable()
    for version, typed in enumerate(["", "r", "radius *", suggestion]):  # answered, typing along, accepted
        assert reachable(Document(accepted.uri, before + typed + after, version=version)), typed
    for version, text in enumerate([before + "x" + after, before + suggestion + "x" + after, before + suggestion,
                                    before[:-1] + after], start=10):
        assert not reachable(Document(accepted.uri, text, version=version)), text
