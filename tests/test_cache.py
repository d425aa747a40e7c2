"""hfpatch.cache: the growable KV cache (appends in place) equals transformers' DynamicCache in every use, and the
sparse attention techniques install it through generate (reversibly, per instance)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_sparse_attention import batch
from tiny_models import tiny_model
from transformers.cache_utils import DynamicCache, DynamicLayer

import hfpatch
from hfpatch import compat
from hfpatch.cache import growable_cache, is_growable, make_growable
from hfpatch.techniques.attention import base as attention_base


def prompt(n=2, length=30, pad=(0, 7), seed=0):
    return batch(n, length, seed, pad)


def gen(model, ids, mask, cache=None, **kw):
    extra = {} if cache is None else {compat.cache_kwarg(model): cache}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **extra, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("capacity", [None, 5, 1000])
def test_generate_with_growable_cache_equals_dynamic_cache(kind, capacity):
    """Exact logits with a buffer sized right, too small (it grows several times) or large; left padding,
    batch 2; Gemma 3's sliding-window layers stay DynamicSlidingWindowLayer."""
    model = tiny_model(kind)
    ids, mask = prompt()
    ref_seq, ref_logits = gen(model, ids, mask)
    cache = growable_cache(model.config, capacity)
    seq, logits = gen(model, ids, mask, cache)
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    assert torch.equal(seq, ref_seq)
    full = [layer for layer in cache.layers if type(layer) is DynamicLayer]
    assert full and all(layer.keys.data_ptr() == layer._hfpatch_buffers[0].data_ptr() for layer in full)
    assert cache.get_seq_length() == ids.shape[1] + 7
    assert compat.compactable_cache(cache)  # still a plain DynamicCache of DynamicLayer objects


def test_decode_step_writes_in_place_and_crop_compaction_deepcopy_keep_working():
    with pytest.raises(ValueError, match="config"):
        make_growable(DynamicCache())  # layers appear lazily: nothing to convert
    cache = growable_cache(tiny_model("llama").config, capacity=12)
    assert is_growable(cache)
    ref = DynamicCache()
    g = torch.Generator().manual_seed(0)
    for step in range(20):  # 10 positions, then one at a time past the capacity
        q = 10 if step == 0 else 1
        k, v = torch.randn(2, 2, q, 8, generator=g), torch.randn(2, 2, q, 8, generator=g)
        before = cache.layers[0]._hfpatch_buffers[0].data_ptr() if step else None
        keys, values = cache.update(k, v, 0)
        rk, rv = ref.update(k, v, 0)
        assert torch.equal(keys, rk) and torch.equal(values, rv)
        if 0 < step < 3:  # inside the capacity: no new buffer
            assert cache.layers[0]._hfpatch_buffers[0].data_ptr() == before
    cache.crop(-3)
    ref.crop(-3)
    twin = copy.deepcopy(cache)
    keep = torch.tensor([0, 2, 5, 7, 20, 25])
    compat.keep_cache_positions(cache, keep)  # the speculative engine's compaction (assigns new tensors)
    compat.keep_cache_positions(ref, keep)
    for c in (cache, twin):
        k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
        out = c.update(k, v, 0)
        assert out[0].shape[-2] == (7 if c is cache else 27)
        assert torch.equal(out[0][..., -1:, :], k)
    assert torch.equal(cache.layers[0].keys[..., :6, :], ref.layers[0].keys)
    # the copy made after the crop holds its own buffer, with the views pointing into it
    assert twin.layers[0].keys.data_ptr() == twin.layers[0]._hfpatch_buffers[0].data_ptr()
    assert twin.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr()


@pytest.mark.parametrize("recipe", ["recycled-attention-paper", "recycled-attention", "tidal-decode", "sink-window",
                                    "quest"])
def test_sparse_recipes_generate_through_the_growable_cache_and_unpatch(recipe):
    model = tiny_model("llama")
    twin = type(model)(model.config).eval()
    ids, mask = prompt()
    ref_seq, ref_logits = gen(model, ids, mask)
    seen = []
    real = growable_cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_base, "growable_cache", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
        with hfpatch.patch(model, recipe, budget=4096, kv_cache="growable") as handle:  # covers everything: exact
            seq, logits = gen(model, ids, mask)
            assert handle.stats[handle.techniques[0].name]["kv_cache"] == "growable"
            twin.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)  # twin untouched
            assert len(seen) == 1
            gen(model, ids, mask, cache=DynamicCache())  # the caller's cache is used as is
            assert "passed a cache" in handle.stats[handle.techniques[0].name]["kv_cache"]
            assert len(seen) == 1
        with hfpatch.patch(model, recipe, budget=4096, kv_cache="dynamic") as handle:  # transformers' cache
            gen(model, ids, mask)
            assert handle.stats[handle.techniques[0].name]["kv_cache"] is None and len(seen) == 1
        with hfpatch.patch(model, recipe, budget=4096) as handle:  # the default is the growable cache
            gen(model, ids, mask)
            assert handle.stats[handle.techniques[0].name]["kv_cache"] == "growable" and len(seen) == 2
        gen(model, ids, mask)
        assert len(seen) == 2  # unpatched: generate is transformers' own again
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(seq, ref_seq)
    assert len(seen[0].layers) == model.config.num_hidden_layers and seen[0].get_seq_length() == ids.shape[1] + 7
    # buffers sized once from prompt + max_new_tokens
    assert seen[0].layers[0]._hfpatch_buffers[0].shape[-2] == ids.shape[1] + 8
