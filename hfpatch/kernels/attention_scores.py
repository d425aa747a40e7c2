"""Attention scores for choosing positions: what one decode step's softmax gives each cached position.

Ops (registered in ``dispatch``):

``group_attention_scores(query, key, valid, scale=)``: the attention probability of every cached position
summed over the query heads that share each KV head, ``[B, Hkv, S]`` float32; the score Recycled Attention,
TidalDecode and ``lowrank_sparse_decode`` rank positions by (``selection.select_positions`` keeps the best).

- reference (torch): float32 softmax of the grouped logits, summed per group;
- triton: reads K in place, once per pass (two passes: per-head log-sum-exp, then the group-summed
  probabilities), for all query heads of a group at once; nothing of size ``[B, Hq, S]`` is written.

``scored_attention(query, key, value, valid, scale=)``: a selecting decode step's full attention
``[B, Hq, Dv]`` and its ``group_attention_scores`` ``[B, Hkv, S]`` together.

- reference (torch): two passes over the keys, sdpa for the output and the scores' reference;
- cpu: one pass over the keys, for float32 CPU tensors: the grouped softmax that the scores' reference
  computes (the same function) gives the scores, and times the values the output; on CPU this beats reading
  the whole key cache twice.

``attention_with_scores(query, key, value, valid, scale)`` (a helper, not an op) is ``scored_attention``
where an implementation does it in one pass, and None elsewhere: there the caller's own two passes (sdpa, then
``group_attention_scores``, Triton on CUDA) are the better pair.
"""
from __future__ import annotations

import functools
import math

import torch

from .dispatch import CpuKernel, float32_cpu_problem, register_kernel
from .interpret import exact_float32_dots
from .launch import target_programs

__all__ = [
    "attention_with_scores",
    "group_attention_scores",
    "group_attention_scores_reference",
    "group_attention_scores_triton",
    "scored_attention",
    "scored_attention_cpu",
    "scored_attention_reference",
]

# Bound by _kernels(); the interpreter patches tl through the kernel function's globals.
triton = None
tl = None


