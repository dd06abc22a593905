import contextlib
import math

import pytest
import torch
from tiny_models import FAMILIES, tiny_model
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from hirope_lsp.model import attention
from hirope_lsp.model.buffers import GrowingTensor, growing_cache
from hirope_lsp.model.methods import REGISTRY
from hirope_lsp.model.patch import attach, make_plan, truncate_cache
from hirope_lsp.model.rope import (
    RopeMethodConfig,
    fixed_unit_positions,
    plain_positions,
    restart_token_index,
    theory_split,
)

ATOL = 2e-5
WINDOW_METHODS = [m.name for m in REGISTRY.values() if m.windowed]
SCALING_METHODS = [m.name for m in REGISTRY.values() if m.rescales]


def random_units(length: int, seed: int = 1, mean_unit: int = 7) -> torch.Tensor:
    """(unit, token) positions with units of random length, ``[1, T, 2]``."""
    g = torch.Generator().manual_seed(seed)
    starts = (torch.rand(length, generator=g) < 1.0 / mean_unit).long()
    starts[0] = 0
    unit = starts.cumsum(0)
    return torch.stack([unit, torch.arange(length)], -1).unsqueeze(0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_window_longer_than_input_gives_unpatched_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, 60))
    reference = model(ids).logits
    handle = attach(model, RopeMethodConfig(window=61))
    patched = handle.forward(ids, random_units(60)).logits
    handle.detach()
    assert torch.allclose(patched, reference, atol=ATOL)
    assert torch.equal(model(ids).logits, reference), "detach must restore the model"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hierarchy_changes_far_scores_only(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, 60))
    reference = model(ids).logits
    handle = attach(model, RopeMethodConfig(window=8, split=0.5))
    patched = handle.forward(ids, random_units(60)).logits
    handle.detach()
    # the first W tokens only see near keys: unchanged; later ones differ
    assert torch.allclose(patched[:, :8], reference[:, :8], atol=ATOL)
    assert (patched[:, 8:] - reference[:, 8:]).abs().max() > 1e-4


