"""The visual-token pruning kernels: diverse_select (DivPrune max-min, ToDRE k-center) and
attention_with_column_sums, torch references against hand-worked cases, Triton (interpreted on CPU; conftest sets
TRITON_INTERPRET=1) against the references."""
from __future__ import annotations

import importlib

import pytest
import torch

import hfpatch.kernels as K
from hfpatch.kernels import (
    attention_with_column_sums,
    attention_with_column_sums_reference,
    attention_with_column_sums_triton,
    diverse_select,
    diverse_select_reference,
    diverse_select_triton,
)

# The package attribute `diverse_select` is the op; the module of that name is reached by its path.
diverse_select_module = importlib.import_module("hfpatch.kernels.diverse_select")

needs_triton_cpu = pytest.mark.skipif(
    not K.triton_runs_on_cpu(), reason=f"Triton cannot run on CPU here: {K.triton_cpu_reason()}"
)

# Five directions in the plane (unit vectors, then the opposite of the first). Cosine distances:
#   d(0,1)=.2 d(0,2)=.4 d(0,3)=1 d(0,4)=2 d(1,2)=.04 d(1,3)=.4 d(1,4)=1.8 d(2,3)=.2 d(2,4)=1.6 d(3,4)=1
FAN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])


# -------------------------------------------------------------------------------------------------
# diverse_select: hand-worked cases
# -------------------------------------------------------------------------------------------------


def test_max_min_first_pick_is_the_token_whose_nearest_neighbour_is_farthest():
    # nearest distances: .2 .04 .04 .2 1 -> token 4 first; its row [2, 1.8, 1.6, 1] -> token 0;
    # then min(row 4, row 0) = [-, .2, .4, 1] -> token 3.
    assert diverse_select_reference(FAN, 1).tolist() == [4]
    assert diverse_select_reference(FAN, 2).tolist() == [0, 4]
    assert diverse_select_reference(FAN, 3).tolist() == [0, 3, 4]


def test_k_center_starts_nearest_the_mean_then_goes_farthest_first():
    # row sums of d: 3.6 2.44 2.24 2.6 6.4 -> token 2 first; its row [.4, .04, -, .2, 1.6] -> token 4;
    # min(row 2, row 4) = [.4, .04, -, .2, -] -> token 0; then min(.., row 0) = [-, .04, -, .2, -] -> token 3.
    assert diverse_select_reference(FAN, 1, "k_center").tolist() == [2]
    assert diverse_select_reference(FAN, 3, "k_center").tolist() == [0, 2, 4]
    assert diverse_select_reference(FAN, 4, "k_center").tolist() == [0, 2, 3, 4]


def test_near_twin_is_not_kept_beside_its_twin():
    pts = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    assert diverse_select_reference(pts, 2).tolist() == [0, 3]
    assert diverse_select_reference(pts, 3).tolist() == [0, 2, 3]


@pytest.mark.parametrize("method", ["max_min", "k_center"])
def test_ties_go_to_the_lowest_index(method):
    same = torch.ones(6, 3)
    assert diverse_select_reference(same, 3, method).tolist() == [0, 1, 2]


def test_scale_does_not_matter_and_zero_rows_are_at_distance_one():
    scaled = FAN * torch.tensor([[3.0], [0.5], [7.0], [2.0], [0.1]])
    assert diverse_select_reference(scaled, 3).tolist() == diverse_select_reference(FAN, 3).tolist()
    with_zero = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]])
    # Token 2 has no direction: distance 1 to both, the farthest nearest-neighbour, so it goes first.
    assert diverse_select_reference(with_zero, 1).tolist() == [2]
    assert torch.isfinite(diverse_select_module.cosine_distances(with_zero)).all()


@pytest.mark.parametrize("method", ["max_min", "k_center"])
def test_budget_at_or_over_the_token_count_keeps_everything(method):
    x = torch.randn(2, 5, 4)
    assert diverse_select_reference(x, 5, method).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert diverse_select_reference(x[0], 99, method).tolist() == [0, 1, 2, 3, 4]
    assert diverse_select_reference(torch.randn(1, 3), 1, method).tolist() == [0]


