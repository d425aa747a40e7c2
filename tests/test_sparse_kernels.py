"""Sparse decode attention, attention scores and position selection: references against plain formulas, the
Triton (interpreted on CPU, see conftest.py) and CPU implementations against the references on awkward shapes."""
from __future__ import annotations

import pytest
import torch

import hfpatch.kernels as K
from hfpatch.kernels import (
    KernelUnavailableError,
    group_attention_scores,
    group_attention_scores_reference,
    scored_attention,
    scored_attention_reference,
    select_positions,
    select_positions_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)

needs_triton_cpu = pytest.mark.skipif(
    not K.triton_runs_on_cpu(), reason=f"Triton cannot run on CPU here: {K.triton_cpu_reason()}"
)

# Outputs are float32 accumulations on both paths, rounded to the input dtype at the end.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
SCORE_TOL = dict(atol=2e-5, rtol=1e-4)  # float32 scores from exactly upcast inputs
DTYPES = list(TOL)

# (B, Hq, Hkv, S, D, Dv, N): GQA ratios 1/3/4/8, non-power-of-two dims, length-1 cache and index sets
SHAPES = [
    (1, 1, 1, 1, 8, 8, 1),
    (2, 6, 2, 37, 24, 24, 13),
    (1, 8, 1, 300, 64, 64, 100),
    (3, 4, 4, 50, 16, 20, 50),
    (2, 9, 3, 129, 40, 40, 77),
]


