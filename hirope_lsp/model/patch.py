"""Attach a position method (HiRoPE and the ones it is compared with) to a loaded transformers causal LM.

The model keeps its own rotary module: it rotates queries and keys by the
global token position exactly as unpatched, and its KV cache stores those
plain-rotated keys.  The patch swaps only the attention function: far
(query, key) pairs are turned from the plain rotation to the method's far
positions at attention time (rotations compose), so the cache can be cut
back and extended freely and both kinds of score are formed at decode time
without recomputing the prompt.

    handle = attach(model, RopeMethodConfig(method="hirope", window=512))
    out = handle.forward(input_ids, positions, cache=cache)
    handle.detach()
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import AttentionPlan, FarKeyStore, windowed_attention
from .methods import RotaryBase, position_method
from .rope import DEFAULT_FAR_BIAS, RopeMethodConfig, default_window, delta_rotation, theory_split

ATTN_NAME = "hirope"



def _hirope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan: AttentionPlan | None = kwargs.get("hirope_plan")
    if plan is None:
        raise RuntimeError(
            "this model has a HiRoPE-style patch attached: call it through the handle's forward() "
            "(or pass hirope_plan=...) so every token has its hierarchical position"
        )
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"HiRoPE attention does not support {unsupported!r} (attention soft-capping or sinks)")
    if scaling is None:
        scaling = module.head_dim**-0.5
    return windowed_attention(query, key, value, plan, scaling, getattr(module, "layer_idx", None),
                              kwargs.get("sliding_window")), None


def _no_mask(*args, attention_mask=None, **kwargs):
    if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
        raise ValueError("HiRoPE attention does not support padding masks; run one sequence per batch row without padding")
    return None


AttentionInterface.register(ATTN_NAME, _hirope_attention)
AttentionMaskInterface.register(ATTN_NAME, _no_mask)


def find_rotary(model) -> torch.nn.Module:
    """The model's shared rotary embedding module (one per model in transformers 5)."""
    modules = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    found = [m for m in modules if hasattr(m, "inv_freq")]
    if not found and any(name.endswith("_inv_freq") for m in modules for name, _ in m.named_buffers()):
        raise ValueError("model gives its layer types rotary embeddings of their own (as Gemma 3's local and global "
                         "RoPE); HiRoPE supports one rotary embedding shared by every layer")
    if not found:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(f"model {kind!r} has no rotary position embedding (no rotary_emb with inv_freq); HiRoPE needs RoPE")
    if len(found) > 1:
        raise ValueError("model has several rotary embedding modules (per-layer RoPE); not supported")
    return found[0]


def cache_keyword(model) -> str:
    """The keyword ``model.forward`` takes the KV cache by: ``cache`` from transformers 5.24 on, where
    ``past_key_values`` still works but warns (FutureWarning) and goes in 5.40; ``past_key_values`` in
    5.0 to 5.23 (and in remote-code models written for them), which have no ``cache``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def check_rotary_layout(rotary, head_dim: int) -> None:
    """Refuse rotary embeddings the far turn cannot follow: the turn rotates channel pairs ``(j, j + R/2)``
    of the first ``R = 2 * len(inv_freq)`` channels, as transformers' ``rotate_half`` does."""
    pairs, device = rotary.inv_freq.numel(), rotary.inv_freq.device
    if 2 * pairs > head_dim:
        raise ValueError(f"the rotary embedding has {pairs} pairs but heads have {head_dim} channels")
    positions = torch.tensor([[0, 1, 7]], device=device)
    probe = copy.deepcopy(rotary)  # a dynamic rope updates itself when called: compare with what it used
    cos, sin = probe(torch.zeros(1, device=device), positions)
    angle = positions[..., None].float() * probe.inv_freq.detach().float()
    scale = getattr(probe, "attention_scaling", 1.0)
    expected = torch.cat([angle, angle], -1)
    if cos.shape[-1] != expected.shape[-1] or not (
            torch.allclose(cos.float(), expected.cos() * scale, atol=1e-4)
            and torch.allclose(sin.float(), expected.sin() * scale, atol=1e-4)):
        raise ValueError(f"the rotary embedding of {type(rotary).__name__} is not laid out as rotate_half over the "
                         "first channels (interleaved pairs, as in Cohere or GLM?); HiRoPE cannot turn its keys")


def dynamic_rope(rotary) -> bool:
    """Whether the rotary module recomputes its frequencies from the input length (as transformers does)."""
    rope_type = getattr(rotary, "rope_type", "default")
    return isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope")


def check_attention(config) -> None:
    """Refuse attention the windowed path does not reproduce."""
    unknown = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"layer types {sorted(unknown)} are not supported by HiRoPE attention "
                         "(full and sliding-window attention are)")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit soft-capping (Gemma 2) is not supported by HiRoPE attention")


