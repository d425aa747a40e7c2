"""hfpatch.kernels.linear_logprob: every implementation (torch reference, tiled CPU, Triton under the interpreter)
against float64 on the same inputs, values and gradients, awkward shapes, ignore_index, the TDPO KL mode, errors
and dispatch.

conftest.py sets TRITON_INTERPRET=1 before triton is imported, so the Triton implementation runs on CPU tensors
here. Most cases shrink the tile (16 tokens x 128 vocabulary entries) so that small shapes cross many tiles: N not
a multiple of the token chunk, V not a multiple of the vocabulary chunk.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import hfpatch.kernels as K
from hfpatch.kernels import KernelUnavailableError, linear_logprob

# The package binds the name linear_logprob to the op, so `import hfpatch.kernels.linear_logprob as m` gives the op.
LL = importlib.import_module("hfpatch.kernels.linear_logprob")

needs_triton_cpu = pytest.mark.skipif(
    not K.triton_runs_on_cpu(), reason=f"Triton cannot run on CPU here: {K.triton_cpu_reason()}"
)

IMPL_PARAMS = [
    pytest.param(LL.linear_logprob_reference, id="torch"),
    pytest.param(LL.linear_logprob_cpu, id="cpu"),
    pytest.param(LL.linear_logprob_triton, id="triton", marks=needs_triton_cpu),
]

# Every path computes the logits and their log-sum-exp in float32 from the exactly upcast inputs, so forward
# errors against float64 do not depend on the input dtype; gradients come back rounded to the input dtype.
FWD_TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-5),
    torch.float16: dict(atol=2e-4, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-4, rtol=2e-5),
}
GRAD_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
DTYPES = list(FWD_TOL)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(LL, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(LL, "TILE_ELEMENTS", 16 * 128)
    assert LL._tile_shape(21, 600) == (16, 128)


def make(n, h, v, dtype, *, seed=0, bias=True, ref=False, ignore=()):
    g = torch.Generator().manual_seed(seed + 31 * n + v)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    b = (torch.randn(v, generator=g)).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        labels[i] = -100
    out = dict(hidden=hidden, weight=weight, labels=labels, bias=b)
    if ref:
        out["reference_hidden"] = (hidden.float() + 0.3 * torch.randn(n, h, generator=g)).to(dtype)
        out["reference_weight"] = (weight.float() + 0.2 * torch.randn(v, h, generator=g)).to(dtype)
    return out


def truth(hidden, weight, labels, bias=None, reference_hidden=None, reference_weight=None, ignore_index=-100):
    """The definition in float64: full logits, log_softmax, gather; KL(ref || policy) from both distributions."""
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    logp_all = torch.log_softmax(logits, -1)
    ignored = labels == ignore_index
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0)
    if reference_hidden is None:
        return logp
    ref_all = torch.log_softmax(reference_hidden.double() @ reference_weight.double().T, -1)
    kl = (ref_all.exp() * (ref_all - logp_all)).sum(-1).masked_fill(ignored, 0)
    return logp, kl


def leaves(inputs, names=("hidden", "weight", "bias")):
    out = {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) and v.is_floating_point()
               else v) for k, v in inputs.items()}
    return out


def upstream(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64)


def grads_of(fn, inputs, n, names=("hidden", "weight", "bias")):
    args = leaves(inputs, names)
    out = fn(**args)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * upstream(n, seed=i + 1)).sum() for i, o in enumerate(outs))
    loss.backward()
    return outs, {k: args[k].grad for k in names if isinstance(args.get(k), torch.Tensor)}


def truth_grads(inputs, n, names=("hidden", "weight", "bias")):
    """Outputs and gradients of the float64 definition, on float64 copies of the inputs."""
    as64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items() if v is not None}
    return grads_of(truth, as64, n, names)


def close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# -------------------------------------------------------------------------------------------------------------
# values and gradients against float64
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,v", [(1, 8, 1), (21, 24, 600), (5, 16, 257)])
def test_values_and_gradients_match_float64(small_tiles, impl, dtype, n, h, v):
    inputs = make(n, h, v, dtype)
    outs, grads = grads_of(impl, inputs, n)
    ref_outs, ref_grads = truth_grads({k: x for k, x in inputs.items()}, n)
    assert outs[0].dtype == torch.float32 and outs[0].shape == (n,)
    close(outs[0], ref_outs[0], FWD_TOL[dtype])
    for name in ("hidden", "weight", "bias"):
        assert grads[name].dtype == dtype, name
        close(grads[name], ref_grads[name], GRAD_TOL[dtype])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_default_tiles_and_no_bias(impl):
    # The shipped tile shape on a vocabulary that is not a multiple of 128.
    inputs = make(6, 32, 4099, torch.float32, bias=False)
    outs, grads = grads_of(impl, inputs, 6, names=("hidden", "weight"))
    ref_outs, ref_grads = truth_grads(inputs, 6,
                                   names=("hidden", "weight"))
    close(outs[0], ref_outs[0], FWD_TOL[torch.float32])
    for name in ("hidden", "weight"):
        close(grads[name], ref_grads[name], GRAD_TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_ignore_index_rows_give_zero_and_no_gradient(small_tiles, impl):
    n = 21
    inputs = make(n, 12, 300, torch.float32, ignore=(0, 7, 8, 20))
    outs, grads = grads_of(impl, inputs, n)
    expected, expected_grads = truth_grads(inputs, n)
    ignored = inputs["labels"] == -100
    assert torch.all(outs[0][ignored] == 0)
    assert torch.all(grads["hidden"][ignored] == 0)
    close(outs[0], expected[0], FWD_TOL[torch.float32])
    for name in ("hidden", "weight", "bias"):
        close(grads[name], expected_grads[name], GRAD_TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_all_rows_ignored_and_custom_ignore_index(impl):
    inputs = make(4, 8, 50, torch.float32)
    inputs["labels"] = torch.full((4,), 7)
    args = leaves(inputs)
    out = impl(**args, ignore_index=7)
    assert torch.all(out == 0)
    out.sum().backward()  # stays connected: a fully masked micro-batch must not fail in backward
    assert torch.all(args["hidden"].grad == 0)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_mixed_precision_inputs(small_tiles, impl):
    # bfloat16 hidden states from an autocast backbone with a float32 lm_head (and bias): float32 logits, each
    # gradient in its input's dtype.
    inputs = make(13, 16, 300, torch.float32, ref=True)
    inputs["hidden"] = inputs["hidden"].bfloat16()
    inputs["reference_hidden"] = inputs["reference_hidden"].bfloat16()
    (logp, kl), grads = grads_of(impl, inputs, 13)
    (t_logp, t_kl), t_grads = truth_grads(inputs, 13)
    close(logp, t_logp, FWD_TOL[torch.bfloat16])
    close(kl, t_kl, FWD_TOL[torch.bfloat16])
    assert grads["hidden"].dtype == torch.bfloat16 and grads["weight"].dtype == torch.float32
    close(grads["hidden"], t_grads["hidden"], GRAD_TOL[torch.bfloat16])
    close(grads["weight"], t_grads["weight"], GRAD_TOL[torch.float32])
    close(grads["bias"], t_grads["bias"], GRAD_TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_leading_dims_are_kept(small_tiles, impl):
    inputs = make(12, 8, 140, torch.float32, ignore=(3,))
    batched = dict(inputs, hidden=inputs["hidden"].view(3, 4, 8), labels=inputs["labels"].view(3, 4))
    out = impl(**batched)
    assert out.shape == (3, 4)
    close(out.reshape(-1), truth(**{k: v for k, v in inputs.items()}), FWD_TOL[torch.float32])


# -------------------------------------------------------------------------------------------------------------
# TDPO mode: KL(pi_ref || pi) in the same pass
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_mode_matches_the_direct_formula(small_tiles, impl, dtype):
    n = 19
    inputs = make(n, 16, 333, dtype, ref=True, ignore=(4,))
    (logp, kl), grads = grads_of(impl, inputs, n)
    (t_logp, t_kl), t_grads = truth_grads(inputs, n)
    close(logp, t_logp, FWD_TOL[dtype])
    close(kl, t_kl, FWD_TOL[dtype])
    assert kl[4] == 0 and torch.all(kl[torch.arange(n) != 4] > 0)
    for name in ("hidden", "weight", "bias"):
        close(grads[name], t_grads[name], GRAD_TOL[dtype])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ref", [False, True])
def test_frozen_head_gradient_needs_no_backward_tiles(small_tiles, monkeypatch, impl, dtype, with_ref):
    # A frozen lm_head (LoRA/PEFT): only hidden needs a gradient. The tiled paths then accumulate the expected
    # embedding sum_v p(v) W_v in the forward pass and the backward recomputes no tile.
    def no_tiles(*args, **kwargs):
        raise AssertionError("the backward recomputed tiles for a frozen head")

    monkeypatch.setattr(LL, "_backward_pass", no_tiles)
    n = 23
    inputs = make(n, 16, 333, dtype, ref=with_ref, ignore=(2, 5))
    outs, grads = grads_of(impl, inputs, n, names=("hidden",))
    t_outs, t_grads = truth_grads(inputs, n, names=("hidden",))
    for a, t in zip(outs, t_outs):
        close(a, t, FWD_TOL[dtype])
    assert torch.all(grads["hidden"][inputs["labels"] == -100] == 0)
    close(grads["hidden"], t_grads["hidden"], GRAD_TOL[dtype])


def test_no_grad_calls_skip_the_expected_embedding(monkeypatch):
    # Under torch.no_grad (reference log-probs) no backward follows: the forward does only the log-sum-exp work.
    seen = []
    original = LL._forward_pass

    def spy(*args, **kwargs):
        seen.append(args[-1] if len(args) == 8 else kwargs.get("expect", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(LL, "_forward_pass", spy)
    inputs = leaves(make(5, 8, 40, torch.float32, bias=False), names=("hidden",))
    with torch.no_grad():
        LL.linear_logprob_cpu(**inputs)
    LL.linear_logprob_cpu(**inputs)
    assert seen == [False, True]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_kl_gradient_reaches_the_policy_only(small_tiles, impl):
    inputs = make(9, 8, 200, torch.float32, bias=False, ref=True)
    args = leaves(inputs, names=("hidden", "weight", "reference_hidden", "reference_weight"))
    _, kl = impl(**args)
    kl.sum().backward()
    assert args["reference_hidden"].grad is None and args["reference_weight"].grad is None
    # d KL / d z = p - p_ref, so d KL / d hidden = (p - p_ref) @ W, checked in float64.
    h, w = inputs["hidden"].double(), inputs["weight"].double()
    p = torch.softmax(h @ w.T, -1)
    p_ref = torch.softmax(inputs["reference_hidden"].double() @ inputs["reference_weight"].double().T, -1)
    close(args["hidden"].grad, (p - p_ref) @ w, GRAD_TOL[torch.float32])
    close(args["weight"].grad, (p - p_ref).T @ h, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_kl_is_zero_against_itself(small_tiles, impl):
    inputs = make(7, 8, 300, torch.float32, bias=False)
    _, kl = impl(**inputs, reference_hidden=inputs["hidden"], reference_weight=inputs["weight"])
    close(kl, torch.zeros(7), dict(atol=1e-5, rtol=0))


# -------------------------------------------------------------------------------------------------------------
# memory: the tiled paths keep nothing of size [N, V]
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [pytest.param(LL.linear_logprob_cpu, id="cpu"),
                                  pytest.param(LL.linear_logprob_triton, id="triton", marks=needs_triton_cpu)])
def test_tiled_paths_save_no_logits_for_backward(small_tiles, impl):
    n, h, v = 16, 4, 600  # few tiles: the interpreter runs one program at a time
    inputs = leaves(make(n, h, v, torch.float32, ref=True))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, kl = impl(**inputs)
    assert max(saved) <= v * h < n * v  # the weight itself is the largest thing kept
    (logp + kl).sum().backward()


# -------------------------------------------------------------------------------------------------------------
# errors and dispatch
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("change,error,match", [
    (dict(labels=torch.tensor([0, 50, 1])), IndexError, r"label 50 .*outside the vocabulary \[0, 50\)"),
    (dict(labels=torch.tensor([0, -5, 1])), IndexError, r"label -5 .*ignore_index=-100"),
    (dict(weight=torch.zeros(50, 7)), ValueError, r"hidden's last dim 8 != weight's H 7"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, r"labels \(4,\) must have hidden's leading shape"),
    (dict(labels=torch.zeros(3)), TypeError, r"labels must hold integer token ids"),
    (dict(hidden=torch.zeros(3, 8, dtype=torch.float64)), TypeError, r"hidden \(torch.float64\) and weight"),
    (dict(reference_hidden=torch.zeros(3, 8, dtype=torch.int32), reference_weight=torch.zeros(50, 8)), TypeError,
     r"reference_hidden \(torch.int32\) and reference_weight \(torch.float32\) must be float32"),
    (dict(bias=torch.zeros(49)), ValueError, r"bias must be a \[V\] = \[50\] tensor"),
    (dict(reference_hidden=torch.zeros(3, 8)), ValueError, r"needs both reference_hidden and reference_weight"),
    (dict(reference_hidden=torch.zeros(3, 8), reference_weight=torch.zeros(40, 8)), ValueError,
     r"reference_weight \(40, 8\) must be \[V, H_ref\] with the policy's V = 50"),
])
def test_argument_errors_are_clear(impl, change, error, match):
    args = dict(hidden=torch.zeros(3, 8), weight=torch.zeros(50, 8), labels=torch.tensor([0, 1, 2]), bias=None)
    args.update(change)
    with pytest.raises(error, match=match):
        impl(**args)


def test_dispatch_picks_the_tiled_cpu_path_and_says_so(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    inputs = make(3, 8, 20, torch.float32)
    assert linear_logprob.backends == ("torch", "triton", "cpu")
    assert linear_logprob.explain(**inputs) == "cpu (auto: cpu tensor and the CPU implementation takes these inputs)"
    assert linear_logprob.resolve_backend(**inputs, backend="torch") == "torch"
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert linear_logprob.resolve_backend(**inputs) == "torch"
    close(linear_logprob(**inputs), LL.linear_logprob_reference(**inputs), FWD_TOL[torch.float32])


def test_triton_without_interpreter_is_a_clear_error(monkeypatch):
    from hfpatch.kernels import dispatch
    monkeypatch.setattr(dispatch, "triton_cpu_reason", lambda: "Triton runs on CPU tensors only under its "
                        "interpreter: set TRITON_INTERPRET=1 ...")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    with pytest.raises(KernelUnavailableError, match=r"linear_logprob: backend 'triton'.*TRITON_INTERPRET=1"):
        linear_logprob(**make(2, 8, 20, torch.float32), backend="triton")
