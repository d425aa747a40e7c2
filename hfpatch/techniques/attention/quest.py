"""Quest-style baseline: query-aware page selection from per-page key min/max bounds.

The cache is cut into pages of ``page_size`` positions; per page and KV head the element-wise minimum
and maximum of the keys give an upper bound of q·k for any key in the page: ``sum_d max(q_d·min_d,
q_d·max_d)``, summed over the query heads of the KV group. Every decode step attends to the best pages
until ``budget`` positions are filled (the last page possibly partly), plus sinks, the recent window and
the current token. Bounds of complete pages are computed once per sequence and extended as the cache
grows. The first ``full_layers`` layers stay dense, as in the paper.

    >>> handle = hfpatch.patch(model, "quest", budget=512, page_size=16)
"""
from __future__ import annotations

import dataclasses

import torch

from ...catalogue import register
from ...technique import param
from .base import SparseAttentionTechnique, budget_param, kv_cache_param, sink_param, window_param


@dataclasses.dataclass
class QuestParams:
    budget: int = budget_param(256)
    kv_cache: str = kv_cache_param()
    sink: int = sink_param(4)
    window: int = window_param(32)
    page_size: int = param(16, help="cached positions per page", ge=1)
    full_layers: int = param(2, help="first layers that always attend to the whole cache", ge=0)


def _bounds(key: torch.Tensor, valid: torch.Tensor | None, start: int, stop: int, page: int):
    """Per-page min/max of keys[start:stop] (a whole number of pages): two [B, Hkv, P, D] tensors."""
    k = key[:, :, start:stop].float()
    if valid is not None:
        v = valid[:, None, start:stop, None]
        kmin = k.masked_fill(~v, float("inf"))
        kmax = k.masked_fill(~v, float("-inf"))
    else:
        kmin = kmax = k
    b, h, n, d = k.shape
    return (kmin.reshape(b, h, n // page, page, d).amin(3), kmax.reshape(b, h, n // page, page, d).amax(3))


@register
class Quest(SparseAttentionTechnique):
    name = "quest"
    summary = "Baseline: Quest-style query-aware page selection by per-page key min/max bounds"
    Params = QuestParams
    label = "quest"

    def decode(self, layer, state, query, key, valid, scale):
        batch, hkv, length, dim = key.shape
        if layer < self.params.full_layers or self.covers_all(length):
            return None
        page = self.params.page_size
        complete = (length // page) * page
        done = state.extra.get("pages_done", 0)
        if state.extra.get("kmin") is None:  # a new sequence (the state was reset)
            done, state.extra["kmin"], state.extra["kmax"] = 0, None, None
        if complete > done:
            kmin, kmax = _bounds(key, valid, done, complete, page)
            if state.extra["kmin"] is not None:
                kmin = torch.cat([state.extra["kmin"], kmin], 2)
                kmax = torch.cat([state.extra["kmax"], kmax], 2)
            state.extra.update(kmin=kmin, kmax=kmax, pages_done=complete)
        kmin, kmax = state.extra["kmin"], state.extra["kmax"]
        if complete < length:  # the partial last page: bounds on the fly
            tail = key[:, :, complete:].float()
            tmin, tmax = tail.amin(2, keepdim=True), tail.amax(2, keepdim=True)
            kmin = tmin if kmin is None else torch.cat([kmin, tmin], 2)
            kmax = tmax if kmax is None else torch.cat([kmax, tmax], 2)
        g = query.shape[1] // hkv
        q = query.float().reshape(batch, hkv, g, 1, dim)
        upper = torch.maximum(q * kmin[:, :, None], q * kmax[:, :, None]).sum(-1)  # [B, Hkv, G, P]
        upper = upper.sum(2)  # positions of padding-only pages are excluded by `valid` below
        scores = upper.repeat_interleave(page, dim=-1)[..., :length]
        return self.select_top(scores, valid)

