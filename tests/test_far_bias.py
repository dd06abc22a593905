"""The prior against far keys (``far_bias``): exact against the pair-by-pair reference, through the
cache, zero is exactly unbiased HiRoPE, a huge one is attention over the window alone."""

import math

import pytest
import torch
from test_hirope_core import ATOL, new_cache, random_units, reference_attention, rotate
from tiny_models import tiny_model

from hirope_lsp.model import attention
from hirope_lsp.model.patch import attach, make_plan
from hirope_lsp.model.rope import DEFAULT_FAR_BIAS, RopeMethodConfig, restart_token_index


def inv_freq(D):
    return (10000.0 ** (-torch.arange(D // 2, dtype=torch.float64) * 2 / D)).float()


def setup(T=30, D=16, H=2, seed=3):
    torch.manual_seed(seed)
    q, k, v = torch.randn(H, T, D), torch.randn(H, T, D), torch.randn(H, T, D)
    positions = random_units(T, seed=4, mean_unit=5)
    tin = restart_token_index(positions)[0]
    pos = [(int(positions[0, i, 0]), int(positions[0, i, 1]), int(tin[i])) for i in range(T)]
    tok = torch.arange(T)
    return q, k, v, positions, pos, rotate(q, tok, D)[None], rotate(k, tok, D)[None]


@pytest.mark.parametrize("method,mode,bias", [("hirope", "constant", 1.5), ("hirope", "log", 1.5), ("hirope", "log", 4.0),
                                              ("hirope", "distance", 1.5), ("rerope", "constant", 1.5),
                                              ("rerope", "log", 1.5), ("self-extend", "log", 1.5),
                                              ("self-extend", "distance", 1.5)])
@pytest.mark.parametrize("fused", [True, False])
def test_biased_prefill_matches_pair_by_pair_reference(method, mode, bias, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(attention, "_fused_disabled", {"cpu"})
    H, T, D, W, split = 2, 30, 16, 6, 0.5
    q, k, v, positions, pos, qr, kr = setup(T, D, H)
    expected = reference_attention(q, k, v, pos, method, split, W, D**-0.5, far_bias=bias, far_bias_mode=mode)
    unbiased = reference_attention(q, k, v, pos, method, split, W, D**-0.5)
    assert (expected - unbiased).abs().max() > 1e-3, "the bias must matter in this setting"
    cfg = RopeMethodConfig(method=method, window=W, split=split, group_size=3, query_chunk=7, far_bias=bias,
                           far_bias_mode=mode)
    plan = make_plan(cfg, positions, T, inv_freq(D), split, W, torch.float32)
    got = attention.windowed_attention(qr, kr, v[None], plan, D**-0.5)
    assert torch.allclose(got[0].transpose(0, 1).double(), expected, atol=1e-5)


def test_distance_bias_is_the_same_kept_for_every_layer_or_built_for_each():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 56))
    cfg = RopeMethodConfig(window=6, query_chunk=8, far_bias=1.5, far_bias_mode="distance")
    kept = forward_logits(model, cfg, ids, random_units(56))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "PAIR_GROWTH_BYTES", 0)
        assert torch.equal(forward_logits(model, cfg, ids, random_units(56)), kept)


def test_distance_prior_of_consecutive_positions_is_the_pair_by_pair_one_laid_out_along_diagonals():
    model = tiny_model("qwen2")
    handle = attach(model, RopeMethodConfig(window=6, far_bias=1.0, far_bias_mode="distance"))
    plan = handle.plan(random_units(300), 120)
    assert plan.consecutive
    general = handle.plan(random_units(300), 120)
    general.__dict__["consecutive"] = False  # the pair-by-pair path
    for a, b, lo, hi in [(0, 120, 0, 300), (17, 41, 3, 250), (100, 101, 0, 187), (5, 6, 0, 1)]:
        assert torch.equal(plan._distance_prior(a, b, lo, hi), general._distance_prior(a, b, lo, hi))


@pytest.mark.parametrize("mode", ["constant", "log", "distance"])
def test_biased_decoding_rows_match_reference(mode):
    """A decoding step puts far and near scores into one softmax (attend_tiles): the bias is taken there."""
    H, T, D, W, split = 2, 30, 16, 6, 0.5
    q, k, v, positions, pos, qr, kr = setup(T, D, H)
    expected = reference_attention(q, k, v, pos, "hirope", split, W, D**-0.5, far_bias=2.0, far_bias_mode=mode)
    cfg = RopeMethodConfig(window=W, split=split, far_bias=2.0, far_bias_mode=mode)
    for m in (W, 2 * W + 1, T - 1):
        plan = make_plan(cfg, positions[:, : m + 1], 1, inv_freq(D), split, W, torch.float32)
        blocks = attention.chunk_blocks(plan, 0, 1)
        assert attention.contiguous(blocks) and all(b.allowed is None for b in blocks) and any(b.far for b in blocks)
        got = attention.windowed_attention(qr[:, :, m : m + 1], kr[:, :, : m + 1], v[None, :, : m + 1], plan, D**-0.5)
        assert torch.allclose(got[0, 0].double(), expected[:, m], atol=1e-5)


def dense_biased(q, k, v, plan, scale, bias, mode):
    """Both score matrices in full, far scores lowered by the bias, one softmax (O(n^2) reference)."""
    fq = attention.turn(q, plan.query_cos, plan.query_sin)
    fk = attention.turn(k, plan.key_cos, plan.key_sin)
    dist = (plan.query_pos[:, :, None] - plan.key_pos[:, None, :])[:, None]
    far = dist >= plan.window
    n_far = far.sum(-1, keepdim=True).double()
    if mode == "distance":
        b = bias * torch.log1p(dist.double() / plan.window)
    else:
        b = bias if mode == "constant" else bias * torch.log(torch.clamp(n_far / plan.window, min=1.0))
    scores = torch.where(far, (fq @ fk.transpose(-1, -2)).double() * scale - b, (q @ k.transpose(-1, -2)).double() * scale)
    scores = scores.masked_fill(dist < 0, -math.inf)
    return (torch.softmax(scores, -1) @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("mode", ["constant", "log", "distance"])
def test_positions_out_of_order_count_far_keys_by_distance(mode):
    torch.manual_seed(6)
    T, D = 36, 16
    q, k, v = torch.randn(1, 2, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    token = torch.cat([torch.arange(20, 36), torch.arange(0, 20)])
    positions = torch.stack([token // 6, token], -1)[None]
    cfg = RopeMethodConfig(window=5, split=0.5, query_chunk=8, far_bias=1.5, far_bias_mode=mode)
    plan = make_plan(cfg, positions, T, inv_freq(D), 0.5, 5, torch.float32)
    assert not plan.keys_sorted
    got = attention.windowed_attention(q, k, v, plan, 0.25)
    assert torch.allclose(got.double(), dense_biased(q, k, v, plan, 0.25, 1.5, mode), atol=1e-5)


@pytest.mark.parametrize("family,far_bias,mode,cache_kind", [
    ("llama", 2.0, "constant", "dynamic"), ("llama", 1.5, "log", "growing"), ("qwen2", 1.5, "log", "dynamic"),
    ("qwen3", 2.0, "constant", "growing"), ("qwen3", [0.5, 3.0], "constant", "growing"),
    ("mistral", [1.0, 0.0], "log", "growing"), ("llama", 1.5, "distance", "growing"),
    ("qwen2", [2.0, 0.5], "distance", "dynamic")])
def test_biased_decoding_through_the_cache_equals_full_forward(family, far_bias, mode, cache_kind):
    model = tiny_model(family)
    T = 56
    ids = torch.randint(0, 97, (1, T))
    positions = random_units(T)
    handle = attach(model, RopeMethodConfig(window=6, query_chunk=8, far_bias=far_bias, far_bias_mode=mode))
    full = handle.forward(ids, positions).logits
    cache, ctx = new_cache(cache_kind, model.config)
    with ctx:
        steps = [handle.forward(ids[:, :40], positions[:, :40], past_key_values=cache).logits]
        for t in range(40, T):
            steps.append(handle.forward(ids[:, t : t + 1], positions[:, : t + 1], past_key_values=cache).logits)
    handle.detach()
    assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL)
    unbiased = attach(model, RopeMethodConfig(window=6, query_chunk=8))
    assert (unbiased.forward(ids, positions).logits - full).abs().max() > 1e-4


def forward_logits(model, cfg, ids, positions, decode_from=None):
    handle = attach(model, cfg)
    try:
        if decode_from is None:
            return handle.forward(ids, positions).logits
        cache, ctx = new_cache("growing", model.config)
        with ctx:
            steps = [handle.forward(ids[:, :decode_from], positions[:, :decode_from], past_key_values=cache).logits]
            steps += [handle.forward(ids[:, t : t + 1], positions[:, : t + 1], past_key_values=cache).logits
                      for t in range(decode_from, ids.shape[1])]
        return torch.cat(steps, 1)
    finally:
        handle.detach()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("decode_from", [None, 40])
def test_zero_bias_is_exactly_unbiased_hirope(fused, decode_from, monkeypatch):
    if not fused:
        monkeypatch.setattr(attention, "_fused_disabled", {"cpu"})
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 56))
    positions = random_units(56)
    calls = []
    original = attention.AttentionPlan.far_row_bias
    monkeypatch.setattr(attention.AttentionPlan, "far_row_bias",
                        lambda self, *a: calls.append(original(self, *a)) or calls[-1])
    base = dict(window=6, query_chunk=8)
    today = forward_logits(model, RopeMethodConfig(**base), ids, positions, decode_from)
    for far_bias, mode in ((0.0, "constant"), (0, "log"), ([0.0, 0.0], "constant"), ([0.0, 0.0], "log"),
                           (0.0, "distance"), ([0.0, 0.0], "distance")):
        got = forward_logits(model, RopeMethodConfig(**base, far_bias=far_bias, far_bias_mode=mode), ids, positions,
                             decode_from)
        assert torch.equal(got, today), (far_bias, mode)
    assert calls and all(c is None for c in calls), "a zero bias must take the unbiased path"


def test_log_bias_is_zero_until_the_far_keys_outnumber_the_window():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 12))  # at most 12 - 6 = 6 far keys per query: log(max(1, 6 / 6)) = 0
    positions = random_units(12)
    base = dict(window=6, query_chunk=4)
    plain = forward_logits(model, RopeMethodConfig(**base), ids, positions)
    assert torch.equal(forward_logits(model, RopeMethodConfig(**base, far_bias=5.0, far_bias_mode="log"), ids, positions),
                       plain)
    longer = torch.randint(0, 97, (1, 30))
    assert not torch.allclose(
        forward_logits(model, RopeMethodConfig(**base, far_bias=5.0, far_bias_mode="log"), longer, random_units(30)),
        forward_logits(model, RopeMethodConfig(**base), longer, random_units(30)), atol=1e-4)


