"""The one place that knows transformers internals and how transformers versions differ.

Everything else in hfpatch asks this module instead of importing below transformers' top-level names,
calling private methods, or checking `transformers.__version__` itself (tests/test_imports.py checks the
imports).
Tested range: transformers 5.23 and 5.24 (see `TESTED_TRANSFORMERS`).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward as _transformers_sdpa_attention_forward

TESTED_TRANSFORMERS = (">=5.23", "<5.25")
TRANSFORMERS_VERSION = Version(transformers.__version__)


@functools.cache
def warn_if_untested() -> None:
    """Warn once per process when the installed transformers is outside the range hfpatch was tested on."""
    low, high = (Version(spec.lstrip("<>=")) for spec in TESTED_TRANSFORMERS)
    if not (low <= TRANSFORMERS_VERSION < high):
        warnings.warn(
            f"hfpatch was tested with transformers {','.join(TESTED_TRANSFORMERS)}; you have "
            f"{TRANSFORMERS_VERSION}. Patches may still work; please report problems.",
            stacklevel=3,
        )


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwarg(model) -> str:
    """Name of the forward keyword that carries the KV cache.

    5.24 renamed `past_key_values` to `cache`; 5.23 silently ignores `cache=`, so the name is decided by
    the model's own forward signature rather than by version number.
    """
    params = _forward_parameters(type(model))
    return "cache" if "cache" in params else "past_key_values"


def call_cache(kwargs):
    """The cache object a forward or ``generate`` call was given, under either keyword (5.24's ``cache`` or the
    older ``past_key_values``); an explicit ``cache=`` wins, as the model's own forward decides."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def output_cache(outputs):
    """The cache object of a model output, under whichever field name this version uses."""
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    return cache


#: transformers' own sdpa attention function: the sparse techniques run exactly it on full steps (re-exported
#: rather than wrapped, since it runs in every layer of every step).
sdpa_attention_forward = _transformers_sdpa_attention_forward


def uses_default_dynamic_cache(model) -> bool:
    """Whether `generate` gives this model a plain DynamicCache when the caller passes none."""
    return bool(model._supports_default_dynamic_cache())


def is_full_attention_layer(layer) -> bool:
    """Whether a cache layer is exactly a full-attention `DynamicLayer` (not a sliding window or a subclass)."""
    return type(layer) is DynamicLayer


def new_dynamic_cache(config):
    """An empty `DynamicCache` whose layers exist already, one per decoder layer of `config`."""
    return DynamicCache(config=config)


def new_unbounded_cache(config):
    """An empty `DynamicCache` with one full-attention `DynamicLayer` per decoder layer of `config`, sliding-window
    layers included: they keep every position (storage index = position), and the caller applies the window in the
    attention mask. Without an explicit mask, transformers' sliding mask on such a layer is exact (offset 0)."""
    cache = DynamicCache()
    cache.layers.extend(DynamicLayer() for _ in new_dynamic_cache(config).layers)
    return cache


def attention_functions():
    """transformers' global registry of attention functions (name -> callable)."""
    from transformers import AttentionInterface

    return AttentionInterface


def mask_functions():
    """transformers' global registry of attention-mask builders (name -> callable)."""
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionMaskInterface


# Attention implementations known to apply an additive 4D (tree) mask exactly; flash kernels cannot take one.
_TREE_MASK_IMPLEMENTATIONS = {"eager", "sdpa"}


def register_attention(name: str, attention_fn, mask_like: str, *, accepts_tree_mask: bool = False) -> None:
    """Register an attention function and the mask builder it shares with a built-in implementation.

    Without a mask function registered under the same name, `create_causal_mask` returns None and padding
    is silently ignored, so both are always registered together.
    """
    attention_functions().register(name, attention_fn)
    masks = mask_functions()
    masks.register(name, masks._global_mapping[mask_like])
    if accepts_tree_mask:
        _TREE_MASK_IMPLEMENTATIONS.add(name)


