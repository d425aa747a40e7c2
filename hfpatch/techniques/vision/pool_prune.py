"""pool_prune: 2-D average pooling of each image's patch grid down to the budget (a baseline).

Per patch grid of h x w tokens and a share of k tokens, the pooled grid is ph x pw with ph = max(1, min(h,
floor(sqrt(k * h / w)))) and pw = max(1, min(w, k // ph)) (the largest grid of the image's aspect that fits k; it
can keep fewer than k tokens: the statistics report what was kept). Each pooled token is the mean of the
projected features in its adaptive-pooling window and takes the sequence slot (and position id) of the window's
top-left token, so pooled tokens keep the image's reading order and original positions. LLaVA-NeXT's base and
high-resolution grids are pooled separately, sharing the budget by size; newline tokens are kept.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ...catalogue import register
from .base import ImageTokens, PruningParams, Selection, VisionPruningTechnique, split_budget


def pooled_grid(grid: tuple[int, int], budget: int) -> tuple[int, int]:
    """The `(ph, pw)` pooled grid for an `h x w` grid and a budget of tokens (ph * pw <= budget)."""
    h, w = grid
    ph = max(1, min(h, math.floor(math.sqrt(budget * h / w))))
    pw = max(1, min(w, budget // ph))
    return ph, pw


def pool_select(features: torch.Tensor, grid: tuple[int, int], budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool `[h * w, D]` row-major grid features to at most `budget` tokens.

    Returns the sorted grid indices whose slots the pooled tokens take (each window's top-left token) and the
    pooled features `[len(index), D]` in the same order. A budget >= h * w returns the grid unchanged.
    """
    h, w = grid
    if budget >= h * w:
        return torch.arange(h * w, device=features.device), features
    ph, pw = pooled_grid(grid, budget)
    image = features.T.reshape(1, -1, h, w).float()
    pooled = torch.nn.functional.adaptive_avg_pool2d(image, (ph, pw))[0].reshape(features.shape[1], -1).T
    # adaptive pooling's window i starts at floor(i * size / out)
    rows = torch.tensor([math.floor(i * h / ph) for i in range(ph)])
    cols = torch.tensor([math.floor(j * w / pw) for j in range(pw)])
    index = (rows[:, None] * w + cols[None, :]).flatten().to(features.device)
    return index, pooled.to(features.dtype)


@dataclasses.dataclass
class PoolPruneParams(PruningParams):
    pass


@register
class PoolPrune(VisionPruningTechnique):
    """Average-pool each image's patch grid down to the budget (a baseline: no scores, no selection)."""

    name = "pool_prune"
    summary = "visual-token pruning baseline: 2-D average pooling of each image's patch grid to the budget (lossy)"
    Params = PoolPruneParams

    def select(self, image: ImageTokens, budget: int) -> Selection:
        indices, features = [], []
        for segment, share in zip(image.layout.segments, split_budget(image.layout, budget)):
            if share == 0:
                continue
            index = segment.index.to(image.features.device)
            local, pooled = pool_select(image.features[index], segment.grid, share)
            indices.append(index[local])
            features.append(pooled)
        index = torch.cat(indices)
        order = torch.argsort(index)
        return Selection(index[order], torch.cat(features)[order])