def test_token_level_everywhere_is_plain_rope():
    """One level (the global token index), or a split giving every pair to it: plain RoPE."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 50))
    reference = model(ids).logits
    for cfg, positions in (
        (RopeMethodConfig(levels=1, window=4), plain_positions(50)[..., 1:]),
        (RopeMethodConfig(split=1.0, window=4), random_units(50)),
        (RopeMethodConfig(split=1.0, window=4), plain_positions(50)),
    ):
        handle = attach(model, cfg)
        assert torch.allclose(handle.forward(ids, positions).logits, reference, atol=ATOL)
        handle.detach()


def test_one_unit_far_scores_see_window_distance():
    """With one unit, far unit-level pairs all see distance W-1 (the paper's rule), so logits change
    beyond the window: HiRoPE is not plain RoPE there, and the test pins that down."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 50))
    handle = attach(model, RopeMethodConfig(window=4, split=0.25))
    one_unit = handle.forward(ids, plain_positions(50)).logits
    handle.detach()
    assert (one_unit - model(ids).logits).abs().max() > 1e-4


def new_cache(kind, config):
    """transformers' concatenating cache (run with gradients on), or the in-place one the server
    uses (run in inference mode, where it writes into spare capacity)."""
    if kind == "growing":
        return growing_cache(config), torch.inference_mode()
    return DynamicCache(config=config), contextlib.nullcontext()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", WINDOW_METHODS)
@pytest.mark.parametrize("cache_kind", ["dynamic", "growing"])
def test_incremental_decoding_equals_full_forward(family, method, cache_kind):
    model = tiny_model(family)
    T = 56
    ids = torch.randint(0, 97, (1, T))
    positions = random_units(T)
    handle = attach(model, RopeMethodConfig(method=method, window=6, unit_size=5, group_size=3, query_chunk=8))
    full = handle.forward(ids, positions).logits
    cache, mode = new_cache(cache_kind, model.config)
    with mode:
        steps = [handle.forward(ids[:, :40], positions[:, :40], past_key_values=cache).logits]
        for t in range(40, T):
            steps.append(handle.forward(ids[:, t : t + 1], positions[:, : t + 1], past_key_values=cache).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL)


@pytest.mark.parametrize("method", ["hirope", "hirope-fixed"])
def test_incremental_decoding_with_restarting_token_index(method):
    """Decoding turns only new keys; a restarting index still counts from a unit start before them."""
    model = tiny_model("llama")
    handle = attach(model, RopeMethodConfig(method=method, window=6, unit_size=5, token_index="restart", query_chunk=8))
    ids = torch.randint(0, 97, (1, 50))
    positions = random_units(50, mean_unit=12)
    full = handle.forward(ids, positions).logits
    cache, mode = new_cache("growing", model.config)
    with mode:
        steps = [handle.forward(ids[:, :30], positions[:, :30], past_key_values=cache).logits]
        steps += [handle.forward(ids[:, t : t + 1], positions[:, : t + 1], past_key_values=cache).logits
                  for t in range(30, 50)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL)


@pytest.mark.parametrize("cache_kind", ["dynamic", "growing"])
def test_cache_cut_back_and_extended_equals_fresh_forward(cache_kind):
    model = tiny_model("qwen3")
    handle = attach(model, RopeMethodConfig(window=5))
    ids = torch.randint(0, 97, (1, 48))
    positions = random_units(48)
    cache, mode = new_cache(cache_kind, model.config)
    with mode:
        handle.forward(ids, positions, past_key_values=cache)
    # an edit at token 30: keep the first 30, re-run a different tail with a different hierarchy
    truncate_cache(cache, 30)
    assert cache.get_seq_length() == 30
    new_tail = torch.randint(0, 97, (1, 25))
    new_ids = torch.cat([ids[:, :30], new_tail], 1)
    new_positions = torch.cat([positions[:, :30], random_units(55, seed=9)[:, 30:]], 1)
    new_positions[0, 30:, 0] += positions[0, 29, 0]
    with mode:
        extended = handle.forward(new_tail, new_positions, past_key_values=cache).logits
    fresh = handle.forward(new_ids, new_positions).logits[:, 30:]
    assert torch.allclose(extended, fresh, atol=ATOL)
    with pytest.raises(ValueError, match="cannot cut"):
        truncate_cache(cache, 100)


# ---- slow reference: the score of every (query, key) pair built from the formula, pair by pair ----


def far_distance(method, m, n, pos, j, num_pairs, split, W, unit_size=5, group=3, restart=False):
    """Rotary distance of pair j between query m and key n beyond the window, straight from the definitions."""
    if method == "rerope":
        return W
    if method == "self-extend":
        return (m // group - n // group) + W - W // group
    if method == "hirope-fixed":
        unit_m, unit_n = m // unit_size, n // unit_size
    else:
        unit_m, unit_n = pos[m][0], pos[n][0]
    if j < round(split * num_pairs):
        return pos[m][2] - pos[n][2] if restart else m - n
    return (unit_m - unit_n) + W - 1


def reference_far_bias(far_bias, mode, n_far, W, dist):
    """The prior subtracted from a far score at token distance ``dist``, from its definition: a
    constant, growing as log(n_far / W), or as the key's own log(1 + dist / W)."""
    if mode == "constant":
        return far_bias
    if mode == "distance":
        return far_bias * math.log(1 + dist / W)
    return far_bias * math.log(max(1.0, n_far / W))


def reference_attention(q, k, v, pos, method, split, W, scale, restart=False, far_bias=0.0, far_bias_mode="constant"):
    """q: [H, T, D] raw (unrotated); pos: list of (unit, token, token_in_unit); ``far_bias`` is taken from
    the score of every key at distance >= W."""
    H, T, D = q.shape
    P = D // 2
    theta = 10000.0 ** (-torch.arange(P, dtype=torch.float64) * 2 / D)
    out = torch.zeros(H, T, D, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for m in range(T):
        scores = torch.full((H, T), -math.inf, dtype=torch.float64)
        n_far = sum(1 for n in range(m + 1) if m - n >= W)
        for n in range(m + 1):
            s = torch.zeros(H, dtype=torch.float64)
            for j in range(P):
                if m - n < W:
                    dist = m - n
                else:
                    dist = far_distance(method, m, n, pos, j, P, split, W, restart=restart)
                c, sn = math.cos(dist * theta[j]), math.sin(dist * theta[j])
                q1, q2, k1, k2 = q[:, m, j], q[:, m, j + P], k[:, n, j], k[:, n, j + P]
                s += (q1 * k1 + q2 * k2) * c + (q1 * k2 - q2 * k1) * sn
            scores[:, n] = s * scale
            if m - n >= W:
                scores[:, n] -= reference_far_bias(far_bias, far_bias_mode, n_far, W, m - n)
        out[:, m] = torch.einsum("ht,htd->hd", torch.softmax(scores, -1), v)
    return out


def rotate(x, positions, D):
    P = D // 2
    theta = 10000.0 ** (-torch.arange(P, dtype=torch.float64) * 2 / D)
    ang = positions.double()[:, None] * theta
    emb = torch.cat([ang, ang], -1)
    return (x * emb.cos() + attention.rotate_half(x) * emb.sin()).float()


@pytest.mark.parametrize(
    "method,restart", [("hirope", False), ("hirope", True), ("hirope-fixed", False), ("rerope", False), ("self-extend", False)]
)
@pytest.mark.parametrize("fused", [True, False])
def test_fast_path_matches_pair_by_pair_reference(method, restart, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(attention, "_fused_disabled", {"cpu"})
    torch.manual_seed(3)
    H, T, D, W, split = 2, 30, 16, 6, 0.5
    q, k, v = torch.randn(H, T, D), torch.randn(H, T, D), torch.randn(H, T, D)
    positions = random_units(T, seed=4, mean_unit=5)
    tin = restart_token_index(positions)[0]
    pos = [(int(positions[0, i, 0]), int(positions[0, i, 1]), int(tin[i])) for i in range(T)]
    expected = reference_attention(q, k, v, pos, method, split, W, D**-0.5, restart=restart)

    cfg = RopeMethodConfig(method=method, window=W, split=split, unit_size=5, group_size=3,
                           token_index="restart" if restart else "global", query_chunk=7)
    inv_freq = (10000.0 ** (-torch.arange(D // 2, dtype=torch.float64) * 2 / D)).float()
    plan = make_plan(cfg, positions, T, inv_freq, split, W, torch.float32)
    tok = torch.arange(T)
    qr, kr = rotate(q, tok, D)[None], rotate(k, tok, D)[None]
    got = attention.windowed_attention(qr, kr, v[None], plan, D**-0.5)  # [1, T, H, D]
    assert torch.allclose(got[0].transpose(0, 1).double(), expected, atol=1e-5)


def test_grouped_query_heads_match_repeated_keys():
    torch.manual_seed(5)
    B, Hq, Hkv, T, D = 1, 4, 2, 40, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    cfg = RopeMethodConfig(window=5, split=0.5, query_chunk=9)
    inv_freq = (10000.0 ** (-torch.arange(D // 2) * 2 / D)).float()
    plan = make_plan(cfg, random_units(T), T, inv_freq, 0.5, 5, torch.float32)
    grouped = attention.windowed_attention(q, k, v, plan, 0.25)
    repeated = attention.windowed_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), plan, 0.25)
    assert torch.allclose(grouped, repeated, atol=1e-6)


def test_restart_token_index():
    positions = torch.tensor([[[0, 0], [0, 1], [1, 2], [1, 3], [1, 4], [2, 5]]])
    assert restart_token_index(positions).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_theory_split_matches_the_paper():
    assert theory_split(10000, 4096) == pytest.approx(0.70, abs=0.01)
    assert theory_split(10000, 2048) == pytest.approx(0.63, abs=0.01)


# ---- the other methods behind the same switch ----


@pytest.mark.parametrize("method", SCALING_METHODS)
def test_scaling_methods_change_long_inputs_and_detach_restores(method):
    model = tiny_model("llama", train_length=32)
    ids = torch.randint(0, 97, (1, 64))
    reference = model(ids).logits
    handle = attach(model, RopeMethodConfig(method=method, factor=2.0))
    scaled = handle.forward(ids, plain_positions(64)).logits
    assert (scaled - reference).abs().max() > 1e-4
    handle.detach()
    assert torch.equal(model(ids).logits, reference)


def test_rope_method_is_the_unpatched_model():
    model = tiny_model("mistral")
    ids = torch.randint(0, 97, (1, 40))
    handle = attach(model, RopeMethodConfig(method="rope"))
    assert torch.equal(handle.forward(ids, plain_positions(40)).logits, model(ids).logits)


# ---- bad configuration and input ----


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(split=1.5), "split must lie in"),
        (dict(split=-0.1), "split must lie in"),
        (dict(window=0), "window must be a positive"),
        (dict(window=-3), "window must be a positive"),
        (dict(method="alibi"), "unknown position method"),
        (dict(token_index="local"), "token_index"),
        (dict(levels=0), "at least 1 level"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attach(tiny_model("llama"), RopeMethodConfig(**kwargs))


def test_positions_not_matching_input_are_refused():
    model = tiny_model("llama")
    handle = attach(model, RopeMethodConfig(window=4))
    ids = torch.randint(0, 97, (1, 10))
    with pytest.raises(ValueError, match="positions cover 9 tokens"):
        handle.forward(ids, fixed_unit_positions(9))
    with pytest.raises(ValueError, match="levels"):
        handle.forward(ids, torch.zeros(1, 10, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, tokens, levels"):
        handle.forward(ids, torch.arange(10)[None])
    with pytest.raises(ValueError, match="integers"):
        handle.forward(ids, fixed_unit_positions(10).float())


def test_unpositioned_call_of_patched_model_is_an_error():
    model = tiny_model("llama")
    attach(model, RopeMethodConfig(window=4))
    with pytest.raises(RuntimeError, match="hierarchical position"):
        model(torch.randint(0, 97, (1, 10)))


def test_model_without_rope_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    with pytest.raises(ValueError, match="no rotary position embedding"):
        attach(model, RopeMethodConfig())


def dense_windowed(q, k, v, plan, scale):
    """Both score matrices in full, chosen per pair by distance before one softmax (O(n^2) reference)."""
    fq = attention.turn(q, plan.query_cos, plan.query_sin)
    fk = attention.turn(k, plan.key_cos, plan.key_sin)
    dist = (plan.query_pos[:, :, None] - plan.key_pos[:, None, :])[:, None]
    scores = torch.where(dist < plan.window, q @ k.transpose(-1, -2), fq @ fk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(dist < 0, -math.inf)
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


def test_positions_out_of_order_take_the_general_path():
    """Token positions need not increase along the sequence (e.g. context blocks placed out of order)."""
    torch.manual_seed(6)
    T, D = 36, 16
    q, k, v = torch.randn(1, 2, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    token = torch.cat([torch.arange(20, 36), torch.arange(0, 20)])
    positions = torch.stack([token // 6, token], -1)[None]
    inv_freq = (10000.0 ** (-torch.arange(D // 2) * 2 / D)).float()
    plan = make_plan(RopeMethodConfig(window=5, split=0.5, query_chunk=8), positions, T, inv_freq, 0.5, 5, torch.float32)
    assert not plan.keys_sorted
    got = attention.windowed_attention(q, k, v, plan, 0.25)
    assert torch.allclose(got, dense_windowed(q, k, v, plan, 0.25), atol=1e-5)


@pytest.mark.parametrize("gap", [0, 5])
def test_equal_band_masks_are_built_once_and_gaps_get_their_own(gap):
    torch.manual_seed(7)
    T, D = 64, 16
    q, k, v = torch.randn(1, 2, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    token = torch.cat([torch.arange(0, 30), torch.arange(30 + gap, T + gap)])
    positions = torch.stack([token // 6, token], -1)[None]
    inv_freq = (10000.0 ** (-torch.arange(D // 2) * 2 / D)).float()
    plan = make_plan(RopeMethodConfig(window=5, split=0.5, query_chunk=8), positions, T, inv_freq, 0.5, 5, torch.float32)
    assert plan.keys_sorted and plan.consecutive == (gap == 0)
    got = attention.windowed_attention(q, k, v, plan, 0.25)
    assert torch.allclose(got, dense_windowed(q, k, v, plan, 0.25), atol=1e-5)
    masked = [b for blocks in plan.blocks.values() for b in blocks if b.allowed is not None]
    assert len(masked) == 16  # a far band and a near band per chunk
    assert len(plan.masks) == (4 if gap == 0 else 0), "consecutive positions: a mask per distinct band (the first chunk's two, then two)"


def test_growing_tensor_writes_in_place_and_cuts_back_as_a_view():
    grown = GrowingTensor()
    reference = torch.empty(1, 2, 0, 4)
    with torch.inference_mode():
        for step, n in enumerate([5, 1, 1, 300, 1]):
            x = torch.full((1, 2, n, 4), float(step))
            reference = torch.cat([reference, x], -2)
            assert torch.equal(grown.append(x), reference)
        capacity = grown.capacity
        assert capacity >= 308 and capacity % 64 == 0
        grown.truncate(6)
        reference = reference[..., :6, :]
        y = torch.full((1, 2, 3, 4), 9.0)
        assert torch.equal(grown.append(y), torch.cat([reference, y], -2))
        assert grown.capacity == capacity  # no copy: written into the room it had
        grown.compact()
        assert grown.capacity == 9 and torch.equal(grown.view, torch.cat([reference, y], -2))
    # outside inference mode the inference-mode buffer is copied, not written
    z = torch.ones(1, 2, 1, 4)
    assert torch.equal(grown.append(z)[..., -1:, :], z) and not grown.buffer.is_inference()
