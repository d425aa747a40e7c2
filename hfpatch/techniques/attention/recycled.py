"""Recycled Attention: a full-attention step every `stride` decode steps picks the positions the steps in
between attend to.

At a full step the query attends to the whole cache; its attention probabilities, summed over the query
heads of each KV group, rank the cached positions and the top ``budget`` (sinks and recent window forced
in) are kept per KV head. The next ``stride - 1`` steps attend only to those positions plus every token
generated since. The dynamic variant (``drift_threshold``) also triggers a full step as soon as a layer's
query drifts from the query of its last full step: mean cosine similarity over heads below the threshold
in any batch row. ``stride=1`` or a budget >= the context length is plain full attention.

``rescore_rank`` (off by default; not in the paper) re-selects at every sparse step with the current query,
scored cheaply in a rank-r principal basis of the keys (``lowrank_keys``, the idea of Loki): on SmolLM2-135M
at 8k context any selection reused for even two steps cost 8% perplexity, a per-step one under 1%. Such a
step is one kernel, ``kernels.lowrank_sparse_decode`` (fused C++ on CPU).

    >>> handle = hfpatch.patch(model, "recycled-attention-paper", budget=512, stride=16)  # the paper's setting
    >>> handle = hfpatch.patch(model, "recycled-attention", budget=512)  # per step: rescore_rank="auto" (d/4), stride=64
"""
from __future__ import annotations

import dataclasses

import torch

from ...kernels import group_attention_scores, lowrank_sparse_decode
from ...catalogue import register
from ...technique import param
from .base import LayerState, SparseAttentionTechnique, budget_param, kv_cache_param, sink_param, window_param
from .lowrank_keys import LowRankKeys


#: ``rescore_rank="auto"`` is the head dimension over this (Loki's d/4). Rank 16 (d/4 on SmolLM2-135M) found
#: 7/10 tuning needles on Gemma 3 270M (head dimension 256), rank 32 9/10, d/4 = 64 10/10 like full attention
#: (docs/results/sparse-attention.md).
AUTO_RANK_DIVISOR = 4


@dataclasses.dataclass
class RecycledAttentionParams:
    budget: int = budget_param(256)
    kv_cache: str = kv_cache_param()
    sink: int = sink_param(4)
    window: int = window_param(32)
    stride: int = param(16, help="decode steps between full-attention (re-selection) steps; 1 = always full", ge=1)
    follow: int = param(
        0, help="also attend, t steps after a full step, to the positions t after its `follow` highest-scoring "
                "ones per KV head (heads that copy a passage move one position per generated token); 0 = off, "
                "the paper's method", ge=0)
    drift_threshold: float | None = param(
        None, help="dynamic variant: also re-select when the cosine similarity of the query to the last full "
                   "step's query falls below this (None = fixed stride)", ge=-1.0, le=1.0)
    rescore_rank: int | str = param(
        0, help="0 = the paper (sparse steps reuse the last full step's selection); r > 0: every sparse step "
                "re-selects its `budget` positions by the current query's scores in a rank-r principal basis of "
                "the keys (Loki-style, reads r / head_dim of the key cache); 'auto' = a quarter of the head "
                "dimension (Loki's d/4: 16 on SmolLM2-135M's 64, 64 on Gemma 3's 256, where rank 16 lost "
                "needles); full steps still come every `stride`",
        ge=0)

    def __post_init__(self):
        if isinstance(self.rescore_rank, str) and self.rescore_rank != "auto":
            raise ValueError(f"rescore_rank must be 'auto' or a number >= 0, not {self.rescore_rank!r}")


