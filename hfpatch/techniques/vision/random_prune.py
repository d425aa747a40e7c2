"""random_prune: keep a seeded uniform random subset of each image's visual tokens.

A baseline every pruning method must beat (UniPruneBench finds random pruning a strong one). The choice is
reproducible: each image draws from a generator seeded with `seed` and the image's number in the call.
"""
from __future__ import annotations

import dataclasses

import torch

from ...catalogue import register
from ...technique import param
from .base import ImageTokens, PruningParams, Selection, VisionPruningTechnique


@dataclasses.dataclass
class RandomPruneParams(PruningParams):
    seed: int = param(0, ge=0, le=2**31, help="seed of the generators drawing the kept tokens (one per image, "
                                               "seeded from seed and the image's number)")


@register
class RandomPrune(VisionPruningTechnique):
    """Keep `budget` of each image's visual tokens, drawn uniformly at random (seeded); original order kept."""

    name = "random_prune"
    summary = "visual-token pruning baseline: a seeded random subset of each image's tokens (lossy)"
    Params = RandomPruneParams

    def select(self, image: ImageTokens, budget: int) -> Selection:
        # one generator per image, seeded from (seed, image number): the same image drawn again (generate repeats
        # a prompt's images for several sequences) keeps the same tokens
        generator = torch.Generator().manual_seed(self.params.seed * 1_000_003 + image.number)
        selectable = torch.cat([segment.index for segment in image.layout.segments])
        pick = torch.randperm(len(selectable), generator=generator)[:budget]
        return Selection(selectable[pick].sort().values)
