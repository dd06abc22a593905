"""The engine on the embedded default model: KV reuse gives what a fresh computation gives."""

import dataclasses

import pytest
import torch

from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
from hirope_lsp.hierarchy.document import Document
from hirope_lsp.model.engine import Cancelled, Engine, EngineSettings, Prompt
from hirope_lsp.model.loading import ModelLoadError, load_model
from hirope_lsp.model.rope import RopeMethodConfig

SOURCE = '''import os


def list_files(directory):
    """Every file under directory."""
    result = []
    for root, dirs, files in os.walk(directory):
        for name in files:
            result.append(os.path.join(root, name))
    return result


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1
        return self.
'''


@pytest.fixture(scope="module")
def loaded():
    return load_model(None, device="cpu", dtype="float32")


def engine_for(loaded, **rope):
    cfg = RopeMethodConfig(window=16, **rope)
    return Engine(EngineSettings(rope=cfg, prefill_chunk=64), loaded=loaded)


def prompt_for(engine, text, line, character, budget=600):
    doc = Document("file:///w/m.py", text, language_id="python")
    builder = PromptBuilder(engine.tokenizer, engine.fim, ContextSettings(budget_tokens=budget))
    built = builder.build(doc, line, character)
    return Prompt("file:///w/m.py", built.token_ids, built.positions)


