"""Family glue of the visual-token pruning techniques beyond LLaVA: Qwen2-VL / Qwen2.5-VL (M-RoPE positions,
scores on the pre-merge grid, Qwen2.5-VL's window order)."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

import hfpatch
from hfpatch.techniques.vision.families import glue_for

QWEN_IMAGE, QWEN_START, QWEN_END = 120, 122, 123
NEW = 5
SELECTORS = ["hiprune", "divprune", "random_prune"]
#: selectors whose choice for a row does not depend on the other rows (random_prune draws images in batch order)
DETERMINISTIC = ["hiprune", "divprune"]


def recipe(kind: str, **params) -> dict:
    return {"hfpatch_version": "1.0", "name": f"test-{kind}", "techniques": [{"type": kind, **params}]}


def qwen_row(seed: int, text=(6, 7), grid=(1, 4, 4)):
    """One prompt: text, one image of `grid` patches (t, h, w; 2x2 merged into one token), text."""
    generator = torch.Generator().manual_seed(seed)
    t, h, w = grid
    tokens = t * h * w // 4
    ids = torch.tensor([[1, 5, QWEN_START] + [QWEN_IMAGE] * tokens + [QWEN_END] + list(text)])
    return {"input_ids": ids, "pixel_values": torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([list(grid)])}


def qwen_batch(rows):
    width = max(r["input_ids"].shape[1] for r in rows)
    ids, mask = [], []
    for r in rows:
        gap = width - r["input_ids"].shape[1]
        ids.append(torch.cat([torch.zeros(gap, dtype=torch.long), r["input_ids"][0]]))
        mask.append(torch.cat([torch.zeros(gap, dtype=torch.long), torch.ones(r["input_ids"].shape[1], dtype=torch.long)]))
    out = {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask),
           "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
           "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows])}
    out["mm_token_type_ids"] = (out["input_ids"] == QWEN_IMAGE).int()
    return out


def reference_tokens(model, inputs, keep, new=NEW):
    """Greedy tokens of the unpatched model on the hand-pruned sequence, no cache: merged embeddings and the
    model's own M-RoPE positions of the whole sequence, cut to `keep` per row (left-padded to the longest row),
    then each new token at the last position + 1."""
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(list(inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
        embeds = embeds.masked_scatter((inputs["input_ids"] == QWEN_IMAGE).unsqueeze(-1), features)
        positions, _ = inner.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"],
                                            mm_token_type_ids=inputs["mm_token_type_ids"])
        batch, width = keep.shape[0], int(keep.sum(1).max())
        emb = torch.zeros(batch, width, embeds.shape[-1])
        pos = torch.zeros(3, batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row in range(batch):
            index = torch.nonzero(keep[row]).flatten()
            start = width - len(index)
            emb[row, start:], pos[:, row, start:] = embeds[row, index], positions[:, row, index]
            mask[row, start:] = inputs["attention_mask"][row, index]
        out = []
        for _ in range(new):
            logits = model(inputs_embeds=emb, position_ids=pos, attention_mask=mask).logits[:, -1]
            token = logits.argmax(-1)
            out.append(token)
            emb = torch.cat([emb, inner.get_input_embeddings()(token)[:, None]], 1)
            pos = torch.cat([pos, pos[:, :, -1:] + 1], 2)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("technique", SELECTORS)
def test_qwen_generate_equals_reference_on_hand_pruned_sequence(kind, technique):
    model = tiny_model(kind)
    reference = copy.deepcopy(model)
    # row 0: a 4x8 image (8 tokens); row 1: a 4x4 image (4 tokens) and a shorter prompt: left padding
    inputs = qwen_batch([qwen_row(1, text=(6, 7, 8), grid=(1, 4, 8)), qwen_row(2, text=(9,))])
    with hfpatch.patch(model, recipe(technique, budget=2)) as handle:
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        keep = handle.technique(technique).last_keep
        stats = handle.stats[technique]
    assert stats["pruned"] and [image["kept"] for image in stats["images"]] == [2, 2]
    assert keep[inputs["input_ids"] != QWEN_IMAGE].all()
    expected = reference_tokens(reference, inputs, keep)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_batch_one_and_full_budget_identity(kind):
    model = tiny_model(kind)
    row = qwen_row(3)
    inputs = dict(row, mm_token_type_ids=(row["input_ids"] == QWEN_IMAGE).int())
    logits = model(**inputs).logits
    with hfpatch.patch(model, recipe("divprune", budget=4)) as handle:
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=1e-5)
        assert not handle.stats["divprune"]["pruned"]
    with hfpatch.patch(model, recipe("divprune", budget=1)) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
        assert handle.stats["divprune"]["tokens_after"] == 1
        # a plain forward prunes too, with the model's own M-RoPE positions (get_rope_index) sliced
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - 3


def test_qwen_scores_map_merged_tokens_to_their_pre_merge_groups():
    model = tiny_model("qwen2_5_vl")
    glue = glue_for(model)
    grid = torch.tensor([[1, 4, 8]])
    outputs = model.model.get_image_features(torch.randn(32, 3 * 2 * 14 * 14), grid, return_dict=True)
    encoded = glue.describe(model, {"image_grid_thw": grid}, outputs)
    (layout,) = encoded.layouts
    assert layout.num_tokens == 8 and layout.segments[0].grid == (2, 4)
    assert layout.source.shape == (8, 4)  # each merged token reads its 2x2 group of tower tokens
    # every tower token belongs to exactly one merged token
    assert sorted(layout.source.flatten().tolist()) == list(range(32))
    # a score per tower token (in the tower's block order) becomes the mean over each token's group
    tower_scores = torch.arange(32, dtype=torch.float32)
    torch.testing.assert_close(layout.token_scores(tower_scores), layout.source.float().mean(-1))


def gemma3_row(seed: int, text=(6, 7)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, 125] + [127] * 4 + [126] + list(text)])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=generator)}


@pytest.mark.parametrize("technique", DETERMINISTIC)
def test_gemma3_padded_batch_rows_equal_their_single_runs(technique):
    model = tiny_model("gemma3")
    rows = [gemma3_row(1, text=(6, 7, 8, 9)), gemma3_row(2, text=(9,))]
    with hfpatch.patch(model, recipe(technique, budget=2)) as handle:
        singles = []
        for row in rows:
            inputs = dict(row, token_type_ids=(row["input_ids"] == 127).long())
            singles.append(model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[0, row["input_ids"].shape[1]:])
        width = rows[0]["input_ids"].shape[1]
        ids = torch.stack([torch.cat([torch.zeros(width - r["input_ids"].shape[1], dtype=torch.long), r["input_ids"][0]])
                           for r in rows])
        batch = {"input_ids": ids, "attention_mask": (torch.arange(width) >= torch.tensor([[0], [3]])).long(),
                 "token_type_ids": (ids == 127).long(), "pixel_values": torch.cat([r["pixel_values"] for r in rows])}
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        stats = handle.stats[technique]
    assert stats["pruned"] and [image["kept"] for image in stats["images"]] == [2, 2]
    for row, single in enumerate(singles):
        assert out[row, width:].tolist() == single.tolist()


def test_gemma3_full_budget_identity_and_pooled_sources():
    model = tiny_model("gemma3")
    row = gemma3_row(3)
    inputs = dict(row, token_type_ids=(row["input_ids"] == 127).long())
    logits = model(**inputs).logits
    with hfpatch.patch(model, recipe("hiprune", budget=4)):
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=1e-5)
    outputs = model.model.get_image_features(row["pixel_values"], return_dict=True)
    (layout,) = glue_for(model).describe(model, {}, outputs).layouts
    # 4x4 patches pooled 2x2: token 0 reads patches 0, 1, 4, 5; token 3 reads 10, 11, 14, 15
    assert layout.source[0].tolist() == [0, 1, 4, 5] and layout.source[3].tolist() == [10, 11, 14, 15]


def test_qwen_plain_decode_loop_continues_m_rope_positions():
    from hfpatch import compat

    model = tiny_model("qwen2_vl")
    row = qwen_row(5, text=(6, 7, 8))
    inputs = dict(row, mm_token_type_ids=(row["input_ids"] == QWEN_IMAGE).int())
    length = inputs["input_ids"].shape[1]
    with hfpatch.patch(model, recipe("divprune", budget=1)):
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, length:].tolist()
        # a hand-written loop: no position ids, the uncompacted mask; positions must continue from the whole
        # sequence plus the rope_deltas of its M-RoPE grid
        out = model(**inputs, attention_mask=torch.ones(1, length, dtype=torch.long), use_cache=True)
        cache, mask, tokens = compat.output_cache(out), torch.ones(1, length, dtype=torch.long), []
        for _ in range(4):
            token = out.logits[:, -1].argmax(-1)
            tokens.append(int(token))
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            out = model(input_ids=token[:, None], attention_mask=mask, **{compat.cache_kwarg(model): cache})
    assert tokens == expected


def idefics_row(seed: int, crops: int = 2, text=(6, 7)):
    """One prompt with `crops` crops of 4 tokens each, every crop between two marker tokens (as the processor
    writes an image split into crops)."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1, 5]
    for _ in range(crops):
        ids += [125] + [127] * 4 + [126]
    ids = torch.tensor([ids + list(text)])
    return {"input_ids": ids, "pixel_values": torch.randn(1, crops, 3, 28, 28, generator=generator)}


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("technique", DETERMINISTIC)
def test_idefics3_padded_batch_rows_equal_their_single_runs(kind, technique):
    model = tiny_model(kind)
    rows = [idefics_row(1, crops=2, text=(6, 7, 8, 9)), idefics_row(2, crops=2, text=(9,))]
    with hfpatch.patch(model, recipe(technique, budget=3)) as handle:
        singles = [model.generate(**row, max_new_tokens=NEW, do_sample=False)[0, row["input_ids"].shape[1]:]
                   for row in rows]
        width = rows[0]["input_ids"].shape[1]
        ids = torch.stack([torch.cat([torch.zeros(width - r["input_ids"].shape[1], dtype=torch.long), r["input_ids"][0]])
                           for r in rows])
        batch = {"input_ids": ids, "attention_mask": (ids != 0).long(),
                 "pixel_values": torch.cat([r["pixel_values"] for r in rows])}
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        stats = handle.stats[technique]
    # one entry per row: its two crops (8 tokens) share the budget of 3
    assert stats["pruned"] and [(image["tokens"], image["kept"]) for image in stats["images"]] == [(8, 3), (8, 3)]
    for row, single in enumerate(singles):
        assert out[row, width:].tolist() == single.tolist()


