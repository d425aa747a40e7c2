"""Shared machinery of the sparse decode attention techniques.

Every technique here installs one per-instance attention function (``primitives.use_attention_function``,
registered with sdpa's mask builder, so padding masks keep arriving). Calls that are not a decode step
(prefill, a multi-token step such as speculative tree verification, training, a sliding-window layer)
run transformers' own sdpa attention unchanged. Decode steps (one query token over a cache) go to the
technique's ``decode`` method, which either returns ``None`` (attend to everything) or an index set of
cached positions to attend to, served by the ``sparse_decode_attention`` kernel.

Per-sequence state (what the last full step selected, page bounds, ...) lives on the technique instance,
one ``LayerState`` per layer, never on a class or module. A step continues a sequence when the cache
grew by exactly one position in the same batch; anything else (a new ``generate`` call, a cropped cache
after speculative verification, a different batch) starts over with a full step.

Shared parameters: ``budget`` = how many cached context positions a sparse step attends to (sinks and
recent window included), ``sink`` = first valid positions always kept, ``window`` = most recent positions
always kept. The current token is always attended. When ``budget`` covers the whole cache the step is
plain full attention, so a budget >= the context length gives the unpatched logits.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, ClassVar

import torch

from ... import arch, compat, primitives
from ...cache import growable_cache
from ...kernels import (
    ENV_VAR,
    CompiledKernel,
    KernelOp,
    cpu_build,
    group_attention_scores,
    select_positions,
    sparse_decode_attention,
    with_forced_first,
)
from ...technique import Technique, param

#: Attention implementations whose masks and numerics the sparse path reproduces. Full steps run sdpa.
SUPPORTED_IMPLEMENTATIONS = (None, "sdpa", "eager")


def budget_param(default: int = 256):
    return param(default, help="cached context positions attended in a sparse decode step (sinks and recent "
                               "window included); >= the context length gives full attention", ge=1)


def sink_param(default: int = 4):
    return param(default, help="first (non-padding) positions always attended (attention sinks)", ge=0)


def window_param(default: int = 32):
    return param(default, help="most recent positions always attended", ge=0)


def kv_cache_param(default: str = "growable"):
    return param(default, choices=("growable", "dynamic"),
                 help="cache that generate() builds when the caller passes none: 'growable' appends in place "
                      "(hfpatch.cache; transformers' DynamicCache copies the whole cache every step: 1.10x slower "
                      "decoding at 8k, docs/results/sparse-attention.md), 'dynamic' leaves transformers' DynamicCache")


@dataclasses.dataclass
class LayerState:
    """What one layer remembers about the sequence being decoded."""

    batch: int = -1
    seq_len: int = 0  # cache length (positions) at the last call seen
    full_len: int = 0  # cache length at the last full (selecting) step
    index: torch.Tensor | None = None  # [B, Hkv, K] positions chosen at the last full step
    query: torch.Tensor | None = None  # [B, Hq, D] query of the last full step
    steps_since_full: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def key_validity(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """``[B, S]`` bool of attendable cached positions for a one-token query, or None when all are."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask[..., -length:].expand(batch, length)
    return None if bool(mask.all()) else mask


