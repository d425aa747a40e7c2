"""Recycled Attention's ``rescore_rank="auto"``: the rescoring basis is a quarter of the head dimension (Loki's
d/4), so a model with wide heads (Gemma 3: 256) gets a proportionally wide basis instead of a fixed 16."""
from __future__ import annotations

import pytest
import torch
from test_sparse_attention import batch, deep_model, run

import hfpatch
from hfpatch.errors import RecipeError
from hfpatch.techniques.attention.recycled import AUTO_RANK_DIVISOR


def head_dim(model):
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def test_auto_rank_is_a_quarter_of_the_head_dimension_and_decodes_as_that_rank():
    model = deep_model("qwen2")
    ids, mask = batch()
    rank = head_dim(model) // AUTO_RANK_DIVISOR
    settings = dict(budget=12, sink=2, window=3, stride=4)
    with hfpatch.patch(model, "recycled-attention-paper", rescore_rank=rank, **settings) as handle:
        ref_seq, ref_logits = run(model, ids, mask, new=7)
        assert handle.stats["recycled_attention"]["rescore_rank"] == rank
    with hfpatch.patch(model, "recycled-attention-paper", rescore_rank="auto", **settings) as handle:
        seq, logits = run(model, ids, mask, new=7)
        stats = handle.stats["recycled_attention"]
    assert stats["rescore_rank"] == rank and stats["sparse_layer_steps"] > 0
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    # a different explicit rank selects differently: "auto" is not ignored
    with hfpatch.patch(model, "recycled-attention-paper", rescore_rank=1, **settings):
        _, other = run(model, ids, mask, new=7)
    assert not torch.equal(other, ref_logits)


def test_default_recipe_uses_auto_and_the_former_setting_stays_reachable():
    """On SmolLM2-135M (head dimension 64) 'auto' is the former rank 16, so its results stand unchanged."""
    model = deep_model()
    with hfpatch.patch(model, "recycled-attention") as handle:
        assert handle.technique("recycled_attention").params.rescore_rank == "auto"
        assert handle.stats["recycled_attention"]["rescore_rank"] == head_dim(model) // AUTO_RANK_DIVISOR
    with hfpatch.patch(model, "recycled-attention-rescored") as handle:  # its former name: the same setting
        assert handle.technique("recycled_attention").params.rescore_rank == "auto"
    with hfpatch.patch(model, "recycled-attention", rescore_rank=16) as handle:  # the literal former default
        assert handle.stats["recycled_attention"]["rescore_rank"] == 16


def test_other_strings_are_refused_with_the_allowed_values():
    with pytest.raises((RecipeError, ValueError), match="rescore_rank must be 'auto' or a number"):
        hfpatch.patch(deep_model(), "recycled-attention", rescore_rank="half")
