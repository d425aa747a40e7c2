"""Copies of a patched model: `copy.deepcopy` and `pickle` give a model with an independent, working patch.

The copy is brought back to the unpatched model and its patches are applied again from `handle.to_recipe()`:
it generates as the original does, with its own weights, lists its own handles, and comes off exactly.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from tiny_models import tiny_model

import hfpatch
from hfpatch.techniques.generation.token_recycling import TokenRecycling

# vision recipes patch VLMs only (tests/test_vision_pruning.py copies a patched LLaVA); training recipes patch a
# Trainer, which is not copied as a patched model is
RECIPES = [entry["name"] for entry in hfpatch.list_recipes()
           if not {t.family for t in hfpatch.recipe.resolve_recipe(entry["name"]).build_techniques()}
           & {"vision", "training"}]
# a repetitive prompt (so drafts get accepted) longer than the sparse budget (so decode steps are sparse)
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8]])
NEW = 8


def _overrides(recipe: str) -> dict:
    """Sparse recipes get a budget below the prompt length, so their decode steps really are sparse; draft-model
    recipes get a draft (which the copy drafts with too)."""
    from test_draft_model import builtin_recipe_overrides

    families = {t.family for t in hfpatch.recipe.resolve_recipe(recipe).build_techniques()}
    return {"budget": 12} if "attention" in families else builtin_recipe_overrides(recipe, tiny_model("llama"))


def _generate(model):
    return model.generate(PROMPT, max_new_tokens=NEW, do_sample=False)


def _logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


def _instance_attrs(model):
    return {name: sorted(module.__dict__) for name, module in model.named_modules()}


def _assert_unpatched_like(model, plain):
    """`model` is exactly the unpatched `plain` (a deepcopy made before patching)."""
    assert hfpatch.active_patches(model) == []
    assert _instance_attrs(model) == _instance_attrs(plain)
    assert model.config._attn_implementation == plain.config._attn_implementation
    for (key, value), (plain_key, plain_value) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert key == plain_key and torch.equal(value, plain_value), key
    assert torch.equal(_logits(model), _logits(plain))


def _assert_own_patch(clone, original):
    clone_handles, original_handles = hfpatch.active_patches(clone), hfpatch.active_patches(original)
    assert clone_handles, "the copy lost its patch"
    assert [h.recipe.name for h in clone_handles] == [h.recipe.name for h in original_handles]
    assert not {id(h) for h in clone_handles} & {id(h) for h in original_handles}
    assert all(h.model is clone for h in clone_handles)
    pointers = {p.data_ptr() for p in original.parameters()}
    assert not any(p.data_ptr() in pointers for p in clone.parameters()), "the copy shares weights"


@pytest.mark.parametrize("recipe", RECIPES)
def test_deepcopy_carries_an_independent_working_patch(recipe):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    hfpatch.patch(model, recipe, **_overrides(recipe))
    expected = _generate(model)
    clone, other = copy.deepcopy(model), copy.deepcopy(model)
    _assert_own_patch(clone, model)
    assert torch.equal(_generate(clone), expected)

    # weights are the copy's own, both ways
    before = _logits(model)
    with torch.no_grad():
        clone.model.layers[0].mlp.up_proj.weight.zero_()
    assert not torch.equal(_logits(clone), before)
    assert torch.equal(_logits(model), before)

    # the original can come off (an attention function unregistered, say) and the copy keeps working
    hfpatch.unpatch(model)
    assert torch.equal(_generate(other), expected)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    assert torch.equal(_generate(other), expected)

    assert hfpatch.unpatch(other) == len(hfpatch.active_patches(clone))
    _assert_unpatched_like(other, plain)


@pytest.mark.parametrize("recipe", ["token-recycling", "recycling+lookup", "recycled-attention",
                                    "onednn-linear"])
def test_pickle_round_trip_applies_the_recipe_again(recipe):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    hfpatch.patch(model, recipe, **_overrides(recipe))
    expected = _generate(model)
    loaded = pickle.loads(pickle.dumps(model))
    _assert_own_patch(loaded, model)
    assert torch.equal(_generate(loaded), expected)
    hfpatch.unpatch(model)
    assert torch.equal(_generate(loaded), expected)
    hfpatch.unpatch(loaded)
    _assert_unpatched_like(loaded, plain)
    _assert_unpatched_like(model, plain)


def test_a_warm_draft_table_travels_with_the_copy():
    model = tiny_model("llama")
    handle = hfpatch.patch(model, "token-recycling")
    _generate(model)
    table = handle.technique("token_recycling").export_tensors()[0]["table"]
    clone = copy.deepcopy(model)
    copied = hfpatch.active_patches(clone)[0].technique("token_recycling")
    assert torch.equal(copied.export_tensors()[0]["table"], table)
    _generate(clone)  # the copy's table learns on its own; the original's does not move
    assert torch.equal(handle.technique("token_recycling").export_tensors()[0]["table"], table)


@pytest.mark.parametrize("stack", [("onednn-linear", "token-recycling"), ("recycled-attention-paper", "ngram-lookup")])
def test_stacked_patches_are_copied_in_order(stack):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    for recipe in stack:
        hfpatch.patch(model, recipe, **_overrides(recipe))
    expected = _generate(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _assert_own_patch(clone, model)
        assert [h.recipe.name for h in hfpatch.active_patches(clone)] == list(stack)
        assert torch.equal(_generate(clone), expected)
        assert hfpatch.unpatch(clone) == 2
        _assert_unpatched_like(clone, plain)
    assert hfpatch.unpatch(model) == 2
    _assert_unpatched_like(model, plain)


def test_copy_of_a_peft_wrapped_model_stays_wrapped():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain = copy.deepcopy(lora)
    hfpatch.patch(lora, "token-recycling")
    expected = _generate(lora)
    clone = copy.deepcopy(lora)
    assert type(clone) is type(lora)
    _assert_own_patch(clone.get_base_model(), lora.get_base_model())
    assert hfpatch.active_patches(clone)
    assert torch.equal(_generate(clone), expected)
    hfpatch.unpatch(lora)
    assert _instance_attrs(lora) == _instance_attrs(plain)
    assert torch.equal(_generate(clone), expected)
    again = copy.deepcopy(clone)  # a copy of the copy is still a wrapper with its own patch
    assert type(again) is type(lora) and hfpatch.active_patches(again)
    hfpatch.unpatch(clone)
    assert _instance_attrs(clone) == _instance_attrs(plain)
    assert torch.equal(_logits(clone), _logits(plain))


def test_a_copy_that_cannot_be_patched_again_is_unpatched_with_a_warning(monkeypatch):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    hfpatch.patch(model, "token-recycling")
    expected = _generate(model)

    def refuse(self, model, ctx):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(TokenRecycling, "apply", refuse)
    with pytest.warns(RuntimeWarning, match=r"token-recycling.*injected failure.*unpatched model"):
        clone = copy.deepcopy(model)
    _assert_unpatched_like(clone, plain)
    assert torch.equal(_generate(model), expected)  # the original keeps its patch
    assert hfpatch.active_patches(model)


def test_unpatch_removes_the_copy_hooks():
    model = tiny_model("llama")
    attrs = _instance_attrs(model)
    with hfpatch.patch(model, "onednn-linear"):
        assert "__deepcopy__" in model.__dict__ and "__reduce_ex__" in model.__dict__
        assert "__deepcopy__" not in model.state_dict()
    assert _instance_attrs(model) == attrs
    clone = copy.deepcopy(model)  # an unpatched model copies as plain torch does
    assert hfpatch.active_patches(clone) == []


def test_pickle_of_a_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain = copy.deepcopy(lora)
    hfpatch.patch(lora, "onednn-linear")
    expected = _generate(lora)
    loaded = pickle.loads(pickle.dumps(lora))
    assert type(loaded) is type(lora) and hfpatch.active_patches(loaded)
    assert torch.equal(_generate(loaded), expected)
    again = copy.deepcopy(loaded)  # the unpickled wrapper copies as a wrapper too
    assert type(again) is type(lora) and hfpatch.active_patches(again)
    assert torch.equal(_generate(again), expected)
    hfpatch.unpatch(loaded)
    assert _instance_attrs(loaded) == _instance_attrs(plain)
    assert torch.equal(_logits(loaded), _logits(plain))
