"""FastV and the in-decoder pruning machinery (hfpatch/techniques/vision/in_llm.py) on tiny VLMs."""
from __future__ import annotations

import pytest
import torch

import hfpatch
import hfpatch.techniques.vision.fastv  # noqa: F401  (registers fastv)
from hfpatch.errors import HfpatchError, RecipeError, UnsupportedModelError
from hfpatch.techniques.vision.in_llm import build_event, visual_spans
from tiny_models import tiny_config, tiny_model

LLAVA_IMAGE = 127
QWEN_IMAGE, QWEN_START, QWEN_END = 120, 122, 123


def recipe(technique: str = "fastv", **params):
    return {"hfpatch_version": "1.0", "name": "test", "techniques": [{"type": technique, **params}]}


def llava_inputs(seed: int = 0, text=(6, 7)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE] * 4 + list(text)])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=generator)}


def qwen_inputs(seed: int = 0, text=(6, 7)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, QWEN_START] + [QWEN_IMAGE] * 4 + [QWEN_END] + list(text)])
    return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": (ids == QWEN_IMAGE).int()}


def gemma3_inputs(seed: int = 0, text=(6, 7)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, 125] + [127] * 4 + [126] + list(text)])
    return {"input_ids": ids, "token_type_ids": (ids == 127).long(),
            "pixel_values": torch.randn(1, 3, 28, 28, generator=generator)}


def left_pad_batch(rows: list[dict], pad: int = 0) -> dict:
    """Two single-row inputs as one left-padded batch (pixels concatenated in row order)."""
    length = max(r["input_ids"].shape[1] for r in rows)
    batch = {"input_ids": [], "attention_mask": []}
    for r in rows:
        ids = r["input_ids"][0]
        gap = length - len(ids)
        batch["input_ids"].append(torch.cat([torch.full((gap,), pad), ids]))
        batch["attention_mask"].append(torch.cat([torch.zeros(gap, dtype=torch.long), torch.ones(len(ids), dtype=torch.long)]))
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in r:
                batch.setdefault(key, []).append(torch.cat([torch.zeros(gap, dtype=r[key].dtype), r[key][0]]))
    out = {key: torch.stack(value) for key, value in batch.items()}
    for key in ("pixel_values", "image_grid_thw"):
        if key in rows[0]:
            out[key] = torch.cat([r[key] for r in rows])
    return out


INPUTS = {"llava": llava_inputs, "qwen2_vl": qwen_inputs, "qwen2_5_vl": qwen_inputs, "gemma3": gemma3_inputs}


def generate(model, inputs, n=5):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False)


# ---------------------------------------------------------------------------------------------------------
# the machinery on fixed tensors

def test_visual_spans_finds_each_run():
    row = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    assert visual_spans(row) == [(1, 3), (5, 8), (9, 10)]
    assert visual_spans(torch.zeros(4, dtype=torch.bool)) == []


def test_build_event_equal_rows_and_dead_slots():
    # row 0 drops positions 2 and 3; row 1 (two pads) drops position 4 only: it has 1 + 2 = 3 positions gone but
    # must keep as many slots as row 0 (4 of 6), so it keeps one pad as a dead slot, never a real token alive
    drop = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    event = build_event(3, drop, valid, 6)
    assert event.layer == 3 and event.kept_len == 4
    assert event.keep.tolist() == [[0, 1, 4, 5], [0, 2, 3, 5]]
    assert event.dead.tolist() == [[False, False, False, False], [True, False, False, False]]
    # nothing to drop (padding alone does not count): no event, so no change to the model's computation
    assert build_event(1, torch.zeros(2, 6, dtype=torch.bool), valid, 6) is None


def test_build_event_row_with_nothing_to_drop_keeps_dropped_tokens_dead():
    drop = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.ones(2, 4, dtype=torch.bool)
    event = build_event(1, drop, valid, 4)
    # row 1 cannot shrink, so row 0 keeps its dropped tokens in dead slots (masked as keys)
    assert event.kept_len == 4 and event.keep.tolist() == [[0, 1, 2, 3]] * 2
    assert event.dead.tolist() == [[False, True, True, False], [False] * 4]


# ---------------------------------------------------------------------------------------------------------
# FastV on tiny models

