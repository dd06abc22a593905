"""The model families users run, each as a random-weight tiny model with its real shape: head size,
grouped-query ratio, rope parameters and sliding window kept (the window shrunk with the lengths),
depth and width cut.  Attach/detach, exactness against the unpatched model, decoding through the
cache past the sliding window, and clear errors for the shapes HiRoPE does not support."""

import copy
import math

import pytest
import torch
import transformers
from test_hirope_core import ATOL, new_cache, random_units
from transformers import AutoModelForCausalLM, DynamicCache

from hirope_lsp.model import attention
from hirope_lsp.model.cache import KVCachePool
from hirope_lsp.model.patch import attach, make_plan
from hirope_lsp.model.rope import RopeMethodConfig

torch.set_num_threads(1)

SLIDING = 24  # every sliding window below; prompts are longer
T = 60


def rope(kind="default", theta=10000.0, **params):
    return {"rope_type": kind, "rope_theta": theta, **params}


def longrope(pairs=48, **params):
    """Phi-3's short and long factors, switched at the original length (32 here)."""
    return rope("longrope", original_max_position_embeddings=32, short_factor=[1 + j / pairs for j in range(pairs)],
                long_factor=[1 + 8 * j / pairs for j in range(pairs)], **params)


def shape(heads, kv_heads, head_dim, rope_parameters, max_length=64, explicit_head_dim=True, **extra):
    """Heads, key heads and head size of the real model; the hidden size follows them where the
    family derives the head size from it."""
    size = dict(head_dim=head_dim) if explicit_head_dim else dict(hidden_size=heads * head_dim)
    return dict(num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_length,
                rope_parameters=rope_parameters, **size, **extra)


# name: (config class, shape) with the real model's head size, query heads per key head and rope
FAMILIES = {
    # DeepSeek-Coder 6.7B: full multi-head attention, linear scaling x4
    "deepseek-coder": ("LlamaConfig", shape(2, 2, 128, rope("linear", 100000.0, factor=4.0), max_length=128)),
    "codellama": ("LlamaConfig", shape(2, 2, 128, rope(theta=1e6))),  # CodeLlama 7B
    # Llama 3.1 8B: 4 query heads per key head, llama3 scaling x8
    "llama3": ("LlamaConfig", shape(4, 1, 128, rope("llama3", 500000.0, factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=32),
                                     max_length=256)),
    # dynamic NTK scaling (older Llama fine-tunes): the frequencies follow the input length
    "llama-dynamic": ("LlamaConfig", shape(4, 1, 128, rope("dynamic", factor=2.0), max_length=32)),
    # Qwen2.5-Coder 7B: 7 query heads per key head, YaRN x4
    "qwen2.5-coder": ("Qwen2Config", shape(7, 1, 128, rope("yarn", 1e6, factor=4.0, original_max_position_embeddings=32),
                                           max_length=128)),
    # Qwen2 with use_sliding_window: the layers from max_window_layers on slide
    "qwen2-sliding": ("Qwen2Config", shape(7, 1, 128, rope(theta=1e6), use_sliding_window=True, sliding_window=SLIDING,
                                           max_window_layers=1)),
    "qwen3": ("Qwen3Config", shape(4, 1, 128, rope(theta=1e6))),  # Qwen3 8B (query and key norms)
    "mistral": ("MistralConfig", shape(4, 1, 128, rope(), sliding_window=SLIDING)),  # Mistral 7B v0.1
    # StarCoder2 7B: 9 query heads per key head, sliding window (4,096 there)
    "starcoder2": ("Starcoder2Config", shape(9, 1, 128, rope(theta=1e6), explicit_head_dim=False,
                                             sliding_window=SLIDING)),
    # Granite 3 8B: its attention, embedding, residual and logit multipliers
    "granite": ("GraniteConfig", shape(4, 1, 128, rope(theta=1e7), explicit_head_dim=False, attention_multiplier=1 / 128,
                                       embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=16.0)),
    "codegemma": ("GemmaConfig", shape(8, 1, 256, rope())),  # CodeGemma 2B: one key head, head size 256
    # Phi-3 mini 4k: head size 96, sliding window 2,047
    "phi3": ("Phi3Config", shape(2, 2, 96, rope(), explicit_head_dim=False, sliding_window=SLIDING - 1)),
    "phi3-longrope": ("Phi3Config", shape(2, 2, 96, longrope(), max_length=128, explicit_head_dim=False,
                                          original_max_position_embeddings=32)),  # Phi-3 mini 128k
    # Phi-4 mini: rotary embedding on 3/4 of each head, longrope
    "phi4-mini": ("Phi3Config", shape(3, 1, 128, longrope(partial_rotary_factor=0.75), max_length=128,
                                      explicit_head_dim=False, original_max_position_embeddings=32,
                                      partial_rotary_factor=0.75)),
}
FAMILIES = {name: spec for name, spec in FAMILIES.items() if hasattr(transformers, spec[0])}
# frequencies set from the input length: a cache holds keys rotated by older ones, unpatched too
DYNAMIC = {"llama-dynamic", "phi3-longrope", "phi4-mini"}
WITH_SLIDING = [name for name, (_, shape) in FAMILIES.items() if shape.get("sliding_window")]


