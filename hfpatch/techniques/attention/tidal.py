"""TidalDecode: full attention in the first layers and in a few token-selection layers; each selection
layer's top-``budget`` positions serve every following layer until the next selection layer.

Selection happens at every decode step, inside the step: the selection layer attends to the whole cache
and ranks positions by its attention probabilities summed over all query heads (one position set shared
by every head, as the paper does); later layers of the same step attend only to that set. Defaults follow
the paper: layers 0-1 dense, selection at layer 2 and a re-selection layer at 13/32 of the depth (layer 13
of Llama-3-8B's 32) with ``selection_layers=None`` (recipe ``tidal-decode-paper``).

The default ``selection_layers="auto"`` finds the layers where the model itself retrieves, at patch time, from
its attention on a synthetic retrieval prompt (``retrieval_probe``: token ids only, seeded, one forward pass).
The result is cached per model in the process and exported with the parameters (``calibrated_layers`` and
the ``calibrated_for`` fingerprint), so ``handle.to_recipe()`` -> save/push -> a later ``patch()`` on the same
weights skips the probe.

    >>> handle = hfpatch.patch(model, "tidal-decode", budget=512)
    >>> handle.stats["tidal_decode"]["selection_layers"]
"""
from __future__ import annotations

import dataclasses
import warnings

from ...kernels import attention_with_scores
from ...catalogue import register
from ...technique import param
from . import retrieval_probe
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
    selection_layers: list[int] | str | None = param(
        "auto", help="layers that attend fully and select positions for the layers after them: 'auto' = found at "
                     "patch time from where the model retrieves on a synthetic prompt (cached per model, exported "
                     "as calibrated_layers; on SmolLM2-135M it picks [2, 7, 12, 17, 20], the hand-tuned set), None = "
                     "the paper's choice [full_layers, round(13/32 * num_layers)], or an explicit list "
                     "(docs/results/sparse-attention.md)")
    calibrated_layers: list[int] | None = param(
        None, help="with selection_layers='auto': the layers an earlier probe chose (written by handle.to_recipe(); "
                   "used when calibrated_for matches this model, else the probe runs again with a warning)")
    calibrated_for: str = param(
        "", help="fingerprint of the weights and probe settings calibrated_layers belong to (written with them)")

    def __post_init__(self):
        if isinstance(self.selection_layers, str) and self.selection_layers != "auto":
            raise ValueError(f"selection_layers must be 'auto', null or a list of layer indices, "
                             f"not {self.selection_layers!r}")


@register
class TidalDecode(SparseAttentionTechnique):
    name = "tidal_decode"
    summary = ("TidalDecode: dense first layers, a few selection layers whose top-`budget` positions are "
               "reused by the following layers of the same decode step")
    Params = TidalDecodeParams
    label = "tidal"

    def apply(self, model, ctx) -> None:
        layers = self.params.selection_layers
        self._source = "explicit list"
        if layers == "auto":  # probe before this patch changes the attention function
            layers = self._auto_layers(model, ctx.adapter)
        super().apply(model, ctx)
        # Sliding-window layers never run a sparse step (their window is already short), so they cannot select.
        kinds = list(getattr(ctx.adapter.text_config(), "layer_types", None) or [])
        sliding = {i for i, kind in enumerate(kinds) if "sliding" in str(kind)}
        full = [i for i in range(self.num_layers) if i not in sliding]
        if layers is None:  # the paper's choice, clipped to shallow models
            layers = [i for i in {self.params.full_layers, round(13 / 32 * self.num_layers)} if i < self.num_layers]
            self._source = "paper formula"
            if sliding:  # e.g. Gemma 3: each formula layer moves to the next full-attention layer
                layers = sorted({next((f for f in full if f >= i), None) for i in layers} - {None})
                self._source = "paper formula, moved to the next full-attention layers (sliding-window layers " \
                               "cannot select)"
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"selection_layers {bad} outside the model's {self.num_layers} layers")
        windowed = sorted(set(layers) & sliding)
        if windowed:
            raise ValueError(f"selection_layers {windowed} are sliding-window layers of this model, which never run a "
                             f"sparse step and so cannot select; choose among its full-attention layers {full}, or "
                             "use selection_layers='auto'")
        self.selection = sorted(set(layers))
        self._current = None  # (cache length, batch, index) of the latest selection layer in this step

    def _auto_layers(self, model, adapter) -> list[int]:
        """The calibrated layers for this model: from the recipe when its fingerprint matches, else from the
        process cache or a fresh probe; recorded in the parameters so ``to_recipe()`` exports them."""
        p = self.params
        key = retrieval_probe.calibration_key(retrieval_probe.fingerprint(model, adapter), p.budget, p.full_layers)
        if p.calibrated_layers is not None and p.calibrated_for == key:
            layers, self._source = list(p.calibrated_layers), "loaded from the recipe"
        else:
            if p.calibrated_layers is not None:
                warnings.warn(
                    f"tidal_decode: the recipe's calibrated_layers {p.calibrated_layers} were calibrated for "
                    f"{p.calibrated_for or 'an unnamed model'!r}, not this model and these settings ({key!r}); "
                    "probing this model again (save a recipe from this handle to keep the new layers)",
                    stacklevel=2)
            layers, _, cached = retrieval_probe.calibrate(model, adapter, budget=p.budget,
                                                          full_layers=p.full_layers, key=key)
            self._source = "probed (cached in this process)" if cached else "probed"
        self.params = dataclasses.replace(p, calibrated_layers=list(layers), calibrated_for=key)
        return layers

    def stats(self):
        """The sparse-attention counts plus the selection layers in use and where they came from."""
        out = super().stats()
        out["selection_layers"] = list(getattr(self, "selection", []))
        out["selection_source"] = getattr(self, "_source", None)
        return out

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
