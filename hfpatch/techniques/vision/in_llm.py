"""Pruning visual tokens inside the language model, after decoder layer K (FastV, ToDRE stage 2).

The sequence entering the decoder keeps every token; at a layer chosen by the technique (fixed, as FastV's
K, or decided while the prefill runs, as ToDRE's), some visual tokens stop: every later layer runs on the
shorter sequence, so their hidden states, attention and KV cache hold only the survivors. Layers before it
keep the whole sequence and their full caches.

How it is done, all on this model instance (`InLLMPruner.install`):

- an instance-level wrapper of the top-level model's `forward` reads `input_ids` (which positions are visual
  tokens, through the config's image token ids), the 2-D `attention_mask` (which are padding) and `labels` of
  each call;
- an attention function on the text sub-config only runs the model's own attention implementation
  (sdpa or eager: the numbers are the model's own) and, at the layers the technique observes during a
  prefill, hands it that layer's queries and keys (`LayerAttention`) so it can rank tokens by the
  attention they receive; the vision tower is untouched;
- a forward pre-hook on every decoder layer from the pruning layer on gathers the survivors' hidden states
  (at that layer only), rotary embeddings, position ids and attention-mask rows/columns. Masks are built once
  by the language model with the length of layer 0's cache, which keeps every position; each pruned layer
  takes the columns of the positions its own cache holds (the survivors, then every token added since);
- a forward hook on the last decoder layer puts the pruned sequence back at full length (a dropped token
  carries its hidden state from the pruning layer), so logits, `labels` and `output_hidden_states` keep the
  input's length. Generation reads only the last position, which is always a text token.

Rows of a batch keep the same number of slots (tensors are rectangular). Padding positions are dropped
first (they are masked anyway); a row that drops fewer tokens than the longest-shrinking row keeps some
dropped tokens as "dead" slots: present in the tensors but masked as keys for every query, so each row's
result is what it would be alone. Decode steps then attend to `kept + new` positions at the pruned layers.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ... import compat, primitives
from ...errors import HfpatchError, UnsupportedModelError

#: attention implementations whose 4-D masks the pruner can slice (flash kernels take no such mask)
SUPPORTED_IMPLEMENTATIONS = (None, "eager", "sdpa")


#: VLM types whose language model the pruner has been tested on (tiny models of each in tests)
IN_LLM_MODEL_TYPES = frozenset({"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm"})


def visual_token_ids(model) -> tuple[int, ...]:
    """The placeholder token ids a VLM's images (and videos) occupy in `input_ids`, from its config."""
    config = model.config
    ids = []
    for field in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    if not ids:
        raise UnsupportedModelError(f"{type(model).__name__} names no image token id in its config "
                                    "(image_token_id); visual tokens cannot be found in its input_ids")
    return tuple(ids)


class InLLMPruningError(HfpatchError, RuntimeError):
    """A call continued a sequence whose pruned cache does not match what the pruner recorded."""


@dataclasses.dataclass
class PruneEvent:
    """One pruning of a sequence: from decoder layer `layer` on, only the `keep` positions exist."""

    layer: int  # first decoder layer that runs on the pruned sequence
    keep: torch.Tensor  # [B, L'] original positions of the slots kept, ascending per row
    dead: torch.Tensor | None  # [B, L'] True for slots kept only for shape (masked as keys), None if none
    length: int  # L: length of the prefill sequence
    cache: Any = None  # weak reference to the cache the pruned layers wrote (None without a cache)

    @property
    def kept_len(self) -> int:
        return self.keep.shape[1]