@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "gemma3"])
def test_full_budget_is_identity(kind):
    model = tiny_model(kind)
    inputs = INPUTS[kind]()
    reference = model(**inputs).logits
    with hfpatch.patch(model, recipe(budget=4, layer=1)) as handle:
        logits = model(**inputs).logits
        assert handle.stats["fastv"]["pruned"] is False
        assert handle.stats["fastv"]["visual_tokens"] == [4]
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def test_pruned_forward_keeps_shape_and_changes_logits():
    model = tiny_model("llava")
    inputs = llava_inputs()
    reference = model(**inputs).logits
    with hfpatch.patch(model, recipe(budget=1, layer=1)) as handle:
        logits = model(**inputs).logits
        stats = handle.stats["fastv"]
    assert logits.shape == reference.shape
    assert stats["pruned"] and stats["layer"] == 1 and stats["kept_visual_tokens"] == [1]
    assert stats["pruned_sequence_length"] == 5
    # layer 0 sees everything: the positions before the image are unchanged, the text after it is not
    torch.testing.assert_close(logits[:, :2], reference[:, :2], rtol=0, atol=1e-5)
    assert (logits[:, -1] - reference[:, -1]).abs().max() > 1e-4


def _reference_next_token(model, ids, pixel_values, keep_prompt, layer_k):
    """Greedy next token computed by hand: layers < K on every position, layers >= K on the kept prompt positions
    plus every generated token, no cache, original positions (the sequence a FastV prefill + decode must see)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    features = torch.cat(list(features)).to(embeds.dtype)
    mask = (ids == LLAVA_IMAGE)[..., None].expand_as(embeds)
    hidden = embeds.masked_scatter(mask, features)
    lm = inner.language_model
    positions = torch.arange(ids.shape[1])
    keep = torch.cat([keep_prompt, torch.arange(int(keep_prompt.max()) + 1, ids.shape[1])])
    keep = keep[keep >= 0]
    for index, decoder_layer in enumerate(lm.layers):
        if index == layer_k:
            hidden, positions = hidden[:, keep], positions[keep]
        cos, sin = lm.rotary_emb(hidden, positions[None])
        hidden = decoder_layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions[None])
    return int(model.lm_head(lm.norm(hidden))[0, -1].argmax())


def test_generate_equals_reference_loop_on_hand_pruned_sequence():
    model = tiny_model("llava")
    inputs = llava_inputs(seed=3)
    handle = hfpatch.patch(model, recipe(budget=2, layer=1))
    out = generate(model, inputs, n=6)
    technique = handle.techniques[0]
    keep_prompt = technique.pruner.event.keep[0]
    assert handle.stats["fastv"]["kept_visual_tokens"] == [2]
    handle.unpatch()
    ids = inputs["input_ids"]
    prompt_len = ids.shape[1]
    expected = ids
    for _ in range(6):
        token = _reference_next_token(model, expected, inputs["pixel_values"], keep_prompt, 1)
        expected = torch.cat([expected, torch.tensor([[token]])], dim=1)
    assert out[0, prompt_len:].tolist() == expected[0, prompt_len:].tolist()


@pytest.mark.parametrize("kind,implementation", [("llava", "sdpa"), ("llava", "eager"), ("qwen2_vl", "sdpa"),
                                                 ("qwen2_vl", "eager"), ("qwen2_5_vl", "sdpa"), ("gemma3", "sdpa"),
                                                 ("gemma3", "eager")])
def test_padded_batch_rows_equal_their_single_runs(kind, implementation):
    model = tiny_model(kind)
    model.set_attn_implementation(implementation)
    long_row = INPUTS[kind](seed=1, text=(6, 7, 8, 9))
    short_row = INPUTS[kind](seed=2, text=(9,))
    with hfpatch.patch(model, recipe(budget=1, layer=1)) as handle:
        singles = [generate(model, row)[0, row["input_ids"].shape[1]:] for row in (long_row, short_row)]
        batch = left_pad_batch([long_row, short_row])
        out = generate(model, batch)
        stats = handle.stats["fastv"]
    assert stats["pruned"] and stats["kept_visual_tokens"] == [1, 1]
    # the short row has 3 pads; both rows drop 3 visual tokens, so the short row keeps pads as dead slots
    assert stats["dead_slots"] == 3
    length = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        assert out[row, length:].tolist() == single.tolist()


def test_gemma3_sliding_layers_after_k_past_the_window():
    # layers 1 and 2 slide (window 16) and run on the pruned sequence; 20 new tokens take the sequence past the
    # window, where each pruned sliding layer's mask is rebuilt over original positions
    config = tiny_config("gemma3")
    config.text_config.num_hidden_layers = 3
    config.text_config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    model = tiny_model("gemma3", config=config)
    long_row, short_row = gemma3_inputs(seed=1, text=(6, 7, 8, 9)), gemma3_inputs(seed=2, text=(9,))
    with hfpatch.patch(model, recipe(budget=1, layer=1)) as handle:
        singles = [generate(model, row, n=20)[0, row["input_ids"].shape[1]:] for row in (long_row, short_row)]
        batch = left_pad_batch([long_row, short_row])
        out = generate(model, batch, n=20)
        assert handle.stats["fastv"]["pruned"]
    length = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        assert out[row, length:].tolist() == single.tolist()


def test_keep_ratio_and_stats():
    model = tiny_model("qwen2_vl")
    with hfpatch.patch(model, recipe(keep_ratio=0.5, layer=1)) as handle:
        generate(model, qwen_inputs(), n=2)
        stats = handle.stats["fastv"]
    assert stats["visual_tokens"] == [4] and stats["kept_visual_tokens"] == [2]
    assert stats["sequence_length"] == 10 and stats["pruned_sequence_length"] == 8


def test_inputs_embeds_only_is_not_pruned_and_says_why():
    model = tiny_model("llava")
    embeds = model.get_input_embeddings()(torch.tensor([[1, 5, 6, 7]]))
    reference = model(inputs_embeds=embeds).logits
    with hfpatch.patch(model, recipe(budget=1, layer=1)) as handle:
        logits = model(inputs_embeds=embeds).logits
        assert "inputs_embeds" in handle.stats["fastv"]["reason"]
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_unpatch_restores_and_second_instance_untouched():
    model, other = tiny_model("llava"), tiny_model("llava")
    inputs = llava_inputs()
    reference = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    implementation = model.config.get_text_config()._attn_implementation
    handle = hfpatch.patch(model, recipe(budget=1, layer=1))
    assert (model(**inputs).logits - reference).abs().max() > 1e-4
    torch.testing.assert_close(other(**inputs).logits, reference, rtol=0, atol=0)
    handle.unpatch()
    torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=0)
    assert model.config.get_text_config()._attn_implementation == implementation
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_refusals():
    with pytest.raises(RecipeError, match="exactly one of budget"):
        hfpatch.patch(tiny_model("llava"), recipe(budget=2, keep_ratio=0.5))
    with pytest.raises(RecipeError, match="exactly one of budget"):
        hfpatch.patch(tiny_model("llava"), recipe(layer=1))
    with pytest.raises(RecipeError):
        hfpatch.patch(tiny_model("llava"), recipe(budget=0))
    with pytest.raises(HfpatchError, match="decoder layers"):
        hfpatch.patch(tiny_model("llava"), recipe(budget=2, layer=2))
    with pytest.raises(UnsupportedModelError, match="llama"):
        hfpatch.patch(tiny_model("llama"), recipe(budget=2, layer=1))


def test_builtin_recipes_patch_by_name():
    model = tiny_model("llava")
    for name, kept in (("fastv", 2), ("fastv-25", 1)):
        # the tiny model has 2 decoder layers, so the paper's K=2 is overridden to K=1
        with hfpatch.patch(model, name, layer=1) as handle:
            generate(model, llava_inputs(), n=2)
            assert handle.stats["fastv"]["kept_visual_tokens"] == [kept]


# ---------------------------------------------------------------------------------------------------------
# ToDRE: stage 1 (k-center before the language model) and stage 2 (all visual tokens dropped inside it)

def four_layer_llava():
    config = tiny_config("llava")
    config.text_config.num_hidden_layers = 4
    return tiny_model("llava", config=config)


def test_todre_stage_one_alone_is_k_center_selection():
    from hfpatch.kernels.diverse_select import diverse_select

    model = tiny_model("llava")
    inputs = llava_inputs(seed=4)
    features = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output[0]
    with hfpatch.patch(model, recipe("todre", budget=2, threshold=0.0)) as handle:
        generate(model, inputs, n=2)
        keep = handle.technique("todre").last_keep
        assert "stage2" not in handle.stats["todre"]
    expected = diverse_select(features, 2, method="k_center")
    image_positions = torch.nonzero(inputs["input_ids"][0] == LLAVA_IMAGE).flatten()
    assert keep[0, image_positions].nonzero().flatten().tolist() == expected.tolist()


def test_todre_stage_two_drops_every_visual_token_at_the_first_layer_below_threshold():
    model = four_layer_llava()
    inputs = llava_inputs(seed=5)
    # shares of layers 0, 1, 2 with stage 2 observing but never firing
    with hfpatch.patch(model, recipe("todre", budget=4, threshold=1e-9, start_layer=1)) as handle:
        generate(model, inputs, n=1)
        shares = handle.stats["todre"]["stage2"]["visual_attention_share"]
    assert len(shares) == 3
    threshold = sorted(shares)[1] + 1e-6  # below it: the two smallest shares
    expected_layer = 1 + next(i for i, share in enumerate(shares) if share < threshold)
    handle = hfpatch.patch(model, recipe("todre", budget=4, threshold=threshold, start_layer=1))
    out = generate(model, inputs, n=5)
    stage2 = handle.stats["todre"]["stage2"]
    handle.unpatch()
    assert stage2["pruned"] and stage2["layer"] == expected_layer and stage2["kept_visual_tokens"] == [0]
    # generate == the unpatched layers run by hand with the image gone from that layer on
    ids = inputs["input_ids"]
    text = torch.nonzero(ids[0] != LLAVA_IMAGE).flatten()
    sequence = ids
    for _ in range(5):
        token = _reference_next_token(model, sequence, inputs["pixel_values"], text, expected_layer)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert out[0, ids.shape[1]:].tolist() == sequence[0, ids.shape[1]:].tolist()


def _reference_two_stage_next_token(model, ids, pixel_values, stage1, layer_k, stage2):
    """Greedy next token by hand for ToDRE with both stages: every layer reads only the `stage1` prompt positions
    (text + the visual tokens stage 1 kept) at their ORIGINAL positions, layers >= K only `stage2` (the text);
    every generated token everywhere; no cache."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    features = torch.cat(list(features)).to(embeds.dtype)
    hidden = embeds.masked_scatter((ids == LLAVA_IMAGE)[..., None].expand_as(embeds), features)
    lm = inner.language_model
    generated = torch.arange(int(stage1.max()) + 1, ids.shape[1])
    positions = torch.cat([stage1, generated])
    later = torch.cat([stage2, generated])
    hidden = hidden[:, positions]
    for index, decoder_layer in enumerate(lm.layers):
        if index == layer_k:
            survive = torch.isin(positions, later)
            hidden, positions = hidden[:, survive], positions[survive]
        cos, sin = lm.rotary_emb(hidden, positions[None])
        hidden = decoder_layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions[None])
    return int(model.lm_head(lm.norm(hidden))[0, -1].argmax())


