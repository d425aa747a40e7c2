"""hfpatch.kernels: dispatch rules, the logprob_gather reference, and Triton (interpreted on CPU)
against the reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the Triton kernels run on
CPU tensors here. The interpreter is slow: interpreted cases keep V <= 50257 and the 262144 vocab
is checked on the reference path only.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hfpatch.kernels as K
from hfpatch.kernels import dispatch
from hfpatch.kernels import (
    KernelOp,
    KernelUnavailableError,
    logprob_gather,
    logprob_gather_reference,
    logprob_gather_triton,
)

needs_triton_cpu = pytest.mark.skipif(
    not K.triton_runs_on_cpu(), reason=f"Triton cannot run on CPU here: {K.triton_cpu_reason()}"
)

INF = float("inf")
REPO = Path(__file__).resolve().parents[1]

# Forward outputs are float32 computed from the exactly upcast input on both paths, so they differ
# only by summation order: the tolerance does not depend on the input dtype. Gradients are rounded
# to the input dtype at the end, where one ulp apart is possible.
FWD_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-5, rtol=1e-5),
}
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-6, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-6, rtol=1.6e-2),
}
DTYPES = list(FWD_TOL)


def naive(logits, index):
    """The definition: full float32 log-softmax, then gather."""
    return torch.log_softmax(logits.float(), -1).gather(-1, index.long().unsqueeze(-1)).squeeze(-1)


def make(n, v, dtype, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed + 7919 * n + v)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    index = torch.randint(0, v, (n,), generator=g)
    return logits, index


def close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


# -------------------------------------------------------------------------------------------------
# reference vs the naive formula
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(1, 1), (3, 7), (17, 4099), (2, 262144)])
def test_reference_matches_naive(n, v, dtype):
    logits, index = make(n, v, dtype)
    logp, lse = logprob_gather_reference(logits, index, return_lse=True)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == (n,)
    close(logp, naive(logits, index), FWD_TOL[dtype])
    close(lse, torch.logsumexp(logits.float(), -1), FWD_TOL[dtype])


def test_reference_gradient_matches_naive():
    logits, index = make(5, 300, torch.float32)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w = torch.randn(5)
    (logprob_gather_reference(a, index) * w).sum().backward()
    (naive(b, index) * w).sum().backward()
    close(a.grad, b.grad, GRAD_TOL[torch.float32])


def test_reference_nonfinite_rows_follow_torch():
    logits = torch.randn(4, 6)
    logits[0, 2] = -INF  # masked entry, chosen -> -inf
    logits[1] = -INF  # fully masked row -> nan, lse -inf
    logits[2, 1] = INF  # +inf logit -> nan, lse +inf
    logits[3, 0] = -INF  # masked entry, not chosen -> finite
    index = torch.tensor([2, 3, 4, 5])
    logp, lse = logprob_gather_reference(logits, index, return_lse=True)
    close(logp, naive(logits, index), {})
    close(lse, torch.logsumexp(logits, -1), {})
    assert logp[0] == -INF and logp[1].isnan() and logp[2].isnan() and logp[3].isfinite()


def test_reference_rejects_out_of_range_index():
    logits = torch.randn(2, 3, 10)
    index = torch.tensor([[0, 9, 1], [2, 10, 3]])
    with pytest.raises(IndexError, match=r"index 10 at position \(1, 1\).*\[0, 10\).*ignore_index"):
        logprob_gather(logits, index, backend="torch")
    with pytest.raises(IndexError, match="index -100"):
        logprob_gather(logits, torch.full((2, 3), -100), backend="torch")


def test_ignore_index_gives_zero_and_no_gradient():
    logits = torch.randn(2, 3, 10, requires_grad=True)
    index = torch.tensor([[0, -100, 1], [2, 5, -100]])
    logp, lse = logprob_gather(logits, index, ignore_index=-100, return_lse=True)
    assert logp[0, 1] == 0 and logp[1, 2] == 0
    kept = index != -100
    close(logp[kept], naive(logits.detach(), index.clamp(min=0))[kept], FWD_TOL[torch.float32])
    close(lse, torch.logsumexp(logits.detach(), -1), FWD_TOL[torch.float32])
    logp.sum().backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[1, 2] == 0)


@pytest.mark.parametrize(
    "logits,index,ignore_index,error,match",
    [
        (torch.randn(2, 5).double(), torch.zeros(2, dtype=torch.long), None, TypeError, "float64"),
        (torch.randn(2, 5), torch.zeros(2), None, TypeError, "integers"),
        (torch.randn(2, 5), torch.zeros(3, dtype=torch.long), None, ValueError, r"index shape \(3,\)"),
        (torch.randn(2, 0), torch.zeros(2, dtype=torch.long), None, ValueError, "empty vocabulary"),
        (torch.randn(2, 5), torch.zeros(2, dtype=torch.long), 1.5, TypeError, "ignore_index"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_argument_errors_are_clear_on_both_paths(logits, index, ignore_index, error, match, backend):
    if backend == "triton" and not K.triton_runs_on_cpu():
        pytest.skip(K.triton_cpu_reason())
    with pytest.raises(error, match=match):
        logprob_gather(logits, index, ignore_index=ignore_index, backend=backend)


# -------------------------------------------------------------------------------------------------
# Triton (interpreted) vs reference
# -------------------------------------------------------------------------------------------------


@needs_triton_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 7, 1000, 4099, 50257])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_triton_matches_reference(n, v, dtype):
    logits, index = make(n, v, dtype)
    logp, lse = logprob_gather(logits, index, return_lse=True, backend="triton")
    ref_logp, ref_lse = logprob_gather_reference(logits, index, return_lse=True)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == (n,)
    close(logp, ref_logp, FWD_TOL[dtype])
    close(lse, ref_lse, FWD_TOL[dtype])


@needs_triton_cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_non_contiguous_inputs(dtype):
    base, _ = make(3 * 6, 1031, dtype)
    base = base.view(3, 6, 1031)
    idx = torch.randint(0, 1000, (3, 6))
    cases = {
        # the DPO label shift: a [B, T-1, V] view whose leading dims cannot be merged
        "shifted": (base[:, :-1], idx[:, 1:]),
        # padded rows: row stride 1031, V 1000
        "row_padded": (base[0, :, :1000], idx[0]),
        # V not unit-stride
        "strided_v": (base[1, :, ::3], idx[1] % 344),
        # vocab-major storage
        "transposed": (base[2].t().contiguous().t(), idx[2]),
        # 4-D input
        "4d": (base[:, :4].reshape(3, 2, 2, 1031), idx[:, :4].reshape(3, 2, 2)),
        # 1-D: a single row, scalar index
        "1d": (base[0, 0], idx[0, 0]),
        # expanded (stride 0) index
        "expanded_index": (base[0], idx[0, :1].expand(6)),
        "int32_index": (base[0], idx[0].int()),
    }
    for name, (logits, index) in cases.items():
        out = logprob_gather(logits, index, return_lse=True, backend="triton")
        ref = logprob_gather_reference(logits, index, return_lse=True)
        for a, b in zip(out, ref):
            assert a.shape == index.shape, name
            close(a, b, FWD_TOL[dtype])


@needs_triton_cpu
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_extreme_values(dtype):
    big = {torch.float32: 1e30, torch.float16: 6e4, torch.bfloat16: 1e30}[dtype]
    logits, index = make(8, 1500, dtype)
    logits[0, index[0]] = -INF  # chosen token masked -> -inf
    logits[1, ::2] = -INF  # half the vocab masked
    logits[2] = -INF  # fully masked row -> nan (lse -inf)
    logits[3, 17] = INF  # +inf logit -> nan (lse +inf)
    logits[4] = big  # huge equal logits: uniform
    logits[5, 1499] = big  # one huge logit in the last (partial) block
    logits[6] = -big  # huge negative logits
    logits[7, :] = 0
    logits[7, 3] = float("nan")  # NaN poisons the row
    index[1] = 1
    out = logprob_gather(logits, index, return_lse=True, backend="triton")
    ref = logprob_gather_reference(logits, index, return_lse=True)
    for a, b in zip(out, ref):
        close(a, b, FWD_TOL[dtype])
    close(out[0], naive(logits, index), FWD_TOL[dtype])
    assert out[0][0] == -INF and out[0][2].isnan() and out[0][3].isnan() and out[0][7].isnan()
    assert out[1][2] == -INF and out[1][3] == INF


@needs_triton_cpu
def test_triton_ignore_index_and_empty():
    logits, index = make(6, 999, torch.bfloat16)
    for ignore in (-100, 5):  # a negative sentinel and an in-vocab pad id
        idx = index.clone()
        idx[[1, 4]] = ignore
        out = logprob_gather(logits, idx, ignore_index=ignore, return_lse=True, backend="triton")
        ref = logprob_gather_reference(logits, idx, ignore_index=ignore, return_lse=True)
        close(out[0], ref[0], FWD_TOL[torch.bfloat16])
        close(out[1], ref[1], FWD_TOL[torch.bfloat16])
        assert (out[0][[1, 4]] == 0).all() and out[0][0] != 0
    empty = logprob_gather(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), backend="triton")
    assert empty.shape == (0,) and empty.dtype == torch.float32


@needs_triton_cpu
def test_triton_out_of_range_index_gives_nan_not_garbage():
    logits, index = make(3, 100, torch.float32)
    index[1] = 100
    index[2] = -1
    out = logprob_gather_triton(logits, index)
    assert out[0].isfinite() and out[1].isnan() and out[2].isnan()


@needs_triton_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(1, 7), (5, 4099)])
def test_triton_gradient_matches_reference(n, v, dtype):
    logits, index = make(n, v, dtype)
    index[0] = -100 if n > 1 else index[0]
    g_logp, g_lse = torch.randn(n), torch.randn(n)
    for use_lse in (False, True):
        grads = []
        for impl in (logprob_gather_triton, logprob_gather_reference):
            x = logits.clone().requires_grad_()
            logp, lse = impl(x, index, return_lse=True, ignore_index=-100)
            loss = (logp * g_logp).sum() + ((lse * g_lse).sum() if use_lse else 0)
            loss.backward()
            grads.append(x.grad)
        assert grads[0].dtype == dtype and grads[0].shape == logits.shape
        close(grads[0], grads[1], GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_extreme_values(dtype):
    """Masked entries and huge logits: both paths give log_softmax's exact gradient."""
    big = {torch.float32: 1e30, torch.float16: 6e4, torch.bfloat16: 1e30}[dtype]
    logits, index = make(4, 700, dtype)
    logits[0, ::3] = -INF
    index[0] = 1
    logits[1] = big  # uniform: softmax 1/700 everywhere (exp(x - lse) would say 1)
    logits[2, 5] = big  # one dominant logit
    logits[3] = -big
    impls = [logprob_gather_reference, naive]
    if K.triton_runs_on_cpu():
        impls.append(logprob_gather_triton)
    grads = []
    for impl in impls:
        x = logits.clone().requires_grad_()
        impl(x, index).sum().backward()
        grads.append(x.grad)
    assert grads[0][0, ::3].eq(0).all()
    for g in grads[1:]:
        close(grads[0], g, GRAD_TOL[dtype])


