"""Linear layers through oneDNN with weights packed once: the CPU matrix kernel that short token batches need.

On CPU, PyTorch runs `nn.Linear` through MKL's GEMM, which handles a batch of a few tokens badly: on the
2-core machine of docs/results/speculative.md a SmolLM2-135M forward of 2 tokens (400 cached) took 1.7x the time of one
token, 8 tokens 1.6x, and the 49k-row `lm_head` alone took 7.4 ms for one token. oneDNN's inner-product
primitive on weights reordered once into its blocked layout stays memory-bound up to a dozen tokens: the
same forwards took 25.9 ms (1 token), 32.3 ms (8) and 37.8 ms (16) instead of 41.6, 65.2 and 80.2. That is
exactly the shape of a speculative verification step (a tree of drafted tokens) and of plain decoding.

Results equal the default kernel's up to float rounding (a different summation order: logits of SmolLM2
differed by at most 2e-4, the greedy token at every one of 400 positions was the same), so this is not
bit-identical to the unpatched model; greedy text can differ where two logits nearly tie.

The packed copy costs one extra copy of every packed weight in memory. It is made when the patch is applied
and again, lazily, whenever the weight changes (in-place update, new tensor, dtype or device); calls that
need autograd, run under autocast or on another device or dtype take the layer's own forward.

    >>> handle = hfpatch.patch(model, "onednn-linear")        # CPU model, float32 or bfloat16
    >>> model.generate(**inputs, max_new_tokens=64)
    >>> handle.stats["onednn_linear"]                          # packed layers, bytes, calls per path
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ... import primitives
from ...errors import PatchError
from ...catalogue import register
from ...kernels.onednn_linear import PackedLinear, onednn_available
from ...technique import Technique, param


@dataclasses.dataclass
class OneDNNLinearParams:
    include_lm_head: bool = param(
        True, help="also pack the output projection (the largest matrix of a small model; with tied embeddings "
                   "its packed copy is the one extra copy that costs most memory)")


@register
class OneDNNLinear(Technique):
    name = "onednn_linear"
    family = "compute"
    summary = "CPU: nn.Linear layers through oneDNN with weights packed once (fast for 1-16 token batches)"
    Params = OneDNNLinearParams
    claims: ClassVar[frozenset[str]] = frozenset({"linear-forward"})

    def __init__(self, params: Any = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.layers: list[PackedLinear] = []
        self.counters = {"packed_calls": 0, "default_calls": 0, "repacks": 0}

    def _targets(self, model: torch.nn.Module) -> list[torch.nn.Linear]:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # exact type only: subclasses of nn.Linear (quantised layers, adapters) compute something else
        return [m for m in model.modules()
                if type(m) is torch.nn.Linear and (self.params.include_lm_head or m is not output)]

    def apply(self, model: torch.nn.Module, ctx) -> None:
        targets = self._targets(model)
        if not targets:
            raise PatchError("onednn_linear: the model has no torch.nn.Linear layer to pack")
        devices = {m.weight.device.type for m in targets}
        if devices != {"cpu"}:
            raise PatchError(f"onednn_linear is a CPU technique, but the model's linear layers are on "
                             f"{sorted(devices)}; on an accelerator the default kernels already handle small "
                             f"batches well, so leave it out of the recipe there")
        dtypes = {m.weight.dtype for m in targets}
        for dtype in dtypes:
            ok, why = onednn_available(dtype)
            if not ok:
                raise PatchError(f"onednn_linear cannot run here: {why}; load the model in float32 "
                                 f"(or bfloat16 on a CPU that supports it) or leave the technique out")
        self.layers = []
        for module in targets:
            layer = PackedLinear(module, self.counters)
            ctx.record(primitives.replace_forward(module, layer))
            self.layers.append(layer)
        ctx.record(self._release)

    def _release(self) -> None:
        self.layers = []

    def stats(self) -> dict[str, Any]:
        return {"packed_layers": len(self.layers),
                "packed_mib": round(sum(layer.packed_bytes for layer in self.layers) / 2**20, 1),
                **self.counters}
