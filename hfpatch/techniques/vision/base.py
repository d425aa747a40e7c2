"""Shared machinery of the visual-token pruning techniques (family "vision").

Where it acts (transformers 5.x): the outer VLM's inner model (`model.model`, e.g. `LlavaModel`) gets an
instance-level `forward` wrapper. At prefill (a call that carries images over an empty cache) the wrapper

1. runs the vision tower and projector through the model's own feature function (`FamilyGlue.encode`), with
   HiPrune's attention recording switched on when the technique needs scores;
2. merges the features into their placeholder positions as the model itself would (`FamilyGlue.merge`), so
   the placeholder count check passes on the full sequence;
3. asks the technique which tokens of each image to keep (`select`), keeps every text token and every token
   the layout marks as always kept (LLaVA-NeXT's image newlines);
4. cuts `inputs_embeds`, `attention_mask`, `position_ids` (and token types) down to the kept positions, left-
   padding rows that end up shorter than the longest (different image counts or sizes per row), and calls the
   original forward with `inputs_embeds` and no pixels.

Survivors keep their original position ids (sliced, not renumbered), so decoding needs no further position
work: `generate` appends `last + 1` to the position ids it built at prefill. What does need work is the
attention mask: `generate` keeps extending the uncompacted 2-D mask, but the cache holds only the kept
positions, so every later call on that cache gets the mask compacted the same way (and, when the caller gives
no position ids, positions continuing from the original length). That state is kept per cache object.

A technique is a `VisionPruningTechnique` subclass with a `Params` dataclass derived from `PruningParams`
(the common `budget` / `keep_ratio`, exactly one) and a `select(image, budget)` method returning a
`Selection`. Nothing else is needed for a technique that chooses visual tokens before the language model;
techniques that prune inside the language model (FastV, ToDRE stage 2) build on the same family glue.
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
import time
import weakref
from typing import Any, ClassVar

import torch

from ... import compat, primitives
from ...errors import UnsupportedModelError
from ...technique import Technique, param
from .families import EncodedImages, ImageLayout, glue_for


def budget_param():
    return param(None, ge=1, help="visual tokens kept per image (image-newline and CLS tokens are kept on top and "
                                  "not counted); give this or keep_ratio, not both")


def keep_ratio_param():
    return param(None, gt=0.0, le=1.0, help="fraction of each image's visual tokens kept (rounded, at least 1); "
                                            "give this or budget, not both")


@dataclasses.dataclass
class PruningParams:
    """The parameters every pruning technique shares: exactly one of `budget` or `keep_ratio`."""

    budget: int | None = budget_param()
    keep_ratio: float | None = keep_ratio_param()

    def __post_init__(self):
        if (self.budget is None) == (self.keep_ratio is None):
            given = "both" if self.budget is not None else "neither"
            raise ValueError(
                f"give exactly one of budget (visual tokens kept per image) or keep_ratio (fraction of each image's "
                f"tokens kept); got {given} (budget={self.budget!r}, keep_ratio={self.keep_ratio!r}). A recipe that "
                f"sets one is switched to the other by overriding it with None, e.g. "
                f"hfpatch.patch(model, 'hiprune-33', budget=64, keep_ratio=None)")

    def tokens_kept(self, selectable: int) -> int:
        """Visual tokens kept of an image with `selectable` patch tokens."""
        if self.budget is not None:
            return min(self.budget, selectable)
        return min(selectable, max(1, round(self.keep_ratio * selectable)))


@dataclasses.dataclass
class ImageTokens:
    """One image as a technique sees it when choosing tokens.

    `features`: `[num_tokens, D]` projected features in placeholder order (what the language model would read).
    `layout`: which tokens are selectable and where they lie on the patch grid (see `families.ImageLayout`).
    `scores`: per vision-tower layer index, a `[num_tokens]` score (the column-mean attention that token
    received in that layer) when the technique asked for attention scores; NaN on tokens without a source.
    `number`: the image's index in this call (0-based, over the whole batch, in placeholder order).
    """

    number: int
    features: torch.Tensor
    layout: ImageLayout
    scores: dict[int, torch.Tensor]


@dataclasses.dataclass
class Selection:
    """What a technique keeps of one image: `index` = sorted positions among the image's tokens (selectable ones
    only; the always-kept tokens are added by the base), and optionally `features` (`[len(index), D]`) that
    replace those tokens' features (pooling merges tokens instead of dropping them)."""

    index: torch.Tensor
    features: torch.Tensor | None = None


