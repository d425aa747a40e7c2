"""Attention that also says how much attention each key received: the output plus per-key column sums.

HiPrune ranks a vision encoder's patch tokens by the attention they receive in a middle and a deep layer
(the column mean of the softmax matrix over heads and queries). transformers' eager attention gets that by
returning the whole ``[B, H, N, N]`` matrix; sdpa returns none. This op computes the attention output and
``column_sums[b, k] = sum_{h, q} softmax(q k^T * scaling + mask)[b, h, q, k]`` together, so a vision tower
can keep its fast attention for every layer and pay only for the scores of the layers a technique asks for.

The Triton path never holds an ``N x N`` matrix: pass 1 is a flash-style forward (output and the row
log-sum-exp, one program per (image, head, block of queries)); pass 2 recomputes the probabilities tile by
tile from the saved log-sum-exp and sums them over the queries (one program per (image, head, block of
keys), no atomics, so the result is deterministic); the per-head sums are added in torch.
"""
from __future__ import annotations

import functools

import torch

from .dispatch import register_kernel

__all__ = ["attention_with_column_sums", "attention_with_column_sums_reference",
           "attention_with_column_sums_triton"]

# Bound by _kernels(); the kernels must see triton.language as a module global (see logprob_gather.py).
triton = None
tl = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(query, key, value, scaling, attention_mask) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_with_column_sums: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention_with_column_sums: {name} must be [B, H, N, D], got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention_with_column_sums: {name} dtype {t.dtype} is not float32/float16/bfloat16")
    B, H, _, D = query.shape
    if key.shape[:2] != (B, H) or key.shape[-1] != D:
        raise ValueError(f"attention_with_column_sums: key {tuple(key.shape)} does not fit query "
                         f"{tuple(query.shape)} (same B, H and D; grouped heads are not supported)")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"attention_with_column_sums: value {tuple(value.shape)} must have key's [B, H, Nk] "
                         f"{tuple(key.shape[:3])}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"attention_with_column_sums: scaling must be a number, got {scaling!r}")
    if attention_mask is not None:
        try:
            torch.broadcast_shapes(attention_mask.shape, (B, 1, query.shape[2], key.shape[2]))
        except RuntimeError:
            raise ValueError(f"attention_with_column_sums: attention_mask {tuple(attention_mask.shape)} does not "
                             f"broadcast to [B, 1, Nq, Nk] = {[B, 1, query.shape[2], key.shape[2]]}") from None
        if attention_mask.dtype == torch.bool:
            raise TypeError("attention_with_column_sums: attention_mask must be an additive float mask "
                            "(0 where allowed, a large negative number where not), not bool")