def rolling_start(cache, past: int) -> int:
    """The first key a rolling sliding-window cache layer (``DynamicSlidingWindowLayer``, which keeps
    its last ``window - 1`` keys) hands to attention in the next forward; ``past`` without such layers."""
    windows = [layer.sliding_window for layer in getattr(cache, "layers", ()) if getattr(layer, "is_sliding", False)]
    return max(0, past - min(windows) + 1) if windows else past


def trained_length(config) -> int:
    params = getattr(config, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


class PositionHandle:
    """A position method attached to a model: ``forward`` with hierarchical positions, ``detach``."""

    def __init__(self, model, cfg: RopeMethodConfig):
        cfg.validate(num_layers=model.config.num_hidden_layers)
        self.model = model
        self.cfg = cfg
        self.rotary = find_rotary(model)
        inv_freq = self.rotary.inv_freq
        head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        self.method = position_method(cfg.method)
        self.dynamic = dynamic_rope(self.rotary)
        if self.dynamic and self.method.rescales:
            raise ValueError(f"the model's rope_type {self.rotary.rope_type!r} sets its frequencies from the input "
                             f"length; method {cfg.method!r} would fight it: use a window method or 'rope'")
        if self.method.windowed:
            check_rotary_layout(self.rotary, head_dim)
            check_attention(model.config)
        self.num_pairs = inv_freq.numel()
        self.cache_keyword = cache_keyword(model)
        self.train_length = cfg.train_length or trained_length(model.config)
        base = float((model.config.rope_parameters or {}).get("rope_theta", 10000.0))
        self.base = base
        self.split = cfg.split if cfg.split is not None else theory_split(base, self.train_length)
        self.window = cfg.window if cfg.window is not None else default_window(self.train_length)
        self._saved_attn = model.config._attn_implementation
        self._saved_inv_freq = inv_freq.detach().clone()
        self._saved_scaling = getattr(self.rotary, "attention_scaling", 1.0)
        self._saved_seq_len = getattr(self.rotary, "max_seq_len_cached", None)  # a dynamic rope's state
        self.attached = True
        if self.method.windowed:
            model.set_attn_implementation(ATTN_NAME)
        elif self.method.rescales and not self.method.factor_from_input:
            self._rescale(cfg.factor or 1.0)

    @property
    def windowed(self) -> bool:
        return self.method.windowed

    def _rescale(self, factor: float) -> None:
        """The method's frequencies for ``factor``, from the model's own (``factor <= 1``: those)."""
        if factor <= 1.0:
            inv_freq, scaling = self._saved_inv_freq, self._saved_scaling
        else:
            saved = RotaryBase(self._saved_inv_freq, self._saved_scaling, self.base, self.train_length,
                               self.model.config)
            inv_freq, scaling = self.method.frequencies(saved, factor)
        self.rotary.inv_freq.copy_(inv_freq.to(self.rotary.inv_freq.dtype))
        self.rotary.attention_scaling = scaling

    def plan(self, positions: torch.Tensor, new_tokens: int, keys_from: int = 0) -> AttentionPlan:
        dtype = next(self.model.parameters()).dtype
        return make_plan(self.cfg, positions, new_tokens, self.rotary.inv_freq, self.split, self.window, dtype,
                         keys_from)

    def check_positions(self, input_ids: torch.Tensor, positions: torch.Tensor, past: int) -> None:
        if positions.dim() != 3:
            raise ValueError(f"positions must be [batch, tokens, levels], got shape {tuple(positions.shape)}")
        B, S = input_ids.shape
        if positions.shape[0] != B or positions.shape[1] != past + S:
            raise ValueError(
                f"positions cover {positions.shape[1]} tokens of batch {positions.shape[0]}, but the cache holds "
                f"{past} and the input adds {S} (batch {B}): give one position per cached and new token"
            )
        if self.method.hierarchical and positions.shape[-1] != self.cfg.levels:
            raise ValueError(f"positions have {positions.shape[-1]} levels, the configuration says {self.cfg.levels}")
        if positions.dtype.is_floating_point:
            raise ValueError("positions must be integers")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache=None, *, past_key_values=None,
                **kwargs):
        """Run the model on ``input_ids`` ``[B, S]`` whose positions (with the cached ones before) are ``positions``;
        ``cache`` (or its older name ``past_key_values``) is the KV cache, handed to the model by the name
        its transformers version takes."""
        if not self.attached:
            raise RuntimeError("this handle was detached")
        if cache is not None and past_key_values is not None:
            raise TypeError("give the KV cache as cache= or as past_key_values=, not both")
        past_key_values = cache if cache is not None else past_key_values
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = positions.to(input_ids.device)
        self.check_positions(input_ids, positions, past)
        S = input_ids.shape[1]
        if self.method.factor_from_input:
            self._rescale(max(1.0, positions.shape[1] / self.train_length))
        if self.dynamic and self.windowed:  # let the rotary update its frequencies now, so the plan turns by them
            self.rotary(torch.zeros(1, device=input_ids.device), positions[:, -S:, -1])
        if self.windowed:
            store = None
            if past_key_values is not None:
                store = getattr(past_key_values, "hirope_far_keys", None)
                if store is None:
                    store = FarKeyStore(self.model.config.num_hidden_layers)
                    past_key_values.hirope_far_keys = store
                store.truncate(past)  # keys past the cache's length were cut away (or never cached)
            keys_from = min(store.ready(past), rolling_start(past_key_values, past)) if store is not None else 0
            plan = self.plan(positions, S, keys_from)
            plan.far_keys = store
            kwargs["hirope_plan"] = plan
        return self.model(
            input_ids=input_ids,
            position_ids=positions[:, -S:, -1],
            **{self.cache_keyword: past_key_values},
            **kwargs,
        )

    __call__ = forward

    def detach(self) -> None:
        if not self.attached:
            return
        self.model.set_attn_implementation(self._saved_attn)
        # assigned, not copied into: a dynamic rope's inv_freq may be its original_inv_freq itself
        self.rotary.inv_freq = self._saved_inv_freq.clone()
        self.rotary.attention_scaling = self._saved_scaling
        if self._saved_seq_len is not None:
            self.rotary.max_seq_len_cached = self._saved_seq_len
        self.attached = False