def unregister_attention(name: str) -> None:
    attention_functions()._global_mapping.pop(name, None)
    mask_functions()._global_mapping.pop(name, None)
    _TREE_MASK_IMPLEMENTATIONS.discard(name)


def accepts_tree_mask(implementation: str | None) -> bool:
    """Whether an attention implementation applies an additive 4D mask exactly in multi-token steps."""
    return implementation in _TREE_MASK_IMPLEMENTATIONS


def attn_implementation(config) -> str | None:
    """The attention implementation a (sub-)config currently selects."""
    return getattr(config, "_attn_implementation", None)


def sub_config_names(config) -> tuple[str, ...]:
    """Names of the nested configs (text_config, vision_config, ...) that exist on this config."""
    return tuple(name for name in getattr(config, "sub_configs", {}) if getattr(config, name, None) is not None)


def has_sliding_window_layers(config) -> bool:
    """Whether any decoder layer uses sliding-window attention (its cache layer drops old positions)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    return any("sliding" in str(kind) for kind in layer_types)


def sliding_window(config) -> int | None:
    """The sliding-window size of a model with sliding-window layers (None when it has none)."""
    if not has_sliding_window_layers(config):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "sliding_window", None)


def compactable_cache(cache) -> bool:
    """Whether `keep_cache_positions` can serve this cache: a DynamicCache of plain or sliding-window layers.

    A sliding-window layer that has slid (it holds only its most recent positions) is served too: positions
    are mapped onto what it still holds. To roll a verified tree back past the window, turn on
    `record_sliding_past` first, so that the tree's forward does not drop positions the accepted path needs.
    """
    return type(cache) is DynamicCache and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                                               for layer in cache.layers)


def sliding_windows(cache) -> list[int | None]:
    """Per cache layer: its sliding window, or None for a full-attention layer."""
    return [layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None for layer in cache.layers]


def record_sliding_past(cache, on: bool) -> None:
    """On: sliding-window layers keep every position until the next `keep_cache_positions`, which cuts them back
    to the window (transformers' own assisted decoding does this with `activate_past_recording` and `crop`), so
    a tree verified past the window can be compacted to its accepted path. Off: back to holding the window only."""
    for layer in cache.layers:
        if not isinstance(layer, DynamicSlidingWindowLayer):
            continue
        layer.record_past = on
        if not on and layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys[..., -layer.sliding_window + 1 :, :]
            layer.values = layer.values[..., -layer.sliding_window + 1 :, :]


def cache_view(cache, num_layers: int):
    """A new DynamicCache whose first `num_layers` layers start from `cache`'s tensors (shared, not copied).
    A layer's update concatenates into new tensors, so running a model's first layers on it never writes to
    `cache` (full-attention layers only)."""
    view = DynamicCache()
    for layer in cache.layers[:num_layers]:
        mine = DynamicLayer()
        if layer.keys is not None and layer.keys.numel():
            mine.lazy_initialization(layer.keys, layer.values)
            mine.keys, mine.values = layer.keys, layer.values
        view.layers.append(mine)
    return view


def keep_cache_positions(cache, keep) -> None:
    """Keep only the cached positions in `keep` (1-D LongTensor, ascending), in every layer.

    RoPE is already applied to cached keys, so kept positions keep their original positions. A
    sliding-window layer also counts the positions it has seen, which must follow the compaction; one that has
    slid holds only its most recent positions (storage index 0 is position `cumulative_length - stored`), and
    keeps at most the last `sliding_window - 1` of `keep`, all a later token can see.
    """
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        stored = layer.keys.shape[-2]
        local = keep
        window = getattr(layer, "sliding_window", None)
        if window is not None:
            offset = getattr(layer, "cumulative_length", stored) - stored
            local = keep[keep >= offset] - offset
            local = local[-(window - 1):]
        if len(local) and int(local[0]) == 0 and int(local[-1]) == len(local) - 1:  # a prefix: a view, no copy
            layer.keys = layer.keys[..., : len(local), :]
            layer.values = layer.values[..., : len(local), :]
        else:
            index = local.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = len(keep)


def load_causal_lm(repo: str, revision: str | None, dtype):
    """A causal LM from a Hub repo id (or local folder) at `revision`, in eval mode. Repository code is never
    run (`trust_remote_code=False`): a model that needs it fails to load with transformers' own error."""
    model = transformers.AutoModelForCausalLM.from_pretrained(repo, revision=revision, dtype=dtype,
                                                              trust_remote_code=False)
    return model.eval()


def decoder_only_generate_output(*, sequences, scores, logits, cache):
    """A `GenerateDecoderOnlyOutput`, with the cache under this version's field name (`cache` from 5.24)."""
    import dataclasses

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    cache_field = "cache" if "cache" in names else "past_key_values"
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits, **{cache_field: cache})


