"""random_prune: keep a seeded uniform random subset of each image's visual tokens.

A baseline every pruning method must beat (UniPruneBench finds random pruning a strong one). The choice is
reproducible: the generator is seeded with `seed` at every prefill and images draw in placeholder order.
"""
from __future__ import annotations

import dataclasses

import torch

from ...catalogue import register
from ...technique import param
from .base import ImageTokens, PruningParams, Selection, VisionPruningTechnique


@dataclasses.dataclass
class RandomPruneParams(PruningParams):
    seed: int = param(0, ge=0, help="seed of the generator drawing the kept tokens (re-seeded at every prefill)")


@register
class RandomPrune(VisionPruningTechnique):
    """Keep `budget` of each image's visual tokens, drawn uniformly at random (seeded); original order kept."""

    name = "random_prune"
    summary = "visual-token pruning baseline: a seeded random subset of each image's tokens (lossy)"
    Params = RandomPruneParams

    def _prefill(self, *args, **kwargs):
        self._generator = torch.Generator().manual_seed(self.params.seed)
        return super()._prefill(*args, **kwargs)

    def select(self, image: ImageTokens, budget: int) -> Selection:
        selectable = torch.cat([segment.index for segment in image.layout.segments])
        pick = torch.randperm(len(selectable), generator=self._generator)[:budget]
        return Selection(selectable[pick].sort().values)