def make_plan(cfg: RopeMethodConfig, positions: torch.Tensor, new_tokens: int, inv_freq: torch.Tensor,
              split: float, window: int, dtype: torch.dtype, keys_from: int = 0) -> AttentionPlan:
    """Attention plan for ``positions`` ``[B, T, levels]`` of which the last ``new_tokens`` are queries;
    keys before ``keys_from`` are turned already (kept beside the cache) and get no rotation here."""
    token = positions[..., -1]
    far = position_method(cfg.method).far_positions(cfg, positions, inv_freq.numel(), split, window, keys_from)
    kc, ks = delta_rotation(far.key, token[:, keys_from:], inv_freq, dtype)
    qc, qs = delta_rotation(far.query[:, -new_tokens:], token[:, -new_tokens:], inv_freq, dtype)
    return AttentionPlan(
        window=window,
        query_pos=token[:, -new_tokens:],
        key_pos=token,
        query_cos=qc,
        query_sin=qs,
        key_cos=kc,
        key_sin=ks,
        key_offset=keys_from,
        query_chunk=cfg.query_chunk,
        far_bias=cfg.layer_far_bias(),
        far_bias_mode=cfg.far_bias_mode,
    )


def attach(model, cfg: RopeMethodConfig | None = None, **overrides) -> PositionHandle:
    """Attach a position method to ``model`` (``RopeMethodConfig`` fields as keywords also work)."""
    cfg = cfg or RopeMethodConfig()
    if overrides:
        cfg = copy.replace(cfg, **overrides) if hasattr(copy, "replace") else RopeMethodConfig(**{**cfg.__dict__, **overrides})
    return PositionHandle(model, with_model_far_bias(model, cfg))


def with_model_far_bias(model, cfg: RopeMethodConfig) -> RopeMethodConfig:
    """``cfg`` with an unset far bias replaced by the one the model's card records (else 0)."""
    if cfg.far_bias is not None:
        return cfg
    from .loading import recommended_far_bias

    recorded = recommended_far_bias(model)
    value, mode = recorded if recorded is not None else (DEFAULT_FAR_BIAS, cfg.far_bias_mode)
    return dataclasses.replace(cfg, far_bias=value, far_bias_mode=mode)


def truncate_cache(cache, length: int) -> None:
    """Cut ``cache`` back to its first ``length`` tokens."""
    current = cache.get_seq_length()
    if length < 0 or length > current:
        raise ValueError(f"cannot cut a cache of {current} tokens to {length}")
    cut_layers(cache, length)


def cut_layers(cache, length: int) -> None:
    """Cut every layer of ``cache`` holding more than ``length`` tokens back to ``length``: after a forward
    stopped between two layers (or failed in one), the layers before hold more tokens than those after."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        current = cache.get_seq_length()
        if length < current:
            cache.crop(length - current)
        return
    for layer in layers:
        held = layer.get_seq_length()
        if held > length:
            layer.crop(length - held)


def decoder_layers(model) -> list | None:
    """The model's stack of decoder layers (the module list as long as its ``num_hidden_layers``)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and count and len(module) == count:
            return list(module)
    return None

