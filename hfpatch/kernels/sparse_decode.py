"""Decode attention of one query step over a gathered index set of the KV cache.

``sparse_decode_attention(query, key, value, index)`` equals attention of ``query`` over only the cached
positions listed in ``index`` (per batch row and KV head), i.e.
``softmax(q · key[..., index, :]ᵀ · scale) · value[..., index, :]`` with GQA (each KV head serves
``Hq // Hkv`` consecutive query heads). Sparse decode techniques (Recycled Attention, TidalDecode,
Quest, sink + window) call it on the steps that attend to a subset of the cache.

The Triton kernel never materialises the gathered K/V: each program takes one (batch, KV head) and one
slice of the index set (split-K, "flash decoding"), loads the listed rows straight from the cache,
keeps a running max / sum / weighted value sum for all query heads of the group, and writes a partial
result; a tiny torch reduction merges the slices. The reference gathers, then computes in float32.

Entries of ``index`` outside ``[0, S)`` (e.g. -1 padding of a ragged index set) are skipped, as are
positions whose ``valid[b, pos]`` is False (left padding; the Triton wrapper folds ``valid`` into the
index set with one small gather). A row with nothing to attend gives zeros.

On CPU a compiled kernel (``csrc/sparse_decode.cpp``, float32, one index set per KV head) reads the listed
rows in place with prefetching, instead of the reference's gathers, masks and sdpa call; for other inputs
(bfloat16, an index set per query head) ``auto`` dispatch runs the reference and says so.
"""
from __future__ import annotations

import functools
import math

import torch

from .cpu_build import CompiledKernel, load
from .dispatch import float32_cpu_problem, register_kernel
from .interpret import exact_float32_dots
from .launch import target_programs

__all__ = ["sparse_decode_attention", "sparse_decode_attention_cpu", "sparse_decode_attention_reference",
           "sparse_decode_attention_triton"]

# Bound by _kernels(); the interpreter patches tl through the kernel function's globals.
triton = None
tl = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(query, key, value, index, valid):
    if query.dim() != 3 or key.dim() != 4 or value.dim() != 4 or index.dim() != 3:
        raise ValueError(
            "sparse_decode_attention: expected query [B, Hq, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv], "
            f"index [B, Hkv or Hq, N]; got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}, "
            f"{tuple(index.shape)}"
        )
    b, hq, d = query.shape
    _, hkv, s, dk = key.shape
    if key.shape[0] != b or dk != d or value.shape[:3] != key.shape[:3] or index.shape[0] != b \
            or index.shape[1] not in (hkv, hq):
        raise ValueError(
            f"sparse_decode_attention: inconsistent shapes query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}, index {tuple(index.shape)}"
        )
    if hq % hkv:
        raise ValueError(f"sparse_decode_attention: {hq} query heads is not a multiple of {hkv} KV heads")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"sparse_decode_attention: {name} dtype {t.dtype} is not supported")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"sparse_decode_attention: index must hold integers, got {index.dtype}")
    if valid is not None and (valid.dim() != 2 or tuple(valid.shape) != (b, s)):
        raise ValueError(f"sparse_decode_attention: valid must be [B, S] = {(b, s)}, got {tuple(valid.shape)}")