class LayerAttention:
    """The queries and keys of one decoder layer in a prefill, with the attention probabilities they give.

    `query` [B, Hq, L, D] and `key` [B, Hkv, L, D] after RoPE (what the model's attention receives); the
    probabilities are computed on demand in float32, with the layer's own mask, scaling and soft-cap.
    """

    def __init__(self, layer: int, query, key, mask, scaling: float | None, softcap: float | None):
        self.layer = layer
        self.query, self.key, self.mask = query, key, mask
        self.scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        self.softcap = softcap
        self._last: torch.Tensor | None = None

    @torch.no_grad()
    def _probs(self, rows: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [B, Hq, R, L] of the query rows `rows` (1-D index) over every key (scores for a
        choice, never part of a gradient)."""
        query = self.query[:, :, rows].float()
        groups = query.shape[1] // self.key.shape[1]
        key = self.key.float().repeat_interleave(groups, dim=1)
        logits = query @ key.transpose(-1, -2) * self.scaling
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        length = key.shape[2]
        if self.mask is not None:
            mask = self.mask[:, :, rows][..., -length:]
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        else:  # no mask: causal over the whole sequence
            positions = torch.arange(length, device=logits.device)
            allowed = positions[None, :] <= rows.to(logits.device)[:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        # a fully masked row (a padding query) gives zeros, not NaN
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def last_query(self) -> torch.Tensor:
        """[B, L]: the attention the last position pays to each position, averaged over heads (FastV's score)."""
        if self._last is None:
            rows = torch.tensor([self.query.shape[2] - 1], device=self.query.device)
            self._last = self._probs(rows)[:, :, 0].mean(1)
        return self._last

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, L]: the attention paid to each position by the query rows `rows` ([B, L] bool), averaged over
        those rows and the heads (rows with no selected query give zeros)."""
        index = rows.any(0).nonzero().flatten()
        if index.numel() == 0:
            return torch.zeros(rows.shape, device=self.query.device)
        probs = self._probs(index).mean(1)  # [B, R, L]
        weights = rows[:, index].float().to(probs.device)  # [B, R]
        total = weights.sum(1, keepdim=True).clamp_min(1.0)
        return (weights[:, :, None] * probs).sum(1) / total


#: decide(layer, attention, visual [B, L] bool, valid [B, L] bool) -> drop [B, L] bool or None
Decide = Callable[[int, LayerAttention, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def visual_spans(visual_row: torch.Tensor) -> list[tuple[int, int]]:
    """The [start, end) runs of True in a 1-D bool tensor: the images of one row (adjacent images form one
    run, since nothing in the token ids separates them)."""
    flags = visual_row.to(torch.int8).cpu()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), flags, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def build_event(layer: int, drop: torch.Tensor, valid: torch.Tensor, length: int) -> PruneEvent | None:
    """The slots each row keeps when it drops `drop` ([B, L] bool) from `layer` on; None when nothing drops.

    Padding positions (`~valid`) go too. Rows keep equally many slots: a row that drops fewer positions
    keeps some dropped ones as dead slots, padding first (it is masked already), then dropped tokens.
    """
    drop = drop & valid
    if not bool(drop.any()):
        return None
    gone = drop | ~valid
    kept_len = int((~gone).sum(1).max())
    # priority 0 = kept, 1 = padding, 2 = dropped token; smallest (priority, position) first
    priority = torch.where(drop, 2, torch.where(gone, 1, 0))
    positions = torch.arange(length, device=drop.device)
    order = (priority * (length + 1) + positions).topk(kept_len, dim=1, largest=False).indices
    keep = order.sort(dim=1).values
    dead = gone.gather(1, keep)
    return PruneEvent(layer=layer, keep=keep, dead=dead if bool(dead.any()) else None, length=length)


def _gather_rows(tensor: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` with its sequence dimension `dim` reduced to the positions `keep` ([B, L'], one row per batch
    row); the batch dimension is the one right before `dim` (a batch of 1 is broadcast)."""
    batch_dim = dim - 1
    shape = list(tensor.shape)
    shape[batch_dim] = keep.shape[0]
    tensor = tensor.expand(shape)
    index_shape = [1] * tensor.dim()
    index_shape[batch_dim], index_shape[dim] = keep.shape
    index = keep.to(tensor.device).view(index_shape)
    expand = list(tensor.shape)
    expand[dim] = keep.shape[1]
    return tensor.gather(dim, index.expand(expand))


def _slice_mask(mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A 4-D mask [B|1, 1|H, q, S] reduced to the key columns `columns` ([B, C], one row per batch row);
    transposed, the same reduces query rows."""
    batch = columns.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    index = columns.to(mask.device)[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], -1)
    return mask.gather(3, index)


class InLLMPruner:
    """The in-decoder pruning machinery of one patched model (see the module docstring).

    `observe(layer)` says at which layers a prefill's attention is handed to `decide`; `decide` returns the
    positions to drop from the next layer on, or None. Statistics of the last prefill are in `stats`.
    """

    def __init__(self, name: str, observe: Callable[[int], bool], decide: Decide):
        self.name = name
        self.observe = observe
        self.decide = decide
        self.event: PruneEvent | None = None
        self.stats: dict[str, Any] = {}
        self._visual: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._prefill_start: float | None = None
        self._skip: str | None = None  # why the current call is not pruned, decided before the decoder runs
        self._call: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------
    # installing

    def install(self, model, ctx, visual_token_ids: tuple[int, ...]) -> None:
        """Hook this model instance (every change recorded on `ctx`).

        A technique that changes the sequence before the language model reads it (ToDRE's stage 1) then says
        where the visual tokens went with `set_masks`.
        """
        adapter = ctx.adapter
        text_config = adapter.text_config()
        implementation = compat.attn_implementation(text_config)
        if implementation not in SUPPORTED_IMPLEMENTATIONS and not str(implementation).startswith("hfpatch_"):
            raise UnsupportedModelError(
                f"{self.name} slices the 4-D attention masks of the language model and needs its 'sdpa' or 'eager' "
                f"attention, but it uses {implementation!r}; load the model with attn_implementation='sdpa' (or call "
                f"model.set_attn_implementation('sdpa')) and patch again")
        self.visual_token_ids = torch.tensor(sorted(visual_token_ids), dtype=torch.long)
        self.layers = adapter.decoder_layers()
        self.num_layers = len(self.layers)
        # a sliding-window layer's mask is rebuilt at decode steps with its window over original positions
        self.sliding_windows = [getattr(attention, "sliding_window", None) for attention in adapter.attention_modules()]
        # masks this layer builds itself take the form the attention function expects: eager adds a float mask
        self._mask_kind = "float" if compat.uses_eager_masks(implementation) else "bool"
        delegate_name = implementation

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            layer = getattr(module, "layer_idx", None)
            call = self._call
            if (call.get("scoring") and layer is not None and self.event is None and query.shape[2] == key.shape[2]
                    and query.shape[2] == call["length"] and self.observe(layer)):
                seen = LayerAttention(layer, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"))
                self._decide(layer, seen)
            return compat.attention_function(delegate_name, module)(module, query, key, value, attention_mask,
                                                                    *args, **kwargs)

        sub = adapter.text_sub_config()
        mask_like = "eager" if implementation is None else implementation
        _, undo = primitives.use_attention_function(model, attention, mask_like=mask_like,
                                                    sub_configs=(sub,) if sub else None, label=f"{self.name}_scores")
        ctx.record(undo)
        # the top-level forward is wrapped on the instance rather than hooked: PEFT's tuner calls
        # `model.forward(...)` directly, past any forward hook, and stale inputs must never be read
        ctx.record(primitives.wrap_method(
            adapter.model, "forward", lambda original, *args, **kwargs: self._outer(original, args, kwargs)))
        for index, layer in enumerate(self.layers):
            ctx.record(primitives.add_forward_hook(layer, self._layer_pre_hook(index), pre=True))
        ctx.record(primitives.add_forward_hook(self.layers[-1], self._last_layer_hook))
        ctx.record(self.reset)

    def reset(self) -> None:
        """Forget the sequence in progress (patch removal, or a new sequence)."""
        self.event = None
        self._prefill_start = None
        self._skip = None
        self._visual = self._valid = None
        self._call = {}

    # ------------------------------------------------------------------------------------------------
    # reading each call's inputs

    def set_inputs(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Record which positions of the next forward are visual tokens and which are padding."""
        if input_ids is None or input_ids.dim() != 2:
            self._visual = None
        else:
            self._visual = torch.isin(input_ids, self.visual_token_ids.to(input_ids.device))
        self._valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None

    def set_masks(self, visual: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Say directly which positions of the sequence the language model is about to read are visual tokens and
        which are real (not padding): for a technique that changed the sequence after `input_ids` were read."""
        self._visual = visual.bool()
        self._valid = None if valid is None else valid.bool()

    def padding_mask(self) -> torch.Tensor | None:
        """The `[B, L]` mask of real positions of the current call's `input_ids` (None when none was given)."""
        return self._valid

    def _outer(self, original, args, kwargs):
        """The top-level forward: read this call's input ids, padding mask and labels, then run it."""
        try:
            inputs = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        except TypeError:  # let the model itself raise its own error for a bad call
            inputs = kwargs
        inputs = {**inputs.pop("kwargs", {}), **inputs}
        input_ids = inputs.get("input_ids")
        self.set_inputs(input_ids if isinstance(input_ids, torch.Tensor) else None, inputs.get("attention_mask"))
        # as the pre-LLM techniques do: a loss is over every input position, so such a call is not pruned
        self._skip = ("labels were given: the loss needs every position of the sequence, so the call was not pruned"
                      if inputs.get("labels") is not None else None)
        return original(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # deciding

    def _start_prefill(self, batch: int, length: int, cache) -> None:
        self.event = None
        self._prefill_start = time.perf_counter()
        # what the call said about its inputs is read once: a later forward that does not say it again (a
        # direct language-model call) is not pruned from stale inputs
        visual, valid, reason = self._visual, self._valid, self._skip
        self._visual = self._valid = self._skip = None
        self.stats = {"pruned": False, "sequence_length": length}
        if reason is not None:
            pass
        elif visual is None:
            reason = "no input_ids reached the model (inputs_embeds only), so visual positions are unknown"
        elif tuple(visual.shape) != (batch, length):
            reason = (f"the language model received {length} positions but input_ids had {visual.shape[-1]} "
                      "(a chunked prefill, or another patch changed the sequence before the decoder)")
        elif not bool(visual.any()):
            reason = "no visual tokens in the input"
        if reason is not None:
            self.stats["reason"] = reason
            self._call = {"scoring": False}
            return
        if valid is None or tuple(valid.shape) != (batch, length):
            valid = torch.ones(batch, length, dtype=torch.bool, device=visual.device)
        self._call = {"scoring": True, "length": length, "visual": visual, "valid": valid.to(visual.device),
                      "cache": cache}
        self.stats["visual_tokens"] = [int(v) for v in (visual & valid.to(visual.device)).sum(1)]

    def _decide(self, layer: int, seen: LayerAttention) -> None:
        call = self._call
        visual = call["visual"].to(seen.query.device)
        valid = call["valid"].to(seen.query.device)
        drop = self.decide(layer, seen, visual, valid)
        if drop is None or layer + 1 >= self.num_layers:
            return
        event = build_event(layer + 1, drop.to(visual.device), valid, call["length"])
        if event is None:
            return
        cache = call.get("cache")
        event.cache = weakref.ref(cache) if cache is not None else None
        self.event = event
        dropped = drop & valid
        self.stats.update({
            "pruned": True,
            "layer": event.layer,
            "kept_visual_tokens": [int(n) for n in (visual & valid & ~dropped).sum(1)],
            "pruned_sequence_length": event.kept_len,
            "dead_slots": 0 if event.dead is None else int(event.dead.sum()),
        })

    # ------------------------------------------------------------------------------------------------
    # slicing the decoder's inputs

    def _layer_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = compat.call_cache(kwargs)
            if index == 0:
                if cache is None or compat.cache_layer_length(cache, 0) == 0:
                    self._start_prefill(hidden.shape[0], hidden.shape[1], cache)
                else:
                    self._call = {"scoring": False}
            event = self.event
            if event is None or index < event.layer:
                return None
            prefill = self._call.get("scoring", False)
            if prefill:
                return self._slice_prefill(index, event, hidden, args, kwargs)
            return self._slice_decode(index, event, hidden, cache, args, kwargs)

        return hook

    def _slice_prefill(self, index, event, hidden, args, kwargs):
        keep = event.keep.to(hidden.device)
        if index == event.layer:
            self._call["full_hidden"] = hidden
            hidden = _gather_rows(hidden, keep, 1)
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")

        def sliced_mask():
            cut = mask
            if isinstance(cut, torch.Tensor) and cut.dim() == 4:
                cut = _slice_mask(_slice_mask(cut, keep).transpose(2, 3), keep).transpose(2, 3)
            return self._mask_dead(cut, event, hidden, event.kept_len, prefill=True)

        # layers of one type share their mask, rotary tensors and positions: cut each once per forward
        kwargs["attention_mask"] = self._once(mask, sliced_mask)
        embeddings = kwargs.get("position_embeddings")
        if isinstance(embeddings, (tuple, list)):
            kwargs["position_embeddings"] = type(embeddings)(
                self._once(t, lambda t=t: _gather_rows(t, keep.to(t.device), 1)) if t.dim() == 3 else t
                for t in embeddings)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == event.length:
            kwargs["position_ids"] = self._once(position_ids, lambda: _gather_rows(
                position_ids, keep.to(position_ids.device), position_ids.dim() - 1))
        return self._with_hidden(hidden, args, kwargs)

    def _once(self, source, make):
        """`make()` for this forward's `source` tensor (or None), computed at the first layer that asks."""
        done = self._call.setdefault("cut", {})
        key = id(source)
        if key not in done or done[key][0] is not source:
            done[key] = (source, make())  # the source is kept, so its id cannot be reused during the forward
        return done[key][1]

    def _slice_decode(self, index, event, hidden, cache, args, kwargs):
        """A step on a cache that holds the pruned prompt: this layer's mask is built here, from what the prefill
        recorded (the given one takes its length from the first full- or sliding-attention layer's cache, which
        may be a pruned layer or not, so its columns cannot be trusted)."""
        q_len = hidden.shape[1]
        if index == event.layer:
            self._check_cache(event, cache, q_len)
        kwargs = dict(kwargs)
        held = compat.cache_layer_length(cache, index)
        visible = compat.cache_visible_length(cache, index, q_len)
        key = ("decode", held, visible, q_len, self.sliding_windows[index])
        masks = self._call.setdefault("cut", {})
        if key not in masks:  # every pruned layer of one type sees the same slots: one mask per step
            masks[key] = (None, self._decode_mask(index, event, hidden, held, visible))
        kwargs["attention_mask"] = masks[key][1]
        return self._with_hidden(hidden, args, kwargs)

    def _decode_mask(self, index: int, event: PruneEvent, hidden: torch.Tensor, held: int, visible: int):
        """[B, 1, q, C] mask of a pruned layer's step: the layer's cached slots (kept prompt slots, then every
        token added since) as sequence positions; dead slots and padding masked, causal among the new tokens,
        and the sliding window (over original positions) on a sliding-window layer. None when nothing is masked."""
        batch, q_len = hidden.shape[:2]
        device = hidden.device
        added = held - event.kept_len  # `held`: the layer's cached slots before this step's write
        positions = torch.cat([event.keep.to(device),
                               torch.arange(event.length, event.length + added + q_len, device=device).expand(batch, -1)], 1)
        blocked = torch.zeros(positions.shape, dtype=torch.bool, device=device)
        if event.dead is not None:
            blocked[:, : event.kept_len] = event.dead.to(device)
        positions, blocked = positions[:, -visible:], blocked[:, -visible:]
        window = self.sliding_windows[index]
        query_positions = torch.arange(event.length + added, event.length + added + q_len, device=device)
        allowed = (positions[:, None, :] <= query_positions[None, :, None]) & ~blocked[:, None, :]
        if window is not None:  # the window counts original positions, dropped ones included
            allowed &= query_positions[None, :, None] - positions[:, None, :] < window
        if q_len == 1 and bool(allowed.all()):
            return None
        allowed = allowed[:, None]
        if self._mask_kind == "bool":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min)

    def _check_cache(self, event: PruneEvent, cache, q_len: int) -> None:
        if cache is None:
            raise InLLMPruningError(
                f"{self.name}: a step without a cache continued a pruned sequence; call the model on the whole "
                "sequence again (use_cache=False forwards prune each call afresh)")
        if event.cache is not None and event.cache() is not cache:
            raise InLLMPruningError(
                f"{self.name}: this call continues a cache that is not the one the last prefill pruned; start "
                "the sequence again (a fresh prefill) to use it with this patch")
        full_past = compat.cache_layer_length(cache, 0) - q_len  # layer 0 already holds this step's tokens
        expected = event.kept_len + (full_past - event.length)
        held = compat.cache_layer_length(cache, event.layer)
        if held != expected:
            raise InLLMPruningError(
                f"{self.name}: layer {event.layer}'s cache holds {held} positions, expected {expected} ({event.kept_len} "
                f"kept of {event.length} plus {full_past - event.length} added since); the cache was changed "
                "outside this patch (cropped or reordered); start the sequence again")

    def _mask_dead(self, mask, event: PruneEvent, hidden: torch.Tensor, columns: int, *, prefill: bool):
        """The mask with dead slots' key columns masked (a dead query still sees itself, so no row is empty).

        `columns` is the layer's key length, used to build a causal mask where the layer was given none
        (sdpa without padding)."""
        if event.dead is None:
            return mask
        batch, q_len = hidden.shape[:2]
        if mask is None:
            allowed = torch.ones(q_len, columns, dtype=torch.bool, device=hidden.device).tril(columns - q_len)
            allowed = allowed[None, None].expand(batch, 1, q_len, columns)
            if self._mask_kind == "bool":
                mask = allowed
            else:
                mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                    ~allowed, torch.finfo(hidden.dtype).min)
        columns = mask.shape[-1]
        dead_cols = torch.zeros(batch, columns, dtype=torch.bool, device=mask.device)
        dead_cols[:, : event.kept_len] = event.dead.to(mask.device)
        block = dead_cols[:, None, None, :].expand(batch, 1, q_len, columns)
        if prefill:
            block = block & ~torch.eye(q_len, columns, dtype=torch.bool, device=mask.device)[None, None]
        mask = mask.expand(batch, *mask.shape[1:])
        if mask.dtype == torch.bool:
            return mask & ~block
        return mask.masked_fill(block, torch.finfo(mask.dtype).min)

    @staticmethod
    def _with_hidden(hidden, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    # ------------------------------------------------------------------------------------------------
    # the output at full length

    def _last_layer_hook(self, module, args, kwargs, output):
        start, self._prefill_start = self._prefill_start, None
        if start is not None:  # the decoder part of a prefill (layer 0 to the last layer), pruned or not
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.is_cuda:
                torch.cuda.synchronize(hidden.device)
            self.stats["decoder_prefill_seconds"] = time.perf_counter() - start
        full = self._call.get("full_hidden")
        event = self.event
        if full is None or event is None:
            return None
        self._call["full_hidden"] = None
        pruned = output[0] if isinstance(output, tuple) else output
        keep = event.keep.to(pruned.device)
        values = pruned
        if event.dead is not None:  # a dead slot stays what it was at the pruning layer
            values = torch.where(event.dead.to(pruned.device)[..., None], _gather_rows(full, keep, 1), pruned)
        restored = full.clone()
        restored.scatter_(1, keep[..., None].expand(-1, -1, full.shape[-1]), values.to(full.dtype))
        if isinstance(output, tuple):
            return (restored, *output[1:])
        return restored