def test_todre_both_stages_generate_equals_hand_pruned_reference():
    # The assembled LLaVA's ToDRE answers (docs/results/vision.md) were checked the same way on the real model:
    # stage 1 keeps the k-center tokens at their original positions, stage 2 removes them from layer K on.
    from hfpatch.kernels.diverse_select import diverse_select

    model = four_layer_llava()
    inputs = llava_inputs(seed=6, text=(6, 7, 8))
    ids = inputs["input_ids"]
    with hfpatch.patch(model, recipe("todre", budget=2, threshold=1.0, start_layer=2)) as handle:
        out = generate(model, inputs, n=5)
        stats = handle.stats["todre"]
    assert stats["tokens_after"] == 2 and stats["stage2"]["layer"] == 2 and stats["stage2"]["kept_visual_tokens"] == [0]
    features = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output[0]
    image = torch.nonzero(ids[0] == LLAVA_IMAGE).flatten()
    text = torch.nonzero(ids[0] != LLAVA_IMAGE).flatten()
    stage1 = torch.cat([text, image[diverse_select(features, 2, method="k_center")]]).sort().values
    sequence = ids
    for _ in range(5):
        token = _reference_two_stage_next_token(model, sequence, inputs["pixel_values"], stage1, 2, text)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert out[0, ids.shape[1]:].tolist() == sequence[0, ids.shape[1]:].tolist()


