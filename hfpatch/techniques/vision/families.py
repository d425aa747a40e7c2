"""Per-model-type glue of the visual-token pruning techniques: where a VLM's image tokens come from.

The pruning machinery in `base.py` is the same for every VLM: at prefill it runs the vision tower through the
model's own feature path, chooses which visual tokens of each image survive, cuts them out of the merged input
sequence and calls the model's language part on what is left. What differs between model families is only how
the features come out of the model and how they are laid out, so each family is one `FamilyGlue` object
registered here under its `config.model_type`:

- `feature_method`: the name of the inner model's feature function (`get_image_features`). transformers 5.24's
  `generate` calls it before the prefill and hands the forward `mm_encoder_outputs`, so the patch wraps it on
  the instance to record what it needs while the tower runs.
- `encode(model, inputs)` calls that feature function as the model's own forward would (same arguments) and
  returns its output; `describe(model, arguments, outputs)` turns the arguments and output of one feature
  call into an `EncodedImages`: per image, the projected features in the order they fill the image
  placeholder tokens, and an `ImageLayout` saying which of those tokens are selectable patch tokens on a 2-D
  grid (`segments`), which are always kept (`fixed`: LLaVA-NeXT's image-newline tokens, a CLS token the model
  keeps), and which vision-tower tokens each one came from (`source`, so per-tower-token scores such as
  attention column sums can be read per image token).
- `vision_layers(model)` lists the tower's transformer layers (to find which layer an attention call belongs
  to) and `deep_layer(model)` / `default_object_layer(model)` say which layers HiPrune scores.
- `merge(model, inputs, features)` returns the input embeddings with the image features put into their
  placeholder positions (the model's own `masked_scatter` merge) and the boolean placeholder mask.
- `slice_positions(position_ids, index, pad)` cuts `position_ids` down to the kept sequence positions
  (2-D `[B, L]` here; a family with multi-row positions such as Qwen2-VL's M-RoPE overrides it).
- `language_kwargs(inputs)` names the model inputs that must not reach the language part again once the
  features are merged (pixels and their side inputs).

`glue_for(model)` returns the registered glue or raises `UnsupportedModelError` naming the model type and the
supported ones. A new family is a `FamilyGlue` subclass plus one `register_glue(...)` call in this file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ...errors import UnsupportedModelError


@dataclasses.dataclass
class Segment:
    """Selectable tokens of one image that lie on one 2-D patch grid.

    `index` holds positions within the image's token sequence (row-major over `grid`, so `index[r * w + c]` is
    the token at row r, column c) and `grid` is `(h, w)` with `h * w == len(index)`.
    """

    index: torch.Tensor
    grid: tuple[int, int]


@dataclasses.dataclass
class ImageLayout:
    """How one image's tokens are laid out in the sequence the language model reads.

    `num_tokens`: placeholder tokens the image fills. `segments`: its selectable patch tokens, one entry per
    grid (LLaVA: one 24x24 grid; LLaVA-NeXT: the base image grid and the unpadded high-resolution grid).
    `fixed`: positions always kept and not counted against the budget (image-newline tokens, a kept CLS token).
    `source`: `[num_tokens, k]` indices into the flattened `[num_tower_images * tower_tokens]` token axis of the
    vision tower's output that each image token comes from (-1 = none, e.g. a newline token), so a score per
    tower token becomes a score per image token (the mean over its sources).
    """

    num_tokens: int
    segments: list[Segment]
    fixed: torch.Tensor
    source: torch.Tensor

    @property
    def num_selectable(self) -> int:
        return sum(len(segment.index) for segment in self.segments)

    def token_scores(self, tower_scores: torch.Tensor) -> torch.Tensor:
        """`[num_tokens]` scores from `[num_tower_images, tower_tokens]` per-tower-token scores (NaN where an
        image token has no source)."""
        flat = tower_scores.reshape(-1).float()
        valid = self.source >= 0
        values = flat[self.source.clamp(min=0).to(flat.device)] * valid.to(flat.device)
        counts = valid.sum(-1).to(flat.device)
        out = values.sum(-1) / counts.clamp(min=1)
        return out.masked_fill(counts == 0, float("nan"))


@dataclasses.dataclass
class EncodedImages:
    """The vision side of one prefill: per image, projected features `[num_tokens, D]` and their layout.

    `outputs` is what the model's own feature function returned (kept on the model output as `image_outputs`).
    `tower_tokens` is the number of tokens per tower image (CLS and registers included).
    """

    features: list[torch.Tensor]
    layouts: list[ImageLayout]
    outputs: Any = None
    tower_tokens: int = 0
    #: per vision layer index, `[num_tower_images * tower_tokens]` column-mean attention recorded while the tower
    #: ran (filled by the technique when it asked for scores)
    scores: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: wall time of the feature call (vision tower and projector)
    seconds: float = 0.0
    #: the implementation of `attention_with_column_sums` that computed the scores (None without scores)
    kernel: str | None = None
    #: per entry of `features`, the number of the encoded image it is (None: entry i is image i); set when
    #: generate repeats the images of each prompt for several sequences per prompt
    numbers: list[int] | None = None


class FamilyGlue:
    """Base of the per-family glue (see the module docstring for what each method must provide)."""

    #: config.model_type values this glue serves
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the default HiPrune object layer is this fraction of the tower depth (CLIP-L/14 in LLaVA: layer 9 of 24)
    object_layer_fraction: ClassVar[float] = 9 / 24
    #: model inputs the language part must not see again once the image features are merged
    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: the inner model's feature function (wrapped on the instance to record scores and layouts)
    feature_method: ClassVar[str] = "get_image_features"
    #: the key of the images in `mm_encoder_outputs`
    modality: ClassVar[str] = "image"

    def problem(self, model) -> str | None:
        """Why this glue cannot serve this particular model of its type (None when it can); checked at patch time."""
        return None

    # --- the vision tower ------------------------------------------------------------------------------
    def inner(self, model) -> torch.nn.Module:
        """The module whose `forward` merges image features into the text sequence and runs the language model
        (the one the patch wraps): `model.model` for transformers' VLMs."""
        return model.model

    def vision_tower(self, model) -> torch.nn.Module:
        """The vision tower module (under the outer model)."""
        raise NotImplementedError

    def vision_layers(self, model) -> list[torch.nn.Module]:
        """The tower's transformer layers in order (the first `encoder.layers` / `encoder.layer` list found)."""
        for name, module in self.vision_tower(model).named_modules():
            if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "layer", "blocks"):
                return list(module)
        raise UnsupportedModelError(f"cannot find the transformer layers of {type(self.vision_tower(model)).__name__}")

    def deep_layer(self, model) -> int:
        """0-based index of the tower layer whose output the model reads its image features from."""
        raise NotImplementedError

    def default_object_layer(self, model) -> int:
        """HiPrune's middle "object" layer: `object_layer_fraction` of the depth (layer 9 of CLIP-L/14's 24),
        never deeper than the feature layer."""
        depth = len(self.vision_layers(model))
        return max(0, min(round(self.object_layer_fraction * depth), self.deep_layer(model), depth - 1))

    # --- features and the input sequence ---------------------------------------------------------------
    def has_images(self, inputs: dict[str, Any]) -> bool:
        """Whether this forward call carries raw images to encode."""
        pixels = inputs.get("pixel_values")
        return pixels is not None and pixels.numel() > 0

    def precomputed(self, inputs: dict[str, Any]) -> bool:
        """Whether the caller passed already-encoded images (the patch cannot score those)."""
        return bool(inputs.get("mm_encoder_outputs"))

    def precomputed_outputs(self, inputs: dict[str, Any]):
        """The feature output passed in `mm_encoder_outputs` (None when there is none)."""
        return (inputs.get("mm_encoder_outputs") or {}).get(self.modality)

    def encode(self, model, inputs: dict[str, Any]):
        """Call the inner model's feature function on this forward's images (through the instance, so the
        patch's wrapper sees the call) and return its output."""
        raise NotImplementedError

    def describe(self, model, arguments: dict[str, Any], outputs) -> EncodedImages:
        """The features and layouts of one call of the feature function (`arguments` by name)."""
        raise NotImplementedError

    def merge(self, model, inputs: dict[str, Any], features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The input embeddings with the image features scattered over the image placeholder tokens, as the model's
        own forward does, and the `[B, L]` bool mask of those positions."""
        input_ids = inputs.get("input_ids")
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = model.model.get_input_embeddings()(input_ids)
        stacked = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
        mask = self.placeholder_mask(model, input_ids, embeds, stacked)
        return embeds.masked_scatter(mask, stacked), mask[..., 0]

    def placeholder_mask(self, model, input_ids, embeds: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
        """Where the features go, `[B, L, H]` bool: the model's own `get_placeholder_mask`, which also checks that
        the image-token count equals the feature count."""
        return model.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=stacked)

    def full_positions(self, model, inputs: dict[str, Any], length: int, device) -> torch.Tensor:
        """Position ids of the whole (unpruned) sequence when the caller gave none: `0..L-1` here; a family with
        multi-row positions (Qwen2-VL's M-RoPE) computes them as the model's own forward would."""
        return torch.arange(length, device=device).unsqueeze(0)

    def continued_positions(self, model, start: int, new: int, device) -> torch.Tensor:
        """Position ids of `new` tokens continuing a pruned prompt whose original length (plus the tokens generated
        since) is `start`, for a call without position ids (`generate` always passes them): `start..start+new-1`.
        A family whose positions are offset from the sequence index (M-RoPE's rope_deltas) overrides this."""
        return torch.arange(start, start + new, device=device).unsqueeze(0)

    def slice_positions(self, position_ids: torch.Tensor, index: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Positions of the kept sequence: `position_ids[b, index[b, j]]`, 0 where `pad[b, j]` (a left pad slot)."""
        batch = index.shape[0]
        positions = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
        return positions.gather(1, index.to(positions.device)).masked_fill(pad.to(positions.device), 0)

    def slice_sequence_inputs(self, kwargs: dict[str, Any], index: torch.Tensor, pad: torch.Tensor) -> dict[str, Any]:
        """Other per-position inputs (`token_type_ids`, `mm_token_type_ids`: `[B, L]`) cut to the kept positions;
        left pad slots get 0 (text)."""
        out = dict(kwargs)
        for key in ("token_type_ids", "mm_token_type_ids"):
            value = out.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                out[key] = value.gather(1, index.to(value.device)).masked_fill(pad.to(value.device), 0)
        return out

    def language_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs with the vision-only ones dropped (they have been consumed by the merge)."""
        drop = set(self.vision_inputs) | {"mm_encoder_outputs", "input_ids", "inputs_embeds"}
        return {key: value for key, value in inputs.items() if key not in drop}


def _grid_layout(num_features: int, grid: tuple[int, int], source_offset: int, prefix: int) -> ImageLayout:
    """Layout of an image whose features are `prefix` non-grid tokens followed by an `h x w` grid, row-major,
    taken from tower tokens `source_offset ...` in order."""
    h, w = grid
    index = torch.arange(prefix, num_features)
    source = (torch.arange(num_features) + source_offset).unsqueeze(-1)
    return ImageLayout(num_tokens=num_features, segments=[Segment(index, (h, w))], fixed=torch.arange(prefix),
                       source=source)


class LlavaGlue(FamilyGlue):
    """LLaVA (1.5): one square grid of patch tokens per image, CLS dropped under the "default" strategy.

    Under vision_feature_select_strategy="full" the CLS (and any register) tokens reach the language model too;
    they have no grid position, so they are always kept and not counted against the budget.
    """

    model_types = ("llava",)
    vision_inputs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def vision_tower(self, model):
        return model.model.vision_tower

    def problem(self, model):
        vision = model.config.vision_config
        if getattr(vision, "model_type", None) == "pixtral" and type(self) is LlavaGlue:
            return ("its Pixtral vision tower encodes each image at its own resolution (no fixed patch grid), which "
                    "the pruning techniques do not support yet")
        if not getattr(vision, "image_size", None) or not getattr(vision, "patch_size", None):
            return "its vision config has no image_size / patch_size, so the patch grid is unknown"
        return None

    def _options(self, model, inputs):
        config = model.config
        layer = inputs.get("vision_feature_layer")
        strategy = inputs.get("vision_feature_select_strategy")
        return (config.vision_feature_layer if layer is None else layer,
                config.vision_feature_select_strategy if strategy is None else strategy)

    def deep_layer(self, model, feature_layer=None) -> int:
        if feature_layer is None:
            feature_layer = model.config.vision_feature_layer
        if not isinstance(feature_layer, int):  # several layers concatenated: the deepest one
            depth = len(self.vision_layers(model)) + 1
            feature_layer = max(layer % depth for layer in feature_layer)
        depth = len(self.vision_layers(model))
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i - 1
        return max(0, feature_layer % (depth + 1) - 1)

    def grid(self, model) -> tuple[int, int]:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def encode(self, model, inputs):
        layer, strategy = self._options(model, inputs)
        extra = {} if inputs.get("image_sizes") is None else {"image_sizes": inputs["image_sizes"]}
        return model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=layer,
                                              vision_feature_select_strategy=strategy, return_dict=True, **extra)

    def describe(self, model, arguments, outputs):
        layer, strategy = self._options(model, arguments)
        if arguments.get("image_sizes") is not None:
            raise UnsupportedModelError("llava with image_sizes (a variable-resolution tower such as Pixtral) is not "
                                        "supported by the pruning techniques: its images have no fixed patch grid")
        features = list(outputs.pooler_output)
        h, w = self.grid(model)
        layouts = []
        offset = 0
        tower_tokens = 0
        for feature in features:
            n = feature.shape[0]
            prefix = n - h * w
            if prefix < 0:
                raise UnsupportedModelError(f"llava image has {n} feature tokens, fewer than its {h}x{w} patch grid")
            # the tower's tokens: the features plus the CLS token the "default" strategy dropped
            dropped = 1 if strategy == "default" else 0
            tower_tokens = n + dropped
            layouts.append(_grid_layout(n, (h, w), offset + dropped, prefix))
            offset += tower_tokens
        return EncodedImages(features, layouts, outputs, tower_tokens)


class LlavaNextGlue(LlavaGlue):
    """LLaVA-NeXT: per image a base-resolution grid, then the unpadded high-resolution grid whose rows each end
    in an image-newline token (kept, never counted against the budget). Crops are of the tower's image size;
    the layout comes from running the model's own packing on the tower-token indices."""

    model_types = ("llava_next",)

    def grid(self, model) -> tuple[int, int]:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def encode(self, model, inputs):
        layer, strategy = self._options(model, inputs)
        if inputs.get("image_sizes") is None:
            raise ValueError("llava_next needs image_sizes with pixel_values (the processor returns both)")
        return model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=layer,
                                              vision_feature_select_strategy=strategy, return_dict=True)

    def describe(self, model, arguments, outputs):
        layer, strategy = self._options(model, arguments)
        inner = model.model
        image_sizes = arguments["image_sizes"]
        features = list(outputs.pooler_output)
        h, w = self.grid(model)
        per_crop = h * w + (1 if strategy == "full" else 0)  # feature tokens per crop
        dropped = 1 if strategy == "default" else 0
        tower_tokens = per_crop + dropped
        # Run the model's own packing on tower-token indices (as 1-dim features) with a newline value of -1: the
        # packed result says, for every image token, which tower token it is (or that it is a newline).
        crops = [self._num_crops(inner, size) for size in image_sizes]
        offsets = torch.tensor([0] + crops[:-1]).cumsum(0).tolist()
        index_features = [
            (torch.arange(count * tower_tokens, dtype=torch.float64).view(count, tower_tokens, 1)[:, dropped:]
             + offset * tower_tokens)
            for count, offset in zip(crops, offsets)
        ]
        packed, _ = inner.pack_image_features(index_features, image_sizes, strategy,
                                              image_newline=torch.tensor([-1.0], dtype=torch.float64))
        layouts = []
        for feature, order in zip(features, packed):
            order = order[:, 0].round().long()
            if len(order) != feature.shape[0]:
                raise UnsupportedModelError(f"llava_next packing gave {len(order)} tokens for an image with "
                                            f"{feature.shape[0]} features")
            newline = order < 0
            prefix = per_crop - h * w  # a CLS kept under the "full" strategy
            base = torch.arange(prefix, per_crop)
            segments = [Segment(base, (h, w))]
            rest = torch.arange(per_crop, len(order))
            rows = int(newline[per_crop:].sum())
            high = rest[~newline[per_crop:]]
            if rows and len(high):
                # the high-resolution grid: rows of `cols` patch tokens, each row followed by a newline token
                segments.append(Segment(high, (rows, len(high) // rows)))
            fixed = torch.cat([torch.arange(prefix), torch.nonzero(newline).flatten()])
            layouts.append(ImageLayout(num_tokens=len(order), segments=segments, fixed=fixed.sort().values,
                                       source=order.unsqueeze(-1)))
        return EncodedImages(features, layouts, outputs, tower_tokens)

    @staticmethod
    def _num_crops(inner, image_size) -> int:
        from ...compat import llava_next_num_crops

        return llava_next_num_crops(inner.config, image_size)


class QwenVLGlue(FamilyGlue):
    """Qwen2-VL / Qwen2.5-VL: per image a `t x h x w` patch grid that the merger folds into `(h/m) x (w/m)` tokens
    (m = spatial_merge_size, 2), so each image token comes from the m*m tower tokens of its merge group (a score
    per tower token, on the 4x finer pre-merge grid, becomes a score per image token through `source`).
    Qwen2.5-VL's tower runs its blocks on merge groups reordered into windows (`compat.qwen_vision_window_index`):
    `source` points into that block order. Positions are M-RoPE `[3, B, L]` (`[4, B, L]` under `generate`, with
    a text row first) from the model's own `get_rope_index` on the whole sequence, sliced per row, so survivors
    keep their coordinates; `rope_deltas` is set as the model's own forward sets it. Videos are not pruned."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    vision_inputs = ("pixel_values", "image_grid_thw")
    #: HiPrune's object layer for Qwen2.5-VL is block 16 of 32
    object_layer_fraction = 0.5

    def vision_tower(self, model):
        return model.model.visual

    def deep_layer(self, model) -> int:
        return len(self.vision_layers(model)) - 1  # the merger reads the last block's output

    def encode(self, model, inputs):
        return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)

    def describe(self, model, arguments, outputs):
        from ...compat import qwen_vision_window_index

        visual = self.vision_tower(model)
        merge = visual.spatial_merge_size
        unit = merge * merge
        grid_thw = arguments.get("image_grid_thw")
        features = outputs.pooler_output
        sizes = [int(t) * (int(h) // merge) * (int(w) // merge) for t, h, w in grid_thw.tolist()]
        if isinstance(features, torch.Tensor):
            features = torch.split(features, sizes)
        features = list(features)
        window = qwen_vision_window_index(visual, grid_thw)
        # block position of every merge group (original order -> order the tower's blocks run in)
        block_group = None if window is None else torch.argsort(window.cpu())
        layouts, offset = [], 0
        for size, (t, h, w) in zip(sizes, grid_thw.tolist()):
            groups = torch.arange(offset, offset + size)
            if block_group is not None:
                groups = block_group[groups]
            source = groups.unsqueeze(-1) * unit + torch.arange(unit)
            grid = (int(t) * (int(h) // merge), int(w) // merge)  # frames stacked as rows
            layouts.append(ImageLayout(num_tokens=size, segments=[Segment(torch.arange(size), grid)],
                                       fixed=torch.zeros(0, dtype=torch.long), source=source))
            offset += size
        return EncodedImages(features, layouts, outputs, 0)

    def placeholder_mask(self, model, input_ids, embeds, stacked):
        # Qwen2-VL's returns the image mask and the video mask
        image_mask, _ = model.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=stacked)
        return image_mask

    def full_positions(self, model, inputs, length, device):
        inner = model.model
        positions, deltas = inner.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs.get("attention_mask"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"))
        inner.rope_deltas = deltas  # what the model's own forward records for its decode steps
        return positions.to(device)

    def continued_positions(self, model, start, new, device):
        """M-RoPE positions `[3, B, new]` of tokens after a pruned prompt: `start..` plus each row's `rope_deltas`
        (recorded from the whole sequence), as the model's own decode steps compute them."""
        positions = torch.arange(start, start + new, device=device).view(1, 1, -1)
        deltas = model.model.rope_deltas
        if deltas is not None:
            positions = positions + deltas.to(device).view(1, -1, 1)
        return positions.expand(3, -1, -1)

    def slice_positions(self, position_ids, index, pad):
        """`[k, B, L]` M-RoPE rows (or `[B, L]`) cut to the kept positions of each row; 0 on left pad slots."""
        if position_ids.dim() == 2:
            return super().slice_positions(position_ids, index, pad)
        rows, batch = position_ids.shape[0], index.shape[0]
        positions = position_ids.expand(rows, batch, -1)
        gathered = positions.gather(2, index.to(positions.device).unsqueeze(0).expand(rows, -1, -1))
        return gathered.masked_fill(pad.to(positions.device).unsqueeze(0), 0)


class Gemma3Glue(FamilyGlue):
    """Gemma 3: a SigLIP tower's `p x p` patch grid average-pooled (kernel k = p / s) into an `s x s` grid of
    `mm_tokens_per_image` tokens per image; each image token comes from a `k x k` block of tower tokens. The outer
    model builds the language model's masks from `token_type_ids` (bidirectional inside an image), which the
    base slices with the sequence, so survivors of an image still see each other."""

    model_types = ("gemma3",)
    vision_inputs = ("pixel_values",)

    def vision_tower(self, model):
        return model.model.vision_tower

    def deep_layer(self, model) -> int:
        return len(self.vision_layers(model)) - 1  # the projector reads the tower's last hidden state

    def encode(self, model, inputs):
        return model.model.get_image_features(inputs["pixel_values"], return_dict=True)

    def describe(self, model, arguments, outputs):
        projector = model.model.multi_modal_projector
        side, patches = projector.tokens_per_side, projector.patches_per_image
        kernel = patches // side
        features = list(outputs.pooler_output)
        rows = torch.arange(side).repeat_interleave(side)
        cols = torch.arange(side).repeat(side)
        offsets = torch.arange(kernel)
        # tower tokens (row-major over the p x p patch grid) of each pooled token's k x k block
        block = ((rows[:, None, None] * kernel + offsets[None, :, None]) * patches
                 + cols[:, None, None] * kernel + offsets[None, None, :]).reshape(side * side, -1)
        tower_tokens = patches * patches
        layouts = [ImageLayout(num_tokens=side * side, segments=[Segment(torch.arange(side * side), (side, side))],
                               fixed=torch.zeros(0, dtype=torch.long), source=block + number * tower_tokens)
                   for number in range(len(features))]
        return EncodedImages(features, layouts, outputs, tower_tokens)


class Idefics3Glue(FamilyGlue):
    """Idefics3 / SmolVLM: each image is cut into crops (plus a downscaled global view); a crop's `p x p` SigLIP
    patch tokens are pixel-shuffled (scale s) into a `(p/s) x (p/s)` grid of tokens, each from an `s x s` block
    of tower tokens. The feature function returns one tensor per batch row (all its crops), so a row's crops are
    one entry here with one grid segment per crop: the budget is per row's images together (per image when
    each prompt has one image), shared among the crops in proportion to their size. The row/column marker
    tokens around each crop are text and always kept."""

    model_types = ("idefics3", "smolvlm")
    vision_inputs = ("pixel_values", "pixel_attention_mask")

    def vision_tower(self, model):
        return model.model.vision_model

    def deep_layer(self, model) -> int:
        return len(self.vision_layers(model)) - 1  # the connector reads the tower's last hidden state

    def encode(self, model, inputs):
        return model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"),
                                              return_dict=True)

    def describe(self, model, arguments, outputs):
        inner = model.model
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        tower_tokens = side * side
        scale = inner.connector.scale_factor
        # which tower tokens each shuffled token is made of: the connector's own shuffle run on token indices
        order = torch.arange(tower_tokens, dtype=torch.float64).view(1, tower_tokens, 1)
        shuffled = inner.connector.pixel_shuffle(order, scale)[0].round().long()  # [tower_tokens / s^2, s^2]
        per_crop = shuffled.shape[0]
        grid = (side // scale, side // scale)
        features = list(outputs.pooler_output)
        layouts, crop = [], 0
        for row_features in features:
            crops = row_features.shape[0] // per_crop
            segments = [Segment(torch.arange(c * per_crop, (c + 1) * per_crop), grid) for c in range(crops)]
            source = torch.cat([shuffled + (crop + c) * tower_tokens for c in range(crops)]) if crops else \
                torch.zeros(0, scale * scale, dtype=torch.long)
            layouts.append(ImageLayout(num_tokens=crops * per_crop, segments=segments,
                                       fixed=torch.zeros(0, dtype=torch.long), source=source))
            crop += crops
        return EncodedImages(features, layouts, outputs, tower_tokens)

    def placeholder_mask(self, model, input_ids, embeds, stacked):
        # both models scatter the features over the image tokens (Idefics3's inputs_merger, SmolVLM's forward)
        # without a get_placeholder_mask of their own
        placeholder = input_ids == model.config.image_token_id
        if int(placeholder.sum()) != stacked.shape[0]:
            raise ValueError(f"{model.config.model_type}: {int(placeholder.sum())} image tokens in input_ids but "
                             f"{stacked.shape[0]} image features")
        return placeholder.unsqueeze(-1).expand_as(embeds).to(embeds.device)


_GLUE: dict[str, FamilyGlue] = {}


def register_glue(glue: FamilyGlue) -> FamilyGlue:
    """Register a family's glue under each of its model types."""
    for kind in glue.model_types:
        _GLUE[kind] = glue
    return glue


register_glue(LlavaGlue())
register_glue(LlavaNextGlue())
register_glue(QwenVLGlue())
register_glue(Gemma3Glue())
register_glue(Idefics3Glue())


def supported_model_types() -> frozenset[str]:
    """Model types some glue serves."""
    return frozenset(_GLUE)


def glue_for(model) -> FamilyGlue:
    """The glue for `model`'s type, or `UnsupportedModelError` naming it and the supported types."""
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    glue = _GLUE.get(kind)
    if glue is None:
        raise UnsupportedModelError(
            f"visual-token pruning does not support model type {kind!r} ({type(model).__name__}); supported: "
            f"{', '.join(sorted(_GLUE))}")
    return glue
