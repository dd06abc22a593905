"""Windowed two-pass attention: plain RoPE near, other positions far.

Queries are taken in chunks of ``query_chunk`` rows.  For each chunk a
*near* pass attends the plain-rotated keys within the window and a *far*
pass attends the far-rotated keys beyond it; each pass returns its
log-sum-exp and the two are merged exactly.  Memory is
``O(query_chunk * keys)``, linear in the context length.

A prior against far keys (``far_bias`` ``b >= 0``, subtracted from the score
of every key at distance ``>= window``) lowers the far pass's log-sum-exp by
``b`` before the merge, and the far scores by ``b`` where a decoding step puts
far and near scores into one softmax.  In "distance" mode the prior is the
key's own, ``b = far_bias * log(1 + d / window)`` at token distance ``d``: it goes
into the far pass's scores (an additive mask) instead, and a key keeps it
however much context lies beyond.  With ``b = 0`` nothing is computed and
the path is exactly the unbiased one.

A layer with a sliding window ``R`` (Mistral, StarCoder2, Qwen2's upper
layers) masks every key at distance ``>= R`` as the unpatched model does:
near keys are those closer than ``min(W, R)``, far ones lie in ``[W, R)``.

The fused CPU and CUDA kernels that return log-sum-exp are used where they
run; ``attend_eager`` is the portable fallback and the decode path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field

import torch

from .buffers import GrowingTensor

log = logging.getLogger(__name__)

NEG_INF = float("-inf")
PAIR_GROWTH_BYTES = 128 << 20  # a forward's "distance" biases kept for its other layers up to this much


@dataclass
class AttentionPlan:
    """Everything the attention layers need for one forward, built once per forward."""

    window: int
    query_pos: torch.Tensor  # [B, S] global token positions of the new tokens
    key_pos: torch.Tensor  # [B, T] global token positions of every cached token
    query_cos: torch.Tensor  # [B, S, D] far turn of the queries
    query_sin: torch.Tensor
    key_cos: torch.Tensor  # [B, T - key_offset, D] far turn of the keys from key_offset on
    key_sin: torch.Tensor
    key_offset: int = 0  # keys before it are turned already (kept in far_keys)
    query_chunk: int = 256
    blocks: dict = field(default_factory=dict)  # (a, b) -> [KeyBlock], filled by the first layer
    far_keys: "FarKeyStore | None" = None  # far-turned keys kept with the KV cache across forwards
    masks: dict = field(default_factory=dict)  # (pattern, query groups) -> PairMask, shared by equal blocks
    far_bias: float | tuple = 0.0  # prior against far keys: one value, or a tuple with one per layer
    far_bias_mode: str = "constant"  # "constant": b = far_bias; "log": b = far_bias * log(max(1, n_far / window));
    # "distance": b = far_bias * log(1 + d / window) for the key at distance d (one per query-key pair)
    far_growth: dict = field(default_factory=dict)  # (a, b) -> log(max(1, n_far / window)) [B, b - a], "log" mode
    pair_added: dict = field(default_factory=dict)  # (a, b, lo, hi, bias) -> what "distance" adds to scores, while it fits
    reach: int | None = None  # the layer's sliding window: keys at distance >= reach are masked
    first_key: int = 0  # where the layer's keys start among the plan's tokens (a rolling sliding-window cache)
    views: dict = field(default_factory=dict)  # (reach, first_key) -> the plan as such a layer sees it

    def layer_view(self, sliding_window: int | None, keys: int) -> "AttentionPlan":
        """The plan for a layer attending ``keys`` keys with ``sliding_window``: a rolling cache
        (transformers' ``DynamicSlidingWindowLayer``) hands over only the last keys."""
        first = self.key_pos.shape[1] - keys
        if first < 0 or (first and not sliding_window):
            raise ValueError(f"the layer attends {keys} keys, the plan has positions for {self.key_pos.shape[1]}")
        if not sliding_window:
            return self
        view = self.views.get((sliding_window, first))
        if view is None:
            if 0 < first < self.key_offset:
                raise ValueError(f"the layer's keys start at {first}, the plan turns keys from {self.key_offset} on")
            skip = first - self.key_offset if first else 0
            view = dataclasses.replace(
                self, key_pos=self.key_pos[:, first:], key_cos=self.key_cos[:, skip:], key_sin=self.key_sin[:, skip:],
                key_offset=self.key_offset if not first else 0, blocks={}, masks={}, far_growth={}, pair_added={},
                views={},
                reach=int(sliding_window), first_key=first)
            self.views[(sliding_window, first)] = view
        return view

    @property
    def has_far(self) -> bool:
        return self.reach is None or self.reach > self.window

    def layer_far_bias(self, layer: int | None) -> float:
        if not isinstance(self.far_bias, tuple):
            return float(self.far_bias)
        if layer is None or not 0 <= layer < len(self.far_bias):
            raise ValueError(f"a per-layer far bias ({len(self.far_bias)} values) needs the layer index, got {layer}")
        return float(self.far_bias[layer])

    def far_counts(self, a: int, b: int) -> torch.Tensor:
        """Number of far keys (distance >= window) each query of ``[a, b)`` sees, ``[B, b - a]``."""
        qpos, kpos, W, R = self.query_pos[:, a:b], self.key_pos, self.window, self.reach
        if self.keys_sorted:
            k = kpos[0].contiguous()
            n = torch.searchsorted(k, (qpos[0] - W).contiguous(), right=True)
            if R is not None:
                n = n - torch.searchsorted(k, (qpos[0] - R).contiguous(), right=True)
            return n[None]
        dist = qpos[:, :, None] - kpos[:, None, :]
        far = dist >= W
        return (far if R is None else far & (dist < R)).sum(-1)

    def far_row_bias(self, a: int, b: int, layer: int | None, groups: int) -> "float | torch.Tensor | None":
        """What the far scores of the rows of queries ``[a, b)`` lose (rows: the ``groups`` query heads
        of a key head, each over the chunk, as ``windowed_attention`` lays them out): None without a
        bias, a number in "constant" mode, ``[B, 1, groups * (b - a)]`` float in "log" mode."""
        scale = self.layer_far_bias(layer)
        if scale == 0.0 or self.far_bias_mode == "distance":
            return None
        if self.far_bias_mode == "constant":
            return scale
        if self.far_bias_mode != "log":
            raise ValueError(f"unknown far_bias_mode {self.far_bias_mode!r}")
        growth = self.far_growth.get((a, b))
        if growth is None:
            n_far = self.far_counts(a, b).to(torch.float64)
            growth = torch.log(torch.clamp(n_far / self.window, min=1.0)).float()
            self.far_growth[(a, b)] = growth
        B, C = growth.shape
        return growth[:, None, :].expand(B, groups, C).reshape(B, 1, groups * C) * scale

    def far_pair_bias(self, a: int, b: int, block: "KeyBlock", layer: int | None,
                      groups: int) -> "torch.Tensor | None":
        """In "distance" mode, what is added to each far score of queries ``[a, b)`` against the keys of
        ``block`` (minus the layer's bias x log(1 + distance / window)), ``[B, 1, groups * (b - a), hi - lo]``
        float (rows laid out as in ``far_row_bias``); None otherwise.  Pairs the block masks get the bias of
        distance ``window``.  Kept scaled for the forward's other layers, so a layer adds it as it is."""
        if self.far_bias_mode != "distance":
            return None
        scale = self.layer_far_bias(layer)
        if scale == 0.0:
            return None
        key = (a, b, block.lo, block.hi, scale)
        added = self.pair_added.get(key)
        if added is None:
            added = self._distance_prior(a, b, block.lo, block.hi).mul_(-scale)
            kept = sum(g.numel() for g in self.pair_added.values())
            if (kept + added.numel()) * added.element_size() <= PAIR_GROWTH_BYTES:  # every layer reuses it
                self.pair_added[key] = added
        B, C, T = added.shape
        return added[:, None] if groups == 1 else added[:, None].expand(B, groups, C, T).reshape(B, 1, groups * C, T)

    def _distance_prior(self, a: int, b: int, lo: int, hi: int) -> torch.Tensor:
        """log(1 + max(distance, window) / window) for the queries ``[a, b)`` against the keys ``[lo, hi)``,
        ``[B, b - a, hi - lo]`` float.  With consecutive positions the distances along a diagonal are equal,
        so it is one row of ``b - a + hi - lo - 1`` values laid out as a Toeplitz matrix (the same numbers)."""
        C, T = b - a, hi - lo
        diagonal = self.consecutive and C > 0 and T > 0
        if diagonal:
            first = self.query_pos[0, a] - self.key_pos[0, lo] - (T - 1)  # the distance of query a to key hi - 1
            dist = torch.arange(C + T - 1, device=self.query_pos.device, dtype=self.query_pos.dtype) + first
        else:
            dist = self.query_pos[:, a:b, None] - self.key_pos[:, None, lo:hi]
        prior = torch.log1p(torch.clamp(dist.to(torch.float32) / self.window, min=1.0))
        return prior.as_strided((C, T), (1, 1)).flip(-1)[None] if diagonal else prior

    @functools.cached_property
    def keys_sorted(self) -> bool:
        k = self.key_pos
        return k.shape[0] == 1 and bool((k[:, 1:] >= k[:, :-1]).all())

    @functools.cached_property
    def consecutive(self) -> bool:
        """Key and query positions each 0, 1, 2, ... plus a constant (every prompt the server builds):
        then a block's mask depends only on its shape and offset, and equal ones are built once."""
        return all(p.shape[0] == 1 and bool((p[:, 1:] - p[:, :-1] == 1).all()) for p in (self.key_pos, self.query_pos))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by per-token ``cos``/``sin`` ``[B, T, R]``: its first ``R <= D``
    channels (partial rotary embeddings leave the rest unrotated)."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([turn(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def attend_eager(q, k, v, allowed, scale, add=None):
    """Reference attention with log-sum-exp.

    q: [B, H, S, D]; k, v: [B, H, T, D]; allowed: bool [B, 1|H, S, T]; ``add``: float added to the
    scaled scores, broadcast like ``allowed``.
    Returns out [B, H, S, D] (0 for rows with no allowed key) and lse [B, H, S] (-inf there).
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if add is not None:
        scores = scores + add.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    out = torch.matmul(weights, v.float()).to(q.dtype)
    return out, lse


_fused_disabled: set[str] = set()


class PairMask:
    """Which (query, key) pairs of a block attend, and what the kernels derive from that, built once
    per mask (shared masks: once per forward, not per layer): the fused kernels' additive mask and
    the rows that see no key at all."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed  # bool [B, 1|H, S, T]
        any_key = allowed.any(dim=-1)
        self.empty_rows = None if bool(any_key.all()) else ~any_key  # [B, 1|H, S]
        self._bias: dict[torch.dtype, torch.Tensor] = {}

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        bias = self._bias.get(dtype)
        if bias is None:
            bias = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            bias.masked_fill_(~self.allowed, NEG_INF)
            self._bias[dtype] = bias
        return bias


def _attend_fused(q, k, v, pairs: PairMask | None, scale, add=None):
    mask = None if pairs is None else pairs.bias(q.dtype)
    if add is not None:
        mask = add.to(q.dtype) if mask is None else mask + add.to(q.dtype)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
    elif q.device.type == "cuda":
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[1], -1, -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, 0.0, False, scale=scale
        )[:2]
        lse = lse[..., : q.shape[-2]]
    else:
        raise NotImplementedError(q.device.type)
    return out, lse.float()


