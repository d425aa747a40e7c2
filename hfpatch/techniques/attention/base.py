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

Static caches (``generate(..., cache_implementation="static")``, a ``StaticCache``) hand every layer the whole
preallocated ``[B, Hkv, max_cache_len, D]`` buffer, whose tail holds positions not written yet, with a 4-D mask
built for the full buffer. Every call is cut to the written prefix first (views: the user's cache is never
copied or reallocated): its length is the last position any query may attend to, plus one, read from the mask
once per forward and shared by all layers. That is one small host read; a pre-hook on the language model tells
static-cache forwards apart by the cache's type, so multi-token calls on a dynamic cache read nothing, and a
padded decode step reads its mask once instead of once per layer. From there a static-cache decode step is the
same step as on a dynamic cache (same length, sinks, window, top-K and continuation rule), so greedy output
matches the dynamic cache. A forward traced by ``torch.compile`` (``generate`` compiles static-cache decoding
on CUDA unless ``disable_compile=True``) cannot run the data-dependent selection: it runs dense attention and
``stats["fallback_reason"]`` says so.

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


#: why a forward traced by torch.compile runs dense attention (stats["fallback_reason"])
COMPILED_REASON = ("a torch.compile'd forward (generate compiles static-cache decoding on CUDA) ran dense attention: "
                   "sparse selection is data-dependent; pass disable_compile=True to generate() to decode sparse")


def _compiling() -> bool:
    """Whether this call is being traced by torch.compile (dynamo evaluates this to a constant)."""
    return torch.compiler.is_compiling()


def written_prefix(attention_mask: torch.Tensor | None, batch: int, query_length: int,
                   length: int) -> tuple[int, torch.Tensor | None]:
    """``(n, valid)``: how many leading cached positions a call can attend to, and ``[B, n]`` bool of the
    attendable ones among them (None when all are).

    On a dynamic cache ``n`` is ``length``. On a static cache it is the written prefix: the mask row of every
    query stops at the query's own position and the unwritten tail is masked for all of them. Without a mask
    a multi-token call over a longer cache is sdpa's top-left causal attention (transformers skips the mask
    of a static-cache prefill that starts at position 0), which never reads past ``query_length``."""
    if attention_mask is None:
        return (query_length if 1 < query_length < length else length), None
    mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None, None, :]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    seen = mask[..., -length:].any(dim=2).any(dim=1)  # [B or 1, length]: attendable by some query
    end = (seen * torch.arange(1, length + 1, device=seen.device)).amax()  # last attendable position + 1
    dense = (seen.sum(-1) == end).all()  # every row attends to all of [0, end): no padding, no holes
    n, dense = torch.stack([end, dense.long()]).tolist()  # the one host read of the call
    n = max(n, 1)
    return n, (None if dense else seen[:, :n].expand(batch, n))


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


