"""ToDRE: diverse visual tokens before the language model, then none once the text stops looking at them.

ToDRE ("Token Diversity and task RElevance", 2025; no public code) prunes in two stages:

1. after the encoder, per image, keep `budget` (or `keep_ratio`) tokens by greedy k-center over the projected
   features (cosine distance; first pick the token nearest the mean direction, then farthest-point steps):
   `hfpatch.kernels.diverse_select(features, budget, method="k_center")`, through the same per-image machinery
   as HiPrune and DivPrune (`base.VisionPruningTechnique`);
2. inside the language model, during the prefill, measure at each decoder layer from `start_layer - 1` on how
   much attention the text pays to the (remaining) visual tokens: the share of the attention of the text
   tokens after the first image (the instruction; the last token when no text follows) that lands on visual
   tokens, averaged over heads and those queries. At the first layer where that share is below `threshold`
   in every row of the batch, every visual token is dropped from the next layer on (`in_llm.InLLMPruner`:
   hidden states, per-layer masks and KV caches of the later layers). `threshold=0` turns stage 2 off.

The rule fires at the FIRST observed layer below `threshold`, so it presumes the text's attention on the image only
falls with depth. A model whose text reads the image late (SmolLM2-135M in the assembled LLaVA: shares of
0.01-0.05 at layers 2-14, peaks of 0.1-0.25 at layers 15-24) loses the image at layer 3 with the defaults; choose
`start_layer` past those layers on held-out data (docs/results/vision.md measures how).

The decision is one per batch (rows are pruned at the same layer, so tensors stay rectangular): a row whose
text still attends to its image keeps the batch's visual tokens. `handle.stats["todre"]` has stage 1's per-image
counts, `visual_attention_share` (the largest row share at each observed layer) and stage 2's `layer`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ...catalogue import register
from ...technique import param
from .base import ImageTokens, PruningParams, Selection, VisionPruningTechnique, diverse_selection
from .in_llm import InLLMPruner, visual_token_ids


@dataclasses.dataclass
class ToDREParams(PruningParams):
    threshold: float = param(0.05, ge=0.0, le=1.0,
                             help="stage 2: drop every visual token after the first decoder layer where the text's "
                                  "attention share on visual tokens is below this (0 = stage 2 off)")
    start_layer: int = param(2, ge=1, help="stage 2: the earliest decoder layer that may run without visual tokens; "
                                           "the rule assumes the text's attention on the image only falls with depth, "
                                           "so on a model that reads the image late set it past those layers (the "
                                           "assembled LLaVA's SmolLM2 reads it at layers 15-24 of 30 and needs 24: "
                                           "docs/results/vision.md)")


def text_queries(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the text positions after each row's first visual token (the last position when none)."""
    seen = visual.long().cumsum(1) > 0
    rows = seen & ~visual & valid
    last = torch.zeros_like(rows)
    last[:, -1] = True
    return torch.where(rows.any(1, keepdim=True), rows, last)


@register
class ToDRE(VisionPruningTechnique):
    """Stage 1: greedy k-center diversity per image before the language model; stage 2: drop all visual tokens
    inside the language model once the text's attention on them falls below a threshold."""

    name = "todre"
    summary = ("visual-token pruning: k-center diverse tokens before the LLM, then all visual tokens dropped at the "
               "layer where the text stops attending to them (ToDRE; lossy)")
    Params = ToDREParams
    claims: ClassVar[frozenset[str]] = frozenset({"visual-tokens", "language-sequence"})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pruner = InLLMPruner(self.name, self._observe, self._decide)
        self._shares: list[float] = []
        self._last_layer = 0

    def apply(self, model, ctx) -> None:
        super().apply(model, ctx)
        self._last_layer = len(ctx.adapter.decoder_layers()) - 1
        if self.params.threshold > 0:
            self.pruner.install(model, ctx, visual_token_ids(ctx.adapter.model))

    # stage 1 ------------------------------------------------------------------------------------------

    def select(self, image: ImageTokens, budget: int) -> Selection:
        return diverse_selection(image, budget, "k_center", self._stats)

    def _choose(self, encoded, embeds, placeholder):
        keep, embeds = super()._choose(encoded, embeds, placeholder)
        if self.params.threshold > 0 and not bool(keep.all()):
            # the language model will read the kept positions, each row left-padded to the longest (base._prefill):
            # tell stage 2 which of those are visual tokens and which are real
            batch, length = keep.shape
            compact = int(keep.sum(1).max())
            index = torch.zeros(batch, compact, dtype=torch.long, device=keep.device)
            pad = torch.zeros(batch, compact, dtype=torch.bool, device=keep.device)
            for row in range(batch):
                kept = torch.nonzero(keep[row]).flatten()
                index[row, compact - len(kept):] = kept
                pad[row, : compact - len(kept)] = True
            valid = self.pruner.padding_mask()
            if valid is None or tuple(valid.shape) != (batch, length):
                valid = torch.ones(batch, length, dtype=torch.bool, device=keep.device)
            valid = valid.to(keep.device)
            self.pruner.set_masks(placeholder.to(keep.device).gather(1, index) & ~pad, valid.gather(1, index) & ~pad)
        return keep, embeds

    # stage 2 ------------------------------------------------------------------------------------------

    def _observe(self, layer: int) -> bool:
        if layer == 0:
            self._shares = []
        # nothing can run without the visual tokens after the last layer
        return self.params.start_layer - 1 <= layer < self._last_layer

    def _decide(self, layer: int, seen, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        probs = seen.from_rows(text_queries(visual, valid))  # [B, L]
        share = (probs * visual.to(probs.dtype)).sum(1)  # per row
        self._shares.append(round(float(share.max()), 6))
        if bool((share < self.params.threshold).all()):
            return visual.clone()
        return None

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        if self.params.threshold > 0:
            stage2 = dict(self.pruner.stats)
            if "reason" not in stage2:  # the shares belong to the last prefill that was scored
                stage2["visual_attention_share"] = list(self._shares)
            out["stage2"] = stage2
        return out