def attend(q, k, v, pairs: PairMask | None, scale, add=None):
    """Attention with log-sum-exp over the allowed pairs; rows with none give lse=-inf, out=0.

    ``pairs=None`` means every pair is allowed (no mask is built); ``add`` (float ``[B, 1, S, T]``)
    is added to the scaled scores."""
    device = q.device.type
    allowed = None if pairs is None else pairs.allowed
    if device not in _fused_disabled:
        try:
            out, lse = _attend_fused(q, k, v, pairs, scale, add)
        except (RuntimeError, NotImplementedError) as err:  # kernel missing for this device/dtype
            log.warning("fused attention with log-sum-exp unavailable on %s (%s); using the eager path", device, err)
            _fused_disabled.add(device)
            out, lse = attend_eager(q, k, v, allowed, scale, add)
    else:
        out, lse = attend_eager(q, k, v, allowed, scale, add)
    if pairs is not None and pairs.empty_rows is not None:
        lse = lse.masked_fill(pairs.empty_rows, NEG_INF)
        out = out.masked_fill(pairs.empty_rows.unsqueeze(-1), 0.0)
    return out, lse


def merge(parts):
    """Merge attention results over disjoint key sets by their log-sum-exps."""
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, S]
    total = torch.logsumexp(lses, dim=0)
    safe_total = total.masked_fill(torch.isinf(total), 0.0)
    out = None
    for (o, lse) in parts:
        w = torch.exp(lse - safe_total).unsqueeze(-1)
        term = o.float() * w
        out = term if out is None else out + term
    return out, total


