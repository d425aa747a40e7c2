"""Visual-token pruning (family "vision"): selection functions, budgets, and the patch inside generate.

The reference for every pruned run is the unpatched model run on the hand-pruned sequence: the same kept
positions cut out of the merged input embeddings (survivors keep their original position ids, shorter rows are
left-padded) and given to the unpatched model's own `generate` as `inputs_embeds`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

import hfpatch
from hfpatch.errors import RecipeError, UnsupportedModelError
from hfpatch.kernels.diverse_select import diverse_select
from hfpatch.techniques.vision.hiprune import hiprune_select
from hfpatch.techniques.vision.pool_prune import pool_select, pooled_grid

IMAGE = 127  # the tiny models' image token id
NEW = 5
SELECTORS = ["hiprune", "divprune", "random_prune"]  # techniques that keep a subset of the original tokens
ALL = SELECTORS + ["pool_prune"]


def recipe(kind: str, **params) -> dict:
    return {"hfpatch_version": "1.0", "name": f"test-{kind}", "techniques": [{"type": kind, **params}]}


# ------------------------------------------------------------------------------------------------------------
# hiprune_select on fixed tensors


def test_hiprune_select_anchor_buffers_registers():
    # 4x4 grid; budget 10 with alpha 0.5 -> round(10 * 0.5 / 5) = 1 anchor, 4 buffers, 5 registers
    obj = torch.zeros(16)
    obj[5] = 1.0  # row 1, col 1
    deep = torch.arange(16, dtype=torch.float)  # registers: the highest indices not yet taken
    kept = hiprune_select(obj, deep, (4, 4), 10, alpha=0.5)
    assert kept.tolist() == sorted([5, 4, 6, 1, 9] + [15, 14, 13, 12, 11])


def test_hiprune_select_grid_edges_do_not_wrap():
    # anchor at row 0, col 3 of a 4x4 grid: neighbours are 2 (left) and 7 (down); 4 (the next row's start) and
    # -1 / out of grid are not neighbours
    obj = torch.zeros(16)
    obj[3] = 1.0
    deep = -torch.arange(16, dtype=torch.float)  # registers: the lowest indices not yet taken
    kept = hiprune_select(obj, deep, (4, 4), 5, alpha=1.0)  # 1 anchor, 2 buffers, 2 registers
    assert kept.tolist() == sorted([3, 2, 7, 0, 1])
    # anchor at the bottom-left corner (row 3, col 0): right 13 and up 8 only
    obj = torch.zeros(16)
    obj[12] = 1.0
    assert hiprune_select(obj, torch.zeros(16), (4, 4), 3, alpha=1.0).tolist() == [8, 12, 13]


def test_hiprune_select_buffers_are_deduplicated_and_cut_at_the_budget():
    # two adjacent anchors (5 and 6 on a 4x4 grid) share no buffer with each other: 5's right is the anchor 6
    obj = torch.zeros(16)
    obj[5], obj[6] = 2.0, 1.0
    deep = torch.zeros(16)
    # budget 10, alpha 1 -> 2 anchors; buffers of 5: 4, (6 taken), 1, 9; of 6: (5 taken), 7, 2, 10 -> 8 + 2 registers
    kept = hiprune_select(obj, deep, (4, 4), 10, alpha=1.0)
    assert set([5, 6, 4, 1, 9, 7, 2, 10]) <= set(kept.tolist()) and len(kept) == 10
    # budget 3, alpha 1 -> 1 anchor (round(0.6)); only its first two buffers fit (left, right), no registers
    assert hiprune_select(obj, deep, (4, 4), 3, alpha=1.0).tolist() == [4, 5, 6]


def test_hiprune_select_small_and_full_budgets():
    obj, deep = torch.rand(16), torch.rand(16)
    # round(4 * 0.1 / 5) = 0 anchors: all registers, the top-4 by deep score
    assert hiprune_select(obj, deep, (4, 4), 4).tolist() == sorted(torch.topk(deep, 4).indices.tolist())
    assert hiprune_select(obj, deep, (4, 4), 16).tolist() == list(range(16))
    assert hiprune_select(obj, deep, (4, 4), 99).tolist() == list(range(16))
    with pytest.raises(ValueError, match="budget must be >= 1"):
        hiprune_select(obj, deep, (4, 4), 0)
    with pytest.raises(ValueError, match=r"\[h \* w\]"):
        hiprune_select(obj[:15], deep, (4, 4), 4)


def test_pool_select_hand_worked():
    features = torch.arange(16, dtype=torch.float).view(16, 1)  # a 4x4 grid holding its own index
    index, pooled = pool_select(features, (4, 4), 4)  # 2x2 windows
    assert index.tolist() == [0, 2, 8, 10]
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    index, pooled = pool_select(features, (4, 4), 1)
    assert index.tolist() == [0] and pooled.flatten().tolist() == [7.5]
    assert pooled_grid((4, 4), 5) == (2, 2)  # the largest square-ish grid within the budget
    assert pooled_grid((2, 6), 3) == (1, 3)
    index, pooled = pool_select(features, (4, 4), 16)
    assert index.tolist() == list(range(16)) and torch.equal(pooled, features)


def test_divprune_first_pick_and_greedy_on_fixed_points():
    # the first pick is the token whose nearest neighbour is farthest (3: alone on the left); then farthest-point
    points = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.05]])
    assert diverse_select(points, 1).tolist() == [3]
    assert diverse_select(points, 2).tolist() == [0, 3]
    assert diverse_select(points, 3).tolist() == [0, 2, 3]


# ------------------------------------------------------------------------------------------------------------
# parameters and refusals


@pytest.mark.parametrize("params, message", [
    ({"budget": 8, "keep_ratio": 0.5}, "exactly one of budget"),
    ({}, "exactly one of budget"),
    ({"budget": 0}, ">= 1"),
    ({"keep_ratio": 0.0}, "> 0"),
    ({"keep_ratio": 1.5}, "<= 1"),
])
@pytest.mark.parametrize("kind", ALL)
def test_budget_and_keep_ratio_refusals(kind, params, message):
    with pytest.raises(RecipeError, match=message):
        hfpatch.patch(tiny_model("llava"), recipe(kind, **params))


def test_unsupported_model_is_refused_by_name():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        hfpatch.patch(model, recipe("hiprune", budget=4))
    assert hfpatch.active_patches(model) == []


def test_vision_family_is_listed():
    listed = {t["name"]: t for t in hfpatch.list_techniques()}
    for name in ALL:
        assert listed[name]["family"] == "vision"
        assert {"budget", "keep_ratio"} <= {p["name"] for p in listed[name]["params"]}


# ------------------------------------------------------------------------------------------------------------
# models, inputs and the hand-pruned reference


def llava_inputs(model, images_per_row=(1, 1), lengths=(3, 5)):
    """Left-padded rows `[text..., <image> x N per image, text...]` with different images per row."""
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(1)
    rows = []
    for count, length in zip(images_per_row, lengths):
        text = torch.randint(3, 100, (length + 2,), generator=gen).tolist()
        row = [1] + text[:length // 2]
        for _ in range(count):
            row += [IMAGE] * n + text[length // 2: length // 2 + 1]
        rows.append(row + text[-1:])
    return _pad(rows) | {"pixel_values": torch.randn(sum(images_per_row), 3, 28, 28, generator=gen)}


def llava_next_inputs(model, sizes=((42, 84), (84, 84))):
    sizes = torch.tensor(sizes)
    gen = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(len(sizes), 5, 3, 42, 42, generator=gen)
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    rows = [[1, 7 + i] + [IMAGE] * count + [9, 10 + i] for i, count in enumerate(counts)]
    return _pad(rows) | {"pixel_values": pixel_values, "image_sizes": sizes}


def _pad(rows):
    width = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return {"input_ids": ids, "attention_mask": mask}


def merged_embeddings(model, inputs):
    """The unpatched model's merged input embeddings (text embeddings with image features scattered in)."""
    inner = model.model
    extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        features = inner.get_image_features(inputs["pixel_values"], **extra).pooler_output
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(list(features))
        mask = inputs["input_ids"] == IMAGE
        return embeds.masked_scatter(mask.unsqueeze(-1), features)