def _auto_compile_off(model, kwargs) -> bool:
    """Whether to pass ``disable_compile=True``: the call decodes on a compileable (static) cache on a device
    where transformers compiles such decoding by itself, and the caller did not ask for or against compiling."""
    config = kwargs.get("generation_config") or model.generation_config
    if "disable_compile" in kwargs or kwargs.get("compile_config") is not None or \
            getattr(config, "disable_compile", False) or getattr(config, "compile_config", None) is not None:
        return False
    if getattr(model, "device", torch.device("cpu")).type == "cpu":
        return False  # transformers compiles only on accelerators unless a compile_config says otherwise
    cache = compat.call_cache(kwargs)
    if cache is not None:
        return bool(getattr(cache, "is_compileable", False))
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    # transformers' static kinds (and their deprecated aliases, e.g. 'hybrid'); the dynamic ones never compile
    return implementation is not None and implementation not in ("dynamic", "offloaded", "quantized", "paged")


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
        self._prefix_seen: tuple | None = None  # ((mask, shapes, written_prefix), ...) of the latest forward
        self._static_forward = False  # whether the current forward's cache is a static (compileable) one
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
        ctx.record(lambda: setattr(self, "_prefix_seen", None))  # drop the reference to the last mask
        # which cache each forward runs on: only a static cache's calls need their written prefix read
        ctx.record(primitives.add_forward_hook(ctx.adapter.language_model, self._see_cache, pre=True))
        # generate() is wrapped for the in-place cache (kv_cache='growable') and, on every parameter setting, to
        # keep transformers from compiling static-cache decoding on an accelerator (see _generate)
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
        """``generate`` with an in-place KV cache when the caller brings none (see ``hfpatch.cache``), and
        without transformers' automatic ``torch.compile`` of static-cache decoding, which would trace the
        attention function and so run every decode step dense (``COMPILED_REASON``). A caller who asks for
        compilation (``compile_config``, ``disable_compile=False``) gets it, and the dense fallback is in stats."""
        growable = getattr(self.params, "kv_cache", "dynamic") == "growable"
        problem = _growable_cache_problem(model, kwargs) if growable else "kv_cache='dynamic'"
        if problem is None:
            cache = growable_cache(model.config, _capacity_hint(model, args, kwargs))
            kwargs = {**kwargs, compat.cache_kwarg(model): cache}
        compile_off = _auto_compile_off(model, kwargs)
        if compile_off:
            kwargs = {**kwargs, "disable_compile": True}
        out = original(*args, **kwargs)
        # after the call: the prefill resets the statistics
        if growable:
            self._stats["kv_cache"] = "growable" if problem is None else f"transformers' ({problem})"
        if compile_off:
            self._stats["auto_compile"] = ("off: generate() compiles static-cache decoding on this device, which "
                                           "would run every decode step dense; pass compile_config= to compile "
                                           "(dense) anyway")
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
            "fallback_reason": None,  # why decode steps ran dense although sparse was asked for, if they did
            "auto_compile": None,  # set when generate()'s automatic compile was turned off for the last call
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

    def _see_cache(self, module, args, kwargs) -> None:
        """Forward pre-hook of the language model: note whether this forward runs on a static cache (a type
        fact, no device read)."""
        cache = compat.call_cache(kwargs)
        self._static_forward = bool(getattr(cache, "is_compileable", False))

    def _prefix(self, attention_mask, batch: int, q_len: int, length: int) -> tuple[int, torch.Tensor | None]:
        """``written_prefix`` of this forward's mask, computed at its first layer and reused by the others
        (every full-attention layer of a forward gets the same mask object)."""
        if attention_mask is None:
            return written_prefix(None, batch, q_len, length)
        shapes = (batch, q_len, length)
        for mask, seen_shapes, facts in self._prefix_seen or ():
            if mask is attention_mask and seen_shapes == shapes:
                return facts
        facts = written_prefix(attention_mask, batch, q_len, length)
        # the last two masks: models that alternate full and sliding-window layers pass two per forward
        self._prefix_seen = ((self._prefix_seen or ())[-1:]) + ((attention_mask, shapes, facts),)
        return facts

    def _attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if _compiling():
            # Traced code cannot branch on the selected positions; say so instead of serving dense silently.
            self._stats["fallback_reason"] = COMPILED_REASON
            return self._full(module, query, key, value, attention_mask, scaling, dropout, kwargs)
        batch, _, q_len, dim = query.shape
        if q_len == 1 or self._static_forward:
            n, valid = self._prefix(attention_mask, batch, q_len, key.shape[2])
        else:  # a multi-token call over a dynamic cache (prefill, tree verification) reads nothing: full sdpa
            n, valid = key.shape[2], None
        if n < key.shape[2]:  # a static cache: attend within the written prefix (views, nothing is copied)
            if attention_mask is not None:  # aligned on the last key, as written_prefix reads it
                attention_mask = attention_mask[..., attention_mask.shape[-1] - key.shape[2]:][..., :n]
            key, value = key[:, :, :n], value[:, :, :n]
        if q_len == 1 and valid is None and attention_mask is not None and attention_mask.dtype == torch.bool:
            # every cached position is attendable: no mask, as on a dynamic cache (sdpa's faster path, same numbers)
            attention_mask = None
        length = key.shape[2]
        layer = getattr(module, "layer_idx", 0) or 0
        step = q_len == 1 and length > 1 and not module.training
        if step and layer == 0:  # counted at layer 0 even when it is a sliding-window layer (Gemma 3)
            self._stats["decode_steps"] += 1
        decode = (step and kwargs.get("softcap") is None and getattr(module, "sliding_window", None) is None
                  and query.dim() == 4)
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

        state = self._state(layer, batch, length)
        scale = dim ** -0.5 if scaling is None else scaling
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
