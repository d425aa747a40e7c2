"""compat.py: the version-dependent helpers behave the same whatever the transformers version."""
import torch
from tiny_models import tiny_config, tiny_model
from transformers import DynamicCache

from hfpatch import compat


def _filled_cache(model, length: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    ids = torch.arange(3, 3 + length)[None]
    model(input_ids=ids, **{compat.cache_kwarg(model): cache}, use_cache=True)
    return cache


def test_cache_kwarg_follows_the_forward_signature():
    model = tiny_model("llama")
    import inspect

    params = inspect.signature(type(model).forward).parameters
    assert compat.cache_kwarg(model) == ("cache" if "cache" in params else "past_key_values")


def test_keep_positions_on_full_and_sliding_layers():
    config = tiny_config("gemma3_text")
    config.sliding_window = 64
    model = tiny_model("gemma3_text", config=config)
    assert compat.sliding_window(model.config) == 64 and compat.sliding_window(tiny_config("llama")) is None
    cache = _filled_cache(model, 10)
    assert compat.compactable_cache(cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    keep = torch.tensor([0, 1, 2, 5, 7])
    compat.keep_cache_positions(cache, keep)
    assert cache.get_seq_length() == 5
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys[..., keep, :]) and torch.equal(layer.values, values[..., keep, :])
        assert getattr(layer, "cumulative_length", 5) == 5
    compat.keep_cache_positions(cache, torch.arange(3))  # a prefix
    assert cache.get_seq_length() == 3
    llama_cache = _filled_cache(tiny_model("llama"), 6)
    compat.keep_cache_positions(llama_cache, torch.arange(4))
    assert llama_cache.get_seq_length() == 4


def test_tree_mask_registry():
    assert compat.accepts_tree_mask("sdpa") and compat.accepts_tree_mask("eager")
    assert not compat.accepts_tree_mask("flash_attention_2")
    compat.register_attention("hfpatch_test_tree", lambda *a, **k: None, "sdpa", accepts_tree_mask=True)
    assert compat.accepts_tree_mask("hfpatch_test_tree")
    compat.unregister_attention("hfpatch_test_tree")
    assert not compat.accepts_tree_mask("hfpatch_test_tree")