def pooled_embeddings(model, inputs, budget):
    """Merged embeddings with pool_prune's replacement: each image's pooled tokens written into their slots."""
    embeds = merged_embeddings(model, inputs).clone()
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    slots = torch.nonzero((inputs["input_ids"] == IMAGE).flatten()).flatten().view(-1, side * side)
    flat = embeds.view(-1, embeds.shape[-1])
    for image in slots:
        index, pooled = pool_select(flat[image], (side, side), budget)
        flat[image[index]] = pooled
    return embeds


def hand_pruned(model, inputs, keep, embeds=None):
    """The reference sequence: kept positions of the merged embeddings, rows left-padded to the longest."""
    embeds = merged_embeddings(model, inputs) if embeds is None else embeds
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate builds
    width = int(keep.sum(1).max())
    out_embeds = torch.zeros(keep.shape[0], width, embeds.shape[-1])
    out_mask = torch.zeros(keep.shape[0], width, dtype=torch.long)
    out_positions = torch.zeros(keep.shape[0], width, dtype=torch.long)
    for row in range(keep.shape[0]):
        index = torch.nonzero(keep[row]).flatten()
        start = width - len(index)
        out_embeds[row, start:] = embeds[row, index]
        out_mask[row, start:] = mask[row, index]
        out_positions[row, start:] = positions[row, index]
    return out_embeds, out_mask, out_positions