@dataclass
class KeyBlock:
    """Keys ``[lo, hi)`` attended by one chunk of queries in one pass (near or far)."""

    far: bool
    lo: int
    hi: int
    allowed: torch.Tensor | None  # bool [B, C, hi - lo], None when every pair is allowed
    pattern: tuple | None = None  # all the mask depends on, when known: blocks with equal ones share it

    def pair_mask(self, groups: int, shared: dict) -> PairMask | None:
        """The mask with each query row repeated for the ``groups`` query heads sharing a key head;
        kept in ``shared`` for every layer and equal block when the pattern is known (a few per
        forward), built for each use otherwise (memory stays one block's)."""
        if self.allowed is None:
            return None
        key = (self.pattern, groups)
        mask = shared.get(key) if self.pattern is not None else None
        if mask is None:
            B, C, T = self.allowed.shape
            mask = PairMask(self.allowed[:, None].expand(B, groups, C, T).reshape(B, 1, groups * C, T))
            if self.pattern is not None:
                shared[key] = mask
        return mask


def _blocks_from_mask(mask: torch.Tensor, far: bool) -> list[KeyBlock]:
    """A prefix of columns every row may see (no mask needed), then the rest up to the last allowed column."""
    idx = mask.any(dim=1).any(dim=0).nonzero()
    if idx.numel() == 0:
        return []
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    not_full = (~mask[:, :, lo:hi].all(dim=1).all(dim=0)).nonzero()
    split = lo + (int(not_full[0]) if not_full.numel() else hi - lo)
    blocks = []
    if split > lo:
        blocks.append(KeyBlock(far, lo, split, None))
    if hi > split:
        blocks.append(KeyBlock(far, split, hi, mask[:, :, split:hi]))
    return blocks