@needs_triton_cpu
def test_triton_gradient_through_noncontiguous_view():
    base = torch.randn(2, 5, 300, requires_grad=True)
    index = torch.randint(0, 300, (2, 4))
    logprob_gather(base[:, :-1], index, backend="triton").sum().backward()
    g_triton = base.grad.clone()
    base.grad = None
    naive(base[:, :-1], index).sum().backward()
    close(g_triton, base.grad, GRAD_TOL[torch.float32])
    assert torch.all(g_triton[:, -1] == 0)


@needs_triton_cpu
def test_triton_no_grad_does_not_build_graph():
    x = torch.randn(2, 50, requires_grad=True)
    with torch.no_grad():
        out = logprob_gather_triton(x, torch.tensor([1, 2]))
    assert not out.requires_grad


# -------------------------------------------------------------------------------------------------
# dispatch rules
# -------------------------------------------------------------------------------------------------


def _probe_op(name="probe"):
    def ref(x, *, k=1):
        return ("torch", k)

    def tri(x, *, k=1):
        return ("triton", k)

    return KernelOp(name, ref, tri)


def test_registry_lists_and_gets_kernels():
    assert "logprob_gather" in K.list_kernels()
    assert K.get_kernel("logprob_gather") is logprob_gather
    assert logprob_gather.reference is logprob_gather_reference
    assert logprob_gather.triton is logprob_gather_triton
    with pytest.raises(KeyError, match="no kernel named 'nope'.*logprob_gather"):
        K.get_kernel("nope")