def sparse_decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one decode step over the cached positions in ``index``; returns ``[B, Hq, Dv]``.

    ``query`` [B, Hq, D]; ``key``/``value`` [B, Hkv, S, D|Dv] (the cache, any strides); ``index``
    [B, Hkv, N] integer positions shared by the query heads of each KV head, or [B, Hq, N], one set per
    query head (entries outside [0, S) are skipped; duplicates count twice, so pass
    a set); ``valid`` optional [B, S] bool (False = padding, never attended); ``scale`` defaults to
    ``D ** -0.5``. Computed in float32, returned in ``query.dtype``.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import sparse_decode_attention
        >>> q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
        >>> idx = torch.arange(10).expand(1, 2, 10)          # every position: plain attention
        >>> sparse_decode_attention(q, k, v, idx).shape
        torch.Size([1, 4, 8])
    """
    _check(query, key, value, index, valid)
    b, hq, d = query.shape
    _, hkv, s, _ = key.shape
    dv = value.shape[-1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    index = index.long()
    per_head = index.shape[1] != hkv  # [B, Hq, N]: query head h*G+g has its own set over KV head h
    n = index.shape[-1]
    if per_head:
        index = index.reshape(b, hkv, g * n)  # the group's sets side by side: one gather per KV head
    ok = (index >= 0) & (index < s)
    idx = index.clamp(0, max(s - 1, 0))
    if valid is not None:
        ok = ok & valid.bool().gather(1, idx.reshape(b, -1)).reshape(idx.shape)
    if s == 0 or idx.shape[-1] == 0:
        return query.new_zeros(b, hq, dv)
    k = _gather_rows(key, idx).float()  # [B, Hkv, N or G*N, D]
    v = _gather_rows(value, idx).float()
    q = query.reshape(b, hkv, g, d).float()
    if per_head:
        k, v, ok = k.reshape(b, hkv, g, n, d), v.reshape(b, hkv, g, n, dv), ok.reshape(b, hkv, g, n)
        logits = torch.einsum("bhgd,bhgnd->bhgn", q, k) * scale
        probs = torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhgn,bhgnd->bhgd", probs, v)
    else:
        # sdpa's CPU kernel over the gathered rows: several times faster than spelling the softmax out in
        # eager ops, which dominates at decode sizes (a few hundred rows)
        mask = None if bool(ok.all()) else ok[:, :, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B,Hkv,G,Dv]
        if mask is not None:
            out = out.nan_to_num(0.0)  # all-masked rows -> zeros
    return out.reshape(b, hq, dv).to(query.dtype)


def _gather_rows(cache: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``cache[b, h, idx[b, h, i], :]`` as ``[B, H, N, D]``.

    One `index_select` over the cache seen as a table of rows (a view, also of a preallocated cache whose
    buffer is longer than S) instead of a `gather` with an expanded index, which is much slower on CPU.
    """
    b, h, _, d = cache.shape
    sb, sh, ss, sd = cache.stride()
    if sd != 1 or ss < d or sb % ss or sh % ss:
        return cache.gather(2, idx[..., None].expand(-1, -1, -1, d))
    rows = ((b - 1) * sb + (h - 1) * sh) // ss + cache.shape[2]
    table = cache.as_strided((rows, d), (ss, 1))
    base = (torch.arange(b, device=idx.device) * (sb // ss))[:, None, None] + \
        (torch.arange(h, device=idx.device) * (sh // ss))[None, :, None]
    return table.index_select(0, (base + idx).reshape(-1)).view(b, h, idx.shape[-1], d)


# ---------------------------------------------------------------------------------------------
# Triton (plain functions here; jit-compiled by _kernels())
# ---------------------------------------------------------------------------------------------


def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, m_ptr, l_ptr,
    HIDX, KV_DIV, N, S, SPLIT, scale,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ib, s_ih, s_in,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    # One program per (batch row, index head) and slice of the index set. An index head is a KV head whose
    # G query heads share the set (KV_DIV = 1), or a single query head with its own set (G = 1, KV_DIV =
    # query heads per KV head); either way the keys come from KV head h // KV_DIV.
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = pid_bh // HIDX
    h = pid_bh - b * HIDX
    hk = h // KV_DIV

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    gmask = g < G
    heads = h * G + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd,
                mask=gmask[:, None] & (d[None, :] < D), other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    start = pid_s * SPLIT
    end = tl.minimum(start + SPLIT, N)
    for off in range(start, end, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        nmask = n < end
        pos = tl.load(idx_ptr + b * s_ib + h * s_ih + n * s_in, mask=nmask, other=-1).to(tl.int64)
        ok = nmask & (pos >= 0) & (pos < S)
        pos = tl.where(ok, pos, 0)  # never form an address outside the cache, even masked
        k = tl.load(k_ptr + b * s_kb + hk * s_kh + pos[:, None] * s_ks + d[None, :] * s_kd,
                    mask=ok[:, None] & (d[None, :] < D), other=0.0)
        if IEEE:
            logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(k))
        logits = logits * scale
        logits = tl.where(ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        p = tl.exp(logits - shift[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * s_vb + hk * s_vh + pos[:, None] * s_vs + dv[None, :] * s_vd,
                    mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    row = (b * HIDX * G + heads) * nsplit + pid_s  # [B, Hq, nsplit] layout
    tl.store(m_ptr + row, m, mask=gmask)
    tl.store(l_ptr + row, l, mask=gmask)
    tl.store(o_ptr + row[:, None] * DV + dv[None, :], acc, mask=gmask[:, None] & (dv[None, :] < DV))


@functools.lru_cache(maxsize=None)
def _kernels():
    global triton, tl
    import triton  # noqa: F811 - binds the module global the kernels read
    import triton.language as tl  # noqa: F811

    return triton.jit(_sparse_decode_kernel)


def _num_splits(bh: int, n: int, block_n: int, device: torch.device) -> int:
    """Enough (batch x head x split) programs to fill the GPU, each with at least one block of positions."""
    blocks = max(1, math.ceil(n / block_n))
    return max(1, min(blocks, math.ceil(target_programs(device) / max(bh, 1)), 256))


def merge_partials(o: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge split-K partials: o [..., P, Dv] (unnormalised), m/l [..., P] running max and sum."""
    top = m.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(m - top)  # exp(-inf) = 0 for empty slices
    denom = (w * l).sum(-1, keepdim=True)
    out = (w[..., None] * o).sum(-2) / denom.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(denom > 0, out, torch.zeros_like(out))


def sparse_decode_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`sparse_decode_attention_reference` (same arguments and result)."""
    _check(query, key, value, index, valid)
    kernel = _kernels()
    b, hq, d = query.shape
    _, hkv, s, _ = key.shape
    dv = value.shape[-1]
    n = index.shape[-1]
    hidx = index.shape[1]
    g = hq // hidx  # query heads per index set
    kv_div = hidx // hkv  # index sets per KV head
    scale = d ** -0.5 if scale is None else float(scale)
    out = torch.empty(b, hq, dv, device=query.device, dtype=query.dtype)
    if b == 0 or hq == 0:
        return out
    block_n = 32 if n >= 32 else 16
    splits = _num_splits(b * hidx, n, block_n, query.device) if n else 1
    split = max(block_n, math.ceil(max(n, 1) / splits / block_n) * block_n)
    splits = max(1, math.ceil(max(n, 1) / split))
    o = torch.empty(b, hq, splits, dv, device=query.device, dtype=torch.float32)
    m = torch.empty(b, hq, splits, device=query.device, dtype=torch.float32)
    l = torch.empty(b, hq, splits, device=query.device, dtype=torch.float32)
    if valid is not None:
        # Padding folds into the index set (a [B, H, N] gather of bools): masked entries become -1.
        pos = index.long().clamp(0, max(s - 1, 0))
        keep = valid.bool().gather(1, pos.reshape(b, -1)).reshape(pos.shape)
        index = index.masked_fill(~keep, -1)
    kernel[(b * hidx, splits)](
        query, key, value, index, o, m, l,
        hidx, kv_div, n, s, split, scale,
        *query.stride(), *key.stride(), *value.stride(), *index.stride(),
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_N=block_n,
        IEEE=exact_float32_dots(key),
    )
    out.copy_(merge_partials(o, m, l))
    return out


def sparse_decode_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The compiled CPU kernel: float32 CPU tensors, one index set per KV head (``index`` [B, Hkv, N]), keys
    and values with unit stride along D (``_cpu_rejects`` says which inputs it does not take)."""
    _check(query, key, value, index, valid)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return load(_CPU_SOURCE).sparse_decode_attention(
        query.contiguous(), key, value, index, None if valid is None else valid.bool(), float(scale))


def _cpu_rejects(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> str | None:
    """Why the compiled kernel does not take these inputs (the reference does), or None. Malformed inputs pass:
    the kernel's argument check raises the same error as the reference's."""
    problem = float32_cpu_problem(query=query, key=key, value=value)
    if problem:
        return problem
    if index.dim() == 3 and key.dim() == 4 and index.shape[1] != key.shape[1]:
        return "an index set per query head: one per KV head only"
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        return "keys or values not contiguous along D"
    return None


_CPU_SOURCE = "sparse_decode.cpp"

sparse_decode_attention = register_kernel(
    "sparse_decode_attention",
    reference=sparse_decode_attention_reference,
    triton=sparse_decode_attention_triton,
    cpu=CompiledKernel(_CPU_SOURCE, sparse_decode_attention_cpu, rejects=_cpu_rejects),
)
