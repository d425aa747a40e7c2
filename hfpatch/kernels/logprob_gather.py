"""Fused row-wise log-softmax + gather: the log-probability of one chosen token per row.

``logprob_gather(logits, index)`` equals
``torch.log_softmax(logits.float(), -1).gather(-1, index[..., None])[..., 0]`` without building the
``[N, V]`` float32 log-softmax: the Triton kernel streams each row once in blocks, keeping a running
maximum and a running sum of exponentials (online logsumexp), then reads the one chosen logit.
Token-level DPO log-probs and speculative verification need exactly this, over vocabularies of
32k-262k entries, where the full log-softmax costs 4-8 bytes per logit of extra memory traffic.

Backward is fused too: ``d logp / d logits = onehot(index) - softmax(logits)``, recomputed from
the saved row max and log-sum (8 bytes per row), written straight in the logits' dtype.

The Triton functions below are plain Python at import time; ``_kernels()`` imports triton and
jit-compiles them on first use, so importing hfpatch never imports triton.
"""
from __future__ import annotations

import functools

import torch

from .dispatch import register_kernel

__all__ = ["logprob_gather", "logprob_gather_reference", "logprob_gather_triton"]

# Bound by _kernels(). The kernels must see triton.language as a module global, not a closure
# variable: the interpreter patches tl through the kernel function's globals.
triton = None
tl = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# argument checks shared by both implementations (no device sync here)
# ---------------------------------------------------------------------------------------------


def _check_args(logits: torch.Tensor, index: torch.Tensor, ignore_index: int | None) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError("logprob_gather: logits and index must be tensors")
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"logprob_gather: logits dtype {logits.dtype} is not supported "
            "(float32, float16 or bfloat16)"
        )
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"logprob_gather: index must hold integers (int64), got {index.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logprob_gather: logits {tuple(logits.shape)} has an empty vocabulary dim")
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"logprob_gather: index shape {tuple(index.shape)} must equal the logits' leading shape "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)} = [..., V])"
        )
    if index.device != logits.device:
        raise ValueError(
            f"logprob_gather: index is on {index.device} but logits are on {logits.device}"
        )
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"logprob_gather: ignore_index must be an int or None, got {ignore_index!r}")


def _check_range(index: torch.Tensor, vocab: int) -> None:
    # Costs one device sync; only the reference pays it (the kernel masks bad reads to NaN).
    bad = (index < 0) | (index >= vocab)
    if bool(bad.any()):
        flat = bad.reshape(-1).nonzero()[0, 0].item()
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), index.shape))
        value = int(index.reshape(-1)[flat])
        raise IndexError(
            f"logprob_gather: index {value} at position {pos} is outside the vocabulary [0, {vocab}) "
            f"({int(bad.sum())} out-of-range entries); pass ignore_index= (e.g. -100) to skip "
            "padding labels"
        )


# ---------------------------------------------------------------------------------------------
# pure-torch reference
# ---------------------------------------------------------------------------------------------