def test_register_kernel_checks_signatures_and_duplicates():
    def ref(x, *, k=1):
        return x

    def tri_bad(x, *, k=2):
        return x

    def tri(x, *, k=1):
        return x

    with pytest.raises(TypeError, match="signature"):
        K.register_kernel("test_bad", reference=ref, triton=tri_bad)
    with pytest.raises(TypeError, match="reserved"):
        K.register_kernel("test_bad", reference=lambda x, backend=1: x, triton=lambda x, backend=1: x)
    assert "test_bad" not in K.list_kernels()
    try:
        op = K.register_kernel("test_dup", reference=ref, triton=tri)
        assert K.register_kernel("test_dup", reference=ref, triton=tri) is op  # idempotent
        with pytest.raises(ValueError, match="already registered"):
            K.register_kernel("test_dup", reference=tri, triton=ref)
        assert K.register_kernel("test_dup", reference=tri, triton=ref, replace=True).reference is tri
    finally:
        dispatch._REGISTRY.pop("test_dup", None)


def test_cpu_tensor_uses_reference_by_default(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    op = _probe_op()
    assert op(torch.zeros(1)) == ("torch", 1)
    assert op(torch.zeros(1), k=3) == ("torch", 3)
    assert logprob_gather.resolve_backend(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)) == "torch"
    assert "cpu tensor" in logprob_gather.explain(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))