def generate(model, **inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def assert_generate_matches_reference(kind, technique, inputs_fn, reference_embeds=None, **params):
    model = tiny_model(kind)
    reference_model = copy.deepcopy(model)
    inputs = inputs_fn(model)
    handle = hfpatch.patch(model, recipe(technique, **params))
    out = generate(model, **inputs)
    keep = handle.technique(technique).last_keep
    stats = handle.stats[technique]
    assert stats["pruned"] and stats["fallback"] is None
    assert stats["tokens_after"] < stats["tokens_before"]
    assert keep.sum() < keep.numel()
    assert keep[inputs["input_ids"] != IMAGE].all()  # every text (and padding) token stays

    merged = None if reference_embeds is None else reference_embeds(reference_model, inputs)
    embeds, mask, positions = hand_pruned(reference_model, inputs, keep, merged)
    ref = generate(reference_model, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], ref.sequences)
    for got, want in zip(out.logits, ref.logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return handle, stats


# ------------------------------------------------------------------------------------------------------------
# generate against the hand-pruned reference


@pytest.mark.parametrize("technique", SELECTORS)
def test_llava_generate_batch_one(technique):
    _, stats = assert_generate_matches_reference(
        "llava", technique, lambda m: {k: v[:1] for k, v in llava_inputs(m, (1,), (3,)).items()}, budget=2)
    assert [(image["tokens"], image["kept"]) for image in stats["images"]] == [(4, 2)]
    assert stats["prefill_seconds"] > 0
    if technique == "hiprune":
        assert stats["attention_kernel"] in ("torch", "triton", "cpu")


@pytest.mark.parametrize("technique", SELECTORS)
def test_llava_generate_padded_batch_of_two(technique):
    _, stats = assert_generate_matches_reference("llava", technique, llava_inputs, keep_ratio=0.5)
    assert [image["row"] for image in stats["images"]] == [0, 1]
    assert stats["kept_fraction"] == 0.5


@pytest.mark.parametrize("budget", [1, 2])
def test_llava_pool_prune_generate_matches_hand_pooled_reference(budget):
    _, stats = assert_generate_matches_reference(
        "llava", "pool_prune", llava_inputs, reference_embeds=lambda m, i: pooled_embeddings(m, i, budget),
        budget=budget)
    assert [image["kept"] for image in stats["images"]] == [budget, budget]


def test_divprune_keeps_what_diverse_select_picks():
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    handle = hfpatch.patch(model, recipe("divprune", budget=2))
    with torch.no_grad():
        model(**inputs)
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    keep = handle.technique("divprune").last_keep
    slots = inputs["input_ids"] == IMAGE
    for row, image in enumerate(features):
        assert keep[row][slots[row]].nonzero().flatten().tolist() == diverse_select(image, 2).tolist()
    assert handle.stats["divprune"]["kernel"] in ("torch", "triton", "cpu")


def test_llava_several_images_per_prompt_repads_rows():
    # row 0 has two images, row 1 one: after pruning row 1 is shorter and is padded on the left
    _, stats = assert_generate_matches_reference(
        "llava", "hiprune", lambda m: llava_inputs(m, (2, 1), (3, 4)), budget=1)
    assert [image["row"] for image in stats["images"]] == [0, 0, 1]
    assert stats["tokens_after"] == 3


@pytest.mark.parametrize("technique", SELECTORS)
def test_llava_next_generate_batch_one(technique):
    _, stats = assert_generate_matches_reference(
        "llava_next", technique, lambda m: {k: v[:1] for k, v in llava_next_inputs(m, ((42, 84),)).items()},
        budget=4)
    # 9 base tokens + a 3x6 high-resolution grid + 3 newlines: the newlines are kept on top of the budget
    assert [(i["tokens"], i["selectable"], i["kept"]) for i in stats["images"]] == [(30, 27, 7)]


@pytest.mark.parametrize("technique", SELECTORS)
def test_llava_next_padded_batch_of_two_different_sizes(technique):
    handle, stats = assert_generate_matches_reference("llava_next", technique, llava_next_inputs, keep_ratio=0.25)
    model = handle.model
    inputs = llava_next_inputs(model)
    keep = handle.technique(technique).last_keep
    newline = model.model.image_newline
    embeds = merged_embeddings(model, inputs)
    is_newline = (embeds == newline).all(-1)
    assert is_newline.sum() > 0 and keep[is_newline].all()


def test_llava_next_pool_prune_pools_each_grid_and_keeps_newlines():
    model = tiny_model("llava_next")
    inputs = {k: v[:1] for k, v in llava_next_inputs(model, ((42, 84),)).items()}
    handle = hfpatch.patch(model, recipe("pool_prune", budget=4))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    # budget 4 shared 1 : 3 by the grids' sizes (9 base, 3x6 high-res): 1x1 + 1x3 pooled tokens, + 3 newlines
    assert [(i["tokens"], i["kept"]) for i in handle.stats["pool_prune"]["images"]] == [(30, 7)]


# ------------------------------------------------------------------------------------------------------------
# identity, round trip, second instance


@pytest.mark.parametrize("kind, inputs_fn", [("llava", llava_inputs), ("llava_next", llava_next_inputs)])
@pytest.mark.parametrize("technique", ALL)
def test_full_budget_gives_unpatched_logits(kind, inputs_fn, technique):
    model = tiny_model(kind)
    inputs = inputs_fn(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    handle = hfpatch.patch(model, recipe(technique, budget=1000))
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert handle.stats[technique]["kept_fraction"] == 1.0 and not handle.stats[technique]["pruned"]


@pytest.mark.parametrize("technique", ALL)
def test_unpatch_restores_and_second_instance_untouched(technique):
    model, other = tiny_model("llava"), tiny_model("llava")
    inputs = llava_inputs(model)
    forward = model.model.forward
    with torch.no_grad():
        expected = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config.vision_config._attn_implementation
    handle = hfpatch.patch(model, recipe(technique, budget=1))
    with torch.no_grad():
        pruned = model(**inputs).logits
        assert pruned.shape[1] < expected.shape[1]
        torch.testing.assert_close(other(**inputs).logits, expected, rtol=0, atol=0)  # same seed, untouched
    assert "forward" not in vars(other.model)
    handle.unpatch()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    assert model.model.forward == forward and "forward" not in vars(model.model) and "forward" not in vars(model)
    assert "get_image_features" not in vars(model.model)
    assert model.config.vision_config._attn_implementation == impl
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_text_only_calls_pass_through():
    model = tiny_model("llava")
    ids = torch.tensor([[1, 5, 6, 7]])
    expected = model.generate(ids, max_new_tokens=3, do_sample=False)
    handle = hfpatch.patch(model, recipe("hiprune", budget=1))
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), expected)
    assert not handle.stats["hiprune"]["pruned"] and handle.stats["hiprune"]["fallback"] is None