def forward_accepts(model, name: str) -> bool:
    """Whether the model class's `forward` takes the keyword `name` (e.g. `logits_to_keep`)."""
    return name in _forward_parameters(type(model))


#: `generation_mode` values of one-token-per-step decoding (argmax, or one sample from the processed scores);
#: they are the values of transformers' internal `GenerationMode.GREEDY_SEARCH` / `.SAMPLE`
GREEDY_SEARCH = "greedy_search"
SAMPLE = "sample"


def generation_mode(generation_config) -> str:
    """The decoding strategy transformers picks for this config, as the value of its internal
    `GenerationMode` enum ("greedy_search", "sample", "beam_search", "assisted_generation", ...).

    A string rather than the enum, so callers compare against `GREEDY_SEARCH` / `SAMPLE` and never import
    `transformers.generation.configuration_utils` themselves.
    """
    return generation_config.get_generation_mode().value


def sample_loop(model):
    """transformers' own greedy/sampling decoding loop, bound to `model`.

    A `custom_generate` loop that finds, once transformers has prepared the call (logits processors,
    stopping criteria, cache), that it cannot serve the request exactly has no public way back: `generate`
    has already been entered. The loop transformers would have run itself is the private
    `GenerationMixin._sample`; it takes `(input_ids, logits_processor=, stopping_criteria=,
    generation_config=, synced_gpus=, streamer=, **model_kwargs)`. It is taken from the model's class, not
    the instance, so an instance-level patch (such as hfpatch's own `generate` wrapper) cannot intercept it.
    """
    return type(model)._sample.__get__(model, type(model))


#: `generate()` parameters that are not generation-config fields or model inputs (transformers 5.23/5.24):
#: named in its signature, or popped from its kwargs before the config is built (`tokenizer`,
#: `assistant_tokenizer`, `trust_remote_code`)
GENERATE_ARGUMENTS = frozenset({
    "inputs", "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
    "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
    "custom_generate", "tokenizer", "assistant_tokenizer", "trust_remote_code",
})


def prepared_generation_config(model, generation_config=None, **kwargs):
    """The generation config `model.generate(generation_config=..., **kwargs)` will decode with.

    transformers merges, in this order of priority, the keyword arguments, the given config, the model's
    `generation_config` and its global defaults (the private `GenerationMixin._prepare_generation_config`),
    so a wrapper deciding before `generate` runs sees the same values the decoding loop will. `kwargs` are
    the generate call's other keyword arguments (model inputs among them are left out of the config);
    `GENERATE_ARGUMENTS` must not be among them. Raises what transformers raises for an invalid request.
    """
    config, _ = model._prepare_generation_config(generation_config, **kwargs)
    return config


def stop_string_criteria(tokenizer, stop_strings):
    """transformers' own stopping criterion for `stop_strings` (what `generate` builds from its `tokenizer`).

    In 5.24 `generate` pops `tokenizer` from its kwargs before it looks for the arguments a callable
    `custom_generate` declares, so such a loop never receives it, and with `stop_strings` set `generate`
    raises "could not locate a tokenizer". A wrapper builds the criterion itself and passes it in
    `stopping_criteria` instead.
    """
    from transformers import StopStringCriteria

    return StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)