def test_batched_rows_are_selected_independently():
    torch.manual_seed(0)
    x = torch.randn(3, 20, 8)
    batched = diverse_select_reference(x, 6)
    assert batched.shape == (3, 6)
    for b in range(3):
        assert batched[b].tolist() == diverse_select_reference(x[b], 6).tolist()
        assert batched[b].tolist() == sorted(set(batched[b].tolist()))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(budget=0), ValueError, "budget must be >= 1"),
        (dict(budget=2, method="dpp"), ValueError, "method must be one of"),
        (dict(budget=2.0), TypeError, "budget must be an int"),
    ],
)
def test_diverse_select_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        diverse_select(torch.randn(4, 3), **kwargs)


def test_diverse_select_refuses_bad_features():
    with pytest.raises(ValueError, match=r"\[N, D\] or \[B, N, D\]"):
        diverse_select(torch.randn(4), 2)
    with pytest.raises(TypeError, match="floating point"):
        diverse_select(torch.ones(4, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="no tokens"):
        diverse_select(torch.randn(0, 3), 2)


# -------------------------------------------------------------------------------------------------
# diverse_select: Triton against the reference, one launch whatever the budget
# -------------------------------------------------------------------------------------------------


@needs_triton_cpu
@pytest.mark.parametrize("method", ["max_min", "k_center"])
@pytest.mark.parametrize("shape,budget", [((1, 5), 1), ((37, 5), 7), ((2, 100, 16), 33), ((3, 9, 4), 8),
                                          ((64, 12), 63)])
def test_triton_selects_what_the_reference_selects(method, shape, budget):
    g = torch.Generator().manual_seed(sum(shape) + budget)
    x = torch.randn(*shape, generator=g)
    assert torch.equal(diverse_select_triton(x, budget, method), diverse_select_reference(x, budget, method))


@needs_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_takes_half_precision_features(dtype):
    x = torch.randn(2, 30, 8).to(dtype)
    assert torch.equal(diverse_select_triton(x, 10), diverse_select_reference(x, 10))


@needs_triton_cpu
def test_triton_hand_worked_case_and_ties():
    assert diverse_select_triton(FAN, 3).tolist() == [0, 3, 4]
    assert diverse_select_triton(FAN, 4, "k_center").tolist() == [0, 2, 3, 4]
    assert diverse_select_triton(torch.ones(6, 3), 3).tolist() == [0, 1, 2]


@needs_triton_cpu
def test_triton_runs_the_greedy_loop_in_one_launch(monkeypatch):
    real = diverse_select_module._kernel()
    launches = []

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(diverse_select_module, "_kernel", lambda: Counting())
    diverse_select_triton(torch.randn(4, 50, 6), 40)
    assert launches == [(4,)]


@needs_triton_cpu
def test_triton_refuses_images_over_its_register_budget(monkeypatch):
    monkeypatch.setattr(diverse_select_module, "MAX_TRITON_TOKENS", 8)
    with pytest.raises(ValueError, match="at most 8 tokens per image.*backend='torch'"):
        diverse_select_triton(torch.randn(9, 3), 2)


def test_dispatch_reports_the_reference_for_cpu_tensors():
    assert diverse_select.explain(torch.randn(4, 3), 2).startswith("torch")
    assert K.get_kernel("diverse_select").backends == ("torch", "triton")


# -------------------------------------------------------------------------------------------------
# attention_with_column_sums
# -------------------------------------------------------------------------------------------------


def _qkv(b, h, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * nq + nk + d)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for n in (nq, nk, nk)]


def test_reference_hand_worked_uniform_attention():
    q = torch.zeros(1, 2, 3, 4)
    k = torch.zeros(1, 2, 5, 4)
    v = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 4)
    out, sums = attention_with_column_sums_reference(q, k, v, 0.5)
    assert torch.allclose(out, torch.full((1, 2, 3, 4), 2.0))  # mean of 0..4
    assert torch.allclose(sums, torch.full((1, 5), 6 / 5))  # 2 heads x 3 queries spread over 5 keys