def _growable_cache_problem(model, kwargs) -> str | None:
    """Why ``generate`` should keep transformers' own cache for this call, or None."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return "the caller passed a cache"
    config = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        return "use_cache=False"
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation is not None:
        return f"cache_implementation={implementation!r}"
    if not compat.uses_default_dynamic_cache(model):
        return "the model does not use a DynamicCache"
    return None


def _capacity_hint(model, args, kwargs) -> int | None:
    """Prompt length + new tokens of a ``generate`` call, to size the cache buffers once (None if unknown)."""
    ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids")
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if ids is None or ids.dim() < 2:
        return None
    if new is not None:
        return ids.shape[1] + int(new)
    longest = kwargs.get("max_length", getattr(config, "max_length", None))
    return int(longest) if longest and longest > ids.shape[1] else None


class SparseAttentionTechnique(Technique):
    """Base of the sparse decode attention techniques (subclasses implement ``decode``)."""

    family = "attention"
    claims: ClassVar[frozenset[str]] = frozenset({"attention"})
    model_types: ClassVar[frozenset[str]] = frozenset(arch.supported_model_types("decoder"))
    #: label of the registered attention function (shows up in config._attn_implementation)
    label: ClassVar[str] = "sparse"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.layers: dict[int, LayerState] = {}
        self._stats: dict[str, Any] = {}
        self.reset_stats()

    # ---------------------------------------------------------------------------------------------
    # patching

    def supports(self, model) -> tuple[bool, str]:
        ok, reason = super().supports(model)
        if not ok:
            return ok, reason
        impl = compat.attn_implementation(model.config.get_text_config())
        if impl not in SUPPORTED_IMPLEMENTATIONS:
            return False, (
                f"{self.name} computes decode attention over a subset of the KV cache and needs the 'sdpa' (or "
                f"'eager') attention implementation, but this model uses {impl!r}; load it with "
                f"attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) and patch again"
            )
        return True, ""

    def apply(self, model, ctx) -> None:
        self.layers.clear()
        self.reset_stats()
        self.num_layers = len(ctx.adapter.decoder_layers())
        self.kernel_fallback = self._prepare_kernels(ctx.adapter)
        # Multi-token steps (prefill, speculative tree verification) go to sdpa with the mask they were given.
        _, undo = primitives.use_attention_function(model, self._attention, mask_like="sdpa", label=self.label,
                                                    accepts_tree_mask=True)
        ctx.record(undo)
        ctx.record(self.layers.clear)
        if getattr(self.params, "kv_cache", "dynamic") == "growable":
            ctx.record(primitives.wrap_generate(
                model, lambda original, *args, **kwargs: self._generate(model, original, args, kwargs)))

    def kernel_ops(self) -> tuple[KernelOp, ...]:
        """The kernel ops this technique's decode steps dispatch to with these parameters (their compiled CPU
        sources are built in ``patch()``)."""
        return (sparse_decode_attention,)

    def _prepare_kernels(self, adapter) -> str | None:
        """Build (or load the cached build of) the compiled CPU kernels this technique will dispatch to, now
        rather than inside the first decode step of a user's ``generate``; returns None when every one is
        ready (or none is needed), else which implementation decode steps fall back to and why (warned once)."""
        sources = sorted({op.cpu.source for op in self.kernel_ops() if isinstance(op.cpu, CompiledKernel)})
        params = list(adapter.language_model.parameters())
        if not sources or not any(p.device.type == "cpu" for p in params):
            return None  # accelerator models dispatch to Triton or the reference: nothing to compile
        if os.environ.get(ENV_VAR, "").strip().lower() == "torch":
            return f"reference (torch): {ENV_VAR}=torch turns the compiled kernels off"
        dtypes = {p.dtype for p in params if p.is_floating_point()}
        if dtypes and torch.float32 not in dtypes:
            # the compiled kernels take float32 only; building them would not change what runs
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
            return f"reference (torch): the compiled CPU kernels take float32 tensors, this model is {names}"
        failures = {source: reason for source in sources if (reason := cpu_build.build(source)) is not None}
        if not failures:
            return None
        why = "; ".join(f"{source}: {reason}" for source, reason in failures.items())
        warnings.warn(
            f"{self.name}: the compiled CPU kernel could not be built here ({why}); decode steps run the "
            "pure-torch reference instead (same results, slower). Install a C++ compiler and ninja "
            "(pip install ninja), then run `hfpatch kernels build` and patch again; "
            f"{ENV_VAR}=torch chooses the reference without trying to build.", RuntimeWarning, stacklevel=3)
        return f"reference (torch): the compiled CPU kernel did not build ({why})"

    def _generate(self, model, original, args, kwargs):
        """``generate`` with an in-place KV cache when the caller brings none (see ``hfpatch.cache``)."""
        problem = _growable_cache_problem(model, kwargs)
        if problem is None:
            cache = growable_cache(model.config, _capacity_hint(model, args, kwargs))
            kwargs = {**kwargs, compat.cache_kwarg(model): cache}
        out = original(*args, **kwargs)
        # after the call: the prefill resets the statistics
        self._stats["kv_cache"] = "growable" if problem is None else f"transformers' ({problem})"
        return out

    # ---------------------------------------------------------------------------------------------
    # statistics

    def reset_stats(self) -> None:
        self._stats = {
            "decode_steps": 0,  # decode forwards seen (counted at layer 0)
            "sparse_layer_steps": 0,  # (layer, step) pairs served by the sparse kernel
            "full_layer_steps": 0,  # decode (layer, step) pairs served by full attention
            "short_context_layer_steps": 0,  # of those, full because the budget covered the whole cache
            "multi_token_steps": 0,  # forwards with several new tokens over a cache (e.g. tree verification)
            "attended_positions": 0,
            "cached_positions": 0,
            "kernel": None,
            "kv_cache": None,  # which cache the last generate() used (set by the generate wrapper)
        }

    def stats(self) -> dict[str, Any]:
        """Counts since the last prefill: sparse vs full (layer, step) pairs and the attended fraction."""
        out = dict(self._stats)
        # None when the compiled kernels were ready at patch time; else the fallback and why
        out["kernel_fallback"] = getattr(self, "kernel_fallback", None)
        total = out["sparse_layer_steps"] + out["full_layer_steps"]
        out["sparse_fraction"] = out["sparse_layer_steps"] / total if total else 0.0
        attended, cached = out.pop("attended_positions"), out.pop("cached_positions")
        # fraction of cached positions read by sparse steps (full steps read everything)
        out["attended_fraction_sparse_steps"] = attended / cached if cached else 1.0
        if out["multi_token_steps"]:
            out["note"] = "multi-token steps over a cache (e.g. speculative verification) used full attention"
        return out

    # ---------------------------------------------------------------------------------------------
    # the attention function

    def _full(self, module, query, key, value, attention_mask, scaling, dropout, kwargs):
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    def _state(self, layer: int, batch: int, length: int) -> LayerState:
        """This layer's state, reset unless this call continues the sequence by exactly one position."""
        state = self.layers.get(layer)
        if state is None or state.batch != batch or length != state.seq_len + 1:
            state = LayerState(batch=batch)
            self.layers[layer] = state
        state.seq_len = length
        return state

    def _attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, _, q_len, dim = query.shape
        length = key.shape[2]
        layer = getattr(module, "layer_idx", 0) or 0
        decode = (q_len == 1 and length > 1 and not module.training and kwargs.get("softcap") is None
                  and getattr(module, "sliding_window", None) is None and query.dim() == 4)
        if not decode:
            if q_len > 1:
                if length == q_len and layer == 0:
                    self.reset_stats()  # a new sequence: stats describe the call that starts here
                elif length > q_len and layer == 0:
                    self._stats["multi_token_steps"] += 1
                self.layers[layer] = LayerState(batch=batch, seq_len=length)
            else:
                self.layers.pop(layer, None)
            return self._full(module, query, key, value, attention_mask, scaling, dropout, kwargs)

        if layer == 0:
            self._stats["decode_steps"] += 1
        state = self._state(layer, batch, length)
        scale = dim ** -0.5 if scaling is None else scaling
        valid = key_validity(attention_mask, batch, length)
        out, index = self.attend(layer, state, query[:, :, 0, :], key, value, valid, scale)
        if out is None or index is None:
            self._stats["full_layer_steps"] += 1
            if out is not None:  # full attention the technique computed itself (e.g. with its scores)
                return out[:, None].contiguous(), None
            if index is not None:
                self._stats["short_context_layer_steps"] += 1
            return self._full(module, query, key, value, attention_mask, scaling, dropout, kwargs)
        self._stats["sparse_layer_steps"] += 1
        self._stats["attended_positions"] += index.shape[-1]
        self._stats["cached_positions"] += length
        return out[:, None].contiguous(), None  # [B, 1, Hq, Dv]

    # ---------------------------------------------------------------------------------------------
    # helpers for subclasses

    def attend(self, layer: int, state: LayerState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None, scale: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(out [B, Hq, Dv], index)`` of a sparse decode step, ``(None, index-or-None)`` for full attention
        by sdpa, or ``(out, None)`` for full attention the technique computed itself.

        The default attends with ``sparse_decode_attention`` to the positions ``decode`` chose; a technique
        that selects and attends in one fused kernel overrides this instead of ``decode``."""
        index = self.decode(layer, state, query, key, valid, scale)
        if index is None or index.shape[-1] >= key.shape[2]:
            return None, index
        if self._stats["kernel"] is None:
            self._stats["kernel"] = sparse_decode_attention.resolve_backend(query, key, value, index)
        return sparse_decode_attention(query, key, value, index, valid, scale=scale), index

    def decode(self, layer: int, state: LayerState, query: torch.Tensor, key: torch.Tensor,
               valid: torch.Tensor | None, scale: float) -> torch.Tensor | None:  # pragma: no cover - abstract
        """Index set ``[B, Hkv, N]`` for this decode step, or None for full attention."""
        raise NotImplementedError

    def covers_all(self, length: int) -> bool:
        """True when the budget reaches the whole cache: the step is full attention."""
        return self.params.budget >= length

    def score_and_select(self, query, key, valid, scale, *, reduce_all_heads: bool = False) -> torch.Tensor:
        """Top-``budget`` positions by this step's attention scores summed over each KV group's query heads
        (or over all heads, broadcast to every KV head), sinks/window/current token forced in."""
        return self.select_top(group_attention_scores(query, key, valid, scale=scale), valid,
                               reduce_all_heads=reduce_all_heads)

    def select_top(self, scores, valid, *, reduce_all_heads: bool = False) -> torch.Tensor:
        """`score_and_select` from scores already computed ([B, H, S], one set per row of H)."""
        batch, heads, _ = scores.shape
        if reduce_all_heads:
            scores = scores.sum(1, keepdim=True)
        scores = with_forced_first(scores, valid, self.params.sink, self.params.window)
        index = select_positions(scores, self.params.budget, valid=valid)
        return index.expand(batch, heads, index.shape[-1]) if reduce_all_heads else index

    @staticmethod
    def with_recent(index: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """``index`` plus every position in ``[start, length)`` (tokens generated since the selection)."""
        if start >= length:
            return index
        recent = torch.arange(start, length, device=index.device, dtype=index.dtype)
        return torch.cat([index, recent.expand(*index.shape[:2], -1)], dim=-1)