def test_default_model_loads_offline_and_completes(loaded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer, fim = load_model(None, device="cpu")
    assert model.config.model_type == "llama" and fim.available
    engine = Engine(EngineSettings(), loaded=(model, tokenizer, fim))
    gen = engine.generate(prompt_for(engine, SOURCE, 18, 20), max_new_tokens=8)
    assert gen.token_ids, "the default model continues a Python prefix"


def test_reuse_gives_the_same_completion_as_from_scratch(loaded):
    engine = engine_for(loaded)
    first = prompt_for(engine, SOURCE, 18, 20)
    engine.generate(first, max_new_tokens=6)
    # the user types "co": the next prompt shares most of its tokens with the first
    edited = SOURCE.rstrip("\n") + "co\n"
    second = prompt_for(engine, edited, 18, 22)
    with_reuse = engine.generate(second, max_new_tokens=12)
    assert with_reuse.reused_tokens > 0.8 * len(second.token_ids)
    fresh_engine = Engine(EngineSettings(rope=engine.settings.rope, reuse_cache=False), loaded=loaded)
    from_scratch = fresh_engine.generate(second, max_new_tokens=12)
    assert from_scratch.reused_tokens == 0
    assert with_reuse.token_ids == from_scratch.token_ids


def test_cached_logits_equal_a_full_forward(loaded):
    engine = engine_for(loaded)
    p = prompt_for(engine, SOURCE, 18, 20)
    engine.generate(p, max_new_tokens=1, heal=False)
    slot = engine.pool.slots[p.key]
    ids = torch.tensor([p.token_ids])
    full = engine.handle.forward(ids, p.positions[None]).logits[0, -1]
    engine.pool.acquire(p.key, p.token_ids, p.positions)  # cut back to all but the last token
    last = engine.handle.forward(ids[:, -1:], p.positions[None], past_key_values=slot.cache).logits[0, -1]
    assert torch.allclose(full, last, atol=1e-4)


@pytest.mark.parametrize("checks", [1, 3, 4, 7], ids=["prefill-chunk-2", "prefill-chunk-4", "decode-1", "decode-4"])
def test_cancellation_stops_generation(loaded, checks):
    """``cancelled()`` is asked before each prefill chunk (32 tokens here: four for this prompt) and each
    decoding step: it stops mid-prefill or mid-decoding, and what follows is as if it had not run."""
    engine = Engine(EngineSettings(rope=RopeMethodConfig(window=16), prefill_chunk=32), loaded=loaded)
    prompt = prompt_for(engine, SOURCE, 18, 20)
    assert 96 < len(prompt.token_ids) <= 128, "four prefill chunks"
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > checks

    with pytest.raises(Cancelled):
        engine.generate(prompt, max_new_tokens=50, cancelled=cancelled)
    assert len(calls) == checks + 1, "it stopped at the first check that said so"
    # the pool is left consistent: the next request reuses what was computed before the stop and
    # continues the prompt as an engine that never saw it does
    after = engine.generate(prompt, max_new_tokens=8)
    assert after.reused_tokens >= min(32 * checks, 96)
    fresh = Engine(EngineSettings(rope=engine.settings.rope, reuse_cache=False), loaded=loaded)
    from_scratch = fresh.generate(prompt, max_new_tokens=8)
    assert from_scratch.reused_tokens == 0
    assert after.token_ids, "the default model continues the prompt"
    assert after.token_ids == from_scratch.token_ids


def test_cache_budget_evicts_least_recently_used(loaded):
    engine = engine_for(loaded)
    engine.pool.budget_bytes = 1
    a = prompt_for(engine, SOURCE, 18, 20)
    engine.generate(Prompt("a", a.token_ids, a.positions), max_new_tokens=1)
    engine.generate(Prompt("b", a.token_ids, a.positions), max_new_tokens=1)
    assert list(engine.pool.slots) == ["b"] and engine.pool.counters.evictions == 1


def test_a_slot_over_budget_only_by_its_spare_capacity_is_compacted_not_cut(loaded):
    engine = engine_for(loaded)
    a = prompt_for(engine, SOURCE, 18, 20)
    engine.generate(Prompt("a", a.token_ids, a.positions), max_new_tokens=1)
    slot = engine.pool.slots["a"]
    kept, with_spare = len(slot.token_ids), slot.nbytes()
    engine.pool.budget_bytes = with_spare - 1
    engine.pool.evict()
    assert slot.nbytes() < with_spare - 1, "the growing buffers kept spare capacity"
    assert engine.pool.slots["a"] is slot and len(slot.token_ids) == kept, "it fits once compacted: nothing cut"


def test_a_document_closed_while_its_slot_is_acquired(loaded, monkeypatch):
    """The event loop drops a closed document's slot while the inference thread acquires it: the
    drop waits for the pool instead of pulling the slot from under it (a fuzzed session found this)."""
    import threading

    from hirope_lsp.model import cache

    engine = engine_for(loaded)
    prompt = prompt_for(engine, SOURCE, 18, 20, budget=200)
    real_common_prefix = cache.common_prefix

    def closed_meanwhile(*args):
        closer = threading.Thread(target=engine.pool.drop, args=("doc",))
        closer.start()
        closer.join(timeout=0.2)  # the event loop runs now (it blocks on the pool's lock when there is one)
        return real_common_prefix(*args)

    monkeypatch.setattr(cache, "common_prefix", closed_meanwhile)
    generation = engine.generate(Prompt("doc", prompt.token_ids, prompt.positions), max_new_tokens=2)
    assert generation.token_ids


def test_missing_model_directory_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/model/dir")
    with pytest.raises(ModelLoadError, match="downloads are off"):
        load_model("some-org/some-model-that-is-not-cached")



def test_token_healing_backs_off_a_bare_newline(loaded):
    engine = engine_for(loaded)
    text = "def f(x):\n"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    positions = torch.stack([torch.zeros(len(ids), dtype=torch.long), torch.arange(len(ids))], -1)
    healed_ids, healed_pos, removed, allowed = engine.heal(ids, positions)
    assert removed == "\n" and healed_ids == ids[:-1] and len(healed_pos) == len(ids) - 1
    assert all(engine.token_texts()[i].startswith("\n") for i in allowed.tolist())
    gen = engine.generate(Prompt("h", ids, positions), max_new_tokens=4)
    assert not gen.text.startswith("\n"), "the healed newline is not repeated in the completion"


def test_token_healing_after_indentation_lets_the_model_split_the_line_its_own_way(loaded):
    engine = Engine(EngineSettings(measure_speed=False), loaded=loaded)
    text = "class A:\n    def __init__(self, a, b):\n        self.a = a\n        "
    prompt = prompt_for(engine, text, 3, 8)
    _, _, removed, allowed = engine.heal(prompt.token_ids, prompt.positions)
    assert removed == "\n        "
    texts = [engine.token_texts()[i] for i in allowed.tolist()]
    assert "\n       " in texts and "\n" in texts, "shorter splits of the backed-off text are allowed"
    assert all(t.startswith(removed) or removed.startswith(t) for t in texts)
    # the model's own split is newline + 7 spaces, then " self": the suggestion is not indented twice
    generation = engine.generate(prompt, max_new_tokens=6)
    assert generation.text.startswith("self"), repr(generation.text)
    written = engine.tokenizer.decode(generation.token_ids)
    assert written.startswith(removed) and written[len(removed):] == generation.text


def test_token_healing_never_indents_the_first_line_deeper_than_the_cursor(loaded):
    engine = Engine(EngineSettings(measure_speed=False), loaded=loaded)
    texts = engine.token_texts()
    healed = "\n  "  # a cursor after two spaces of indentation
    after_prefix = [texts[i] for i in engine.healing_allowed(healed, "\n ").tolist()]
    assert " const" in after_prefix and " " in after_prefix
    assert not any(t.startswith("  ") for t in after_prefix), "one space is left to write, not two"
    at_cursor = engine.healing_allowed(healed, healed).tolist()
    assert not any(texts[i][:1] in (" ", "\t", "\n") for i in at_cursor), "content, not a blank line"
    assert not engine.eos_ids & set(at_cursor) and any(texts[i] == "const" for i in at_cursor)
    assert engine.healing_allowed(healed, healed + "x") is None, "one token after the cursor: free again"
    assert engine.healing_allowed("wid", "wid") is None, "half a word: free once written"
    for text in ("function f(a) {\n  const x = a + 1;\n  ", "function f(req) {\n  var next = req.next;\n\n  "):
        doc = Document("file:///w/m.js", text, language_id="javascript")
        line, character = doc.position_at(len(text))
        built = PromptBuilder(engine.tokenizer, engine.fim, ContextSettings(budget_tokens=600)).build(doc, line, character)
        prompt = Prompt("file:///w/m.js", built.token_ids, built.positions)
        # after a blank line the prompt ends on "\n\n" + "  ": both are backed off, as one text
        assert engine.heal(prompt.token_ids, prompt.positions)[2] == text[text.rindex(";") + 1 :]
        generation = engine.generate(prompt, max_new_tokens=6)
        assert generation.text and not generation.text[:1].isspace(), repr(generation.text)


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_token_healing_of_a_fill_in_the_middle_prompt_backs_off_the_prefix_end(loaded, order):
    model, tokenizer, fim = loaded
    engine = Engine(EngineSettings(rope=RopeMethodConfig(window=16)), loaded=(model, tokenizer,
                                                                           dataclasses.replace(fim, order=order)))
    text = "def area(self):\n    return self.wid"
    line, character = 1, len("    return self.wid")
    prompt = prompt_for(engine, text + "th * self.height\n\nprint(area)\n", line, character)
    ids = prompt.token_ids
    healed_ids, healed_pos, removed, allowed = engine.heal(ids, prompt.positions)
    assert removed and "self.wid".endswith(removed), removed
    gone = next(i for i, (a, b) in enumerate(zip(ids, healed_ids + [None])) if a != b)
    suffix_marker = tokenizer.convert_tokens_to_ids(fim.suffix)
    if order == "psm":  # the prefix ends before the suffix's marker, not before the middle token
        assert ids[gone + 1] == suffix_marker
    else:
        assert gone == len(ids) - 2
    assert healed_ids == ids[:gone] + ids[gone + 1 :] and healed_pos[:, -1].tolist() == list(range(len(ids) - 1))


def test_a_bad_position_setting_at_run_time_leaves_the_model_patched(loaded):
    engine = engine_for(loaded)
    prompt = Prompt("doc", list(range(5, 60)), torch.stack([torch.zeros(55, dtype=torch.long),
                                                            torch.arange(55)], dim=-1))
    before = engine.generate(prompt, 4).token_ids
    with pytest.raises(ValueError, match="one per layer"):
        engine.reconfigure_rope(RopeMethodConfig(window=16, far_bias=[1.0, 2.0]))  # the model has 6 layers
    assert engine.generate(prompt, 4).token_ids == before
    engine.handle.detach()


def test_one_level_positions_complete_and_deeper_levels_are_refused(loaded):
    from hirope_lsp.config import Settings, apply_options

    one = engine_for(loaded, levels=1, far_bias=0.0)  # the card's far bias would make far keys differ
    prompt = prompt_for(one, SOURCE, 18, 20)
    text = one.generate(prompt, max_new_tokens=6).text
    # the token index alone is plain RoPE, as is HiRoPE with a window longer than the prompt
    plain = Engine(EngineSettings(rope=RopeMethodConfig(window=100_000)), loaded=loaded)
    assert text == plain.generate(prompt, max_new_tokens=6).text
    settings, problems = apply_options(Settings(), {"hirope": {"levels": 3}})
    assert settings.engine.rope.levels == 2 and len(problems) == 1 and "levels" in problems[0]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    from hirope_lsp.model.lookup import PromptLookup

    lookup = PromptLookup([5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6], draft=3)
    assert lookup.propose() == [9, 2, 5], "the latest earlier 5 6 was followed by 9 2 5"
    lookup.extend([9])
    assert lookup.propose() == [2, 5, 6]
    assert PromptLookup([1, 2, 3], draft=4).propose() == []


def test_decoding_with_lookup_drafts_gives_the_greedy_tokens_in_fewer_forwards(loaded):
    text = SOURCE * 3  # repeats itself: drafts from the prompt are often right
    results = {}
    for lookup_tokens in (0, 4):
        engine = Engine(EngineSettings(rope=RopeMethodConfig(window=16), lookup_tokens=lookup_tokens,
                                       measure_speed=False), loaded=loaded)
        calls = []
        forward = engine.handle.forward
        engine.handle.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        line = SOURCE.count("\n") * 2 + 3
        generations = [engine.generate(prompt_for(engine, text, line + k, 4), max_new_tokens=20, suppress_eos=True)
                       for k in range(0, 12, 3)]
        results[lookup_tokens] = ([g.token_ids for g in generations], [g.token_logprobs for g in generations],
                                  len(calls))
    assert results[4][0] == results[0][0], "the same tokens as one at a time"
    for with_lookup, plain in zip(results[4][1], results[0][1]):
        assert torch.allclose(torch.tensor(with_lookup), torch.tensor(plain), atol=1e-4)
    assert results[4][2] < results[0][2], "drafts accepted: fewer forwards"


def test_lookup_drafts_are_off_where_the_rotary_follows_the_input_length():
    loaded = load_model(None, device="cpu", dtype="float32")  # unpatched: the module's engines left theirs on
    model = loaded[0]
    text = SOURCE * 12
    results = []
    for lookup_tokens in (0, 4):
        engine = Engine(EngineSettings(rope=RopeMethodConfig(method="dynamic-ntk"), lookup_tokens=lookup_tokens,
                                       measure_speed=False), loaded=loaded)
        prompt = prompt_for(engine, text, text.count("\n") - 2, 4, budget=1500)
        assert len(prompt.token_ids) > model.config.max_position_embeddings
        generation = engine.generate(prompt, max_new_tokens=12, suppress_eos=True)
        results.append((generation.token_ids, torch.tensor(generation.token_logprobs)))
        engine.handle.detach()
    assert results[0][0] == results[1][0] and torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_a_branch_keeps_the_forced_tokens_and_takes_another_at_the_banned_step(loaded):
    engine = Engine(EngineSettings(rope=RopeMethodConfig(window=16), measure_speed=False), loaded=loaded)
    prompt = prompt_for(engine, SOURCE * 2, SOURCE.count("\n") + 3, 4)
    greedy = engine.generate(prompt, max_new_tokens=12, suppress_eos=True)
    k = 3
    again = engine.generate(prompt, max_new_tokens=12, suppress_eos=True, forced=greedy.token_ids[:k])
    assert again.token_ids == greedy.token_ids, "forcing the greedy tokens changes nothing"
    assert torch.allclose(torch.tensor(again.token_logprobs), torch.tensor(greedy.token_logprobs), atol=1e-4)
    branch = engine.generate(prompt, max_new_tokens=12, suppress_eos=True, forced=greedy.token_ids[:k],
                             banned=(greedy.token_ids[k],))
    assert branch.token_ids[:k] == greedy.token_ids[:k] and branch.token_ids[k] != greedy.token_ids[k]
    assert len(branch.token_ids) == 12
