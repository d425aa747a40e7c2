"""TidalDecode: full attention in the first layers and in a few token-selection layers; each selection
layer's top-``budget`` positions serve every following layer until the next selection layer.

Selection happens at every decode step, inside the step: the selection layer attends to the whole cache
and ranks positions by its attention probabilities summed over all query heads (one position set shared
by every head, as the paper does); later layers of the same step attend only to that set. Defaults follow
the paper: layers 0-1 dense, selection at layer 2 and a re-selection layer at 13/32 of the depth (layer 13
of Llama-3-8B's 32).

    >>> handle = hfpatch.patch(model, "tidal-decode", budget=512)
"""
from __future__ import annotations

import dataclasses

from ...kernels import attention_with_scores
from ...catalogue import register
from ...technique import param
from .base import SparseAttentionTechnique, budget_param, kv_cache_param, sink_param, window_param


@dataclasses.dataclass
class TidalDecodeParams:
    budget: int = budget_param(256)
    kv_cache: str = kv_cache_param()
    sink: int = sink_param(0)
    window: int = window_param(0)
    full_layers: int = param(2, help="first layers that always attend to the whole cache", ge=0)
    per_head: bool = param(
        False, help="True: each query head keeps its own top-`budget` positions by its q·k (the authors' public "
                    "code); False: one set for all heads from the attention probabilities summed over heads, "
                    "which retrieved needles better on SmolLM2-135M (1k context, budget 256: 5/6 vs 2/6)")
    selection_layers: list[int] | None = param(
        None, help="layers that attend fully and select positions for the layers after them (None = the paper's "
                   "choice: [full_layers, round(13/32 * num_layers)]); model-specific: a selection layer should come "
                   "at or just before the layers whose heads retrieve (for SmolLM2-135M [2, 7, 12, 17, 20], see "
                   "docs/results/sparse-attention.md)")


@register
class TidalDecode(SparseAttentionTechnique):
    name = "tidal_decode"
    summary = ("TidalDecode: dense first layers, a few selection layers whose top-`budget` positions are "
               "reused by the following layers of the same decode step")
    Params = TidalDecodeParams
    label = "tidal"

    def apply(self, model, ctx) -> None:
        super().apply(model, ctx)
        layers = self.params.selection_layers
        if layers is None:  # the paper's choice, clipped to shallow models
            layers = [i for i in {self.params.full_layers, round(13 / 32 * self.num_layers)} if i < self.num_layers]
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"selection_layers {bad} outside the model's {self.num_layers} layers")
        self.selection = sorted(set(layers))
        self._current = None  # (cache length, batch, index) of the latest selection layer in this step

    def _selects(self, layer: int) -> bool:
        """A selection layer past the dense ones (one inside them stays dense and selects nothing)."""
        return layer >= self.params.full_layers and layer in self.selection

    def attend(self, layer, state, query, key, value, valid, scale):
        if self._selects(layer) and not self.params.per_head and not self.covers_all(key.shape[2]):
            fused = attention_with_scores(query, key, value, valid, scale)
            if fused is not None:  # the selection layer's own full attention and its scores in one pass
                out, scores = fused
                self._current = (key.shape[2], query.shape[0], self.select_top(scores, valid, reduce_all_heads=True))
                return out, None
        return super().attend(layer, state, query, key, value, valid, scale)

    def decode(self, layer, state, query, key, valid, scale):
        length = key.shape[2]
        if layer < self.params.full_layers or (self.selection and layer < self.selection[0]):
            return None
        if self._selects(layer):
            self._current = None
            if self.covers_all(length):
                return None
            if self.params.per_head:
                index = self.select_per_head(query, key, valid)
            else:
                index = self.score_and_select(query, key, valid, scale, reduce_all_heads=True)
            self._current = (length, query.shape[0], index)
            return None
        if self._current is None or self._current[:2] != (length, query.shape[0]):
            return None  # no selection from this step (e.g. short context): full attention
        return self._current[2]

    def select_per_head(self, query, key, valid):
        """``[B, Hq, budget]``: each query head's top positions by q·k (softmax is monotone, so its top-k by
        probability), sinks/window/current token forced in; the later layers attend per query head."""
        batch, hkv, length, dim = key.shape
        q = query.reshape(batch, hkv, -1, dim).to(key.dtype)
        logits = (q @ key.transpose(-1, -2)).reshape(batch, query.shape[1], length)
        return self.select_top(logits, valid)
