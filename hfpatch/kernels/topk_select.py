"""Selection scoring for sparse decode attention: q·Kᵀ, softmax, per-KV-group reduction, then top-K.

``group_attention_scores(query, key, valid)`` gives, for one decode step, the attention probability of
every cached position summed over the query heads that share each KV head: ``[B, Hkv, S]`` float32.
That is the score Recycled Attention and TidalDecode rank positions by. ``select_positions`` turns such
scores into a sorted index set of a fixed size, with forced positions (sinks, recent window) always in
and padding never in.

The Triton kernel reads K in place, once per pass (two passes: per-head log-sum-exp, then the
group-summed probabilities), for all query heads of a group at once; nothing of size ``[B, Hq, S]`` is
written. The top-K itself runs as ``torch.topk`` over the ``[B, Hkv, S]`` scores, 4 bytes per KV-head
position, which is 1/(2·D) of the key traffic for bf16 keys.
"""
from __future__ import annotations

import math

import numpy

import torch

from .dispatch import register_kernel
from .interpret import exact_float32_dots
from .sparse_decode import _sm_count

__all__ = [
    "attention_with_scores",
    "forced_positions",
    "group_attention_scores",
    "group_attention_scores_reference",
    "group_attention_scores_triton",
    "select_positions",
    "with_forced_first",
]

triton = None
tl = None


def _check(query, key, valid):
    if query.dim() != 3 or key.dim() != 4:
        raise ValueError(
            f"group_attention_scores: expected query [B, Hq, D] and key [B, Hkv, S, D], got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    b, hq, d = query.shape
    if key.shape[0] != b or key.shape[-1] != d or hq % key.shape[1]:
        raise ValueError(f"group_attention_scores: query {tuple(query.shape)} does not fit key {tuple(key.shape)}")
    if valid is not None and tuple(valid.shape) != (b, key.shape[2]):
        raise ValueError(f"group_attention_scores: valid must be [B, S], got {tuple(valid.shape)}")


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


def attention_with_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Full attention of one decode step ``[B, Hq, Dv]`` and ``group_attention_scores`` ``[B, Hkv, S]`` from
    one pass over the keys, for a selecting step that needs both: sdpa plus a separate scoring pass read the
    whole key cache twice. float32 CPU tensors only (None otherwise: there sdpa and the Triton scoring kernel
    are the better pair)."""
    if query.device.type != "cpu" or any(t.dtype != torch.float32 for t in (query, key, value)):
        return None
    _check(query, key, valid)
    probs = _group_probabilities(query, key, valid, scale)
    return (probs @ value).reshape(query.shape[0], query.shape[1], value.shape[-1]), probs.sum(dim=2)


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


_COMPILED = None


def _kernels():
    global triton, tl, _COMPILED
    if _COMPILED is None:
        import triton as _triton
        import triton.language as _tl

        globals()["triton"], globals()["tl"] = _triton, _tl
        _COMPILED = (_triton.jit(_lse_kernel), _triton.jit(_score_kernel))
    return _COMPILED


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
    if query.device.type == "cuda":
        target = 2 * _sm_count(query.device)
    else:
        target = 4
    splits = max(1, min(math.ceil(s / block_s), math.ceil(target / (b * hkv))))
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


def select_positions(
    scores: torch.Tensor,
    budget: int,
    forced: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``budget`` best positions per row of ``scores`` [B, H, S], sorted ascending: ``[B, H, budget]``.

    Positions where ``forced`` [B, S] is True come first (sinks, recent window, the current token);
    positions where ``valid`` [B, S] is False come last (padding; attention masks them anyway when a row
    has fewer valid positions than ``budget``). Which of several tied positions is kept is unspecified
    (``torch.topk``). ``budget`` is clipped to S.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import select_positions
        >>> s = torch.tensor([[[0.1, 0.5, 0.2, 0.9, 0.0]]])
        >>> select_positions(s, 2)
        tensor([[[1, 3]]])
        >>> forced = torch.tensor([[True, False, False, False, True]])
        >>> select_positions(s, 3, forced)
        tensor([[[0, 3, 4]]])
    """
    s = scores.float()
    if forced is not None:
        s = s.masked_fill(forced[:, None, :], float("inf"))
    if valid is not None:
        s = s.masked_fill(~valid.bool()[:, None, :], float("-inf"))
    k = min(int(budget), s.shape[-1])
    if s.device.type == "cpu" and 0 < k < s.shape[-1]:
        return _select_on_cpu(s, k)
    return torch.topk(s, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def _select_on_cpu(s: torch.Tensor, k: int) -> torch.Tensor:
    """``select_positions``' top-k on CPU with NumPy's introselect: ATen's CPU topk copies every row into a
    vector of (value, index) pairs first, which cost 2-3x more per decode step at 8k positions once the
    model's weights had flushed the caches (0.25 vs 0.09 ms per [3, 8192] call, measured)."""
    length = s.shape[-1]
    rows = s.detach().reshape(-1, length).numpy()
    top = numpy.argpartition(rows, length - k, axis=-1)[:, length - k:]
    top.sort(axis=-1)
    return torch.from_numpy(top).reshape(*s.shape[:-1], k)


def forced_positions(valid: torch.Tensor | None, batch: int, length: int, sink: int, window: int,
                     device: torch.device) -> torch.Tensor:
    """``[B, S]`` bool: the first ``sink`` valid positions of each row, the last ``window`` positions and the
    current token (position S-1)."""
    positions = torch.arange(length, device=device)
    forced = (positions >= length - max(window, 1)).expand(batch, length)
    if sink > 0:
        if valid is None:
            forced = forced | (positions < sink)
        else:
            rank = valid.long().cumsum(-1)  # 1-based rank of each valid position in its row
            forced = forced | (valid & (rank <= sink))
    return forced


def with_forced_first(scores: torch.Tensor, valid: torch.Tensor | None, sink: int, window: int) -> torch.Tensor:
    """A float copy of ``scores`` [B, H, S] with the ``forced_positions`` set to +inf, so a top-k keeps them."""
    length = scores.shape[-1]
    if valid is not None:
        forced = forced_positions(valid, scores.shape[0], length, sink, window, scores.device)
        return scores.float().masked_fill(forced[:, None, :], float("inf"))
    # without padding they are two slices: cheaper than building and applying a [B, S] mask per decode step
    out = scores.float().clone()
    out[..., :sink] = float("inf")
    out[..., length - max(window, 1):] = float("inf")
    return out
