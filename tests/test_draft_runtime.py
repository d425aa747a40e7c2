"""The draft's runtime (draft_dtype, draft_kernels): a private copy drafts, the user's draft is untouched, and the
output stays the target's own."""
from __future__ import annotations

import pytest
import torch
from test_draft_model import _draft_for, _recipe, _target
from test_speculative import _prompts

import hfpatch
from hfpatch.errors import PatchError
from hfpatch.kernels.onednn_linear import onednn_available
from hfpatch.techniques.generation.draft_runtime import copy_in_dtype, prepare_draft

DYNAMIC = {"tree": "dynamic", "max_nodes": 12, "width": 4, "min_probability": 0.0}
needs_onednn = pytest.mark.skipif(not onednn_available(torch.float32)[0], reason="no oneDNN in this torch build")


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_copy_in_dtype_converts_every_float_tensor_keeps_ties_and_leaves_the_source_alone():
    target = _target("llama")
    target.config.tie_word_embeddings = True
    target.tie_weights()
    before = _snapshot(target)
    clone = copy_in_dtype(target, torch.bfloat16)
    assert {p.dtype for p in clone.parameters()} == {torch.bfloat16}
    assert clone.lm_head.weight is clone.model.embed_tokens.weight
    assert all(not p.requires_grad for p in clone.parameters())
    assert {p.dtype for p in target.parameters()} == {torch.float32}
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = target.to(torch.bfloat16)(ids).logits
        got = clone(ids).logits
    assert torch.equal(expected, got)


def test_as_given_draft_is_used_directly():
    draft = _target("llama")
    runner, info = prepare_draft(draft, None, "default")
    assert runner is draft and info["runtime"] == "the draft as given"
    runner, _ = prepare_draft(draft, "float32", "default")  # its own dtype: nothing to copy
    assert runner is draft


@pytest.mark.parametrize("settings", [
    {"draft_dtype": "bfloat16"},
    pytest.param({"draft_dtype": "bfloat16", "draft_kernels": "onednn"}, marks=needs_onednn),
    pytest.param({"draft_kernels": "onednn"}, marks=needs_onednn),
])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_private_draft_keeps_greedy_output_identical_and_the_given_draft_untouched(kind, settings):
    target = _target(kind)
    draft = _draft_for(target, kind)
    draft_state = _snapshot(draft)
    draft_forwards = {name: m.forward for name, m in draft.named_modules()}
    prompts = _prompts(3, seed=7)
    expected = [target.generate(p, max_new_tokens=20, do_sample=False) for p in prompts]
    with hfpatch.patch(target, _recipe(**DYNAMIC, **settings), draft_model=draft) as handle:
        got = [target.generate(p, max_new_tokens=20, do_sample=False) for p in prompts]
        stats = handle.stats["draft_model"]
    for ref, out in zip(expected, got):
        assert torch.equal(ref, out)
    runtime = stats["draft_runtime"]
    assert runtime["runtime"].startswith("a private copy")
    assert runtime["dtype"] == settings.get("draft_dtype", "float32")
    if settings.get("draft_kernels") == "onednn":
        assert runtime["packed_layers"] > 0 and runtime["counters"]["packed_calls"] > 0
    assert stats["drafters"]["draft_model"]["draft_forwards"] > 0
    # the user's draft: same weights, dtype and (unpatched) forwards
    assert all(torch.equal(draft_state[k], v) for k, v in draft.state_dict().items())
    assert all(m.forward == draft_forwards[name] for name, m in draft.named_modules())


def test_the_private_copy_is_freed_at_unpatch_while_the_handle_is_kept():
    import gc
    import weakref

    target = _target("llama")
    draft = _draft_for(target, "llama")
    handle = hfpatch.patch(target, _recipe(**DYNAMIC, draft_dtype="bfloat16"), draft_model=draft)
    target.generate(_prompts(1, seed=3)[0], max_new_tokens=4, do_sample=False)
    private = weakref.ref(handle.techniques[0].drafter.draft_model)
    assert private() is not draft
    handle.unpatch()
    gc.collect()
    assert private() is None
    assert handle.stats["draft_model"]["draft_runtime"]["dtype"] == "bfloat16"  # stats still readable


def test_onednn_draft_refused_for_an_unsupported_dtype_with_the_fix():
    target = _target("llama")
    draft = _draft_for(target, "llama").to(torch.float16)
    with pytest.raises(PatchError, match="draft_kernels='default'"):
        hfpatch.patch(target, _recipe(**DYNAMIC, draft_kernels="onednn"), draft_model=draft)
    assert not hfpatch.active_patches(target)


def test_bad_draft_dtype_is_refused_by_name():
    target = _target("llama")
    draft = _draft_for(target, "llama")
    with pytest.raises(Exception, match="draft_dtype"):
        hfpatch.patch(target, _recipe(**DYNAMIC, draft_dtype="float8"), draft_model=draft)


DRAFT_RECIPES = sorted(r["name"] for r in hfpatch.list_recipes()
                       if "draft_model" in {t["type"] for t in hfpatch.recipe.resolve_recipe(r["name"]).techniques})


@needs_onednn
@pytest.mark.parametrize("recipe", DRAFT_RECIPES)
def test_every_builtin_draft_recipe_gives_the_unpatched_greedy_output(recipe):
    """The -cpu recipes included: their private draft copies change only what is proposed; dyspec-cpu's packed
    target (onednn_linear) matches the unpatched target up to float rounding, which these prompts do not meet."""
    assert {"draft-model", "dyspec", "rasd", "draft-model-cpu", "dyspec-cpu", "rasd-cpu"} <= set(DRAFT_RECIPES)
    target = _target("llama")
    draft = _draft_for(target, "llama")
    prompts = _prompts(3, seed=11)
    expected = [target.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    techniques = {t["type"]: t for t in hfpatch.recipe.resolve_recipe(recipe).techniques}
    # a tiny random draft spreads its probability thinly over 128 ids, so its trees would be cut to nothing:
    # draft every candidate and keep the whole tree, so that verification really runs
    overrides = {"min_probability": 0.0} if techniques["draft_model"]["tree"] == "dynamic" else {}
    if "adaptive_tree" in techniques:
        overrides.update(node_cost=0.0, first_draft_cost=0.0)
    with hfpatch.patch(target, recipe, draft_model=draft, **overrides) as handle:
        got = [target.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
        stats = handle.stats["draft_model"]
    for ref, out in zip(expected, got):
        assert torch.equal(ref, out)
    assert stats["fallback"] is None and stats["drafters"]["draft_model"]["accepted_tokens"] > 0