def test_idefics3_full_budget_identity_and_shuffled_sources():
    model = tiny_model("idefics3")
    inputs = idefics_row(3)
    logits = model(**inputs).logits
    with hfpatch.patch(model, recipe("hiprune", budget=8)):
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=1e-5)
    outputs = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
    (layout,) = glue_for(model).describe(model, {}, outputs).layouts
    assert [segment.grid for segment in layout.segments] == [(2, 2), (2, 2)]
    # pixel shuffle: token 0 of crop 0 reads patches 0, 1, 4, 5; token 1 of crop 1 reads 16 + (2, 3, 6, 7)
    assert layout.source[0].tolist() == [0, 1, 4, 5] and layout.source[5].tolist() == [18, 19, 22, 23]


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_fastv_on_idefics3_padded_batch(kind):
    model = tiny_model(kind)
    rows = [idefics_row(1, crops=2, text=(6, 7, 8, 9)), idefics_row(2, crops=2, text=(9,))]
    with hfpatch.patch(model, recipe("fastv", budget=1, layer=1)) as handle:
        singles = [model.generate(**row, max_new_tokens=NEW, do_sample=False)[0, row["input_ids"].shape[1]:]
                   for row in rows]
        width = rows[0]["input_ids"].shape[1]
        ids = torch.stack([torch.cat([torch.zeros(width - r["input_ids"].shape[1], dtype=torch.long), r["input_ids"][0]])
                           for r in rows])
        out = model.generate(input_ids=ids, attention_mask=(ids != 0).long(),
                             pixel_values=torch.cat([r["pixel_values"] for r in rows]), max_new_tokens=NEW, do_sample=False)
        # each crop is its own run of image tokens, so FastV keeps the budget per crop
        assert handle.stats["fastv"]["kept_visual_tokens"] == [2, 2]
    for row, single in enumerate(singles):
        assert out[row, width:].tolist() == single.tolist()