def make(b, hq, hkv, s, d, dv, n, dtype, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed + 31 * s + n)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    # keys/values as a cache view with a larger allocated length (non-contiguous in S)
    k = torch.randn(b, hkv, s + 3, d, generator=g).to(dtype)[:, :, :s]
    v = torch.randn(b, hkv, s + 3, dv, generator=g).to(dtype)[:, :, :s]
    index = torch.stack([torch.stack([torch.randperm(s, generator=g)[:n] for _ in range(hkv)]) for _ in range(b)])
    valid = None
    if pad and b > 1:
        valid = torch.ones(b, s, dtype=torch.bool)
        valid[1, : s // 3] = False  # left padding of row 1
    return q, k, v, index, valid


def dense(q, k, v, valid, scale=None):
    """The definition via sdpa over the whole cache (GQA expanded)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    kk = k.float().repeat_interleave(hq // hkv, 1)
    vv = v.float().repeat_interleave(hq // hkv, 1)
    mask = None if valid is None else valid[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q.float()[:, :, None], kk, vv, attn_mask=mask, scale=scale)
    return out[:, :, 0]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_over_every_position_is_dense_attention(shape):
    b, hq, hkv, s, d, dv, _ = shape
    q, k, v, _, valid = make(*shape, torch.float32)
    index = torch.arange(s).flip(0).expand(b, hkv, s)  # order does not matter
    out = sparse_decode_attention_reference(q, k, v, index, valid, scale=0.3)
    torch.testing.assert_close(out, dense(q, k, v, valid, scale=0.3), **TOL[torch.float32])


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_over_a_subset_is_dense_attention_masked_to_it(shape):
    b, hq, hkv, s, d, dv, n = shape
    q, k, v, index, valid = make(*shape, torch.float32)
    chosen = torch.zeros(b, hkv, s, dtype=torch.bool).scatter_(2, index, True)
    if valid is not None:
        chosen &= valid[:, None, :]
    kk = k.float().repeat_interleave(hq // hkv, 1)
    vv = v.float().repeat_interleave(hq // hkv, 1)
    mask = chosen.repeat_interleave(hq // hkv, 1)[:, :, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask)[:, :, 0]
    expected = expected.nan_to_num(0.0)  # rows whose whole set is padding attend to nothing
    torch.testing.assert_close(sparse_decode_attention_reference(q, k, v, index, valid), expected,
                               **TOL[torch.float32])


def test_reference_reads_caches_of_any_layout():
    """Row gathers see the cache as a table of rows when its strides allow it (contiguous, a view of a longer
    buffer, broadcast heads) and fall back to a gather otherwise (rows not contiguous)."""
    q, k, v, index, _ = make(2, 6, 2, 30, 16, 16, 9, torch.float32, pad=False)
    expected = sparse_decode_attention_reference(q, k.contiguous(), v.contiguous(), index)
    transposed_k = k.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)  # D not the inner stride
    torch.testing.assert_close(sparse_decode_attention_reference(q, transposed_k, v, index), expected)
    one_head_k, one_head_v = k[:, :1].expand(-1, 2, -1, -1), v[:, :1].expand(-1, 2, -1, -1)
    shared = sparse_decode_attention_reference(q, one_head_k, one_head_v, index[:, :1].expand(-1, 2, -1))
    torch.testing.assert_close(shared, sparse_decode_attention_reference(
        q, one_head_k.contiguous(), one_head_v.contiguous(), index[:, :1].expand(-1, 2, -1).contiguous()))


needs_compiled_cpu = pytest.mark.skipif(sparse_decode_attention.cpu.unavailable() is not None,
                                        reason=f"CPU kernel not built: {sparse_decode_attention.cpu.unavailable()}")


@needs_compiled_cpu
@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_cpu_kernel_equals_reference(shape):
    """float32 through the compiled kernel; with -1 / out-of-range entries, duplicates and left padding."""
    q, k, v, index, valid = make(*shape, torch.float32)
    b, _, hkv, s = shape[:4]
    ragged = torch.cat([index, torch.full((b, hkv, 2), -1), torch.full((b, hkv, 1), s), index[..., :1]], -1)
    for idx in (index, ragged):
        torch.testing.assert_close(sparse_decode_attention(q, k, v, idx, valid, scale=0.3, backend="cpu"),
                                   sparse_decode_attention_reference(q, k, v, idx, valid, scale=0.3),
                                   **TOL[torch.float32])
    nothing = torch.full((b, hkv, 3), -1)
    assert sparse_decode_attention(q, k, v, nothing, backend="cpu").abs().sum() == 0


@needs_compiled_cpu
def test_compiled_cpu_kernel_refuses_other_inputs_and_auto_runs_the_reference(monkeypatch):
    """bfloat16, an index set per query head, keys not contiguous along D: backend="cpu" raises with the reason,
    auto runs the reference and says so."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    q, k, v, index, valid = make(2, 6, 2, 37, 24, 24, 13, torch.float32)
    bf16 = make(2, 6, 2, 37, 24, 24, 13, torch.bfloat16)
    per_head = index.repeat_interleave(3, 1)  # [B, Hq, N]: one set per query head
    d_strided = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    for args, reason in ((bf16, "bfloat16: float32 only"), ((q, k, v, per_head, valid), "per query head"),
                         ((q, d_strided, v, index, valid), "not contiguous along D")):
        with pytest.raises(KernelUnavailableError, match=reason):
            sparse_decode_attention(*args, backend="cpu")
        assert sparse_decode_attention.resolve_backend(*args) == "torch"
        assert reason in sparse_decode_attention.explain(*args)
        torch.testing.assert_close(sparse_decode_attention(*args), sparse_decode_attention_reference(*args),
                                   rtol=0, atol=0)


def test_reference_skips_out_of_range_entries_and_padding():
    q, k, v, index, valid = make(2, 4, 2, 20, 8, 8, 6, torch.float32)
    padded = torch.cat([index, torch.full((2, 2, 3), -1), torch.full((2, 2, 1), 20)], -1)
    torch.testing.assert_close(sparse_decode_attention_reference(q, k, v, padded, valid),
                               sparse_decode_attention_reference(q, k, v, index, valid))
    nothing = torch.full((2, 2, 4), -1)
    assert sparse_decode_attention_reference(q, k, v, nothing).abs().sum() == 0  # empty set -> zeros


@needs_triton_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_sparse_decode_matches_reference(shape, dtype):
    q, k, v, index, valid = make(*shape, dtype)
    index[0, 0, 0] = -1  # a padding entry of a ragged set
    out = sparse_decode_attention(q, k, v, index, valid, backend="triton")
    ref = sparse_decode_attention_reference(q, k, v, index, valid)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@needs_triton_cpu
def test_triton_sparse_decode_many_splits_and_fully_masked_row():
    q, k, v, index, valid = make(2, 4, 2, 400, 16, 16, 400, torch.float32)
    valid[0] = False  # nothing to attend in row 0: zeros, not NaN
    out = sparse_decode_attention(q, k, v, index, valid, backend="triton")
    ref = sparse_decode_attention_reference(q, k, v, index, valid)
    assert out[0].abs().sum() == 0
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def per_head_sets(b, hq, s, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(s, generator=g)[:n] for _ in range(hq)]) for _ in range(b)])


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_per_query_head_sets_equal_each_head_alone(shape):
    """An index set per query head ([B, Hq, N], TidalDecode's per-head selection): each head attends to its own
    positions of its KV head, checked head by head against a one-head call."""
    b, hq, hkv, s, d, dv, n = shape
    q, k, v, _, valid = make(*shape, torch.float32)
    index = per_head_sets(b, hq, s, n, seed=s)
    out = sparse_decode_attention_reference(q, k, v, index, valid)
    g = hq // hkv
    for h in range(hq):
        alone = sparse_decode_attention_reference(q[:, h:h + 1], k[:, h // g:h // g + 1], v[:, h // g:h // g + 1],
                                                  index[:, h:h + 1], valid)
        torch.testing.assert_close(out[:, h], alone[:, 0], **TOL[torch.float32])


@needs_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_triton_per_query_head_sets_match_reference(shape, dtype):
    b, hq, hkv, s, d, dv, n = shape
    q, k, v, _, valid = make(*shape, dtype)
    index = per_head_sets(b, hq, s, n, seed=s)
    index[0, -1, 0] = -1
    out = sparse_decode_attention(q, k, v, index, valid, backend="triton")
    torch.testing.assert_close(out, sparse_decode_attention_reference(q, k, v, index, valid), **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
def test_group_scores_reference_is_softmax_summed_per_group(shape):
    b, hq, hkv, s, d, _, _ = shape
    q, k, _, _, valid = make(*shape, torch.float32)
    probs = torch.softmax(
        (q[:, :, None, :] @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2))[:, :, 0] * d ** -0.5
        + (0 if valid is None else torch.where(valid, 0.0, float("-inf"))[:, None]), -1)
    expected = probs.reshape(b, hkv, hq // hkv, s).sum(2)
    torch.testing.assert_close(group_attention_scores_reference(q, k, valid), expected, **SCORE_TOL)


@needs_triton_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_group_scores_match_reference(shape, dtype):
    q, k, _, _, valid = make(*shape, dtype)
    out = group_attention_scores(q, k, valid, scale=0.2, backend="triton")
    ref = group_attention_scores_reference(q, k, valid, scale=0.2)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **SCORE_TOL)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_select_positions_equals_a_straightforward_reference(backend):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, 50, generator=g)
    forced = torch.zeros(2, 50, dtype=torch.bool)
    forced[:, [0, 1, 49]] = True
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :10] = False
    forced[1, :10] = False
    forced[1, [10, 11]] = True
    got = select_positions(scores, 12, forced, valid, backend=backend)
    for b in range(2):
        for h in range(3):
            must = set(forced[b].nonzero().flatten().tolist())
            rest = [(float(scores[b, h, i]), i) for i in range(50) if i not in must and valid[b, i]]
            chosen = must | {i for _, i in sorted(rest, reverse=True)[: 12 - len(must)]}
            assert got[b, h].tolist() == sorted(chosen)
    assert select_positions(scores, 80, backend=backend).shape == (2, 3, 50)  # budget clipped to S