def logprob_gather_reference(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    return_lse: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``index`` under ``softmax(logits)``, row by row, in float32.

    ``logits`` is ``[..., V]`` (float32/float16/bfloat16, any strides), ``index`` has the leading
    shape ``[...]`` and holds token ids. Returns ``logp[...]`` (float32) equal to
    ``log_softmax(logits.float(), -1).gather(-1, index[..., None])[..., 0]``, and with
    ``return_lse=True`` the pair ``(logp, lse)`` where ``lse = logsumexp(logits.float(), -1)``.
    Rows whose index equals ``ignore_index`` get ``logp = 0`` and no gradient (their ``lse`` is
    still computed). Differentiable with respect to ``logits``. Non-finite rows follow torch: a row
    of all ``-inf`` gives ``logp = NaN, lse = -inf``; a row with a ``+inf`` gives
    ``logp = NaN, lse = +inf``; a ``-inf`` logit at the chosen index gives ``logp = -inf``.

    The reference raises ``IndexError`` for an index outside ``[0, V)``; the Triton kernel does
    not check (that would cost a device sync) and returns NaN for such rows.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import logprob_gather
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
        >>> logprob_gather(logits, torch.tensor([1, 0]))
        tensor([-0.6931, -2.1269])
        >>> logp, lse = logprob_gather(logits, torch.tensor([1, -100]), ignore_index=-100,
        ...                            return_lse=True)
        >>> logp, lse
        (tensor([-0.6931,  0.0000]), tensor([0.6931, 2.1269]))
    """
    _check_args(logits, index, ignore_index)
    idx = index.long()
    ignored = None
    if ignore_index is not None:
        ignored = idx == ignore_index
        idx = idx.masked_fill(ignored, 0)
    _check_range(idx, logits.shape[-1])
    x = logits.float()
    # logp = (x_t - m) - log(sum exp(x - m)), not x_t - lse: for huge logits (1e30) lse rounds to
    # m and x_t - lse would lose the log(sum) term entirely. An infinite max shifts by 0 instead
    # (as the kernel does) so that rows with -inf/+inf follow torch. m is a constant shift
    # mathematically, so it carries no gradient.
    m = x.detach().amax(dim=-1, keepdim=True)
    m = m.masked_fill(m.isinf(), 0.0)
    log_s = torch.log(torch.exp(x - m).sum(dim=-1))
    m = m.squeeze(-1)
    lse = m + log_s
    logp = (x.gather(-1, idx.unsqueeze(-1)).squeeze(-1) - m) - log_s
    # A +inf logit leaves no defined distribution: NaN, as log_softmax gives (logsumexp says +inf).
    logp = logp.masked_fill(lse == float("inf"), float("nan"))
    if ignored is not None:
        logp = logp.masked_fill(ignored, 0.0)
    return (logp, lse) if return_lse else logp


# ---------------------------------------------------------------------------------------------
# Triton kernels (plain functions here; jit-compiled by _kernels())
# ---------------------------------------------------------------------------------------------


def _logprob_gather_fwd_kernel(
    logits_ptr, index_ptr, logp_ptr, lse_ptr, shift_ptr, logs_ptr,
    T, V,
    stride_lb, stride_lt, stride_lv,
    stride_ib, stride_it,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
):
    # One program per row. Rows are addressed as (b, t) with two strides so that a [B, T, V] view
    # such as logits[:, :-1] (the usual label shift) needs no copy.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt

    # A scalar running max and sum (one exp per element) rather than per-lane ones (two exps per
    # element): on a bandwidth-bound bf16 stream the exp unit would otherwise be the bottleneck.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols * stride_lv, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # Shifting by an infinite max would give exp(inf - inf) = NaN. Shift by 0 instead: while
        # everything seen is -inf the sum stays 0 (lse = -inf), and once a +inf is seen the sum
        # becomes +inf (lse = +inf), both as torch.logsumexp gives.
        shift = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    # The sum is relative to the last shift; keep shift and log(sum) apart so that huge logits
    # (1e30, where shift + log(sum) rounds to shift) keep their log(sum) term.
    shift = tl.where(tl.abs(m) == float("inf"), 0.0, m)
    log_s = tl.log(s)
    lse = shift + log_s

    idx = tl.load(index_ptr + b * stride_ib + t * stride_it).to(tl.int64)
    # Never read outside the row, even for a bad index: NaN instead of someone else's memory.
    valid = (idx >= 0) & (idx < V)
    target = tl.load(row_ptr + idx * stride_lv, mask=valid, other=float("nan")).to(tl.float32)
    # A +inf logit leaves no defined distribution: NaN, as log_softmax gives.
    logp = tl.where(lse == float("inf"), float("nan"), (target - shift) - log_s)
    if HAS_IGNORE:
        logp = tl.where(idx == ignore_index, 0.0, logp)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    # For the backward pass: softmax = exp((x - shift) - log_s), exact where exp(x - lse) is not.
    tl.store(shift_ptr + row, shift)
    tl.store(logs_ptr + row, log_s)


def _logprob_gather_bwd_kernel(
    logits_ptr, index_ptr, shift_ptr, logs_ptr, glogp_ptr, glse_ptr, grad_ptr,
    T, V,
    stride_lb, stride_lt, stride_lv,
    stride_ib, stride_it,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    HAS_GLOGP: tl.constexpr,
    HAS_GLSE: tl.constexpr,
):
    # grad_j = g_logp * (onehot_j - p_j) + g_lse * p_j = (g_lse - g_logp) * p_j + g_logp * onehot_j
    # A 2-D grid (row, block of V): every block is independent, so small N still fills the GPU.
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    b = row // T
    t = row - b * T
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(logits_ptr + b * stride_lb + t * stride_lt + cols * stride_lv, mask=mask,
                other=float("-inf")).to(tl.float32)
    p = tl.exp((x - tl.load(shift_ptr + row)) - tl.load(logs_ptr + row))
    g_lse = 0.0
    if HAS_GLSE:
        g_lse = tl.load(glse_ptr + row)
    if HAS_GLOGP:
        g = tl.load(glogp_ptr + row)
        idx = tl.load(index_ptr + b * stride_ib + t * stride_it).to(tl.int64)
        if HAS_IGNORE:
            g = tl.where(idx == ignore_index, 0.0, g)
        grad = (g_lse - g) * p + tl.where(cols == idx, g, 0.0)
    else:
        grad = g_lse * p
    tl.store(grad_ptr + row * V + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _kernels():
    global triton, tl
    import triton  # noqa: F811 - binds the module global the kernels read
    import triton.language as tl  # noqa: F811

    return triton.jit(_logprob_gather_fwd_kernel), triton.jit(_logprob_gather_bwd_kernel)


def _block_and_warps(vocab: int, element_size: int) -> tuple[int, int]:
    # Large blocks amortise the two block reductions per step; 4096 x 2 bytes (or 2048 x 4) is
    # 8 KiB per step, 16 elements per thread at 8 warps, which stays in registers.
    cap = 4096 if element_size <= 2 else 2048
    block = min(triton.next_power_of_2(vocab), cap)
    warps = 8 if block >= 2048 else (4 if block >= 512 else 1)
    return block, warps


def _as_rows(logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View logits as [B, T, V] and index as [B, T] without copying where strides allow."""
    if logits.dim() == 1:
        return logits.view(1, 1, -1), index.reshape(1, 1)
    if logits.dim() == 2:
        return logits.unsqueeze(0), index.unsqueeze(0)
    if logits.dim() == 3:
        return logits, index
    # flatten() copies only when the leading strides cannot be merged.
    return logits.flatten(0, -3), index.flatten(0, -2)


def _row_strides(l3: torch.Tensor, i2: torch.Tensor) -> tuple[int, ...]:
    # With a single b, its stride is never used; pass 0 so Triton sees a multiple of 16 and can
    # prove rows aligned (vectorised loads). unsqueeze(0) would report N*V, often not one.
    sb_l, sb_i = (0, 0) if l3.shape[0] == 1 else (l3.stride(0), i2.stride(0))
    return sb_l, l3.stride(1), l3.stride(2), sb_i, i2.stride(1)


def _launch_forward(logits: torch.Tensor, index: torch.Tensor, ignore_index: int | None):
    fwd, _ = _kernels()
    lead = index.shape
    l3, i2 = _as_rows(logits, index)
    B, T, V = l3.shape
    logp = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    lse = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    stats = torch.empty(2, B * T, dtype=torch.float32, device=logits.device)  # shift, log(sum)
    if B * T > 0:
        block, warps = _block_and_warps(V, logits.element_size())
        fwd[(B * T,)](
            l3, i2, logp, lse, stats[0], stats[1],
            T, V,
            *_row_strides(l3, i2),
            0 if ignore_index is None else ignore_index,
            BLOCK_V=block, HAS_IGNORE=ignore_index is not None, num_warps=warps,
        )
    return logp.view(lead), lse.view(lead), stats


def _launch_backward(logits, index, stats, grad_logp, grad_lse, ignore_index):
    _, bwd = _kernels()
    l3, i2 = _as_rows(logits, index)
    B, T, V = l3.shape
    grad = torch.empty((B * T, V), dtype=logits.dtype, device=logits.device)
    if B * T > 0:
        block, warps = _block_and_warps(V, logits.element_size())
        # Unused outputs arrive as None; their pointers are never read (HAS_* False).
        glogp = stats if grad_logp is None else grad_logp.reshape(-1).float().contiguous()
        glse = stats if grad_lse is None else grad_lse.reshape(-1).float().contiguous()
        bwd[(B * T, triton.cdiv(V, block))](
            l3, i2, stats[0], stats[1], glogp, glse, grad,
            T, V,
            *_row_strides(l3, i2),
            0 if ignore_index is None else ignore_index,
            BLOCK_V=block, HAS_IGNORE=ignore_index is not None,
            HAS_GLOGP=grad_logp is not None, HAS_GLSE=grad_lse is not None,
            num_warps=warps,
        )
    return grad.view(logits.shape)


class _LogprobGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, ignore_index):
        logp, lse, stats = _launch_forward(logits, index, ignore_index)
        ctx.save_for_backward(logits, index, stats)
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        logits, index, stats = ctx.saved_tensors
        if grad_logp is None and grad_lse is None:
            return None, None, None
        grad = _launch_backward(logits, index, stats, grad_logp, grad_lse, ctx.ignore_index)
        return grad, None, None


def logprob_gather_triton(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    return_lse: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`logprob_gather_reference` (same signature and results).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Does not validate the
    index range: an out-of-range index gives NaN for its row.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import logprob_gather
        >>> logits = torch.randn(8, 32000, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> logprob_gather(logits, torch.zeros(8, dtype=torch.long, device="cuda"),
        ...                backend="triton")                                   # doctest: +SKIP
    """
    _check_args(logits, index, ignore_index)
    if torch.is_grad_enabled() and logits.requires_grad:
        logp, lse = _LogprobGatherFunction.apply(logits, index, ignore_index)
    else:
        logp, lse, _ = _launch_forward(logits, index, ignore_index)
    return (logp, lse) if return_lse else logp


logprob_gather = register_kernel(
    "logprob_gather",
    reference=logprob_gather_reference,
    triton=logprob_gather_triton,
    description="log_softmax(logits.float(), -1).gather(-1, index) fused, + optional row logsumexp",
)
