"""StreamingLLM-style baseline: every decode step attends to the first ``sink`` positions and the most
recent ones, ``budget`` positions in all (``window`` = budget - sink unless set smaller).

    >>> handle = hfpatch.patch(model, "sink-window", budget=256)
"""
from __future__ import annotations

import dataclasses

import torch

from ...kernels import forced_positions, select_positions
from ...catalogue import register
from ...technique import param
from .base import SparseAttentionTechnique, budget_param, kv_cache_param, sink_param


@dataclasses.dataclass
class SinkWindowParams:
    budget: int = budget_param(256)
    kv_cache: str = kv_cache_param()
    sink: int = sink_param(4)
    window: int | None = param(None, help="most recent positions attended (None = budget - sink)", ge=0)


@register
class SinkWindow(SparseAttentionTechnique):
    name = "sink_window"
    summary = "Baseline: attention sinks + recent window (StreamingLLM-style) in decode steps"
    Params = SinkWindowParams
    label = "sinkwindow"

    def decode(self, layer, state, query, key, valid, scale):
        batch, hkv, length, _ = key.shape
        sink = self.params.sink
        window = self.params.budget - sink if self.params.window is None else self.params.window
        budget = min(self.params.budget, sink + max(window, 1))
        if budget >= length:
            return None
        forced = forced_positions(valid, batch, length, sink, window, key.device)
        scores = torch.zeros(batch, 1, length, device=key.device)
        index = select_positions(scores, budget, forced, valid)
        return index.expand(batch, hkv, index.shape[-1])