def test_precomputed_features_from_before_the_patch_fall_back_with_a_reason():
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
        expected = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         mm_encoder_outputs={"image": features}).logits
    handle = hfpatch.patch(model, recipe("random_prune", budget=1))
    with torch.no_grad():
        got = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    mm_encoder_outputs={"image": features}).logits
    torch.testing.assert_close(got, expected)
    assert "mm_encoder_outputs" in handle.stats["random_prune"]["fallback"]


# ------------------------------------------------------------------------------------------------------------
# built-in recipes and copies


@pytest.mark.parametrize("name, technique", [("hiprune", "hiprune"), ("hiprune-11", "hiprune"),
                                             ("divprune", "divprune"), ("random-prune", "random_prune"),
                                             ("pool-prune", "pool_prune")])
def test_builtin_recipes_prune_a_llava(name, technique):
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    handle = hfpatch.patch(model, name, **({"budget": 1} if name == "hiprune" else {}))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert [image["kept"] for image in handle.stats[technique]["images"]] == [1, 1]
    handle.unpatch()


def test_switching_a_ratio_recipe_to_a_budget_needs_the_ratio_cleared():
    model = tiny_model("llava")
    with pytest.raises(RecipeError, match="budget=64, keep_ratio=None"):
        hfpatch.patch(model, "hiprune-33", budget=2)
    handle = hfpatch.patch(model, "hiprune-33", budget=2, keep_ratio=None)
    assert handle.technique("hiprune").params.budget == 2