def test_todre_both_stages_on_a_padded_batch_rows_equal_single_runs():
    model = four_layer_llava()
    long_row, short_row = llava_inputs(seed=1, text=(6, 7, 8, 9)), llava_inputs(seed=2, text=(9,))
    with hfpatch.patch(model, recipe("todre", budget=2, threshold=1.0, start_layer=2)) as handle:
        singles = [generate(model, row)[0, row["input_ids"].shape[1]:] for row in (long_row, short_row)]
        batch = left_pad_batch([long_row, short_row])
        out = generate(model, batch)
        stats = handle.stats["todre"]
    assert stats["tokens_after"] == 4 and stats["stage2"]["layer"] == 2
    assert stats["stage2"]["visual_tokens"] == [2, 2] and stats["stage2"]["kept_visual_tokens"] == [0, 0]
    length = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        assert out[row, length:].tolist() == single.tolist()


def test_todre_unpatch_restores():
    model = four_layer_llava()
    inputs = llava_inputs()
    reference = model(**inputs).logits
    handle = hfpatch.patch(model, recipe("todre", keep_ratio=0.5, threshold=1.0))
    assert model(**inputs).logits.shape[1] < reference.shape[1]  # stage 1 shortens the sequence
    handle.unpatch()
    torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=0)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_rows_with_images_of_different_sizes_keep_dropped_tokens_dead():
    # row 0: a 4x8 image (8 tokens), row 1: a 4x4 image (4 tokens) and one pad; with budget 1 row 0 drops 7 of its
    # 14 positions and row 1 only 4 of 14 (3 tokens and the pad), so both keep 10 slots: row 0 keeps 3 of its
    # dropped visual tokens as dead slots (masked for every query)
    model = tiny_model("qwen2_vl")
    first = qwen_inputs(seed=1, text=(6, 7))
    generator = torch.Generator().manual_seed(2)
    ids = torch.tensor([[1, 5, QWEN_START] + [QWEN_IMAGE] * 8 + [QWEN_END] + [6, 7]])
    first = {"input_ids": ids, "pixel_values": torch.randn(32, 3 * 2 * 14 * 14, generator=generator),
             "image_grid_thw": torch.tensor([[1, 4, 8]]), "mm_token_type_ids": (ids == QWEN_IMAGE).int()}
    second = qwen_inputs(seed=3, text=(9, 9, 9, 9, 9))
    with hfpatch.patch(model, recipe(budget=1, layer=1)) as handle:
        singles = [generate(model, row)[0, row["input_ids"].shape[1]:] for row in (first, second)]
        batch = left_pad_batch([first, second])
        batch["image_grid_thw"] = torch.cat([first["image_grid_thw"], second["image_grid_thw"]])
        out = generate(model, batch)
        stats = handle.stats["fastv"]
    assert stats["visual_tokens"] == [8, 4] and stats["kept_visual_tokens"] == [1, 1]
    assert stats["pruned_sequence_length"] == 10 and stats["dead_slots"] == 3
    length = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        assert out[row, length:].tolist() == single.tolist()