@register
class RecycledAttention(SparseAttentionTechnique):
    name = "recycled_attention"
    summary = ("Recycled Attention: full attention every `stride` decode steps; its top-`budget` positions "
               "(scores summed per KV group) serve the steps in between")
    Params = RecycledAttentionParams
    label = "recycled"

    def reset_stats(self) -> None:
        super().reset_stats()
        self._stats["full_steps_by_drift"] = 0

    def apply(self, model, ctx) -> None:
        if self.params.rescore_rank and self.params.follow:
            raise ValueError("recycled_attention: `follow` shifts the positions of the last full step's "
                             "selection, which `rescore_rank` replaces at every step; set one of them to 0")
        config = ctx.adapter.text_config()
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        super().apply(model, ctx)

    def kernel_ops(self):
        """Rescored sparse steps run ``lowrank_sparse_decode``; the paper's reuse runs ``sparse_decode_attention``."""
        return (lowrank_sparse_decode,) if self.params.rescore_rank else super().kernel_ops()

    def rank(self, head_dim: int) -> int:
        """The rank of the rescoring basis for heads of `head_dim` (``rescore_rank``, or d/4 for 'auto')."""
        rank = self.params.rescore_rank
        return max(1, head_dim // AUTO_RANK_DIVISOR) if rank == "auto" else int(rank)

    def stats(self):
        """The sparse-attention counts plus the rescoring rank in use ('auto' resolved from the head size)."""
        out = super().stats()
        if self.params.rescore_rank:
            out["rescore_rank"] = self.rank(self._head_dim) if getattr(self, "_head_dim", None) else \
                self.params.rescore_rank
        return out

    def _needs_full(self, state: LayerState, query: torch.Tensor) -> bool:
        if state.index is None or state.steps_since_full + 1 >= self.params.stride:
            return True
        threshold = self.params.drift_threshold
        if threshold is not None and state.query is not None:
            cos = torch.nn.functional.cosine_similarity(query.float(), state.query, dim=-1)  # [B, Hq]
            if bool((cos.mean(-1) < threshold).any()):
                self._stats["full_steps_by_drift"] += 1
                return True
        return False

    def _start_full_step(self, state: LayerState, query: torch.Tensor, length: int) -> None:
        state.steps_since_full = 0
        state.full_len = length
        state.query = query.float()
        state.index = torch.empty(0)  # marker: everything up to full_len (or, rescored, re-selected per step)

    def attend(self, layer, state, query, key, value, valid, scale):
        if not self.params.rescore_rank:
            return super().attend(layer, state, query, key, value, valid, scale)
        length = key.shape[2]
        if self.params.stride == 1 or self._needs_full(state, query):
            self._start_full_step(state, query, length)
            return None, None
        state.steps_since_full += 1
        if self.covers_all(length):
            return None, None
        lowrank = state.extra.get("lowrank")
        if lowrank is None:  # the basis comes from the keys cached when the sequence's first sparse step runs
            lowrank = state.extra["lowrank"] = LowRankKeys(key, valid, self.rank(key.shape[-1]))
        projected, fresh = lowrank.projected(key)
        args = (query, lowrank.basis, projected, key, value, valid)
        options = dict(budget=self.params.budget, scale=scale, sink=self.params.sink, window=self.params.window,
                       fresh=fresh)
        if self._stats["kernel"] is None:
            self._stats["kernel"] = lowrank_sparse_decode.resolve_backend(*args, **options)
        return lowrank_sparse_decode(*args, **options)

    def decode(self, layer, state, query, key, valid, scale):
        length = key.shape[2]
        if self.params.stride == 1:
            return None
        if self._needs_full(state, query):
            self._start_full_step(state, query, length)
            if self.covers_all(length):
                return None
            scores = group_attention_scores(query, key, valid, scale=scale)
            state.index = self.select_top(scores, valid)
            if self.params.follow:
                k = min(self.params.follow, length)
                masked = scores if valid is None else scores.masked_fill(~valid.bool()[:, None, :], float("-inf"))
                state.extra["followed"] = masked.topk(k, dim=-1).indices
            return None  # the full step itself attends to everything
        state.steps_since_full += 1
        if state.index.numel() == 0:
            return None  # the budget covered the whole context at the last full step
        index = self.with_recent(state.index, state.full_len, length)
        followed = state.extra.get("followed")
        if followed is None:
            return index
        shifted = followed + state.steps_since_full
        # the kernel counts a repeated position twice: drop shifted positions already in the set (and those
        # past the last full step, which `with_recent` covers); -1 entries are skipped
        repeated = (shifted[..., None] == state.index[..., None, :]).any(-1) | (shifted >= state.full_len)
        return torch.cat([index, shifted.masked_fill(repeated, -1)], dim=-1)