def family_model(name, seed=0, config_class=None, **overrides):
    class_name, shape = FAMILIES[name] if name in FAMILIES else (config_class, {})
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, initializer_range=0.1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(copy.deepcopy(shape), **overrides)
    config = getattr(transformers, class_name)(**kwargs)
    implementation = "eager" if class_name == "Gemma2Config" else "sdpa"  # Gemma 2 has no sdpa (soft-capping)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def close(got, expected):
    """Equal up to float32 rounding at the logits' scale (StarCoder2's reach 13 here)."""
    return torch.allclose(got, expected, atol=ATOL * max(1.0, float(expected.detach().abs().max())))


def ids_and_positions(length=T, seed=0):
    return torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(seed)), random_units(length)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attach_and_detach_restore_unpatched_logits(family):
    model = family_model(family)
    ids, positions = ids_and_positions()
    reference = model(ids).logits
    handle = attach(model, RopeMethodConfig(window=8))
    assert (handle.forward(ids, positions).logits - reference).abs().max() > 1e-3 * reference.abs().max()
    handle.detach()
    assert torch.equal(model(ids).logits, reference)
    attach(model, RopeMethodConfig(method="yarn" if family not in DYNAMIC else "rope", factor=2.0)).detach()
    assert torch.equal(model(ids).logits, reference)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_window_past_the_input_gives_unpatched_logits(family):
    """Sliding windows included: the prompt is longer than each of them."""
    model = family_model(family)
    ids, positions = ids_and_positions()
    reference = model(ids).logits
    handle = attach(model, RopeMethodConfig(window=T + 1, query_chunk=16))
    patched = handle.forward(ids, positions).logits
    handle.detach()
    assert close(patched, reference)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in DYNAMIC])
@pytest.mark.parametrize("window", [6, 40])  # inside the sliding window (far keys within it), past it (none)
@pytest.mark.parametrize("prefill", [16, 40])  # the cache rolls during decoding, or before it
@pytest.mark.parametrize("cache_kind", ["dynamic", "growing"])
def test_cached_decoding_equals_full_forward(family, window, prefill, cache_kind):
    model = family_model(family)
    ids, positions = ids_and_positions()
    handle = attach(model, RopeMethodConfig(window=window, query_chunk=8))
    full = handle.forward(ids, positions).logits
    cache, mode = new_cache(cache_kind, model.config)
    with mode:
        steps = [handle.forward(ids[:, :prefill], positions[:, :prefill], cache=cache).logits]
        steps += [handle.forward(ids[:, t : t + 1], positions[:, : t + 1], cache=cache).logits for t in range(prefill, T)]
    assert close(torch.cat(steps, 1), full)


@pytest.mark.parametrize("family", sorted(DYNAMIC & set(FAMILIES)))
@pytest.mark.parametrize("cache_kind", ["dynamic", "growing"])
def test_dynamic_rope_cached_decoding_equals_the_unpatched_model(family, cache_kind):
    """Past the trained length the frequencies change from step to step, so no cache gives the full
    forward; the patched model decodes as the unpatched one does with the same cache."""
    ids, positions = ids_and_positions()
    runs = []
    for patched in (False, True):
        model = family_model(family)
        handle = attach(model, RopeMethodConfig(window=T + 1)) if patched else None
        run = handle.forward if patched else (lambda i, p, cache: model(i, cache=cache))
        cache, mode = new_cache(cache_kind, model.config)
        with mode:
            steps = [run(ids[:, :20], positions[:, :20], cache=cache).logits]
            steps += [run(ids[:, t : t + 1], positions[:, : t + 1], cache=cache).logits for t in range(20, T)]
        runs.append(torch.cat(steps, 1))
    assert close(runs[1], runs[0])


@pytest.mark.parametrize("family", sorted(DYNAMIC & set(FAMILIES)))
def test_dynamic_rope_far_keys_turn_by_this_calls_frequencies(family):
    """The first call past the trained length turns far keys as a call on a rotary already at that length."""
    ids, positions = ids_and_positions()
    cold = family_model(family)
    first = attach(cold, RopeMethodConfig(window=8)).forward(ids, positions).logits
    warm = family_model(family)
    warm(ids)  # the rotary updates to this length
    again = attach(warm, RopeMethodConfig(window=8)).forward(ids, positions).logits
    assert close(first, again)


@pytest.mark.parametrize("family", sorted(DYNAMIC & set(FAMILIES)))
def test_dynamic_rope_detach_leaves_the_model_as_unpatched(family):
    ids, positions = ids_and_positions()
    fresh = family_model(family)
    expected_long, expected_short = fresh(ids).logits, fresh(ids[:, :20]).logits
    model = family_model(family)
    handle = attach(model, RopeMethodConfig(window=8))
    handle.forward(ids, positions)
    handle.detach()
    assert close(model(ids).logits, expected_long)
    assert close(model(ids[:, :20]).logits, expected_short)