def chunk_blocks(plan: AttentionPlan, a: int, b: int) -> list[KeyBlock]:
    """Key blocks for queries ``[a, b)``, shared by every layer of one forward.

    With key positions in order (the usual case) only the bands at the window's
    edge and at the sliding window's edge get a mask; otherwise masks are built over all keys."""
    cached = plan.blocks.get((a, b))
    if cached is not None:
        return cached
    qpos, kpos, W, R = plan.query_pos[:, a:b], plan.key_pos, plan.window, plan.reach
    near_reach = W if R is None else min(W, R)
    blocks: list[KeyBlock] = []
    if plan.keys_sorted:
        q_lo, q_hi = int(qpos.min()), int(qpos.max())
        k = kpos[0].contiguous()
        k0 = int(k[0])

        def col(pos: int) -> int:
            """Number of keys at positions <= pos."""
            return int(torch.searchsorted(k, pos, right=True))

        def pattern(far: bool, lo: int, hi: int) -> tuple | None:
            """With consecutive positions a band's mask is a function of these alone."""
            return (far, b - a, hi - lo, q_lo - k0 - lo) if plan.consecutive else None

        def masked(far: bool, lo: int, hi: int, allowed) -> None:
            if hi > lo:
                dist = qpos[:, :, None] - kpos[:, None, lo:hi]
                blocks.append(KeyBlock(far, lo, hi, allowed(dist), pattern(far, lo, hi)))

        if plan.has_far:
            # far for some query: q_lo - R < kpos <= q_hi - W; for every query: q_hi - R < kpos <= q_lo - W
            far_lo, far_hi = (0 if R is None else col(q_lo - R)), col(q_hi - W)
            all_lo, all_hi = (0 if R is None else col(q_hi - R)), col(q_lo - W)
            far = (lambda d: d >= W) if R is None else (lambda d: (d >= W) & (d < R))
            if all_hi > all_lo:
                masked(True, far_lo, all_lo, far)
                blocks.append(KeyBlock(True, all_lo, all_hi, None))
                masked(True, all_hi, far_hi, far)
            else:
                masked(True, far_lo, far_hi, far)
        # columns that can be near: q_lo - near_reach < kpos <= q_hi
        near_lo, near_hi = col(q_lo - near_reach), col(q_hi)
        if near_hi > near_lo:
            dist = qpos[:, :, None] - kpos[:, None, near_lo:near_hi]
            near = (dist >= 0) & (dist < near_reach)
            if bool(near.all()):  # decoding: every key in reach is near
                blocks.append(KeyBlock(False, near_lo, near_hi, None))
            else:
                blocks.append(KeyBlock(False, near_lo, near_hi, near, pattern(False, near_lo, near_hi)))
    else:
        dist = qpos[:, :, None] - kpos[:, None, :]
        blocks = _blocks_from_mask((dist >= 0) & (dist < near_reach), False)
        if plan.has_far:
            blocks += _blocks_from_mask((dist >= W) if R is None else (dist >= W) & (dist < R), True)
    plan.blocks[(a, b)] = blocks
    return blocks