def test_per_layer_bias_equal_values_are_the_constant_and_layers_differ():
    model = tiny_model("qwen3")
    ids = torch.randint(0, 97, (1, 40))
    positions = random_units(40)
    base = dict(window=6, query_chunk=8)
    constant = forward_logits(model, RopeMethodConfig(**base, far_bias=2.5), ids, positions)
    assert torch.equal(forward_logits(model, RopeMethodConfig(**base, far_bias=[2.5, 2.5]), ids, positions), constant)
    first = forward_logits(model, RopeMethodConfig(**base, far_bias=[2.5, 0.0]), ids, positions)
    second = forward_logits(model, RopeMethodConfig(**base, far_bias=[0.0, 2.5]), ids, positions)
    assert (first - second).abs().max() > 1e-4 and (first - constant).abs().max() > 1e-4


def near_only(q, k, v, W, scale):
    """Attention over the keys at distance < W alone (truncation to the window), plain RoPE."""
    T = q.shape[-2]
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill((dist < 0) | (dist >= W), -math.inf)
    return torch.softmax(scores, -1) @ v.double()


@pytest.mark.parametrize("mode", ["constant", "log"])
@pytest.mark.parametrize("fused", [True, False])
def test_huge_bias_is_attention_over_the_window_alone(mode, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(attention, "_fused_disabled", {"cpu"})
    H, T, D, W = 2, 40, 16, 6
    _, _, v, positions, _, qr, kr = setup(T, D, H)
    cfg = RopeMethodConfig(window=W, split=0.5, query_chunk=7, far_bias=1e6, far_bias_mode=mode)
    plan = make_plan(cfg, positions, T, inv_freq(D), 0.5, W, torch.float32)
    got = attention.windowed_attention(qr, kr, v[None], plan, D**-0.5)[0].transpose(0, 1)
    expected = near_only(qr[0], kr[0], v, W, D**-0.5)
    # log mode: rows with at most W far keys have no bias, the rest are truncated to the window
    rows = slice(None) if mode == "constant" else slice(2 * W + 1, None)
    assert torch.allclose(got[:, rows].double(), expected[:, rows], atol=1e-5)
    for m in (W + 3, T - 1):  # decoding steps too
        step = make_plan(cfg, positions[:, : m + 1], 1, inv_freq(D), 0.5, W, torch.float32)
        out = attention.windowed_attention(qr[:, :, m : m + 1], kr[:, :, : m + 1], v[None, :, : m + 1], step, D**-0.5)
        if mode == "constant" or m >= 2 * W:
            assert torch.allclose(out[0, 0].double(), expected[:, m], atol=1e-5)


def test_huge_bias_model_equals_a_sliding_window_model():
    """Far keys all but switched off: the patched model is the same model with a sliding window of W."""
    W = 6
    ids = torch.randint(0, 97, (1, 48))
    windowed = tiny_model("mistral", sliding_window=W)
    reference = windowed(ids).logits
    model = tiny_model("mistral")
    got = forward_logits(model, RopeMethodConfig(window=W, far_bias=1e6), ids, random_units(48))
    assert torch.allclose(got, reference, atol=ATOL)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(far_bias=-1.0), "far_bias must be a finite number >= 0"),
        (dict(far_bias=float("nan")), "far_bias must be a finite number >= 0"),
        (dict(far_bias=float("inf")), "far_bias must be a finite number >= 0"),
        (dict(far_bias=[1.0, -0.5]), "far_bias must be a finite number >= 0"),
        (dict(far_bias=True), "far_bias must be a number"),
        (dict(far_bias="2"), "far_bias must be a number"),
        (dict(far_bias=[]), "one value per layer"),
        (dict(far_bias=[1.0, 2.0, 3.0]), "lists 3 values, one per layer, but the model has 2 layers"),
        (dict(far_bias_mode="linear"), "far_bias_mode must be one of constant, log, distance"),
    ],
)
def test_bad_far_bias_is_refused_at_attach(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attach(tiny_model("llama"), RopeMethodConfig(**kwargs))


def test_per_layer_bias_needs_the_layer_index():
    H, T, D, W = 2, 20, 16, 6
    _, _, v, positions, _, qr, kr = setup(T, D, H)
    plan = make_plan(RopeMethodConfig(window=W, far_bias=[1.0, 2.0]), positions, T, inv_freq(D), 0.5, W, torch.float32)
    with pytest.raises(ValueError, match="needs the layer index"):
        attention.windowed_attention(qr, kr, v[None], plan, D**-0.5)
    assert torch.allclose(attention.windowed_attention(qr, kr, v[None], plan, D**-0.5, layer=1),
                          attention.windowed_attention(qr, kr, v[None], make_plan(
                              RopeMethodConfig(window=W, far_bias=2.0), positions, T, inv_freq(D), 0.5, W,
                              torch.float32), D**-0.5))


def test_an_unset_bias_is_the_one_the_models_card_records_else_none(tmp_path):
    import json

    assert RopeMethodConfig().far_bias is None and RopeMethodConfig().far_bias_mode == "constant"
    model = tiny_model()
    model.config._name_or_path = str(tmp_path)  # a model directory without a card
    handle = attach(model, RopeMethodConfig())
    assert (handle.cfg.far_bias, handle.cfg.far_bias_mode) == (DEFAULT_FAR_BIAS, "constant") == (0.0, "constant")
    handle.detach()
    (tmp_path / "training.json").write_text(json.dumps({"far_bias": {"value": 1.5, "mode": "log"}}))
    handle = attach(model, RopeMethodConfig())
    assert (handle.cfg.far_bias, handle.cfg.far_bias_mode) == (1.5, "log")
    handle.detach()
    handle = attach(model, RopeMethodConfig(far_bias=0.0))  # one the user set wins over the card
    assert (handle.cfg.far_bias, handle.cfg.far_bias_mode) == (0.0, "constant")
    handle.detach()
    (tmp_path / "training.json").write_text(json.dumps({"far_bias": {"value": 1.0, "mode": "distance"}}))
    handle = attach(model, RopeMethodConfig())
    assert (handle.cfg.far_bias, handle.cfg.far_bias_mode) == (1.0, "distance")
    handle.detach()
    (tmp_path / "training.json").write_text(json.dumps({"far_bias": {"value": 1.0, "mode": "sqrt"}}))
    handle = attach(model, RopeMethodConfig())
    assert (handle.cfg.far_bias, handle.cfg.far_bias_mode) == (DEFAULT_FAR_BIAS, "constant"), "an unknown mode is ignored"
    handle.detach()

