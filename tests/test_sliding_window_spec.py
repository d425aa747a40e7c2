"""Speculative generate on sliding-window models with prompts longer than the window: the tree mask of sliding
layers applies each node's window, and the sliding layers' cache is rolled back to the accepted path."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_speculative import _chi_square_p_value, _stats
from tiny_models import _TEXT, tiny_model

import hfpatch
from hfpatch import compat

WINDOW = 16


def _model(kind: str, seed: int = 0):
    """Tiny Gemma 3 (sliding and full layers) or Mistral (every layer sliding) with a 16-token window."""
    if kind == "gemma3_text":
        return tiny_model(kind, seed=seed)  # tiny_models' Gemma 3: window 16, one sliding and one full layer
    config = transformers.MistralConfig(**_TEXT, sliding_window=WINDOW)
    return tiny_model("mistral", seed=seed, config=config)


def _long_prompt(seed: int, length: int = 41) -> torch.Tensor:
    """A repetitive prompt (so drafts get accepted) well past the window."""
    part = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(seed))
    return part.repeat(1, length // 12 + 1)[:, :length]


def _full_draft(target):
    """A one-layer full-attention draft sharing the target's embeddings (a sliding draft stops drafting at its
    window, so it would not exercise the target's sliding tree masks)."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention"]
    else:
        config.sliding_window = None  # Mistral: no window makes every layer a full one
    draft = tiny_model(target.config.model_type, seed=1, config=config)
    own = target.state_dict()
    draft.load_state_dict({k: own[k] if k in own and own[k].shape == v.shape else v
                           for k, v in draft.state_dict().items()})
    return draft


RECIPES = {"ngram-lookup": {}, "token-recycling": {}, "recycling+lookup": {"node_cost": 0.03, "max_tree_nodes": 14},
           "draft-model": {"draft_length": 4}}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("kind", ["gemma3_text", "mistral"])
def test_greedy_identical_past_the_window(kind, recipe):
    model = _model(kind)
    prompts = [_long_prompt(1), _long_prompt(2, length=23)]
    expected = [model.generate(p, max_new_tokens=30, do_sample=False, return_dict_in_generate=True) for p in prompts]
    overrides = dict(RECIPES[recipe])
    if recipe == "draft-model":
        overrides["draft_model"] = _full_draft(model)
    with hfpatch.patch(model, recipe, **overrides) as handle:
        model.generate(prompts[0], max_new_tokens=30, do_sample=False)  # warm the drafters on this text
        for prompt, ref in zip(prompts, expected):
            out = model.generate(prompt, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
            stats = _stats(handle)
            assert stats["fallback"] is None
            assert torch.equal(out.sequences, ref.sequences), (kind, recipe)
            # the returned cache is what plain decoding leaves: each sliding layer holds its window only
            mine, theirs = compat.output_cache(out), compat.output_cache(ref)
            for a, b in zip(mine.layers, theirs.layers):
                assert a.keys.shape == b.keys.shape and not getattr(a, "record_past", False)
                torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
        assert stats["mean_tree_nodes"] >= 1, "no tree was verified past the window"
        if recipe != "draft-model":  # a full-attention draft rarely agrees with a sliding target: trees, no runs
            assert stats["forwards"] < 30 / 1.5, "drafts were rarely accepted: accepted runs are not exercised"


def test_chunked_prefill_past_the_window():
    model = _model("gemma3_text")
    prompt = _long_prompt(3, length=45)
    ref = model.generate(prompt, max_new_tokens=20, do_sample=False)
    with hfpatch.patch(model, "ngram-lookup") as handle:
        out = model.generate(prompt, max_new_tokens=20, do_sample=False, prefill_chunk_size=10)
        assert _stats(handle)["fallback"] is None
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_sampling_distribution_past_the_window():
    model = _model("gemma3_text", seed=3)
    prompt = _long_prompt(4, length=30)
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=0.7, top_k=4)
    runs = 300

    served = {"tokens": 0, "forwards": 0}

    def counts(seed0: int, handle=None, **extra) -> dict:
        found: dict = {}
        for i in range(runs):
            torch.manual_seed(seed0 + i)
            seq = tuple(model.generate(prompt, **{**kwargs, **extra})[0, -3:].tolist())
            found[seq] = found.get(seq, 0) + 1
            if handle is not None:
                assert _stats(handle)["fallback"] is None
                served["tokens"] += _stats(handle)["new_tokens"]
                served["forwards"] += _stats(handle)["forwards"]
        return found

    vanilla = counts(0)
    with hfpatch.patch(model, "token-recycling", template="cpu-14") as handle:
        patched = counts(10_000, handle)
    # tokens beyond one per forward are accepted drafts: sampled paths did descend into trees past the window
    assert served["tokens"] - served["forwards"] > 0.25 * runs, "drafts were rarely accepted"
    assert _chi_square_p_value(vanilla, patched) > 1e-3
    assert _chi_square_p_value(vanilla, counts(20_000, top_k=2)) < 1e-3


def test_a_tree_larger_than_the_window_falls_back_and_says_so():
    model = _model("mistral")
    prompt = _long_prompt(5)
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False)
    with hfpatch.patch(model, "token-recycling", template="cpu-23") as handle:
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), ref)
        assert "does not fit the window (16)" in _stats(handle)["fallback"]