def test_auto_picks_triton_for_cuda_devices(monkeypatch):
    # No GPU here: check the rule on a device object (no CUDA tensor is created).
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    cuda = torch.device("cuda", 0)
    expected = "triton" if K.triton_available() else "torch"
    assert dispatch._choose(_probe_op("x"), cuda, "auto").backend == expected
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch._choose(_probe_op("x"), cuda, "auto").backend == "torch"
    with pytest.raises(KernelUnavailableError, match="triton is not installed.*hfpatch\\[triton\\]"):
        dispatch._choose(_probe_op("x"), cuda, "triton")


def test_env_var_forces_reference_globally(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert dispatch._choose(_probe_op("x"), torch.device("cuda"), "auto").backend == "torch"
    assert _probe_op()(torch.zeros(1)) == ("torch", 1)
    monkeypatch.setenv(K.ENV_VAR, "TORCH ")  # forgiving about case and whitespace
    assert dispatch._choose(_probe_op("x"), torch.device("cuda"), "auto").backend == "torch"
    monkeypatch.setenv(K.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="HFPATCH_KERNELS='fast'"):
        _probe_op()(torch.zeros(1))


def test_backend_override_and_bad_value(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    op = _probe_op()
    assert op(torch.zeros(1), backend="torch") == ("torch", 1)
    with pytest.raises(ValueError, match="backend='cuda'"):
        op(torch.zeros(1), backend="cuda")


@needs_triton_cpu
def test_explicit_triton_runs_on_cpu_under_interpreter_and_beats_env(monkeypatch):
    op = _probe_op()
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert op(torch.zeros(1), backend="triton") == ("triton", 1)  # explicit per-call wins
    monkeypatch.setenv(K.ENV_VAR, "triton")
    assert op(torch.zeros(1)) == ("triton", 1)
    assert op(torch.zeros(1), backend="torch") == ("torch", 1)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    reason = "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 ..."
    monkeypatch.setattr(dispatch, "triton_cpu_reason", lambda: reason)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    with pytest.raises(KernelUnavailableError, match=r"probe: backend 'triton' \(from the backend argument\) "
                       r"cannot run on cpu tensors: Triton runs on CPU.*TRITON_INTERPRET=1"):
        _probe_op()(torch.zeros(1), backend="triton")
    with pytest.raises(KernelUnavailableError, match="meta"):
        _probe_op()(torch.zeros(1, device="meta"), backend="triton")


def test_a_cpu_implementation_that_rejects_the_inputs_is_never_run(monkeypatch):
    """`rejects`: auto runs the reference and says why; backend="cpu" raises with the same reason."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)

    def ref(x, *, k=1):
        return "torch"

    def cpu(x, *, k=1):
        return "cpu"

    def float32_only(x, *, k=1):
        return None if x.dtype == torch.float32 else f"{x.dtype}: float32 only"

    op = KernelOp("probe_cpu", ref, None, cpu=K.CpuKernel(cpu, rejects=float32_only))
    assert op.backends == ("torch", "cpu")
    assert op(torch.zeros(1)) == "cpu" and op.resolve_backend(torch.zeros(1)) == "cpu"
    assert op(torch.zeros(1, dtype=torch.float64)) == "torch"
    assert "does not take these inputs (torch.float64: float32 only)" in op.explain(torch.zeros(1).double())
    with pytest.raises(KernelUnavailableError, match="probe_cpu: backend 'cpu'.*torch.float64: float32 only"):
        op(torch.zeros(1, dtype=torch.float64), backend="cpu")
    with pytest.raises(KernelUnavailableError, match="runs on CPU tensors, not 'meta'"):
        op(torch.zeros(1, device="meta"), backend="cpu")
    with pytest.raises(TypeError, match="CpuKernel"):
        K.register_kernel("test_plain_cpu", reference=ref, triton=None, cpu=cpu)
    assert "test_plain_cpu" not in K.list_kernels()


def _calls_per_op():
    """Calls of every built-in op on CPU tensors, with the backend ``auto`` must pick for each: the CPU
    implementation where one exists and takes the inputs (as before dispatch covered every op), the reference
    for inputs it rejects."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :5] = False
    index = torch.stack([torch.randperm(20, generator=g)[:7] for _ in range(4)]).view(2, 2, 7)
    basis = torch.linalg.qr(torch.randn(2, 2, 8, 3, generator=g)).Q
    projected = (k @ basis).transpose(-1, -2).contiguous()
    scores = torch.rand(2, 2, 20, generator=g)
    sparse_cpu = "cpu" if K.sparse_decode_attention.cpu.unavailable() is None else "torch"
    lowrank_cpu = "cpu" if K.lowrank_sparse_decode.cpu.unavailable() is None else "torch"
    bf16 = [t.bfloat16() for t in (q, k, v)]
    return {
        "attention_with_column_sums": [((k, k, v, 0.3), {}, "torch")],
        "diverse_select": [((torch.randn(9, 4, generator=g), 3), {}, "torch")],
        "group_attention_scores": [((q, k, valid), dict(scale=0.3), "torch")],
        "linear_logprob": [((torch.randn(3, 8, generator=g), torch.randn(11, 8, generator=g), torch.tensor([0, 5, 10])),
                            {}, "cpu")],
        "logprob_gather": [((torch.randn(3, 11, generator=g), torch.tensor([0, 5, 10])), {}, "torch")],
        "lowrank_sparse_decode": [
            ((q, basis, projected, k, v, valid), dict(budget=6, sink=1, window=2), lowrank_cpu),
            ((q, basis, projected.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, valid),
             dict(budget=6, sink=1, window=2), "torch"),  # projected not contiguous along S: the reference
        ],
        "scored_attention": [((q, k, v, valid), dict(scale=0.3), "cpu"),
                             ((q.double(), k.double(), v.double(), valid), dict(scale=0.3), "torch")],
        "select_positions": [((scores, 5), {}, "cpu"), ((scores, 8, valid & (torch.arange(20) < 2), valid), {}, "cpu")],
        "sparse_decode_attention": [
            ((q, k, v, index, valid), dict(scale=0.3), sparse_cpu),
            ((*bf16, index, valid), dict(scale=0.3), "torch"),  # bfloat16: the compiled kernel is float32 only
            ((q, k, v, index.repeat_interleave(3, 1), valid), dict(scale=0.3), "torch"),  # a set per query head
        ],
    }


def _spy_on_implementations(monkeypatch, op, calls):
    """Record which of ``op``'s implementations run, both when dispatch calls them and when any code calls
    their module-level functions directly (an implementation handing a call on to another one)."""

    def spy(label, function):
        @functools.wraps(function)
        def recorded(*args, **kwargs):
            calls.append(label)
            return function(*args, **kwargs)
        return recorded

    def patch_global(function, replacement):
        module = sys.modules[function.__module__]
        if getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, replacement)

    for label, attribute in (("torch", "reference"), ("triton", "triton")):
        function = getattr(op, attribute)
        if function is not None:
            monkeypatch.setattr(op, attribute, spy(label, function))
            patch_global(function, getattr(op, attribute))
    if op.cpu is not None:
        function = op.cpu.function
        monkeypatch.setattr(op.cpu, "function", spy("cpu", function))
        patch_global(function, op.cpu.function)


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_every_op_runs_the_implementation_it_reports(monkeypatch, source):
    """For every registered op, every backend name and inputs its fast implementations take or not: the call runs
    exactly the implementation `choose` reports (a named backend that cannot run raises and runs nothing), and
    `auto` on CPU picks what ran before every op went through dispatch."""
    builtin = {name for name in K.list_kernels() if K.get_kernel(name).reference.__module__.startswith("hfpatch.")}
    cases = _calls_per_op()
    assert set(cases) == builtin, "add the new op to _calls_per_op"
    for name, calls_of_op in cases.items():
        op = K.get_kernel(name)
        ran = []
        with monkeypatch.context() as patched:
            _spy_on_implementations(patched, op, ran)
            for args, kwargs, auto in calls_of_op:
                for backend in K.BACKENDS:
                    if backend == "triton" and op.triton is not None and not K.triton_runs_on_cpu():
                        continue  # cannot tell "unavailable here" from a wrong refusal without the interpreter
                    if source == "argument":
                        patched.delenv(K.ENV_VAR, raising=False)
                        call = dict(kwargs, backend=backend)
                    else:
                        patched.setenv(K.ENV_VAR, backend)
                        call = dict(kwargs)
                    ran.clear()
                    try:
                        choice = op.choose(*args, **call)
                    except KernelUnavailableError:
                        assert backend != "auto" and (backend == "cpu" or op.triton is None), (name, backend)
                        with pytest.raises(KernelUnavailableError):
                            op(*args, **call)
                        assert ran == [], (name, backend, ran)
                        continue
                    op(*args, **call)
                    assert ran == [choice.backend], (name, backend, choice, ran)
                    assert choice.backend == (auto if backend == "auto" else backend), (name, backend, choice)
                    assert choice.implementation is {"torch": op.reference, "triton": op.triton,
                                                     "cpu": op.cpu}[choice.backend]


def test_import_and_interpreter_detection_in_fresh_processes():
    """Importing hfpatch does not import triton; TRITON_INTERPRET is honoured only before import."""
    script = textwrap.dedent(
        """
        import os, sys, torch
        import hfpatch, hfpatch.kernels as K
        assert "triton" not in sys.modules, "importing hfpatch imported triton"
        print("before", K.triton_runs_on_cpu())
        x, i = torch.randn(2, 9), torch.tensor([1, 2])
        print("auto", K.logprob_gather.resolve_backend(x, i))
        if K.triton_available():
            import triton
            os.environ["TRITON_INTERPRET"] = "1"   # too late: triton is already imported
            print("late", K.triton_runs_on_cpu())
            try:
                K.logprob_gather(x, i, backend="triton")
            except K.KernelUnavailableError as e:
                print("error", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", K.ENV_VAR)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert lines["before"] == "False" and lines["auto"] == "torch"
    if K.triton_available():
        assert lines["late"] == "False"
        assert "cannot run on cpu tensors" in lines["error"]
        assert "TRITON_INTERPRET=1 was set after triton had already been imported" in lines["error"]


_AOT_SCRIPT = r"""
import re, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
except ImportError as e:
    print("internals:", e); sys.exit(3)
import hfpatch.kernels
fwd, bwd = sys.modules["hfpatch.kernels.logprob_gather"]._kernels()
target = GPUTarget("cuda", 90, 32)
common = {"T": "i32", "V": "i32", "stride_lb": "i32", "stride_lt": "i32", "stride_lv": "constexpr",
          "stride_ib": "i32", "stride_it": "constexpr", "ignore_index": "i32", "BLOCK_V": "constexpr",
          "HAS_IGNORE": "constexpr"}
# What the launcher sees for contiguous rows with V a multiple of 16 (32000, 128256, 262144).
aligned = {"logits_ptr", "index_ptr", "grad_ptr", "V", "stride_lt", "stride_lb", "stride_ib"}
for dt, block in (("bf16", 4096), ("fp32", 2048)):
    sigs = {
        fwd: dict({"logits_ptr": "*" + dt, "index_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                   "shift_ptr": "*fp32", "logs_ptr": "*fp32"}, **common),
        bwd: dict({"logits_ptr": "*" + dt, "index_ptr": "*i64", "shift_ptr": "*fp32", "logs_ptr": "*fp32",
                   "glogp_ptr": "*fp32", "glse_ptr": "*fp32", "grad_ptr": "*" + dt}, **common,
                  HAS_GLOGP="constexpr", HAS_GLSE="constexpr"),
    }
    for fn, sig in sigs.items():
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in sig}
        consts = {"stride_lv": 1, "stride_it": 1, "BLOCK_V": block, "HAS_IGNORE": True}
        if fn is bwd:
            consts.update(HAS_GLOGP=True, HAS_GLSE=True)
        ptx = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=target,
                             options={"num_warps": 8}).asm["ptx"]
        print(fn.__name__, dt, "vectorised" if "ld.global.v4" in ptx else "scalar")
"""


@pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter accepts code the GPU compiler rejects; compile to PTX (ptxas, no driver)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    if res.returncode == 3:
        pytest.skip(f"this triton's compiler API differs: {res.stdout.strip()}")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.endswith("vectorised") for line in lines), lines
