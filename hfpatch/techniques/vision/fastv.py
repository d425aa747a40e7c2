"""FastV: after decoder layer K, drop the visual tokens the text pays least attention to (a baseline).

FastV (Chen et al., 2024) ranks each image's visual tokens by the attention they receive from the **last
token** of the prompt in layer K-1 (averaged over heads) and keeps the best `budget` (or `keep_ratio`) of
each image from layer K on; layers 0..K-1 see every token. The paper's setting is K=2 with half or a
quarter of LLaVA-1.5's 576 tokens. The scores come from the language model's own attention call in layer
K-1 (its queries and keys, no extra forward); the decoder keeps running its own sdpa or eager attention.

The machinery (hidden states, per-layer masks and KV caches of the later layers) is `in_llm.InLLMPruner`.
Statistics of the last prefill: `visual_tokens` and `kept_visual_tokens` per row, the pruning `layer`, the
sequence length before and after (`dead_slots`: kept only to keep rows equally long), the decoder's prefill
wall time (`decoder_prefill_seconds`), or `reason` when a call was not pruned.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ...catalogue import register
from ...errors import RecipeError
from ...technique import Technique, param
from .base import PruningParams
from .in_llm import IN_LLM_MODEL_TYPES, InLLMPruner, visual_spans, visual_token_ids


@dataclasses.dataclass
class FastVParams(PruningParams):
    """`budget` / `keep_ratio` (exactly one) count every image token the language model reads, LLaVA-NeXT's
    image-newline tokens included (FastV ranks them like the others)."""

    layer: int = param(2, help="K: the first decoder layer that runs without the dropped tokens; the scores "
                               "come from layer K-1 (the paper's K=2)", ge=1)


@register
class FastV(Technique):
    """Drop each image's least-attended visual tokens after decoder layer K (scored by the last token)."""

    name = "fastv"
    family = "vision"
    summary = "drop each image's least-attended visual tokens inside the language model after layer K (FastV)"
    Params = FastVParams
    claims: ClassVar[frozenset[str]] = frozenset({"language-sequence"})
    model_types: ClassVar[frozenset[str]] = IN_LLM_MODEL_TYPES

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pruner = InLLMPruner(self.name, self._observe, self._decide)

    def apply(self, model, ctx) -> None:
        layers = len(ctx.adapter.decoder_layers())
        if self.params.layer >= layers:
            raise RecipeError(f"fastv: layer={self.params.layer} but the language model has {layers} decoder layers; "
                              f"choose 1 <= layer <= {layers - 1}")
        self.pruner.install(model, ctx, visual_token_ids(ctx.adapter.model))

    def stats(self) -> dict[str, Any]:
        return dict(self.pruner.stats)

    def _observe(self, layer: int) -> bool:
        return layer == self.params.layer - 1

    def _decide(self, layer: int, seen, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        scores = seen.last_query()
        drop = torch.zeros_like(visual)
        for row in range(visual.shape[0]):
            for start, end in visual_spans(visual[row] & valid[row]):
                keep = self.params.tokens_kept(end - start)
                if keep >= end - start:
                    continue
                order = scores[row, start:end].argsort(descending=True, stable=True)
                drop[row, start + order[keep:].to(drop.device)] = True
        return drop
