"""divprune: DivPrune's diversity-based choice of visual tokens (greedy max-min on the projected features).

Per image, over its selectable tokens' projected features (what the language model would read): the distance
is 1 - cosine similarity; the first pick is the token whose nearest other token is farthest, then each step
adds the token farthest from everything kept so far (farthest-point greedy). Kept tokens stay in their
original order. LLaVA-NeXT images are selected over both grids together (diversity is not a spatial notion),
newline tokens kept on top. The loop runs in `hfpatch.kernels.diverse_select` (one Triton launch per image batch
on a GPU, its torch reference elsewhere).
"""
from __future__ import annotations

import dataclasses

from ...catalogue import register
from .base import ImageTokens, PruningParams, Selection, VisionPruningTechnique, diverse_selection


@dataclasses.dataclass
class DivPruneParams(PruningParams):
    pass


@register
class DivPrune(VisionPruningTechnique):
    """DivPrune (training-free): keep the most mutually different visual tokens of each image (max-min diversity
    of the projected features under cosine distance)."""

    name = "divprune"
    summary = "visual-token pruning by feature diversity: greedy max-min over cosine distance per image (DivPrune; lossy)"
    Params = DivPruneParams

    def select(self, image: ImageTokens, budget: int) -> Selection:
        return diverse_selection(image, budget, "max_min", self._stats)