def diverse_selection(image: ImageTokens, budget: int, method: str, stats: dict[str, Any]) -> Selection:
    """The `budget` most mutually distant of an image's selectable tokens (`kernels.diverse_select`, `method`
    "max_min" for DivPrune, "k_center" for ToDRE's stage 1), over all its grid segments together; the kernel
    backend that runs is recorded once in `stats["kernel"]`."""
    from ...kernels.diverse_select import diverse_select

    selectable = torch.cat([segment.index for segment in image.layout.segments]).to(image.features.device)
    features = image.features[selectable]
    if stats.get("kernel") is None:
        stats["kernel"] = diverse_select.resolve_backend(features, budget, method=method)
    local = diverse_select(features, budget, method=method)
    return Selection(selectable[local.to(selectable.device)].sort().values)


def split_budget(layout: ImageLayout, budget: int) -> list[int]:
    """Share `budget` among an image's segments in proportion to their sizes (largest remainder, capped by each
    segment's size), so a LLaVA-NeXT image keeps the same fraction of its base and its high-resolution grid."""
    sizes = [len(segment.index) for segment in layout.segments]
    total = sum(sizes)
    exact = [budget * size / total for size in sizes]
    shares = [min(int(x), size) for x, size in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    left = budget - sum(shares)
    while left > 0:
        progressed = False
        for i in order:
            if left and shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return shares


@dataclasses.dataclass
class _SequenceState:
    """What a pruned prefill left behind for the calls that continue on its cache."""

    original_length: int  # sequence length before pruning
    compact_length: int  # positions the cache holds for the prompt
    compact_mask: torch.Tensor  # [B, compact_length] 1 = real token, 0 = padding (original or added)
    padded: bool  # whether compact_mask has zeros (then later calls need a mask even if none is given)


#: attribute under which the feature function's output carries its `EncodedImages`
_ENCODED = "_hfpatch_encoded_images"


def _current_images(encoded: EncodedImages | None, outputs) -> tuple[EncodedImages | None, str | None]:
    """The encoded images as the forward receives them, or (None, why not).

    `generate` with `num_return_sequences` or beams repeats each prompt's images in place on the feature output
    (`pooler_output` becomes `[A, B, A, B]`, the same tensor objects repeated) after the feature call described
    them; each repeated image gets the layout (and the scores) of the image it repeats.
    """
    if encoded is None:
        return None, ("the images came as mm_encoder_outputs that this patch did not see being computed "
                      "(computed before patching, or copied); they are not pruned")
    current = list(getattr(outputs, "pooler_output", encoded.features))
    # a feature tensor's identity is its memory, not the Python object: a pooler_output that is one tensor
    # (Gemma 3: [images, tokens, D]) gives new row views every time it is listed
    def same(tensor):
        return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype

    if len(current) == len(encoded.features) and all(same(a) == same(b) for a, b in zip(current, encoded.features)):
        return encoded, None
    described = {same(features): number for number, features in enumerate(encoded.features)}
    numbers = [described.get(same(features)) for features in current]
    if None in numbers:
        return None, ("the image features were changed after the vision tower ran (not a repetition of the encoded "
                      "images); they are not pruned")
    return dataclasses.replace(encoded, features=current, layouts=[encoded.layouts[n] for n in numbers],
                               numbers=numbers), None


def _unprunable_call(inputs: dict[str, Any], cache) -> str | None:
    """Why a prefill cannot be pruned whatever the images (None when it can)."""
    if getattr(cache, "is_compileable", False):
        return (f"a {type(cache).__name__} (a static, compileable cache) gets masks built for the unpruned sequence "
                "at every step; the call was not pruned (use the default dynamic cache)")
    mask = inputs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return "the attention mask is not a 2-D padding mask (a prepared 4-D mask cannot be cut); the call was not pruned"
    return None


def _bind(original, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positional ones named from the original's signature)."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(original)
    bound = signature.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


class VisionPruningTechnique(Technique):
    """Base of the techniques that keep a subset of each image's visual tokens before the language model.

    Subclasses set `name`, `summary`, `Params` (a `PruningParams` subclass) and implement `select`. A technique
    that reads vision attention (HiPrune) sets `needs_attention_scores = True` and names the layers in
    `scored_layers`: the vision sub-config then selects an attention function that runs those layers through the
    `attention_with_column_sums` kernel while the tower encodes images, and transformers' sdpa everywhere else
    (a tower loaded with eager attention therefore runs sdpa while patched: equal up to float rounding). The
    language model's attention is never touched.

    Calls that are not pruned, each with the reason in `stats()["fallback"]`: a call with `labels` (the loss
    needs every position), images passed as `mm_encoder_outputs` computed before patching, images in a call
    that continues a cache, a static (compileable) cache or a prepared 4-D attention mask (both are built for
    the unpruned sequence). Text-only calls pass through unchanged.
    """

    family = "vision"
    claims: ClassVar[frozenset[str]] = frozenset({"visual-tokens"})
    #: whether `select` reads attention scores of vision layers (`ImageTokens.scores`)
    needs_attention_scores: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._stats: dict[str, Any] = {}
        # per-thread call state, so concurrent calls on one patched model never record into each other's scores
        self._local = threading.local()
        self._recorded_layers: frozenset[int] = frozenset()
        self._layer_of: dict[int, int] = {}
        self.glue = None
        #: `[B, L]` bool: which positions of the last pruned prefill's merged sequence were kept (for inspection)
        self.last_keep: torch.Tensor | None = None
        self.reset_stats()

    @property
    def _recording(self) -> dict[int, torch.Tensor] | None:
        """Column means recorded by the vision attention function during this thread's feature call (else None)."""
        return getattr(self._local, "recording", None)

    @_recording.setter
    def _recording(self, value) -> None:
        self._local.recording = value

    @property
    def _skip(self) -> str | None:
        """Why this thread's current call must not be pruned (set by the outer forward), else None."""
        return getattr(self._local, "skip", None)

    @_skip.setter
    def _skip(self, value) -> None:
        self._local.skip = value

    # ---------------------------------------------------------------------------------------------------
    # what subclasses provide

    def select(self, image: ImageTokens, budget: int) -> Selection:  # pragma: no cover - abstract
        """Choose `budget` (< the image's selectable count) of the image's selectable tokens."""
        raise NotImplementedError

    def scored_layers(self, model) -> frozenset[int]:
        """Vision layer indices (0-based) whose column-mean attention `select` reads (only when
        `needs_attention_scores`)."""
        return frozenset()

    # ---------------------------------------------------------------------------------------------------
    # patching

    def supports(self, model) -> tuple[bool, str]:
        ok, reason = super().supports(model)
        if not ok:
            return ok, reason
        try:
            problem = glue_for(model).problem(model)
        except UnsupportedModelError as exc:
            return False, str(exc)
        if problem:
            return False, f"{self.name} cannot patch this {type(model).__name__}: {problem}"
        if self.needs_attention_scores:
            impl = compat.attn_implementation(model.config.vision_config)
            if impl not in (None, "sdpa", "eager"):
                return False, (f"{self.name} records vision attention scores through its own attention function, "
                               f"which replaces sdpa/eager attention; the vision tower uses {impl!r}: load the model "
                               f"with attn_implementation='sdpa' and patch again")
        return True, ""

    def apply(self, model, ctx) -> None:
        self.glue = glue_for(model)
        self._model = weakref.proxy(model)  # for the glue's position hooks; a proxy keeps no model alive
        self._states = weakref.WeakKeyDictionary()
        self.reset_stats()
        inner = self.glue.inner(model)
        ctx.record(primitives.wrap_method(
            inner, "forward", lambda original, *args, **kwargs: self._forward(model, original, args, kwargs)))
        # a loss over labels needs every position of the sequence: such calls are not pruned (see _outer)
        ctx.record(primitives.wrap_method(
            model, "forward", lambda original, *args, **kwargs: self._outer(original, args, kwargs)))
        # generate() encodes the images before the prefill (mm_encoder_outputs): record scores and layouts there
        ctx.record(primitives.wrap_method(
            inner, self.glue.feature_method,
            lambda original, *args, **kwargs: self._encode(model, original, args, kwargs)))
        if self.needs_attention_scores:
            layers = self.glue.vision_layers(model)
            self._layer_of = {id(module): i for i, layer in enumerate(layers) for module in layer.modules()}
            self._recorded_layers = self.scored_layers(model)
            _, undo = primitives.use_attention_function(model, self._vision_attention, mask_like="sdpa",
                                                        sub_configs=("vision_config",), label=f"{self.name}_vision")
            ctx.record(undo)
        ctx.record(self._forget)

    def _forget(self) -> None:
        self._states = weakref.WeakKeyDictionary()
        self._layer_of = {}

    # ---------------------------------------------------------------------------------------------------
    # statistics

    def reset_stats(self) -> None:
        self._stats = {"pruned": False, "fallback": None, "images": [], "tokens_before": 0, "tokens_after": 0,
                       "kept_fraction": 1.0, "sequence_length_before": None, "sequence_length_after": None,
                       "prefill_seconds": None}

    def stats(self) -> dict[str, Any]:
        """What the last prefill did: per image (`images`: image number, batch row, `tokens` before, `kept`
        after, `kept_fraction`), the totals, the sequence length before/after, the prefill wall time (vision tower,
        selection and language model), `fallback`: why a call with images was not pruned (None if it was), and
        which kernel backend ran ("torch", "triton" or "cpu"): `attention_kernel` for HiPrune's column sums,
        `kernel` for DivPrune's selection.
        Pruning itself is per call and thread-safe; under concurrent calls these statistics describe the
        prefills in whatever order they wrote them (read them after a call when nothing else runs)."""
        out = dict(self._stats)
        out["images"] = [dict(image) for image in self._stats["images"]]
        return out

    # ---------------------------------------------------------------------------------------------------
    # the vision attention function (HiPrune's scores)

    def _vision_attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = self._layer_of.get(id(module))
        if self._recording is not None and layer in self._recorded_layers:
            from ...kernels.vision_attention import attention_with_column_sums

            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min)
            if getattr(self._local, "kernel", None) is None:  # which implementation the dispatch picks, once per call
                self._local.kernel = attention_with_column_sums.resolve_backend(query, key, value, float(scaling),
                                                                                attention_mask)
            output, column_sums = attention_with_column_sums(query, key, value, float(scaling), attention_mask)
            # a mean over heads and queries: the paper's column-mean attention
            sums = column_sums.float() / (query.shape[1] * query.shape[2])
            # a tower that attends per image or per window (Qwen2-VL) calls a layer once per chunk, in sequence order
            previous = self._recording.get(layer)
            self._recording[layer] = sums if previous is None else torch.cat([previous, sums], dim=-1)
            return output.transpose(1, 2).contiguous(), None
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)

    # ---------------------------------------------------------------------------------------------------
    # the forward wrapper

    def _encode(self, model, original, args, kwargs):
        """The inner model's feature function, recording attention scores (when asked for) and describing the
        result's layout on the returned output (`_ENCODED` attribute), where the forward finds it."""
        arguments = _bind(original, args, kwargs)
        start = time.perf_counter()
        if self.needs_attention_scores:
            self._recording = {}
            self._local.kernel = None
        try:
            outputs = original(*args, **kwargs)
            recorded = self._recording or {}
        finally:
            self._recording = None
        encoded = self.glue.describe(model, arguments, outputs)
        encoded.scores = {layer: values.reshape(-1) for layer, values in recorded.items()}
        encoded.seconds = time.perf_counter() - start
        encoded.kernel = getattr(self._local, "kernel", None)
        object.__setattr__(outputs, _ENCODED, encoded)  # a plain attribute: not a field of the ModelOutput
        return outputs

    def _outer(self, original, args, kwargs):
        """The outer model's forward: a call with labels runs unpruned (the loss is over every input position, and
        a pruned sequence would no longer line up with the labels)."""
        if _bind(original, args, kwargs).get("labels") is None:
            return original(*args, **kwargs)
        self._skip = "labels were given: the loss needs every position of the sequence, so the call was not pruned"
        try:
            return original(*args, **kwargs)
        finally:
            self._skip = None

    def _forward(self, model, original, args, kwargs):
        inputs = _bind(original, args, kwargs)
        cache = compat.call_cache(inputs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        glue = self.glue
        skip = self._skip or (_unprunable_call(inputs, cache) if past == 0 else None)
        if past == 0 and (glue.has_images(inputs) or glue.precomputed(inputs)) and skip:
            self.reset_stats()
            self._stats["fallback"] = skip
        elif past == 0 and (glue.has_images(inputs) or glue.precomputed(inputs)):
            start = time.perf_counter()
            self.reset_stats()
            if glue.has_images(inputs):
                outputs = glue.encode(model, inputs)
            else:
                outputs = glue.precomputed_outputs(inputs)
            encoded = getattr(outputs, _ENCODED, None)
            if encoded is not None and not glue.has_images(inputs):
                start -= encoded.seconds  # generate() ran the tower before this call: count it in the prefill
            encoded, problem = _current_images(encoded, outputs)
            if encoded is not None:
                return self._prefill(model, original, inputs, cache, encoded, start)
            self._stats["fallback"] = problem
        state = self._states.get(cache) if cache is not None and past > 0 else None
        if state is not None:
            if glue.has_images(inputs) or glue.precomputed(inputs):
                self._stats["fallback"] = "images in a call that continues a cache are not pruned"
            inputs = self._continue(inputs, state, past)
        return original(**inputs)

    def _continue(self, inputs: dict[str, Any], state: _SequenceState, past: int) -> dict[str, Any]:
        """Inputs of a call on a cache that holds a pruned prompt: compact the mask, continue the positions."""
        reference = inputs.get("inputs_embeds") if inputs.get("input_ids") is None else inputs["input_ids"]
        new = reference.shape[1]
        mask = inputs.get("attention_mask")
        generated = past - state.compact_length  # positions cached after the prompt
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] == state.original_length + generated + new:
                mask = torch.cat([state.compact_mask.to(mask.device, mask.dtype), mask[:, state.original_length:]], 1)
            elif mask.shape[1] != past + new:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} positions; after visual-token pruning this cache holds "
                    f"{past} positions for a prompt of {state.original_length} tokens ({state.compact_length} kept), "
                    f"so a mask of the original sequence ({state.original_length + generated + new}) or of the "
                    f"cached one ({past + new}) is expected")
        elif mask is None and state.padded:
            ones = torch.ones(state.compact_mask.shape[0], generated + new, dtype=state.compact_mask.dtype,
                              device=state.compact_mask.device)
            mask = torch.cat([state.compact_mask, ones], 1)
        inputs = dict(inputs, attention_mask=mask)
        if inputs.get("position_ids") is None:
            inputs["position_ids"] = self.glue.continued_positions(self._model, state.original_length + generated,
                                                                   new, reference.device)
        return inputs

    def _prefill(self, model, original, inputs, cache, encoded: EncodedImages, start: float):
        glue = self.glue
        embeds, placeholder = glue.merge(model, inputs, encoded.features)
        batch, length = placeholder.shape
        keep, embeds = self._choose(encoded, embeds, placeholder)
        if encoded.kernel is not None:
            self._stats["attention_kernel"] = encoded.kernel  # what computed the scored layers' column sums

        lang = glue.language_kwargs(inputs)
        mask = lang.pop("attention_mask", None)
        positions = lang.pop("position_ids", None)
        self._stats.update(sequence_length_before=length)
        if bool(keep.all()):
            # nothing dropped (budgets cover every image): the model's own sequence, untouched; without input_ids
            # the model cannot derive multi-row positions (Qwen2-VL's M-RoPE) itself, so the glue gives them
            if positions is None:
                positions = glue.full_positions(model, inputs, length, embeds.device)
            out = original(**lang, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
            self._stats.update(sequence_length_after=length, prefill_seconds=time.perf_counter() - start)
            self._attach(out, encoded)
            return out

        counts = keep.sum(1)
        compact = int(counts.max())
        index = torch.zeros(batch, compact, dtype=torch.long, device=keep.device)
        pad = torch.zeros(batch, compact, dtype=torch.bool, device=keep.device)
        for row in range(batch):
            kept = torch.nonzero(keep[row]).flatten()
            slots = compact - len(kept)  # rows shorter than the longest are padded on the left
            index[row, slots:] = kept
            pad[row, :slots] = True
        gathered = embeds.gather(1, index.to(embeds.device).unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        new_embeds = gathered.masked_fill(pad.to(embeds.device).unsqueeze(-1), 0)
        base_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else \
            torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        # always pass a 2-D mask: with none, transformers reads gaps in position_ids as packed sequences
        new_mask = base_mask.gather(1, index.to(base_mask.device)).masked_fill(pad.to(base_mask.device), 0)
        if positions is None:
            positions = glue.full_positions(model, inputs, length, embeds.device)
        new_positions = glue.slice_positions(positions, index, pad)
        lang = glue.slice_sequence_inputs(lang, index, pad)
        out = original(**lang, inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_positions)
        state_cache = cache if cache is not None else compat.output_cache(out)
        if state_cache is not None:
            self._states[state_cache] = _SequenceState(
                original_length=length, compact_length=compact, compact_mask=new_mask,
                padded=not bool(new_mask.bool().all()))
        self._stats.update(pruned=True, sequence_length_after=compact, prefill_seconds=time.perf_counter() - start)
        self._attach(out, encoded)
        return out

    @staticmethod
    def _attach(out, encoded: EncodedImages) -> None:
        """Give the output the vision outputs the model itself would have attached (it saw no pixels)."""
        if hasattr(out, "image_outputs") and encoded.outputs is not None:
            out.image_outputs = encoded.outputs

    def _choose(self, encoded: EncodedImages, embeds, placeholder):
        """Run the selection per image: returns the `[B, L]` keep mask and the embeddings (with any replaced
        features written in)."""
        batch, length = placeholder.shape
        flat_positions = torch.nonzero(placeholder.flatten()).flatten()
        keep = (~placeholder).flatten().clone()
        flat_embeds = embeds.reshape(batch * length, -1)
        replaced = False
        cursor = 0
        images = []
        for position, (features, layout) in enumerate(zip(encoded.features, encoded.layouts)):
            number = encoded.numbers[position] if encoded.numbers else position
            positions = flat_positions[cursor: cursor + layout.num_tokens].to(keep.device)
            cursor += layout.num_tokens
            selectable = layout.num_selectable
            budget = self.params.tokens_kept(selectable)
            if budget >= selectable:
                kept = torch.arange(layout.num_tokens, device=keep.device)
                new_features = None
            else:
                scores = {layer: layout.token_scores(values) for layer, values in encoded.scores.items()}
                choice = self.select(ImageTokens(number, features, layout, scores), budget)
                chosen = choice.index.to(keep.device)
                kept, order = torch.sort(torch.cat([chosen, layout.fixed.to(keep.device)]))
                new_features = None
                if choice.features is not None:
                    fixed_features = features[layout.fixed.to(features.device)]
                    new_features = torch.cat([choice.features.to(features), fixed_features])[order.to(features.device)]
            keep[positions[kept]] = True
            if new_features is not None:
                if not replaced:
                    flat_embeds = flat_embeds.clone()
                    replaced = True
                flat_embeds[positions[kept].to(flat_embeds.device)] = new_features.to(flat_embeds)
            row = int(positions[0]) // length if len(positions) else None
            images.append({"image": number, "row": row, "tokens": layout.num_tokens, "kept": int(len(kept)),
                           "selectable": selectable, "kept_fraction": len(kept) / max(1, layout.num_tokens)})
        before = sum(image["tokens"] for image in images)
        after = sum(image["kept"] for image in images)
        self._stats.update(images=images, tokens_before=before, tokens_after=after,
                           kept_fraction=after / before if before else 1.0)
        self.last_keep = keep.view(batch, length)
        return self.last_keep, flat_embeds.view(batch, length, -1)
