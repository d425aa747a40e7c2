"""Speculative generate on sliding-window models with prompts longer than the window: the tree mask of sliding
layers applies each node's window, and the sliding layers' cache is rolled back to the accepted path."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_draft_model import partially_accepted_tree
from test_speculative import _chi_square_p_value, _sample_counts, _stats
from tiny_models import _TEXT, tiny_model

import hfpatch
from hfpatch import compat
from hfpatch.techniques.generation.tree import DraftTree

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
    """A one-layer full-attention draft sharing the target's embeddings (a full draft for a sliding target; sliding
    drafts are tested below)."""
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


# ----- a draft model with sliding-window layers, past its own window -----------------------------------------

DRAFT_SHAPES = {"chain": {"tree": "chain", "draft_length": 4},
                "dynamic": {"tree": "dynamic", "draft_length": 4, "max_nodes": 10, "width": 3,
                            "min_probability": 0.0}}


def _draft_recipe(**params) -> dict:
    return {"hfpatch_version": "1.0", "name": "sliding-draft", "techniques": [{"type": "draft_model", **params}]}


def _shallow_sliding_draft(target):
    """A one-layer draft whose only layer is a sliding one (window 16), sharing the target's embeddings and first
    layer, so it agrees with the target now and then."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = ["sliding_attention"]
    draft = tiny_model(target.config.model_type, seed=1, config=config)
    own = target.state_dict()
    draft.load_state_dict({k: own[k] if k in own and own[k].shape == v.shape else v
                           for k, v in draft.state_dict().items()})
    assert set(compat.sliding_windows(compat.new_dynamic_cache(draft.config))) == {WINDOW}
    return draft


@pytest.mark.parametrize("shape", sorted(DRAFT_SHAPES))
@pytest.mark.parametrize("kind", ["gemma3_text", "mistral"])
def test_sliding_draft_keeps_drafting_past_its_window(kind, shape):
    """The target's own copy as the draft (Gemma 3: sliding and full layers; Mistral: all sliding): past the
    window it must compute exactly what the target does, so greedy chains are accepted whole. A draft that saw
    positions outside its window (or stopped drafting there, as before) would not be."""
    model = _model(kind)
    prompt = _long_prompt(1)
    ref = model.generate(prompt, max_new_tokens=30, do_sample=False)
    with hfpatch.patch(model, _draft_recipe(**DRAFT_SHAPES[shape]), draft_model=copy.deepcopy(model)) as handle:
        out = model.generate(prompt, max_new_tokens=30, do_sample=False)
        stats = _stats(handle)
    assert torch.equal(out, ref)
    assert stats["fallback"] is None
    drafter = stats["drafters"]["draft_model"]
    assert drafter["window"] == WINDOW and drafter["steps_past_window"] >= 5
    if shape == "chain":
        assert drafter["accepted_past_window"] == drafter["drafted_past_window"] > 20
    else:
        assert drafter["accepted_past_window"] > 15 and stats["forwards"] <= 12
    assert drafter["kv_kept_from_tree"] > 0  # accepted drafted nodes' KV moved from their tree slots


def _perturbed_copy(target, kind: str, noise: float = 0.2):
    """The target's copy with noise on its last layer (Mistral: on both), so that past the window the draft agrees
    with the target often but not always: drafts are partly accepted and its cache is rolled back."""
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, weight in draft.named_parameters():
            if "layers.1" in name or ("layers.0" in name and kind == "mistral"):
                weight.add_(torch.randn(weight.shape, generator=generator) * noise * weight.std().clamp_min(1e-3))
    return draft


@pytest.mark.parametrize("shape", sorted(DRAFT_SHAPES))
@pytest.mark.parametrize("draft_kind", ["shallower", "perturbed"])
@pytest.mark.parametrize("kind", ["gemma3_text", "mistral"])
def test_greedy_identical_with_other_sliding_drafts(kind, draft_kind, shape):
    """A one-layer sliding draft (different depth), and a perturbed copy whose drafts past the window are partly
    accepted (the draft's cache then rolls back past its window, keeping the accepted nodes' KV)."""
    model = _model(kind)
    prompts = [_long_prompt(2), _long_prompt(3, length=23)]
    expected = [model.generate(p, max_new_tokens=25, do_sample=False) for p in prompts]
    draft = _shallow_sliding_draft(model) if draft_kind == "shallower" else _perturbed_copy(model, kind)
    with hfpatch.patch(model, _draft_recipe(**DRAFT_SHAPES[shape]), draft_model=draft) as handle:
        for prompt, ref in zip(prompts, expected):
            assert torch.equal(model.generate(prompt, max_new_tokens=25, do_sample=False), ref), (kind, shape)
            assert _stats(handle)["fallback"] is None
        drafter = _stats(handle)["drafters"]["draft_model"]
    assert drafter["drafted_past_window"] > 0
    if draft_kind == "perturbed":
        assert 0 < drafter["accepted_past_window"] < drafter["drafted_past_window"]
        assert drafter["kv_kept_from_tree"] > 0


@pytest.mark.parametrize("kind", ["gemma3_text", "mistral"])
def test_sliding_draft_cache_rolls_back_past_the_window(kind):
    """After a partial acceptance past the window, the draft's cache holds what transformers' own sliding cache
    holds after a fresh prefill of the accepted sequence (sliding layers: the last window - 1 positions)."""
    target = _model(kind)
    draft = copy.deepcopy(target)
    drafter, call, accepted, new_context, bonus = partially_accepted_tree(draft, _long_prompt(6, length=37)[0].tolist())
    after = DraftTree(bonus, max_nodes=1)
    drafter.draft(after, new_context, call)
    assert drafter.kept_from_tree == len(accepted)
    fresh = compat.new_dynamic_cache(draft.config)
    with torch.no_grad():
        logits = draft(torch.tensor([new_context]), **{compat.cache_kwarg(draft): fresh, "use_cache": True}).logits
    n = len(new_context)
    for mine, theirs, window in zip(call.cache.layers, fresh.layers, compat.sliding_windows(fresh)):
        start = 0 if window is None else n - (window - 1)
        assert theirs.keys.shape[-2] == n - start
        torch.testing.assert_close(mine.keys[..., start:n, :], theirs.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.values[..., start:n, :], theirs.values, rtol=1e-4, atol=1e-5)
    assert after.tokens[1] == int(logits[0, -1].argmax())  # the draft's next guess is a fresh prefill's


@pytest.mark.slow
def test_sampling_distribution_with_a_sliding_draft_past_the_window():
    model = _model("gemma3_text", seed=3)
    prompt = _long_prompt(4, length=30)
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=0.7, top_k=4)
    runs = 300

    def counts(seed0: int, **extra) -> dict:
        return _sample_counts(model, prompt, seed0, runs, **{**kwargs, **extra})

    vanilla = counts(0)
    # Recursive SD's Gumbel siblings from a draft with a sliding and a full layer (the target's copy)
    with hfpatch.patch(model, _draft_recipe(**DRAFT_SHAPES["dynamic"], siblings="auto"),
                       draft_model=copy.deepcopy(model)) as handle:
        patched = counts(10_000)
        drafter = _stats(handle)["drafters"]["draft_model"]
        assert _stats(handle)["fallback"] is None
    assert drafter["accepted_past_window"] > 0.4 * runs, "drafts were rarely accepted past the window"
    assert _chi_square_p_value(vanilla, patched) > 1e-3
    assert _chi_square_p_value(vanilla, counts(20_000, top_k=2)) < 1e-3
