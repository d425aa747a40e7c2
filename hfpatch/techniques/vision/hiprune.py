"""hiprune: HiPrune's hierarchical choice of visual tokens from attention inside the vision encoder.

Per image (per patch grid), with N' = the budget:

- anchors: the top round(N' * alpha / 5) tokens by the column-mean attention of a middle "object" layer of the
  vision tower (alpha = 0.1; each anchor brings up to four buffers, so anchors and buffers take about alpha * N');
- buffers: each anchor's left, right, upper and lower neighbour on the patch grid (clamped at the edges, never
  wrapping across rows, deduplicated, anchors excluded);
- registers: the top remaining tokens by the column-mean attention of the deep layer the VLM reads its
  features from, until N' tokens are kept.

Kept tokens stay in their original order. The column means come from a vision-only attention function that
computes each scored layer's output and its per-key column sums in one pass (`attention_with_column_sums`); the
rest of the tower and the language model keep their own attention.

`hiprune_select` is a plain function on tensors, usable on a bare vision encoder.
"""
from __future__ import annotations

import dataclasses

import torch

from ...catalogue import register
from ...technique import param
from .base import ImageTokens, PruningParams, Selection, VisionPruningTechnique, split_budget


def hiprune_select(object_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int], budget: int,
                   alpha: float = 0.1) -> torch.Tensor:
    """HiPrune's choice of `budget` of the `N = h * w` tokens of one patch grid: sorted kept indices (LongTensor).

    `object_scores` / `deep_scores` are `[N]` scores (column-mean attention of the object and the deep layer, CLS
    already dropped), row-major over `grid = (h, w)`.

    Anchors: the top `round(budget * alpha / 5)` tokens by `object_scores` (ties go to the lower index). Buffers:
    each anchor's left, right, up and down neighbours that exist on the grid (no wrap across rows or columns),
    not already kept. When the budget is smaller than anchors plus buffers, all anchors are kept (there are at
    most `budget * alpha / 5 + 0.5 <= budget` of them for alpha <= 1) and buffers are taken in anchor order (the
    best anchor's neighbours first, each anchor's in left, right, up, down order) until the budget is full, so
    no registers are left. A budget so small that round(budget * alpha / 5) is 0 has no anchors: all registers.
    Registers: the top remaining tokens by `deep_scores`. A budget >= N keeps every token.
    """
    h, w = grid
    n = h * w
    if object_scores.shape != (n,) or deep_scores.shape != (n,):
        raise ValueError(f"hiprune_select: scores must both be [h * w] = [{n}] for grid {grid}, got "
                         f"{tuple(object_scores.shape)} and {tuple(deep_scores.shape)}")
    if budget < 1:
        raise ValueError(f"hiprune_select: budget must be >= 1, got {budget}")
    device = object_scores.device
    if budget >= n:
        return torch.arange(n, device=device)
    num_anchors = min(int(round(budget * alpha / 5)), budget)
    # stable descending order: ties go to the lower index, so the choice is deterministic
    anchor_order = torch.sort(object_scores.float().cpu(), descending=True, stable=True).indices[:num_anchors].tolist()
    chosen: list[int] = list(anchor_order)
    taken = set(chosen)
    for anchor in anchor_order:
        row, col = divmod(anchor, w)
        neighbours = []
        if col > 0:
            neighbours.append(anchor - 1)
        if col < w - 1:
            neighbours.append(anchor + 1)
        if row > 0:
            neighbours.append(anchor - w)
        if row < h - 1:
            neighbours.append(anchor + w)
        for token in neighbours:
            if len(chosen) >= budget:
                break
            if token not in taken:
                taken.add(token)
                chosen.append(token)
    remaining = budget - len(chosen)
    if remaining > 0:
        deep = deep_scores.float().cpu().clone()
        deep[torch.tensor(chosen, dtype=torch.long)] = float("-inf")
        registers = torch.sort(deep, descending=True, stable=True).indices[:remaining].tolist()
        chosen.extend(registers)
    return torch.tensor(sorted(chosen), dtype=torch.long, device=device)


@dataclasses.dataclass
class HiPruneParams(PruningParams):
    alpha: float = param(0.1, gt=0.0, le=1.0,
                         help="share of the budget for anchors and their buffers (round(budget * alpha / 5) anchors)")
    object_layer: int | None = param(
        None, ge=0, help="vision layer (0-based) whose attention picks the anchors; None = the family default, "
                         "9/24 of the tower depth (CLIP-L/14 in LLaVA-1.5: layer 9), never deeper than the feature layer")


@register
class HiPrune(VisionPruningTechnique):
    """HiPrune (training-free): anchors from a middle vision layer's attention, their grid neighbours as buffers,
    registers from the feature layer's attention; the rest of each image's visual tokens never reach the LLM."""

    name = "hiprune"
    summary = ("visual-token pruning by vision-encoder attention: anchors + spatial buffers + registers per image "
               "(HiPrune; lossy)")
    Params = HiPruneParams
    needs_attention_scores = True

    def _layers(self, model) -> tuple[int, int]:
        glue = self.glue
        depth = len(glue.vision_layers(model))
        deep = glue.deep_layer(model)
        obj = glue.default_object_layer(model) if self.params.object_layer is None else self.params.object_layer
        if obj >= depth:
            raise ValueError(f"hiprune: object_layer={obj} but the vision tower has {depth} layers (0..{depth - 1})")
        return obj, deep

    def apply(self, model, ctx) -> None:
        from .families import glue_for

        self.glue = glue_for(model)
        self.object_layer, self.deep_layer = self._layers(model)
        super().apply(model, ctx)

    def scored_layers(self, model) -> frozenset[int]:
        return frozenset({self.object_layer, self.deep_layer})

    def stats(self):
        out = super().stats()
        out["object_layer"], out["deep_layer"] = getattr(self, "object_layer", None), getattr(self, "deep_layer", None)
        return out

    def select(self, image: ImageTokens, budget: int) -> Selection:
        object_scores = image.scores[self.object_layer]
        deep_scores = image.scores[self.deep_layer]
        kept = []
        for segment, share in zip(image.layout.segments, split_budget(image.layout, budget)):
            if share == 0:
                continue
            index = segment.index.to(object_scores.device)
            local = hiprune_select(object_scores[index], deep_scores[index], segment.grid, share, self.params.alpha)
            kept.append(index[local])
        return Selection(torch.cat(kept).sort().values)
