"""One decode step that re-selects its positions in a low-rank key basis, then attends to them exactly.

``lowrank_sparse_decode(query, basis, projected, key, value, valid, budget=K, ...)`` is what Recycled
Attention's ``rescore_rank`` does at every sparse step: score every cached position by the softmax of
``(q·P)·(k·P)`` summed over each KV group's query heads (``P`` = ``basis``, the keys' principal
directions; ``projected`` = the cache already multiplied by it), keep the top ``budget`` positions per KV
head with the first ``sink`` valid positions and the last ``window`` forced in, and return the exact
attention over them (``sparse_decode_attention``) plus the chosen positions.

The reference composes the dispatched ops ``group_attention_scores``, ``select_positions`` and
``sparse_decode_attention`` (so a CUDA call runs their Triton kernels). On CPU a fused C++ kernel
(``csrc/sparse_decode.cpp``, built on first use by ``cpu_build``; float32) does all of it in one call: on
a 2-core CPU the composition is ~30 small ops per layer and step whose dispatch and extra passes
over memory cost more than the arithmetic.
"""
from __future__ import annotations

import torch

from .cpu_build import CompiledKernel, load
from .dispatch import float32_cpu_problem, register_kernel
from .attention_scores import group_attention_scores
from .selection import select_positions, with_forced_first
from .sparse_decode import sparse_decode_attention

__all__ = ["lowrank_sparse_decode", "lowrank_sparse_decode_reference"]


def _check(query, basis, projected, key, value, valid, fresh):
    if query.dim() != 3 or key.dim() != 4 or value.dim() != 4 or basis.dim() != 4 or projected.dim() != 4:
        raise ValueError(
            "lowrank_sparse_decode: expected query [B, Hq, D], basis [B, Hkv, D, r], projected [B, Hkv, r, S], "
            f"key/value [B, Hkv, S, D]; got {tuple(query.shape)}, {tuple(basis.shape)}, {tuple(projected.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, hq, d = query.shape
    _, hkv, s, _ = key.shape
    rank = basis.shape[-1]
    if hq % hkv or key.shape[0] != b or key.shape[-1] != d or tuple(value.shape[:3]) != (b, hkv, s):
        raise ValueError(f"lowrank_sparse_decode: query {tuple(query.shape)} does not fit key {tuple(key.shape)} "
                         f"and value {tuple(value.shape)}")
    if tuple(basis.shape) != (b, hkv, d, rank) or tuple(projected.shape) != (b, hkv, rank, s):
        raise ValueError(f"lowrank_sparse_decode: basis must be [B, Hkv, D, r] = {(b, hkv, d, rank)} and projected "
                         f"[B, Hkv, r, S] = {(b, hkv, rank, s)}; got {tuple(basis.shape)}, {tuple(projected.shape)}")
    if valid is not None and tuple(valid.shape) != (b, s):
        raise ValueError(f"lowrank_sparse_decode: valid must be [B, S] = {(b, s)}, got {tuple(valid.shape)}")
    if not 0 <= fresh <= s:
        raise ValueError(f"lowrank_sparse_decode: fresh={fresh} must be between 0 and S={s}")


def lowrank_sparse_decode_reference(
    query: torch.Tensor,
    basis: torch.Tensor,
    projected: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    budget: int,
    scale: float | None = None,
    sink: int = 0,
    window: int = 1,
    fresh: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank re-selection + exact sparse attention for one decode step.

    ``query`` [B, Hq, D]; ``basis`` [B, Hkv, D, r]; ``projected`` [B, Hkv, r, S] (``key @ basis``,
    transposed; any strides); ``key``/``value`` [B, Hkv, S, D|Dv] (the cache, any strides); ``valid``
    optional [B, S] bool (False = padding: never selected, never attended). ``scale`` defaults to
    ``D ** -0.5`` and scales both the approximate and the exact logits. ``window`` counts the current
    token (at least 1 is kept). ``fresh``: the last ``fresh`` positions of ``projected`` are first written
    in place from ``key @ basis`` (the keys added since the previous step; the buffer's owner projects
    the rest once).

    Returns ``(out [B, Hq, Dv] in query.dtype, index [B, Hkv, min(budget, S)] int64)``: the positions
    attended, ascending, then -1 for slots left when a row has fewer valid positions than the budget.
    Which of tied positions is kept is unspecified.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import lowrank_sparse_decode
        >>> q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
        >>> basis = torch.linalg.qr(torch.randn(1, 2, 8, 3)).Q             # any orthonormal columns
        >>> out, index = lowrank_sparse_decode(q, basis, (k @ basis).transpose(-1, -2), k, v, budget=6,
        ...                                    sink=1, window=2)
        >>> out.shape, index.shape, index[0, 0, 0].item(), index[0, 0, -1].item()
        (torch.Size([1, 4, 8]), torch.Size([1, 2, 6]), 0, 19)
    """
    _check(query, basis, projected, key, value, valid, fresh)
    b, hq, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    rank = basis.shape[-1]
    if fresh:
        projected[..., length - fresh:] = (key[:, :, length - fresh:].to(basis.dtype) @ basis).transpose(-1, -2)
    scale = d ** -0.5 if scale is None else scale
    projected_query = (query.to(basis.dtype).reshape(b, hkv, hq // hkv, d) @ basis).reshape(b, hq, rank)
    scores = group_attention_scores(projected_query, projected.transpose(-1, -2), valid, scale=scale)
    index = select_positions(with_forced_first(scores, valid, sink, window), budget, valid=valid)
    if valid is not None:  # a row with fewer valid positions than the budget: padding slots become -1, last
        chosen = valid.bool().gather(1, index.reshape(b, -1)).reshape(index.shape)
        index = torch.where(chosen, index, length).sort(dim=-1).values
        index = index.masked_fill(index == length, -1)
    return sparse_decode_attention(query, key, value, index, valid, scale=scale), index


def lowrank_sparse_decode_cpu(
    query: torch.Tensor,
    basis: torch.Tensor,
    projected: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    budget: int,
    scale: float | None = None,
    sink: int = 0,
    window: int = 1,
    fresh: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused C++ kernel: float32 CPU tensors, ``projected``, ``key`` and ``value`` with unit last stride
    (``_cpu_rejects`` says which inputs it does not take)."""
    _check(query, basis, projected, key, value, valid, fresh)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return load(_SOURCE).lowrank_sparse_decode(
        query.contiguous(), basis.contiguous(), projected, key, value,
        None if valid is None else valid.bool().contiguous(), float(scale), int(budget), int(sink), int(window),
        int(fresh))


def _cpu_rejects(
    query: torch.Tensor,
    basis: torch.Tensor,
    projected: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    budget: int,
    scale: float | None = None,
    sink: int = 0,
    window: int = 1,
    fresh: int = 0,
) -> str | None:
    """Why the fused kernel does not take these inputs (the reference does), or None. Malformed inputs pass: the
    kernel's argument check raises the same error as the reference's."""
    problem = float32_cpu_problem(query=query, basis=basis, projected=projected, key=key, value=value)
    if problem:
        return problem
    if any(t.stride(-1) != 1 for t in (projected, key, value)):
        return "projected, key or value not contiguous along its last dimension"
    return None


_SOURCE = "sparse_decode.cpp"  # beside the plain sparse attention it shares its attention code with

lowrank_sparse_decode = register_kernel(
    "lowrank_sparse_decode",
    reference=lowrank_sparse_decode_reference,
    triton=None,  # on CUDA the reference's own steps run as Triton kernels
    cpu=CompiledKernel(_SOURCE, lowrank_sparse_decode_cpu, rejects=_cpu_rejects),
)