def test_several_images_per_prompt_keep_budget_each():
    model = tiny_model("llava")
    generator = torch.Generator().manual_seed(6)
    ids = torch.tensor([[1, 5] + [LLAVA_IMAGE] * 4 + [6] + [LLAVA_IMAGE] * 4 + [7, 8]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 28, 28, generator=generator)}
    with hfpatch.patch(model, recipe(budget=1, layer=1)) as handle:
        generate(model, inputs, n=2)
        keep = handle.techniques[0].pruner.event.keep[0].tolist()
        assert handle.stats["fastv"]["kept_visual_tokens"] == [2]
    # one survivor in each image's span (positions 2-5 and 7-10), every text token kept
    assert sum(2 <= p <= 5 for p in keep) == 1 and sum(7 <= p <= 10 for p in keep) == 1
    assert {0, 1, 6, 11, 12} <= set(keep)


def test_deep_copy_of_a_fastv_model_prunes_on_its_own():
    import copy

    model = tiny_model("llava")
    inputs = llava_inputs(seed=7)
    handle = hfpatch.patch(model, recipe(budget=1, layer=1))
    expected = generate(model, inputs)
    assert handle.stats["fastv"]["decoder_prefill_seconds"] > 0
    twin = copy.deepcopy(model)
    assert generate(twin, inputs).tolist() == expected.tolist()
    (twin_handle,) = hfpatch.active_patches(twin)
    assert twin_handle.stats["fastv"]["kept_visual_tokens"] == [1]
    handle.unpatch()  # the copy keeps its own patch
    assert generate(twin, inputs).tolist() == expected.tolist()