# (scores shape, budget, sinks forced, padded positions of row 0): S = 1, budget 0, budget >= S, non-power-of-two
# lengths, every position forced, padding, many rows
SELECT_CASES = [
    ((1, 1, 1), 1, 0, 0),
    ((1, 1, 1), 4, 1, 0),
    ((2, 3, 50), 12, 2, 9),
    ((3, 2, 7), 7, 1, 0),
    ((1, 4, 9), 0, 0, 0),
    ((2, 2, 37), 80, 3, 4),
    ((4, 1, 300), 5, 4, 100),  # 4 sinks + the current token fill the budget
    ((2, 1, 8192), 512, 4, 1000),
]


@pytest.mark.parametrize("shape,budget,sink,pad", SELECT_CASES)
def test_select_positions_cpu_matches_reference(shape, budget, sink, pad):
    """Scores without ties (random floats), forced positions (sinks + the current token) within the budget: the
    same set from both; padding only where a row has fewer valid positions than the budget."""
    b, _, s = shape
    g = torch.Generator().manual_seed(s + budget)
    scores = torch.randn(*shape, generator=g)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :pad] = False
    forced = K.forced_positions(valid, b, s, sink, 0, scores.device) if budget else None
    for args in ((scores, budget), (scores, budget, forced, valid), (scores.transpose(0, 1).contiguous()
                                                                      .transpose(0, 1), budget, None, valid)):
        got = select_positions(*args, backend="cpu")
        expected = select_positions_reference(*args)
        assert got.dtype == expected.dtype == torch.int64 and got.shape == expected.shape
        if budget <= int(valid.sum(-1).min()):
            assert torch.equal(got, expected)
        else:  # a row with fewer valid positions than the budget: which padding fills it is unspecified
            for row in range(b):
                keep = valid[row]
                assert torch.equal(got[row].where(keep[got[row]], -1).sort(-1).values,
                                   expected[row].where(keep[expected[row]], -1).sort(-1).values)
    other = scores.double().requires_grad_()  # not float32, part of a graph: both rank a float32 copy
    assert torch.equal(select_positions(other, budget, backend="cpu"), select_positions_reference(other, budget))


