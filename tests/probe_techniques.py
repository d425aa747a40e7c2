"""Test-only techniques that exercise every primitive, and one that fails on purpose.

Importing this module registers them; they are not part of hfpatch.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hfpatch import primitives
from hfpatch.catalogue import register
from hfpatch.technique import Technique, param


@dataclasses.dataclass
class ProbeParams:
    scale: float = param(0.5, help="factor applied to attention outputs", gt=0.0)
    budget: int = param(16, help="unused; lets override tests find a parameter", ge=1)


@register
class ProbeAllPrimitives(Technique):
    """Changes the model through every primitive, so a round trip checks every undo."""

    name = "probe_all_primitives"
    family = "test"
    summary = "test-only: touches the model through every primitive"
    Params = ProbeParams
    claims = frozenset({"attention"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def apply(self, model, ctx):
        scale = self.params.scale

        def attention(module, query, key, value, attention_mask, **kwargs):
            out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return out * scale, weights

        sub = ("text_config",) if ctx.adapter.is_vlm else None
        _, undo = primitives.use_attention_function(model, attention, sub_configs=sub, label="probe")
        ctx.record(undo)
        ctx.record(primitives.set_config_field(model, "hfpatch_probe_field", 123))

        def count(module, args, kwargs, output):
            self.calls += 1

        ctx.record(primitives.add_forward_hook(model, count))
        norm = ctx.adapter.final_norm()
        original_forward = norm.forward
        ctx.record(primitives.replace_forward(norm, lambda hidden: original_forward(hidden) * 1.25))
        layer0 = ctx.adapter.decoder_layers()[0]
        mlp_name = "mlp"
        original_mlp = getattr(layer0, mlp_name)

        class DoubledMLP(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, *args, **kwargs):
                return self.inner(*args, **kwargs) * 2.0

        ctx.record(primitives.replace_module(layer0, mlp_name, DoubledMLP(original_mlp)))

        def generate(original, *args, **kwargs):
            self.calls += 1000
            return original(*args, **kwargs)

        ctx.record(primitives.wrap_generate(model, generate))

    def stats(self):
        return {"calls": self.calls}


@register
class ProbeFailing(Technique):
    """Applies a change, then raises: the patcher must undo this and every earlier technique."""

    name = "probe_failing"
    family = "test"
    summary = "test-only: fails half-way through apply"
    Params = ProbeParams

    def apply(self, model, ctx):
        ctx.record(primitives.add_forward_hook(model, lambda *a, **k: None))
        ctx.record(primitives.set_attribute(model, "hfpatch_probe_attr", 1))
        raise RuntimeError("injected failure")


@dataclasses.dataclass
class OtherParams:
    budget: int = param(8, help="shares a name with ProbeParams.budget", ge=1)


@register
class ProbeHook(Technique):
    """Adds one hook; no claims, so it composes with anything."""

    name = "probe_hook"
    family = "test"
    summary = "test-only: adds a forward hook that adds a constant to the logits"
    Params = OtherParams

    def apply(self, model, ctx):
        def shift(module, args, kwargs, output):
            output.logits = output.logits + 1.0
            return output

        ctx.record(primitives.add_forward_hook(model, shift))