def test_a_call_with_labels_is_not_pruned_and_says_why():
    model = tiny_model("llava")
    inputs = llava_inputs()
    labels = inputs["input_ids"].clone()
    reference = model(**inputs, labels=labels)
    with hfpatch.patch(model, recipe(budget=1, layer=1)) as handle:
        out = model(**inputs, labels=labels)
        assert "labels" in handle.stats["fastv"]["reason"] and not handle.stats["fastv"]["pruned"]
        torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=1e-6)
        model(**inputs)  # the next call without labels is pruned again
        assert handle.stats["fastv"]["pruned"]


@pytest.mark.parametrize("kind", ["qwen2_vl", "gemma3"])
def test_todre_padded_batch_rows_equal_single_runs_on_other_families(kind):
    config = tiny_config(kind)
    config.text_config.num_hidden_layers = 3
    config.text_config.layer_types = (["sliding_attention", "full_attention", "sliding_attention"] if kind == "gemma3"
                                      else ["full_attention"] * 3)
    model = tiny_model(kind, config=config)
    long_row, short_row = INPUTS[kind](seed=1, text=(6, 7, 8, 9)), INPUTS[kind](seed=2, text=(9,))
    with hfpatch.patch(model, recipe("todre", budget=2, threshold=1.0, start_layer=1)) as handle:
        singles = [generate(model, row)[0, row["input_ids"].shape[1]:] for row in (long_row, short_row)]
        batch = left_pad_batch([long_row, short_row])
        out = generate(model, batch)
        stats = handle.stats["todre"]
    assert stats["tokens_after"] == 4 and stats["stage2"]["layer"] == 1
    assert stats["stage2"]["kept_visual_tokens"] == [0, 0]
    length = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        assert out[row, length:].tolist() == single.tolist()


def test_fastv_on_llava_next_images_of_different_sizes():
    model = tiny_model("llava_next")
    sizes = torch.tensor([[42, 84], [84, 84]])
    pixel_values = torch.randn(2, 5, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    rows = [{"input_ids": torch.tensor([[1, 7 + i] + [LLAVA_IMAGE] * count + [9, 10 + i]]),
             "pixel_values": pixel_values[i:i + 1], "image_sizes": sizes[i:i + 1]} for i, count in enumerate(counts)]
    with hfpatch.patch(model, recipe(budget=3, layer=1)) as handle:
        singles = [generate(model, row)[0, row["input_ids"].shape[1]:] for row in rows]
        batch = left_pad_batch(rows)
        batch["image_sizes"] = sizes
        out = generate(model, batch)
        stats = handle.stats["fastv"]
    assert stats["visual_tokens"] == counts and stats["kept_visual_tokens"] == [3, 3] and counts[0] != counts[1]
    length = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        assert out[row, length:].tolist() == single.tolist()


def test_fastv_through_a_peft_wrapper_forward_and_generate():
    peft = pytest.importorskip("peft")
    model = tiny_model("llava")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    inputs = llava_inputs(seed=8)
    reference = wrapped(**inputs).logits
    with hfpatch.patch(wrapped, recipe(budget=1, layer=1)) as handle:
        # PEFT's tuner calls the model's forward directly (no forward hooks run): the call is still read
        logits = wrapped(**inputs).logits
        assert handle.stats["fastv"]["pruned"] and handle.stats["fastv"]["kept_visual_tokens"] == [1]
        assert (logits - reference).abs().max() > 1e-4
        wrapped.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.stats["fastv"]["pruned"]
    torch.testing.assert_close(wrapped(**inputs).logits, reference, rtol=0, atol=0)