@pytest.mark.parametrize("shape", SHAPES)
def test_scored_attention_reference_is_dense_attention_and_group_scores(shape):
    q, k, v, _, valid = make(*shape, torch.float32)
    out, scores = scored_attention_reference(q, k, v, valid, scale=0.3)
    torch.testing.assert_close(out, dense(q, k, v, valid, scale=0.3), **TOL[torch.float32])
    assert torch.equal(scores, group_attention_scores_reference(q, k, valid, scale=0.3))


@pytest.mark.parametrize("shape", SHAPES)
def test_scored_attention_cpu_matches_reference(shape):
    """The one-pass CPU implementation against the two-pass reference; a row with nothing valid gives zeros."""
    q, k, v, _, valid = make(*shape, torch.float32)
    if valid is not None:
        valid[-1] = False
    out, scores = scored_attention(q, k, v, valid, scale=0.3, backend="cpu")
    ref_out, ref_scores = scored_attention_reference(q, k, v, valid, scale=0.3)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape and scores.shape == ref_scores.shape
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    if valid is not None:
        assert out[-1].abs().sum() == 0 and scores[-1].abs().sum() == 0


def test_attention_with_scores_is_the_one_pass_implementation_or_none(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    q, k, v, _, valid = make(2, 6, 2, 37, 24, 24, 13, torch.float32)
    fused = K.attention_with_scores(q, k, v, valid, 0.3)
    expected = scored_attention(q, k, v, valid, scale=0.3, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(fused, expected))
    assert K.attention_with_scores(*make(2, 6, 2, 37, 24, 24, 13, torch.bfloat16)[:3], valid, 0.3) is None
    monkeypatch.setenv(K.ENV_VAR, "torch")  # every fast implementation off: the caller's two passes
    assert K.attention_with_scores(q, k, v, valid, 0.3) is None


def test_kernels_are_registered_and_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert {"sparse_decode_attention", "group_attention_scores", "scored_attention",
            "select_positions"} <= set(K.list_kernels())
    q, k, v, index, valid = make(2, 4, 2, 10, 8, 8, 5, torch.float32)
    built = sparse_decode_attention.cpu.unavailable() is None  # the compiled kernel when it builds here
    assert sparse_decode_attention.resolve_backend(q, k, v, index) == ("cpu" if built else "torch")
    assert group_attention_scores.resolve_backend(q, k) == "torch"  # no CPU version: the reference
    assert select_positions.resolve_backend(torch.rand(2, 2, 10), 4) == "cpu"  # NumPy's introselect
    assert scored_attention.resolve_backend(q, k, v) == "cpu"
    with pytest.raises(KernelUnavailableError, match="no Triton implementation"):
        select_positions(torch.rand(2, 2, 10), 4, backend="triton")
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode_attention(torch.randn(1, 3, 8), k[:1], v[:1], index[:1])