@pytest.mark.parametrize("technique", ["hiprune", "divprune"])
def test_deepcopy_of_a_patched_llava_prunes_on_its_own(technique):
    # (no pickle: an unpatched LLaVA that has encoded an image cannot be pickled either, transformers' output
    # capturing hook on its vision tower is a local function)
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    handle = hfpatch.patch(model, recipe(technique, budget=2))
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for clone in (copy.deepcopy(model),):
        (clone_handle,) = hfpatch.active_patches(clone)
        assert clone_handle is not handle
        assert torch.equal(clone.generate(**inputs, max_new_tokens=3, do_sample=False), expected)
        assert clone_handle.stats[technique]["pruned"]
        hfpatch.unpatch(clone)
        assert "forward" not in vars(clone.model)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected)


def test_a_call_with_labels_is_not_pruned_and_says_why():
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
    with torch.no_grad():
        expected = model(**inputs, labels=labels)
    handle = hfpatch.patch(model, recipe("hiprune", budget=1))
    with torch.no_grad():
        got = model(**inputs, labels=labels)
    torch.testing.assert_close(got.loss, expected.loss)
    assert got.logits.shape == expected.logits.shape
    assert "labels" in handle.stats["hiprune"]["fallback"] and not handle.stats["hiprune"]["pruned"]
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] < expected.logits.shape[1]  # without labels: pruned again
    assert handle.stats["hiprune"]["pruned"] and handle.stats["hiprune"]["fallback"] is None


def test_generate_without_a_cache_prunes_every_step_the_same_way():
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    hfpatch.patch(model, recipe("hiprune", budget=2))
    cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False), cached)


def test_a_hand_written_decode_loop_without_positions_continues_at_original_positions():
    """A loop over forward (no generate): the caller passes the uncompacted mask and no position ids; the patch
    compacts the mask and continues the positions where the unpruned sequence would."""
    model = tiny_model("llava")
    reference_model = copy.deepcopy(model)
    inputs = llava_inputs(model)
    handle = hfpatch.patch(model, recipe("hiprune", keep_ratio=0.5))
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        keep = handle.technique("hiprune").last_keep
        embeds, ref_mask, positions = hand_pruned(reference_model, inputs, keep)
        # the unpatched model's positions without position ids ignore padding: 0..L-1, sliced
        positions = torch.arange(mask.shape[1]).expand_as(mask)[keep].view(2, -1)
        ref = reference_model(inputs_embeds=embeds, attention_mask=ref_mask, position_ids=positions, use_cache=True)
        cache, ref_cache = out.cache, ref.cache
        for step in range(3):
            torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], rtol=1e-5, atol=1e-5)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            ref_mask = torch.cat([ref_mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            next_position = torch.full_like(token, inputs["input_ids"].shape[1] + step)
            ref = reference_model(input_ids=token, attention_mask=ref_mask, position_ids=next_position,
                                  cache=ref_cache, use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="a mask of the original sequence"):
            model(input_ids=token, attention_mask=mask[:, 3:], cache=cache)  # neither length


def test_a_peft_wrapped_llava_is_pruned_and_restored():
    peft = pytest.importorskip("peft")
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                                      init_lora_weights=False))
    expected = lora.generate(**inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        logits = lora(**inputs).logits
    handle = hfpatch.patch(lora, recipe("hiprune", budget=1))
    with torch.no_grad():
        assert lora(**inputs).logits.shape[1] == logits.shape[1] - 3  # one image per row, 4 -> 1 token
    lora.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert handle.stats["hiprune"]["tokens_after"] == 2
    handle.unpatch()
    assert torch.equal(lora.generate(**inputs, max_new_tokens=3, do_sample=False), expected)


@pytest.mark.parametrize("options", [{"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}])
@pytest.mark.parametrize("technique", ["hiprune", "random_prune"])
def test_generate_repeating_the_images_per_sequence_prunes_each_copy_alike(technique, options):
    model = tiny_model("llava")
    reference_model = copy.deepcopy(model)
    inputs = llava_inputs(model)
    handle = hfpatch.patch(model, recipe(technique, budget=2))
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, **options)
    stats = handle.stats[technique]
    assert stats["pruned"] and [image["row"] for image in stats["images"]] == [0, 1, 2, 3]
    keep = handle.technique(technique).last_keep
    # rows 2k and 2k + 1 repeat prompt k: same tokens kept; the reference generates from the hand-pruned prompts
    assert torch.equal(keep[0], keep[1]) and torch.equal(keep[2], keep[3])
    embeds, mask, positions = hand_pruned(reference_model, inputs, keep[::2])
    ref = reference_model.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   max_new_tokens=3, do_sample=False, **options)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], ref)