def stopping_criteria_list(criteria):
    """A `StoppingCriteriaList` of `criteria` (the type `generate` expects for `stopping_criteria`)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(criteria)


# ---------------------------------------------------------------------------------------------------------
# trainers: transformers' Trainer and TRL's preference trainer (TRL is optional; it is imported only here,
# and only when a trainer of its own is what is being patched)

#: TRL versions the training techniques were tested with (`DPOTrainer._compute_loss`, its fused LM head).
TESTED_TRL = (">=1.16", "<1.17")


def is_trainer(obj) -> bool:
    """Whether `obj` is a `transformers.Trainer` (TRL's trainers are subclasses)."""
    import sys

    # `transformers.Trainer` is a lazy import that costs seconds: without it imported, no trainer exists
    module = sys.modules.get("transformers.trainer")
    return module is not None and isinstance(obj, module.Trainer)


def is_trl_preference_trainer(trainer) -> bool:
    """Whether `trainer` is TRL's `DPOTrainer`: its model carries TRL's fused LM head
    (`model(..., labels=, fused_lm_head=True).log_probs`), its collator builds chosen-then-rejected batches with a
    `completion_mask`, and its reference is `trainer.ref_model` or the PEFT policy with the adapter disabled."""
    import sys

    if "trl" not in sys.modules:  # a trainer of TRL's cannot exist without trl imported
        return False
    from trl import DPOTrainer

    return isinstance(trainer, DPOTrainer)


def trl_version():
    """The installed TRL version, or None when TRL is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Version(version("trl"))
    except PackageNotFoundError:
        return None


def is_peft_model(model) -> bool:
    """Whether `model` is a PEFT `PeftModel` (whose adapter can be switched off to give the base model)."""
    return type(model).__module__.startswith("peft") and callable(getattr(model, "disable_adapter", None))


def trainer_unwrapped_model(trainer, model):
    """The model inside the DDP/Accelerate wrapper a trainer hands to `compute_loss`."""
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(model) if accelerator is not None else model


def reference_adapter(peft_model):
    """A context manager in which a PEFT policy computes as its reference: TRL's convention (an adapter named
    "ref" when there is one, else every adapter disabled), else PEFT's own `disable_adapter()`."""
    if "ref" in getattr(peft_model, "peft_config", {}):
        from trl.trainer.utils import use_adapter

        return use_adapter(peft_model, adapter_name="ref")
    return peft_model.disable_adapter()


#: Text-config fields by which some architectures change the logits after `lm_head` (Gemma 2 soft-capping,
#: Cohere/Granite/Falcon-H1 scaling); where one is set, `hidden @ lm_head.weight.T` is not the logits.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                          "logits_scaling")


def logit_transform(model) -> str:
    """Which logit transform after the output head `model` applies ("field=value"), or "" when none."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in LOGIT_TRANSFORM_FIELDS:
        value = getattr(text, field, None)
        if value is not None and value != 1:
            return f"{field}={value}"
    return ""


def trl_loss_settings(trainer) -> dict:
    """The loss settings a TRL `DPOTrainer` was built with (`DPOConfig` fields as the trainer keeps them)."""
    return {
        "loss_type": list(getattr(trainer, "loss_types", ["sigmoid"])),
        "loss_weights": list(getattr(trainer, "loss_weights", [1.0])),
        "ld_alpha": getattr(trainer, "ld_alpha", None),
        "f_divergence_type": str(getattr(trainer, "f_divergence_type", "reverse_kl")),
        "label_smoothing": getattr(trainer, "label_smoothing", 0.0),
        "use_weighting": bool(getattr(trainer, "use_weighting", False)),
        "router_aux_loss": bool(getattr(trainer, "aux_loss_enabled", False)),
        "beta": getattr(trainer, "beta", None),
    }


def trainer_precomputes_reference(trainer) -> bool:
    """Whether a TRL trainer reads precomputed per-sequence reference log-prob sums from the batch."""
    return bool(getattr(trainer, "precompute_ref_logps", False))


def trainer_prepare_inputs(trainer, inputs):
    """A batch moved to the trainer's device as its own steps do (the private `Trainer._prepare_inputs`)."""
    return trainer._prepare_inputs(inputs)