@pytest.mark.parametrize("family", WITH_SLIDING)
def test_kv_pool_reuses_a_prefix_past_the_sliding_window(family):
    """The server cuts a document's cache back to the prompt's common prefix: past the window too."""
    model = family_model(family)
    handle = attach(model, RopeMethodConfig(window=6, query_chunk=8))
    pool = KVCachePool(model.config)
    ids, positions = ids_and_positions()
    edited = torch.cat([ids[:, :45], ids_and_positions(seed=5)[0][:, 45:]], 1)
    with torch.inference_mode():
        for prompt in (ids, edited):
            slot, keep = pool.acquire("doc", prompt[0].tolist(), positions[0])
            logits = handle.forward(prompt[:, keep:], positions, cache=slot.cache).logits
            pool.release(slot, prompt[0].tolist(), positions[0])
    assert keep == 45
    assert close(logits, handle.forward(edited, positions).logits[:, keep:])


def dense_reference(q, k, v, plan, scale, sliding, bias=0.0):
    """Both score matrices in full, keys at distance >= sliding masked, far scores less the log-mode bias."""
    fq = attention.turn(q, plan.query_cos, plan.query_sin)
    fk = attention.turn(k, plan.key_cos, plan.key_sin)
    dist = (plan.query_pos[:, :, None] - plan.key_pos[:, None, :])[:, None]
    near = (dist >= 0) & (dist < min(plan.window, sliding))
    far = (dist >= plan.window) & (dist < sliding)
    b = bias * torch.log(torch.clamp(far.sum(-1, keepdim=True).double() / plan.window, min=1.0))
    scores = torch.where(far, (fq @ fk.transpose(-1, -2)).double() * scale - b, (q @ k.transpose(-1, -2)).double() * scale)
    scores = scores.masked_fill(~(near | far), -math.inf)
    return (torch.softmax(scores, -1) @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("window,sliding", [(5, 17), (5, 6), (9, 7)])
@pytest.mark.parametrize("batch", [1, 2])  # two rows: the masks are built over all keys
@pytest.mark.parametrize("fused", [True, False])
def test_sliding_window_attention_matches_dense_reference(window, sliding, batch, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(attention, "_fused_disabled", {"cpu"})
    torch.manual_seed(2)
    L, D = 40, 16
    q, k, v = (torch.randn(batch, 2, L, D) for _ in range(3))
    positions = torch.cat([random_units(L, seed=s) for s in range(batch)])
    inv_freq = (10000.0 ** (-torch.arange(D // 2, dtype=torch.float64) * 2 / D)).float()
    for bias in (0.0, 1.5):
        cfg = RopeMethodConfig(window=window, split=0.5, query_chunk=7, far_bias=bias, far_bias_mode="log")
        plan = make_plan(cfg, positions, L, inv_freq, 0.5, window, torch.float32)
        got = attention.windowed_attention(q, k, v, plan, D**-0.5, sliding_window=sliding)
        assert torch.allclose(got.double(), dense_reference(q, k, v, plan, D**-0.5, sliding, bias), atol=1e-5)
        for m in (sliding - 1, L - 1):  # decoding rows: one softmax over far and near keys
            step = make_plan(cfg, positions[:, : m + 1], 1, inv_freq, 0.5, window, torch.float32)
            row = attention.windowed_attention(q[:, :, m : m + 1], k[:, :, : m + 1], v[:, :, : m + 1], step, D**-0.5,
                                               sliding_window=sliding)
            assert torch.allclose(row.double(), dense_reference(q[:, :, m : m + 1], k[:, :, : m + 1], v[:, :, : m + 1],
                                                                step, D**-0.5, sliding, bias), atol=1e-5)


def several_rotary_modules():
    model = family_model("codellama")
    model.model.layers[0].self_attn.rotary_emb = copy.deepcopy(model.model.rotary_emb)
    return model


REFUSED = {
    "gemma2 soft-capping": (lambda: family_model("gemma2", config_class="Gemma2Config", head_dim=256, num_attention_heads=8,
                                                 num_key_value_heads=4, sliding_window=SLIDING), "soft-capping"),
    "gemma3 local and global rope": (lambda: family_model("gemma3", config_class="Gemma3TextConfig", head_dim=256,
                                                          num_attention_heads=8, num_key_value_heads=4), "of their own"),
    "cohere interleaved pairs": (lambda: family_model("cohere", config_class="CohereConfig", num_attention_heads=4,
                                                      num_key_value_heads=1), "rotate_half"),
    "several rotary modules": (several_rotary_modules, "several rotary"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_shapes_are_refused_clearly(case):
    build, message = REFUSED[case]
    model = build()
    with pytest.raises(ValueError, match=message):
        attach(model, RopeMethodConfig(window=8))


def test_dynamic_rope_refuses_methods_that_set_the_frequencies():
    model = family_model("llama-dynamic")
    for method in ("ntk", "dynamic-ntk", "yarn"):
        with pytest.raises(ValueError, match="sets its frequencies from the input length"):
            attach(model, RopeMethodConfig(method=method, factor=2.0))
