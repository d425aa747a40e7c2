"""`lowrank_sparse_decode`: the fused CPU kernel against its torch reference, and the compiled-kernel dispatch."""
from __future__ import annotations

import pytest
import torch

from hfpatch.kernels import (
    CompiledKernel,
    group_attention_scores,
    triton_cpu_reason,
    triton_runs_on_cpu,
    KernelUnavailableError,
    cpu_build,
    dispatch,
    lowrank_sparse_decode,
    lowrank_sparse_decode_reference,
    register_kernel,
    sparse_decode_attention,
)

needs_compiled = pytest.mark.skipif(lowrank_sparse_decode.cpu.unavailable() is not None,
                                    reason=f"CPU kernel not built: {lowrank_sparse_decode.cpu.unavailable()}")


def inputs(b, hq, hkv, d, s, rank, *, pad=(), capacity=0, seed=0, dv=None, fresh=0):
    """A step over a cache that may be a view of a longer buffer (like hfpatch's growable cache), with the
    projected keys a view of a longer buffer too (its last `fresh` positions not projected yet: NaN), and
    left padding of `pad[i]` positions in row i."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    key = torch.randn(b, hkv, s + capacity, d, generator=g)[:, :, :s]
    value = torch.randn(b, hkv, s + capacity, dv, generator=g)[:, :, :s]
    query = torch.randn(b, hq, d, generator=g)
    basis = torch.linalg.qr(torch.randn(b, hkv, d, rank, generator=g)).Q
    buffer = torch.empty(b, hkv, rank, s + capacity)
    buffer[..., :s] = (key @ basis).transpose(-1, -2)
    buffer[..., s - fresh:s] = float("nan")
    valid = None
    if pad:
        valid = torch.ones(b, s, dtype=torch.bool)
        for row, n in enumerate(pad):
            valid[row, :n] = False
    return query, basis, buffer[..., :s], key, value, valid


CASES = {  # (b, hq, hkv, d, s, rank, budget, sink, window, pad, capacity, fresh)
    "smollm2-like": (1, 9, 3, 64, 700, 16, 64, 4, 32, (), 40, 1),
    "no-gqa": (2, 4, 4, 16, 77, 5, 10, 0, 1, (), 0, 0),
    "padded": (2, 8, 2, 32, 129, 8, 20, 2, 3, (0, 17), 7, 3),
    "fewer-valid-than-budget": (2, 6, 3, 16, 40, 4, 30, 1, 2, (0, 25), 0, 1),
    "budget-covers-all": (1, 4, 2, 16, 33, 4, 50, 4, 8, (), 0, 33),
    "window-zero-keeps-current": (1, 2, 1, 8, 9, 8, 3, 0, 0, (), 0, 1),
    "length-one": (1, 2, 1, 8, 1, 2, 4, 0, 1, (), 0, 0),
}


@needs_compiled
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_equals_reference(case):
    b, hq, hkv, d, s, rank, budget, sink, window, pad, capacity, fresh = CASES[case]
    args = inputs(b, hq, hkv, d, s, rank, pad=pad, capacity=capacity, fresh=fresh)
    ref_args = inputs(b, hq, hkv, d, s, rank, pad=pad, capacity=capacity, fresh=fresh)
    options = dict(budget=budget, scale=0.3, sink=sink, window=window, fresh=fresh)
    out, index = lowrank_sparse_decode(*args, **options, backend="cpu")
    ref_out, ref_index = lowrank_sparse_decode_reference(*ref_args, **options)
    # both wrote the fresh positions' projections into the buffer
    torch.testing.assert_close(args[2], ref_args[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args[2], (args[3] @ args[1]).transpose(-1, -2), atol=1e-5, rtol=1e-5)
    assert index.dtype == torch.int64 and index.shape == ref_index.shape == (b, hkv, min(budget, s))
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)


@needs_compiled
def test_cpu_kernel_selection_semantics():
    """Sinks and window are always in, padding never, and the rest are the best approximate scores."""
    query, basis, projected, key, value, valid = inputs(2, 6, 3, 16, 60, 16, pad=(0, 9), seed=3)
    out, index = lowrank_sparse_decode(query, basis, projected, key, value, valid, budget=12, sink=2, window=3,
                                       backend="cpu")
    for row, first in ((0, 0), (1, 9)):
        for head in range(3):
            chosen = index[row, head].tolist()
            assert chosen == sorted(chosen) and -1 not in chosen
            assert {first, first + 1, 57, 58, 59} <= set(chosen) and min(chosen) >= first
    # attending to the returned set with the exact kernel gives the returned output
    torch.testing.assert_close(out, sparse_decode_attention(query, key, value, index, valid), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not triton_runs_on_cpu(), reason=f"Triton cannot run on CPU here: {triton_cpu_reason()}")
def test_on_cuda_the_reference_scores_the_projected_view_with_the_triton_kernel():
    """CUDA runs the reference, whose scoring pass reads the projected keys as a transposed view of the
    buffer (unit stride along rank is not given): the Triton kernel must follow those strides."""
    query, basis, projected, key, value, valid = inputs(2, 6, 3, 16, 37, 4, pad=(0, 5), capacity=13)
    projected_query = (query.reshape(2, 3, 2, 16) @ basis).reshape(2, 6, 4)
    view = projected.transpose(-1, -2)
    assert view.stride(-1) != 1
    torch.testing.assert_close(group_attention_scores(projected_query, view, valid, scale=0.3, backend="triton"),
                               group_attention_scores(projected_query, view, valid, scale=0.3, backend="torch"),
                               atol=1e-5, rtol=1e-5)


@needs_compiled
def test_other_dtypes_and_strides_run_the_reference_and_say_so(monkeypatch):
    """bfloat16 or a projected buffer not contiguous along S: auto runs the reference (and reports it),
    backend="cpu" refuses with the reason instead of running the reference under its name."""
    monkeypatch.delenv("HFPATCH_KERNELS", raising=False)
    *tensors, valid = inputs(1, 4, 2, 16, 30, 4, pad=(3,))
    query, basis, projected, key, value = tensors
    strided = projected.transpose(-1, -2).contiguous().transpose(-1, -2)
    for args, reason in (([t.to(torch.bfloat16) for t in tensors] + [valid], "bfloat16: float32 only"),
                         ([query, basis, strided, key, value, valid], "not contiguous along its last dimension")):
        options = dict(budget=8, sink=1, window=2)
        assert lowrank_sparse_decode.resolve_backend(*args, **options) == "torch"
        assert reason in lowrank_sparse_decode.explain(*args, **options)
        with pytest.raises(KernelUnavailableError, match=reason):
            lowrank_sparse_decode(*args, **options, backend="cpu")
        out, index = lowrank_sparse_decode(*args, **options)
        ref_out, ref_index = lowrank_sparse_decode_reference(*args, **options)
        assert out.dtype == args[0].dtype and torch.equal(index, ref_index) and torch.equal(out, ref_out)


def test_shape_errors_name_the_problem():
    query, basis, projected, key, value, valid = inputs(1, 4, 2, 16, 30, 4)
    with pytest.raises(ValueError, match="projected"):
        lowrank_sparse_decode(query, basis, projected[..., :20], key, value, budget=8)
    with pytest.raises(ValueError, match="valid must be"):
        lowrank_sparse_decode(query, basis, projected, key, value, torch.ones(1, 29, dtype=torch.bool), budget=8)
    with pytest.raises(ValueError, match="fresh=31"):
        lowrank_sparse_decode(query, basis, projected, key, value, budget=8, fresh=31)


def test_dispatch_picks_the_compiled_kernel_and_honours_overrides(monkeypatch):
    monkeypatch.delenv("HFPATCH_KERNELS", raising=False)
    args = inputs(1, 4, 2, 16, 30, 4)
    built = lowrank_sparse_decode.cpu.unavailable() is None
    assert lowrank_sparse_decode.resolve_backend(*args, budget=8) == ("cpu" if built else "torch")
    assert lowrank_sparse_decode.resolve_backend(*args, budget=8, backend="torch") == "torch"
    monkeypatch.setenv("HFPATCH_KERNELS", "torch")
    assert lowrank_sparse_decode.resolve_backend(*args, budget=8) == "torch"
    with pytest.raises(KernelUnavailableError, match="no Triton implementation"):
        lowrank_sparse_decode(*args, budget=8, backend="triton")
    # an op without a CPU implementation refuses backend="cpu" by name
    with pytest.raises(KernelUnavailableError, match="no CPU implementation"):
        group_attention_scores(args[0], args[3], backend="cpu")
    with pytest.raises(TypeError, match="Triton implementation, a CPU one, or both"):
        register_kernel("test_neither", reference=lambda x: x, triton=None)


def test_a_kernel_that_does_not_build_falls_back_with_the_reason(tmp_path, monkeypatch, caplog):
    """No compiler, no ninja or a compile error: `auto` runs the reference, `cpu` raises with the reason."""
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_build, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.delenv("HFPATCH_KERNELS", raising=False)
    monkeypatch.setattr(cpu_build, "_failures", {})

    def ref(x, *, k=1):
        return "reference"

    def compiled(x, *, k=1):
        return cpu_build.load("broken.cpp").broken(x, k)

    op = register_kernel("test_broken", reference=ref, triton=None, cpu=CompiledKernel("broken.cpp", compiled))
    try:
        assert op(torch.zeros(1)) == "reference"
        assert "compiled CPU kernel is unavailable" in op.explain(torch.zeros(1))
        with pytest.raises(KernelUnavailableError, match="broken.cpp did not build"):
            op(torch.zeros(1), backend="cpu")
        assert any("could not be built" in r.message for r in caplog.records)
    finally:
        dispatch._REGISTRY.pop("test_broken", None)
    with pytest.raises(FileNotFoundError, match="no C\\+\\+ source 'missing.cpp'"):
        CompiledKernel("missing.cpp", compiled)