def _check(query, key, valid, value=None, name="group_attention_scores"):
    if query.dim() != 3 or key.dim() != 4:
        raise ValueError(
            f"{name}: expected query [B, Hq, D] and key [B, Hkv, S, D], got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    b, hq, d = query.shape
    if key.shape[0] != b or key.shape[-1] != d or hq % key.shape[1]:
        raise ValueError(f"{name}: query {tuple(query.shape)} does not fit key {tuple(key.shape)}")
    if valid is not None and tuple(valid.shape) != (b, key.shape[2]):
        raise ValueError(f"{name}: valid must be [B, S], got {tuple(valid.shape)}")
    if value is not None and (value.dim() != 4 or tuple(value.shape[:3]) != tuple(key.shape[:3])):
        raise ValueError(f"{name}: value must be [B, Hkv, S, Dv] like key {tuple(key.shape)}, "
                         f"got {tuple(value.shape)}")


def group_attention_scores_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of one decode step, summed over each KV group's query heads.

    ``query`` [B, Hq, D], ``key`` [B, Hkv, S, D], ``valid`` optional [B, S] bool (False = padding: score 0
    and excluded from the softmax). Returns float32 ``[B, Hkv, S]``; each row sums to ``Hq // Hkv``
    (or 0 when every position is padding).

    Example:
        >>> import torch
        >>> from hfpatch.kernels import group_attention_scores
        >>> s = group_attention_scores(torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8))
        >>> s.shape, round(float(s[0, 0].sum()), 4)
        (torch.Size([1, 2, 5]), 2.0)
    """
    _check(query, key, valid)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _group_probabilities(query, key, valid, scale).sum(dim=2)


def _group_probabilities(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """float32 softmax probabilities of each query head over the cache, grouped ``[B, Hkv, G, S]``
    (all-padding rows: 0)."""
    b, hq, d = query.shape
    hkv = key.shape[1]
    # the scale goes on the (small) query, not on the [B, Hkv, G, S] logits
    q = query.reshape(b, hkv, hq // hkv, d).float() * scale
    logits = q @ key.float().transpose(-1, -2)
    if valid is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~valid.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


# ---------------------------------------------------------------------------------------------
# Triton group scores (plain functions here; jit-compiled by _kernels())
# ---------------------------------------------------------------------------------------------


def _lse_kernel(
    q_ptr, k_ptr, valid_ptr, m_ptr, l_ptr,
    HKV, S, SPLIT, scale,
    s_qb, s_qh, s_qd, s_kb, s_kh, s_ks, s_kd, s_mb, s_ms,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
):
    # Pass 1: per query head, running max and sum of exp over one slice of the positions.
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = pid_bh // HKV
    h = pid_bh - b * HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = h * G + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd,
                mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    start = pid_s * SPLIT
    end = tl.minimum(start + SPLIT, S)
    for off in range(start, end, BLOCK_S):
        pos = off + tl.arange(0, BLOCK_S)
        ok = pos < end
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * s_mb + pos * s_ms, mask=ok, other=0) != 0)
        k = tl.load(k_ptr + b * s_kb + h * s_kh + pos[:, None] * s_ks + d[None, :] * s_kd,
                    mask=ok[:, None] & (d[None, :] < D), other=0.0)
        if IEEE:
            logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            logits = tl.dot(q, tl.trans(k)) * scale
        logits = tl.where(ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        m = m_new
    row = (b * HKV * G + heads) * nsplit + pid_s
    tl.store(m_ptr + row, m, mask=g < G)
    tl.store(l_ptr + row, l, mask=g < G)


def _score_kernel(
    q_ptr, k_ptr, valid_ptr, lse_ptr, out_ptr,
    HKV, S, scale,
    s_qb, s_qh, s_qd, s_kb, s_kh, s_ks, s_kd, s_mb, s_ms,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
):
    # Pass 2: probabilities exp(logit - lse) summed over the group's query heads, one block of positions.
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh - b * HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = h * G + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd,
                mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    lse = tl.load(lse_ptr + b * HKV * G + heads, mask=g < G, other=float("inf"))
    pos = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = pos < S
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + b * s_mb + pos * s_ms, mask=ok, other=0) != 0)
    k = tl.load(k_ptr + b * s_kb + h * s_kh + pos[:, None] * s_ks + d[None, :] * s_kd,
                mask=ok[:, None] & (d[None, :] < D), other=0.0)
    if IEEE:
        logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    else:
        logits = tl.dot(q, tl.trans(k)) * scale
    p = tl.exp(logits - lse[:, None])  # lse = +inf for padded heads and all-masked rows -> 0
    p = tl.where(ok[None, :] & (g[:, None] < G), p, 0.0)
    tl.store(out_ptr + pid_bh * S + pos, tl.sum(p, 0), mask=pos < S)


@functools.lru_cache(maxsize=None)
def _kernels():
    global triton, tl
    import triton  # noqa: F811 - binds the module global the kernels read
    import triton.language as tl  # noqa: F811

    return triton.jit(_lse_kernel), triton.jit(_score_kernel)


def group_attention_scores_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`group_attention_scores_reference` (same arguments and result)."""
    _check(query, key, valid)
    lse_kernel, score_kernel = _kernels()
    b, hq, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else float(scale)
    out = torch.zeros(b, hkv, s, device=query.device, dtype=torch.float32)
    if b == 0 or s == 0:
        return out
    block_s = 64 if s >= 64 else 16
    splits = max(1, min(math.ceil(s / block_s), math.ceil(target_programs(query.device) / (b * hkv))))
    split = math.ceil(math.ceil(s / splits) / block_s) * block_s
    splits = math.ceil(s / split)
    m = torch.empty(b, hq, splits, device=query.device, dtype=torch.float32)
    l = torch.empty_like(m)
    if valid is not None:
        valid_t = valid.to(torch.int8) if valid.dtype == torch.bool else valid
        s_mb, s_ms = valid_t.stride()
    else:
        valid_t, s_mb, s_ms = out, 0, 0
    meta = dict(G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BLOCK_S=block_s, HAS_VALID=valid is not None, IEEE=exact_float32_dots(key))
    strides = (*query.stride(), *key.stride(), s_mb, s_ms)
    lse_kernel[(b * hkv, splits)](query, key, valid_t, m, l, hkv, s, split, scale, *strides, **meta)
    top = m.amax(-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total = (torch.exp(m - top) * l).sum(-1)
    lse = torch.where(total > 0, top[..., 0] + torch.log(total), torch.full_like(total, float("inf")))
    score_kernel[(b * hkv, math.ceil(s / block_s))](query, key, valid_t, lse.contiguous(), out, hkv, s, scale,
                                                    *strides, **meta)
    return out


group_attention_scores = register_kernel(
    "group_attention_scores",
    reference=group_attention_scores_reference,
    triton=group_attention_scores_triton,
)


# ---------------------------------------------------------------------------------------------
# scored attention: the full attention of a selecting step and its group scores
# ---------------------------------------------------------------------------------------------


def scored_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention of one decode step and its :func:`group_attention_scores`, in two passes over the keys.

    ``query`` [B, Hq, D], ``key``/``value`` [B, Hkv, S, D|Dv], ``valid`` optional [B, S] bool (False =
    padding). Returns ``(out [B, Hq, Dv] in query.dtype, scores [B, Hkv, S] float32)``; a row with every
    position padding attends to nothing (zeros).

    Example:
        >>> import torch
        >>> from hfpatch.kernels import scored_attention
        >>> out, scores = scored_attention(torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
        >>> out.shape, scores.shape
        (torch.Size([1, 4, 8]), torch.Size([1, 2, 5]))
    """
    _check(query, key, valid, value, name="scored_attention")
    b, hq, d = query.shape
    hkv = key.shape[1]
    scale = d ** -0.5 if scale is None else scale
    # the G query heads of a KV group as G query rows over that head's keys: GQA without expanding the cache
    q = query.reshape(b, hkv, hq // hkv, d).float()
    mask = None if valid is None else valid.bool()[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, key.float(), value.float(), attn_mask=mask,
                                                           scale=scale)
    if mask is not None:
        out = out.nan_to_num(0.0)  # all-padding rows -> zeros
    scores = group_attention_scores_reference(query, key, valid, scale=scale)
    return out.reshape(b, hq, value.shape[-1]).to(query.dtype), scores


def scored_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scored_attention_reference` in one pass over the keys (float32 CPU tensors): the grouped
    probabilities are computed once and give both the output and the scores."""
    _check(query, key, valid, value, name="scored_attention")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    probs = _group_probabilities(query, key, valid, scale)
    return (probs @ value).reshape(query.shape[0], query.shape[1], value.shape[-1]), probs.sum(dim=2)


def _cpu_rejects(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> str | None:
    return float32_cpu_problem(query=query, key=key, value=value)


scored_attention = register_kernel(
    "scored_attention",
    reference=scored_attention_reference,
    triton=None,  # on CUDA, sdpa and the Triton scoring kernel (the reference's two passes) are the better pair
    cpu=CpuKernel(scored_attention_cpu, rejects=_cpu_rejects),
)


def attention_with_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``scored_attention(query, key, value, valid, scale=scale)`` where dispatch picks an implementation that
    does it in one pass over the keys (today the CPU one: float32 CPU tensors), else None: the caller then
    runs its own two passes (sdpa and ``group_attention_scores``), which is what the reference would do.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import attention_with_scores
        >>> q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        >>> [t.shape for t in attention_with_scores(q, k, v, None, 0.3)]   # float32 on CPU: one pass
        [torch.Size([1, 4, 8]), torch.Size([1, 2, 5])]
        >>> attention_with_scores(q.double(), k.double(), v.double(), None, 0.3) is None
        True
    """
    choice = scored_attention.choose(query, key, value, valid, scale=scale)
    if choice.backend == "torch":
        return None
    return choice.implementation(query, key, value, valid, scale=scale)