def test_reference_matches_eager_attention_weights():
    q, k, v = _qkv(2, 3, 7, 9, 8)
    mask = torch.zeros(2, 1, 7, 9)
    mask[1, ..., :2] = torch.finfo(torch.float32).min
    out, sums = attention_with_column_sums_reference(q, k, v, 8 ** -0.5, mask)
    weights = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + mask, dim=-1)
    torch.testing.assert_close(out, weights @ v)
    torch.testing.assert_close(sums, weights.sum(dim=(1, 2)))
    torch.testing.assert_close(sums.sum(-1), torch.full((2,), 3.0 * 7))  # every query's row sums to one
    assert sums[1, :2].abs().max() < 1e-30  # masked keys receive nothing


def test_reference_refuses_mismatched_shapes_and_bool_masks():
    q, k, v = _qkv(1, 2, 3, 4, 8)
    with pytest.raises(ValueError, match="grouped heads are not supported"):
        attention_with_column_sums(q, k[:, :1], v[:, :1], 1.0)
    with pytest.raises(ValueError, match=r"must be \[B, H, N, D\]"):
        attention_with_column_sums(q[0], k, v, 1.0)
    with pytest.raises(TypeError, match="additive float mask"):
        attention_with_column_sums(q, k, v, 1.0, torch.ones(1, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_with_column_sums(q, k, v, 1.0, torch.zeros(1, 1, 3, 5))


ATTN_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
SUM_TOL = dict(atol=2e-4, rtol=1e-4)  # float32 sums of float32 probabilities, summation order differs


@needs_triton_cpu
@pytest.mark.parametrize("shape", [(1, 2, 3, 5, 4), (2, 3, 17, 17, 24), (1, 1, 1, 1, 8), (2, 4, 33, 20, 64),
                                   (1, 2, 50, 50, 40)])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_attention_and_sums_match_the_reference(shape, masked):
    q, k, v = _qkv(*shape)
    mask = None
    if masked:  # a padding-style mask, broadcast over queries
        mask = torch.zeros(shape[0], 1, 1, shape[3])
        mask[..., -1] = torch.finfo(torch.float32).min if shape[3] > 1 else 0.0
    out, sums = attention_with_column_sums_triton(q, k, v, shape[-1] ** -0.5, mask)
    ref_out, ref_sums = attention_with_column_sums_reference(q, k, v, shape[-1] ** -0.5, mask)
    torch.testing.assert_close(out, ref_out, **ATTN_TOL[torch.float32])
    torch.testing.assert_close(sums, ref_sums, **SUM_TOL)


@needs_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_attention_half_precision(dtype):
    q, k, v = _qkv(2, 2, 19, 19, 32, dtype)
    out, sums = attention_with_column_sums_triton(q, k, v, 32 ** -0.5)
    ref_out, ref_sums = attention_with_column_sums_reference(q, k, v, 32 ** -0.5)
    assert out.dtype == dtype and sums.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **ATTN_TOL[dtype])
    torch.testing.assert_close(sums, ref_sums, **SUM_TOL)


@needs_triton_cpu
def test_triton_takes_a_full_per_query_mask_and_strided_inputs():
    q, k, v = _qkv(2, 3, 11, 13, 16)
    mask = torch.randn(2, 1, 11, 13)
    # [B, N, H, D] storage viewed as [B, H, N, D]: the layout a transformers attention module hands over.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    out, sums = attention_with_column_sums_triton(q, k, v, 0.25, mask)
    ref_out, ref_sums = attention_with_column_sums_reference(q, k, v, 0.25, mask)
    torch.testing.assert_close(out, ref_out, **ATTN_TOL[torch.float32])
    torch.testing.assert_close(sums, ref_sums, **SUM_TOL)


def test_attention_dispatch_reports_the_reference_for_cpu_tensors():
    q, k, v = _qkv(1, 1, 2, 2, 4)
    assert attention_with_column_sums.explain(q, k, v, 1.0).startswith("torch")
