"""A KV cache that appends in place: transformers' ``DynamicCache`` with preallocated per-layer buffers.

transformers' ``DynamicLayer.update`` concatenates the whole cached prefix with the new token on every
decode step (``torch.cat``), so each step copies every layer's K and V: at 8k context on SmolLM2-135M
that is about 380 MB written per generated token, more than the model's attention reads. Here each full
(non-sliding) ``DynamicLayer`` of a ``DynamicCache`` writes new positions into a buffer with spare
capacity and exposes ``keys``/``values`` as prefix views of it, so a decode step writes one position.

The cache object and its layers keep their transformers types (``DynamicCache`` / ``DynamicLayer``): only
each layer instance's ``update`` is replaced. Everything else that transformers or hfpatch does to a
cache keeps working because it only reads ``layer.keys``/``layer.values`` or assigns new tensors to them:
``crop`` leaves a shorter prefix view of the same buffer (the next update overwrites the dropped tail),
and anything that assigns an unrelated tensor (``batch_select_indices``, ``batch_repeat_interleave``,
``compat.keep_cache_positions`` used by the speculative engine) is noticed on the next update, which
copies that tensor into a fresh buffer. ``copy.deepcopy`` keeps the views views of the copied buffer.

    >>> cache = hfpatch.cache.growable_cache(model.config, capacity=len(prompt) + max_new_tokens)
    >>> model.generate(ids, past_key_values=cache)       # or cache= on transformers >= 5.24
"""
from __future__ import annotations

import types
from typing import Any

import torch

from . import compat

__all__ = ["growable_cache", "make_growable", "is_growable"]

#: Extra positions reserved when a buffer has to grow without a capacity hint (then x1.5 of the need).
MIN_RESERVE = 256


def _buffer_view(layer) -> bool:
    """Whether ``layer.keys``/``layer.values`` are still prefix views of this layer's own buffers."""
    buffers = getattr(layer, "_hfpatch_buffers", None)
    if buffers is None or layer.keys is None or layer.values is None:
        return False
    for view, buf in zip((layer.keys, layer.values), buffers):
        if (view.dim() != 4 or view.data_ptr() != buf.data_ptr() or view.shape[:2] != buf.shape[:2]
                or view.shape[3] != buf.shape[3] or view.stride() != buf.stride()):
            return False
    return True


def _allocate(layer, like_k: torch.Tensor, like_v: torch.Tensor, length: int) -> None:
    """New buffers holding at least ``length`` positions; the current keys/values are copied in."""
    hint = getattr(layer, "_hfpatch_capacity", None)
    capacity = max(length, hint or 0)
    if capacity == length:  # no hint left to honour (or outgrown): grow geometrically
        capacity = length + max(MIN_RESERVE, length // 2)
    b, h, _, dk = like_k.shape
    kbuf = like_k.new_empty(b, h, capacity, dk)
    vbuf = like_v.new_empty(b, h, capacity, like_v.shape[-1])
    old = layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0
    if old:
        kbuf[:, :, :old].copy_(layer.keys)
        vbuf[:, :, :old].copy_(layer.values)
    layer._hfpatch_buffers = (kbuf, vbuf)
    layer.keys, layer.values = kbuf[:, :, :old], vbuf[:, :, :old]


def _update_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
    """``DynamicLayer.update`` without the concatenation: append into the layer's buffer (bound per instance)."""
    if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
    old = self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0
    new = old + key_states.shape[-2]
    if not _buffer_view(self) or new > self._hfpatch_buffers[0].shape[-2] \
            or self._hfpatch_buffers[0].shape[0] != key_states.shape[0] \
            or self._hfpatch_buffers[0].dtype != key_states.dtype:
        _allocate(self, key_states, value_states, new)
    kbuf, vbuf = self._hfpatch_buffers
    kbuf[:, :, old:new].copy_(key_states)
    vbuf[:, :, old:new].copy_(value_states)
    self.keys, self.values = kbuf[:, :, :new], vbuf[:, :, :new]
    return self.keys, self.values


def make_growable(cache, capacity: int | None = None):
    """Make every full-attention ``DynamicLayer`` of ``cache`` append in place; returns the cache.

    ``capacity`` (positions) sizes the first buffer of each layer, e.g. prompt length + max_new_tokens;
    without it buffers grow by half their size (at least ``MIN_RESERVE`` positions) when full. Sliding
    window layers and other layer types are left as they are.
    """
    if not cache.layers:
        raise ValueError("make_growable needs a cache whose layers exist already: build the DynamicCache with "
                         "config= (or use growable_cache(config))")
    for layer in cache.layers:
        if compat.is_full_attention_layer(layer):
            # An instance attribute, not a subclass: the speculative engine only compacts caches whose layers
            # are exactly DynamicLayer (compat.compactable_cache), and this layer still is one.
            layer.update = types.MethodType(_update_in_place, layer)
            layer._hfpatch_capacity = capacity
    cache._hfpatch_growable = True
    return cache


def growable_cache(config, capacity: int | None = None):
    """A new ``DynamicCache`` for ``config`` (a model config) whose full-attention layers append in place."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return make_growable(compat.new_dynamic_cache(text), capacity)


def is_growable(cache) -> bool:
    return bool(getattr(cache, "_hfpatch_growable", False))
