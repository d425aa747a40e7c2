"""Recycled Attention's `rescore_rank`: per-step re-selection by low-rank key scores (lowrank_keys), and the
CPU implementation of select_positions (NumPy's introselect) it relies on."""
from __future__ import annotations

import pytest
import torch
from test_sparse_attention import TOL, batch, deep_model, run

import hfpatch
from hfpatch.kernels import group_attention_scores, select_positions, select_positions_reference, sparse_decode_attention
from hfpatch.techniques.attention.base import LayerState
from hfpatch.techniques.attention.lowrank_keys import LowRankKeys, principal_basis
from hfpatch.techniques.attention.recycled import RecycledAttention


def keys_and_valid(seed=0, length=40, dim=16):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 6, dim, generator=g), torch.randn(2, 3, length, dim, generator=g)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :5] = False
    return q, k, valid


def lowrank_scores(lowrank, q, k, valid, scale):
    """The selection scores of a step: softmax of the projected logits summed per KV group."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    projected_query = (q.reshape(b, hkv, hq // hkv, d) @ lowrank.basis).reshape(b, hq, -1)
    projected, fresh = lowrank.projected(k)
    if fresh:  # what the kernel does first: project the keys added since the last call
        projected[..., -fresh:] = (k[:, :, -fresh:] @ lowrank.basis).transpose(-1, -2)
    return group_attention_scores(projected_query, projected.transpose(-1, -2), valid, scale=scale)


@pytest.mark.parametrize("padded", [False, True])
def test_full_rank_scores_equal_exact_scores_and_follow_a_growing_cache(padded):
    q, k, valid = keys_and_valid()
    valid = valid if padded else None
    lowrank = LowRankKeys(k[:, :, :30], None if valid is None else valid[:, :30], rank=16)
    for length in (30, 31, 40):  # the buffer (capacity 30 + 64) is extended by the keys added since
        v = None if valid is None else valid[:, :length]
        torch.testing.assert_close(lowrank_scores(lowrank, q, k[:, :, :length], v, 0.25),
                                   group_attention_scores(q, k[:, :, :length], v, scale=0.25), atol=1e-5, rtol=1e-5)
    long_k = torch.randn(2, 3, 200, 16)  # past the buffer's capacity: it grows, earlier projections kept
    long_k[:, :, :40] = k
    torch.testing.assert_close(lowrank_scores(lowrank, q, long_k, None, 0.25), group_attention_scores(q, long_k, scale=0.25),
                               atol=1e-5, rtol=1e-5)
    assert lowrank.length == 200 and lowrank.buffer.shape[-1] >= 200


def test_basis_spans_keys_that_live_in_a_subspace_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    plane = torch.linalg.qr(torch.randn(16, 4, generator=g)).Q  # a 4-dim subspace of R^16
    k = (torch.randn(1, 2, 50, 4, generator=g) @ plane.T)
    valid = torch.ones(1, 50, dtype=torch.bool)
    valid[0, :10] = False
    k[:, :, :10] = 100 * torch.randn(1, 2, 10, 16, generator=g)  # padding keys far outside the subspace
    basis = principal_basis(k, valid, 4)  # [1, 2, 16, 4]
    assert torch.allclose(basis.transpose(-1, -2) @ basis, torch.eye(4).expand(1, 2, 4, 4), atol=1e-5)
    residual = plane - basis @ (basis.transpose(-1, -2) @ plane)  # the subspace projects onto itself
    assert residual.abs().max() < 1e-4
    q = torch.randn(1, 4, 16, generator=g)
    exact = group_attention_scores(q, k, valid, scale=0.25)
    torch.testing.assert_close(lowrank_scores(LowRankKeys(k, valid, 4), q, k, valid, 0.25), exact, atol=1e-5, rtol=1e-5)


def test_each_sparse_step_selects_with_its_own_query():
    """At full rank, a sparse step's set is exactly the top-`budget` of that step's own scores (the paper's
    method would reuse the full step's set instead)."""
    technique = RecycledAttention(budget=9, sink=2, window=3, stride=8, rescore_rank=16)
    paper = RecycledAttention(budget=9, sink=2, window=3, stride=8)
    q, k, valid = keys_and_valid()
    v = torch.randn_like(k)
    state, paper_state = LayerState(batch=2), LayerState(batch=2)
    assert technique.attend(0, state, q, k[:, :, :39], v[:, :, :39], valid[:, :39], 0.25) == (None, None)  # full
    assert state.extra.get("lowrank") is None  # no selection pass at a full step when re-scoring
    paper.decode(0, paper_state, q, k[:, :, :39], valid[:, :39], 0.25)
    q2 = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))
    out, got = technique.attend(0, state, q2, k, v, valid, 0.25)
    assert torch.equal(got, technique.score_and_select(q2, k, valid, 0.25))
    torch.testing.assert_close(out, sparse_decode_attention(q2, k, v, got, valid, scale=0.25), atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, paper.decode(0, paper_state, q2, k, valid, 0.25)[..., :9])
    assert state.extra["lowrank"].rank == 16


def test_rescored_model_decodes_sparsely_and_covers_padding():
    model = deep_model("qwen2")
    ids, mask = batch(pad=(0, 11))
    _, ref_logits = run(model, ids, mask)
    with hfpatch.patch(model, "recycled-attention-paper", budget=ids.shape[1] + 8, rescore_rank=4) as handle:
        _, logits = run(model, ids, mask)  # the budget covers the context: full attention
        assert handle.stats["recycled_attention"]["sparse_layer_steps"] == 0
    torch.testing.assert_close(logits, ref_logits, **TOL[torch.float32])
    with hfpatch.patch(model, "recycled-attention-paper", budget=12, sink=2, window=3, rescore_rank=4, stride=3) as h:
        _, logits = run(model, ids, mask, new=7)
        stats = h.stats["recycled_attention"]
        for row in range(2):  # padding is never selected: each row alone decodes the same
            keep = mask[row].bool()
            _, alone = run(model, ids[row:row + 1, keep], mask[row:row + 1, keep], new=7)
            torch.testing.assert_close(logits[row, :alone.shape[1]], alone[0], atol=1e-4, rtol=1e-4)
    assert stats["sparse_layer_steps"] > 0 and stats["full_layer_steps"] > 0


def test_rescore_with_follow_is_refused_and_the_model_left_as_it_was():
    model = deep_model(layers=3)
    with pytest.raises(hfpatch.errors.PatchError, match="set one of them to 0"):
        hfpatch.patch(model, "recycled-attention-paper", rescore_rank=16, follow=16)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("shape,budget", [((2, 3, 50), 12), ((1, 1, 8192), 512), ((3, 2, 7), 7), ((1, 4, 9), 1)])
def test_cpu_top_k_path_equals_torch_topk(shape, budget):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(*shape, generator=g)
    scores[..., :2] = float("inf")  # forced positions
    scores[..., -1] = float("-inf")  # padding
    expected = torch.topk(scores, min(budget, shape[-1]), dim=-1).indices.sort(-1).values
    assert select_positions.resolve_backend(scores, budget) == "cpu"  # what auto runs on CPU: NumPy's introselect
    got = select_positions(scores, budget, backend="cpu")
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert torch.equal(select_positions_reference(scores, budget), expected)
    strided = scores.transpose(0, 1)  # a non-contiguous view
    assert torch.equal(select_positions(strided, budget, backend="cpu"), expected.transpose(0, 1))