def trainer_truncation_mode(trainer) -> str:
    """How the trainer's preference collator cuts long sequences ("keep_start" or "keep_end")."""
    return getattr(getattr(trainer, "args", None), "truncation_mode", "keep_start") or "keep_start"


#: The trainer method that fills `_signature_columns` (the dataset columns kept by `remove_unused_columns`).
SIGNATURE_COLUMNS_METHOD = "_set_signature_columns_if_needed"


def add_signature_columns(trainer, columns) -> list[str]:
    """Add `columns` to the trainer's kept dataset columns if they are already decided; returns those added (so
    that they can be removed again). Before they are decided, wrap `SIGNATURE_COLUMNS_METHOD` and call this after."""
    current = trainer.__dict__.get("_signature_columns")
    if current is None:
        return []
    added = [column for column in columns if column not in current]
    trainer._signature_columns = list(current) + added
    return added


def remove_signature_columns(trainer, columns) -> None:
    """Take `columns` (added by `add_signature_columns`) out of the trainer's kept dataset columns again."""
    current = trainer.__dict__.get("_signature_columns")
    if current is not None:
        trainer._signature_columns = [column for column in current if column not in columns]


def attention_function(implementation: str | None, module):
    """The attention function transformers runs for `implementation` inside `module` (an attention module).

    "eager" (and None) is not in transformers' registry: each model file has its own `eager_attention_forward`,
    found in the module's own model file. Every other name (sdpa, a function registered by hfpatch) comes
    from the registry. Used by techniques that observe one layer's attention and then run the model's own.
    """
    import sys

    if implementation in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return attention_functions()._global_mapping[implementation]


def cache_layer_length(cache, layer_idx: int) -> int:
    """Positions held by one layer of a cache (0 for an empty or absent cache)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def llava_next_num_crops(config, image_size) -> int:
    """How many tower-sized crops LLaVA-NeXT cuts an image of `image_size` (height, width) into, base image
    included (transformers' own `image_size_to_num_patches`, which its `get_image_features` uses)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches(image_size=image_size, grid_pinpoints=config.image_grid_pinpoints,
                                         patch_size=config.vision_config.image_size))


def cache_visible_length(cache, layer_idx: int, query_length: int) -> int:
    """Keys one cache layer hands to attention in a step of `query_length` new tokens (all it holds plus the new
    ones, or a sliding-window layer's window): the cache layer's own `get_mask_sizes`, which takes the query
    length in 5.24 and the new tokens' cache positions in earlier versions."""
    layer = cache.layers[layer_idx]
    if "cache_position" in inspect.signature(layer.get_mask_sizes).parameters:
        import torch

        past = int(layer.get_seq_length())
        return int(layer.get_mask_sizes(torch.arange(past, past + query_length))[0])
    return int(layer.get_mask_sizes(query_length)[0])


def qwen_vision_window_index(visual, grid_thw):
    """Qwen2.5-VL's vision tower runs its blocks on merge groups reordered into attention windows: the group order
    it uses (`window_index`, global over the images), or None for a tower without windows (Qwen2-VL)."""
    if not hasattr(visual, "fullatt_block_indexes"):
        return None
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    return window_index


def uses_eager_masks(implementation: str | None) -> bool:
    """Whether an attention implementation receives eager's additive float masks (eager itself, or a function
    registered with eager's mask builder) rather than sdpa's boolean ones."""
    if implementation in (None, "eager"):
        return True
    builders = mask_functions()._global_mapping
    return builders.get(implementation) is builders.get("eager")