class FarKeyStore:
    """Far-turned keys of cached tokens, per layer, kept beside a KV cache so a decoding step turns
    only its new keys.  Valid while the cache's prefix (tokens and positions) is unchanged: the
    caller cuts it back to the cache length before every forward."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: dict[int, GrowingTensor] = {}
        self.unkept: set[int] = set()  # layers that keep none: no far key in reach, or a rolling cache

    def truncate(self, length: int) -> None:
        for far in self.keys.values():
            far.truncate(length)

    def ready(self, length: int) -> int:
        """How many of the ``length`` cached keys every layer that keeps far keys holds turned already
        (a plan need not turn them)."""
        if len(self.keys) + len(self.unkept) < self.num_layers:
            return 0
        return min((far.length for far in self.keys.values()), default=length)

    def skip(self, layer: int) -> None:
        self.keys.pop(layer, None)
        self.unkept.add(layer)

    def far_keys(self, layer: int, key: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        self.unkept.discard(layer)
        far = self.keys.setdefault(layer, GrowingTensor())
        far.truncate(key.shape[-2])
        n = far.length
        if n < plan.key_offset:
            raise RuntimeError(f"layer {layer} holds {n} far keys, the plan starts at {plan.key_offset}")
        start = n - plan.key_offset
        return far.append(turn(key[..., n:, :], plan.key_cos[:, start:], plan.key_sin[:, start:]))

    def compact(self) -> None:
        for far in self.keys.values():
            far.compact()

    def nbytes(self) -> int:
        return sum(far.nbytes() for far in self.keys.values())


FEW_ROWS = 64  # query rows for which one softmax over all blocks beats a kernel per block (a decoding step
# with its drafts: 5 tokens x 7 query heads per key head in Qwen2.5-0.5B)


def contiguous(blocks: list[KeyBlock]) -> bool:
    """Whether the blocks follow each other without gaps or overlap (a decoding step's far and near keys)."""
    return all(x.hi == y.lo for x, y in zip(blocks, blocks[1:]))


def attend_tiles(near_q, far_q, key, far_key, value, blocks: list[KeyBlock], scale: float,
                 far_bias: "float | torch.Tensor | None" = None, masks: "list[PairMask | None] | None" = None,
                 pair_biases: "list[torch.Tensor | None] | None" = None):
    """Attention over all blocks with one softmax, for a few query rows: the scores of each block
    against its own keys side by side (masked where ``masks`` say), one weighted sum of the values;
    ``far_bias`` (a number, or ``[B, 1, rows]``) is taken from the far blocks' scaled scores, and
    ``pair_biases`` (one per block, ``[B, 1, rows, keys]`` or None) added to each pair's."""
    parts = []
    for k, b in enumerate(blocks):
        part = torch.matmul((far_q if b.far else near_q).float(),
                            (far_key if b.far else key)[:, :, b.lo : b.hi].float().transpose(-1, -2)) * scale
        if b.far and far_bias is not None:
            part = part - (far_bias.unsqueeze(-1) if isinstance(far_bias, torch.Tensor) else far_bias)
        if pair_biases is not None and pair_biases[k] is not None:
            part = part + pair_biases[k]
        mask = masks[k] if masks is not None else None
        if mask is not None:
            part = part.masked_fill(~mask.allowed, NEG_INF)
        parts.append(part)
    weights = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
    if contiguous(blocks):
        values = value[:, :, blocks[0].lo : blocks[-1].hi]
    else:  # a key both far (for some rows) and near (for others) appears in two blocks
        values = torch.cat([value[:, :, b.lo : b.hi] for b in blocks], dim=-2)
    return torch.matmul(weights, values.float()).to(near_q.dtype)


def far_keys_of(key: torch.Tensor, plan: AttentionPlan, layer: int | None) -> torch.Tensor | None:
    """The layer's far-turned keys: kept beside the cache where the layer's keys start at the first
    token, turned here otherwise; None where no key is far."""
    store = plan.far_keys if layer is not None else None
    if store is not None and (not plan.has_far or plan.first_key):
        store.skip(layer)
    if not plan.has_far:
        return None
    if store is not None and not plan.first_key:
        return store.far_keys(layer, key, plan)
    if plan.key_offset:
        raise ValueError("a plan that skips turned keys needs the store that holds them")
    return turn(key, plan.key_cos, plan.key_sin)


def windowed_attention(query, key, value, plan: AttentionPlan, scale: float, layer: int | None = None,
                       sliding_window: int | None = None) -> torch.Tensor:
    """Attention output ``[B, S, Hq, D]`` for plain-rotated ``query`` ``[B, Hq, S, D]``,
    ``key``/``value`` ``[B, Hkv, T, D]``: plain scores within ``plan.window``, far scores beyond,
    none at distance ``>= sliding_window``."""
    B, Hq, S, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    plan = plan.layer_view(sliding_window, key.shape[-2])
    far_key = far_keys_of(key, plan, layer)
    far_query = None if far_key is None else turn(query, plan.query_cos, plan.query_sin)
    out = torch.empty(B, Hq, S, D, dtype=query.dtype, device=query.device)
    chunk = max(1, plan.query_chunk // G)
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        C = b - a
        # grouped-query attention: the G query heads sharing a key head become rows
        near_q = query[:, :, a:b].reshape(B, Hkv, G * C, D)
        far_q = None if far_query is None else far_query[:, :, a:b].reshape(B, Hkv, G * C, D)
        blocks = chunk_blocks(plan, a, b)
        far_bias = plan.far_row_bias(a, b, layer, G) if any(block.far for block in blocks) else None
        pair_biases = [plan.far_pair_bias(a, b, block, layer, G) if block.far else None for block in blocks]
        if G * C <= FEW_ROWS and blocks:
            masks = [block.pair_mask(G, plan.masks) for block in blocks]
            out[:, :, a:b] = attend_tiles(near_q, far_q, key, far_key, value, blocks, scale, far_bias,
                                          masks, pair_biases).reshape(B, Hq, C, D)
            continue
        parts = []
        for block, pair_bias in zip(blocks, pair_biases):
            q, k = (far_q, far_key) if block.far else (near_q, key)
            o, lse = attend(q, k[:, :, block.lo : block.hi], value[:, :, block.lo : block.hi],
                            block.pair_mask(G, plan.masks), scale, pair_bias)
            if block.far and far_bias is not None:
                lse = lse - far_bias  # every far key's score lowered by the row's bias: its log-sum-exp by the same
            parts.append((o, lse))
        if not parts:
            raise ValueError("a query has no key to attend to: positions must let every token see itself")
        merged, _ = merge(parts)
        out[:, :, a:b] = merged.reshape(B, Hq, C, D).to(query.dtype)
    return out.transpose(1, 2).contiguous()