def test_concurrent_generate_calls_prune_independently():
    import threading

    model = tiny_model("llava")
    inputs = [llava_inputs(model, (1, 1), (3, 5)), {k: v.flip(0) for k, v in llava_inputs(model, (1, 1), (4, 2)).items()}]
    handle = hfpatch.patch(model, recipe("hiprune", budget=2))
    expected = [model.generate(**x, max_new_tokens=4, do_sample=False) for x in inputs]
    results = {}

    def run(i):
        for _ in range(3):
            results.setdefault(i, []).append(model.generate(**inputs[i], max_new_tokens=4, do_sample=False))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):  # a thread that raised has fewer results
        assert len(results.get(i, [])) == 3 and all(torch.equal(out, expected[i]) for out in results[i])
    assert handle.stats["hiprune"]["pruned"]


def test_an_object_layer_beyond_the_tower_is_refused_and_the_model_restored():
    model = tiny_model("llava")
    with pytest.raises(hfpatch.errors.PatchError, match="object_layer=5 but the vision tower has 2 layers"):
        hfpatch.patch(model, recipe("hiprune", budget=2, object_layer=5))
    assert hfpatch.active_patches(model) == [] and "forward" not in vars(model.model)


def test_a_llava_with_a_pixtral_tower_is_refused():
    import transformers

    from tiny_models import _text_config

    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, image_size=28, patch_size=14, head_dim=8)
    config = transformers.LlavaConfig(vision_config=vision, text_config=_text_config("llama"), image_token_id=127)
    model = tiny_model("llava", config=config)
    with pytest.raises(UnsupportedModelError, match="Pixtral vision tower"):
        hfpatch.patch(model, recipe("divprune", budget=2))


def test_unpadded_rows_with_different_image_counts_are_repadded_after_pruning():
    # both rows 13 tokens (no padding, so generate drops the all-ones mask); row 0 has two images, row 1 one:
    # pruned, row 1 is shorter and gets left padding and a mask the decode steps keep using
    def inputs_fn(model):
        inputs = llava_inputs(model, (2, 1), (2, 12))
        assert inputs["attention_mask"].all()
        return inputs

    _, stats = assert_generate_matches_reference("llava", "hiprune", inputs_fn, budget=1)
    assert stats["sequence_length_before"] == 13 and stats["sequence_length_after"] == 13 - 3  # row 1's length


def test_a_static_cache_falls_back_with_a_reason():
    model = tiny_model("llava")
    inputs = llava_inputs(model)
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
    handle = hfpatch.patch(model, recipe("hiprune", budget=1))
    got = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)
    assert not handle.stats["hiprune"]["pruned"] and "StaticCache" in handle.stats["hiprune"]["fallback"]
    with torch.no_grad():  # a 4-D mask given to a forward
        mask4d = torch.zeros(2, 1, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1])
        model(**dict(inputs, attention_mask=mask4d))
    assert "4-D" in handle.stats["hiprune"]["fallback"]