def attention_with_column_sums_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                         scaling: float, attention_mask: torch.Tensor | None = None
                                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and the attention each key received.

    ``query`` is ``[B, H, Nq, D]``, ``key``/``value`` ``[B, H, Nk, D]``, ``attention_mask`` an optional additive
    float mask broadcastable to ``[B, 1, Nq, Nk]``. Returns ``(output, column_sums)``: ``output`` ``[B, H, Nq, D]``
    in the query's dtype, and ``column_sums`` ``[B, Nk]`` float32, the softmax probabilities summed over heads
    and queries (divide by ``H * Nq`` for HiPrune's column mean). Probabilities are computed in float32.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import attention_with_column_sums
        >>> q = torch.zeros(1, 2, 3, 4); k = torch.zeros(1, 2, 5, 4); v = torch.ones(1, 2, 5, 4)
        >>> out, sums = attention_with_column_sums(q, k, v, 0.5)
        >>> sums            # 2 heads x 3 queries spread evenly over 5 keys
        tensor([[1.2000, 1.2000, 1.2000, 1.2000, 1.2000]])
    """
    _check_args(query, key, value, scaling, attention_mask)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1)
    output = (probs @ value.float()).to(query.dtype)
    return output, probs.sum(dim=(1, 2))


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------


def _forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    H, NQ, NK, D, scaling,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smq, smk,
    sob, soh, son, sod,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh - b * H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        kv_mask = col_ok[:, None] & (dims[None, :] < D)
        k = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skn + dims[None, :] * skd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * scaling
        if HAS_MASK:
            scores += tl.load(mask_ptr + b * smb + rows[:, None] * smq + cols[None, :] * smk,
                              mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        # A fully masked row so far keeps m = -inf; shift by 0 there so exp gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - shift[:, None])
        alpha = tl.exp(m - shift)
        s = s * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + h * svh + cols[:, None] * svn + dims[None, :] * svd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    out = acc / s[:, None]
    tl.store(out_ptr + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims[None, :] < D))
    tl.store(lse_ptr + bh * NQ + rows, shift + tl.log(s), mask=row_ok)


def _column_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, col_ptr,
    H, NQ, NK, D, scaling,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    smb, smq, smk,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh - b * H
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < NK
    k = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skn + dims[None, :] * skd,
                mask=col_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
    total = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, NQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < NQ
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                    mask=row_ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * scaling
        if HAS_MASK:
            scores += tl.load(mask_ptr + b * smb + rows[:, None] * smq + cols[None, :] * smk,
                              mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + bh * NQ + rows, mask=row_ok, other=0.0)
        # Padding rows and columns at -inf: their exp is 0 (not an overflow against a very negative lse).
        scores = tl.where(row_ok[:, None] & col_ok[None, :], scores, float("-inf"))
        p = tl.exp(scores - lse[:, None])
        total += tl.sum(p, 0)
    tl.store(col_ptr + bh * NK + cols, total, mask=col_ok)


@functools.lru_cache(maxsize=None)
def _kernels():
    global triton, tl
    import triton  # noqa: F811 - binds the module global the kernels read
    import triton.language as tl  # noqa: F811

    return triton.jit(_forward_kernel), triton.jit(_column_kernel)


def attention_with_column_sums_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                      scaling: float, attention_mask: torch.Tensor | None = None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`attention_with_column_sums_reference` (same signature and results).

    Example:
        >>> q = k = v = torch.randn(2, 16, 577, 64, device="cuda", dtype=torch.bfloat16)   # doctest: +SKIP
        >>> out, sums = attention_with_column_sums(q, k, v, 64 ** -0.5, backend="triton")   # doctest: +SKIP
    """
    _check_args(query, key, value, scaling, attention_mask)
    forward, columns = _kernels()
    B, H, NQ, D = query.shape
    NK = key.shape[2]
    output = torch.empty_like(query)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=query.device)
    per_head = torch.zeros(B, H, NK, dtype=torch.float32, device=query.device)
    if attention_mask is not None:
        # Broadcast views keep stride 0 on the broadcast dims: no [B, Nq, Nk] copy of a [1, 1, 1, Nk] mask.
        mask = attention_mask.expand(B, 1, NQ, NK)[:, 0]
        mask_args = (mask, mask.stride(0), mask.stride(1), mask.stride(2))
    else:
        mask_args = (lse, 0, 0, 0)  # never read (HAS_MASK False)
    block_d = max(16, triton.next_power_of_2(D))
    block = 16 if query.device.type != "cuda" else (64 if block_d <= 64 else 32)
    if B * H * NQ and NK:
        common = dict(HAS_MASK=attention_mask is not None, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
                      num_warps=4)
        forward[(B * H, triton.cdiv(NQ, block))](
            query, key, value, mask_args[0], output, lse,
            H, NQ, NK, D, float(scaling),
            *query.stride(), *key.stride(), *value.stride(), *mask_args[1:], *output.stride(), **common)
        columns[(B * H, triton.cdiv(NK, block))](
            query, key, mask_args[0], lse, per_head,
            H, NQ, NK, D, float(scaling),
            *query.stride(), *key.stride(), *mask_args[1:], **common)
    return output, per_head.sum(dim=1)


attention_with_column_sums = register_kernel(
    "attention_with_column_sums",
    reference=attention_with_column_sums_reference,
    triton=attention_with_column_sums_triton,
    description="softmax attention plus the attention each key received (summed over heads and queries), "
                "without an N x N matrix",
)
