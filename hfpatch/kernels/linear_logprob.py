"""Fused linear log-prob: ``log softmax(hidden @ weight.T + bias)[label]`` per row, without the ``[N, V]`` logits.

``linear_logprob(hidden, weight, labels)`` is what token-level DPO (and any per-token likelihood) needs from the
language-model head: one log-probability per token. Written plainly it builds the ``[tokens, vocab]`` logits, a
float32 copy and the log-softmax (12 bytes per logit: 3 GiB for 2048 tokens x 128k vocab), and autograd keeps them
for the backward. Here the vocabulary is walked in tiles of ``[token_chunk, vocab_chunk]``:

- forward: each tile's logits are one matmul (float32 accumulation), folded into per-row running statistics, an
  online log-sum-exp (running max and sum of exponentials) plus the label's logit when it falls in the tile; the
  tile buffer is reused, so the working memory is one tile whatever the vocabulary;
- backward: each tile is recomputed and turned into the logits' gradient ``g * (onehot - softmax)`` in place,
  then folded into ``grad_hidden += tile @ W_tile`` and ``grad_weight[tile] += tile.T @ hidden``. The vocabulary is
  the outer loop, so each ``grad_weight`` row block is finished once and written in the weight's dtype (no float32
  ``[V, H]`` accumulator next to the bfloat16 gradient);
- frozen head (only ``hidden`` needs a gradient, as with LoRA/PEFT in DPO): the forward also accumulates the
  expected embedding ``E = sum_v p(v) W_v`` online (one more matmul per tile), and the backward is
  ``grad_hidden = g * (W[label] - E)`` with no tile recomputed: two matmuls per tile in all, like the naive path.

TDPO mode: with ``reference_hidden`` and ``reference_weight`` the same pass also returns the per-position
``KL(pi_ref || pi) = sum_v p_ref(v) (log p_ref(v) - log p(v))``, from the reference's tile of the same vocabulary
block (a second online log-sum-exp and a running ``sum exp(z_ref - m_ref) (z_ref - z)``). The reference side is a
constant: no gradient flows to ``reference_hidden``/``reference_weight``; the policy gets ``d KL / d z = p - p_ref``.

Implementations (one op, ``dispatch`` picks and reports which ran):

- ``torch``: the definition, full float32 logits + ``log_softmax`` + gather (the numerics oracle; [N, V] memory);
- ``cpu``: the tiled ``torch.autograd.Function`` above with the tile folds written in torch (the memory win on CPU);
- ``triton``: the same tiling with cuBLAS matmuls (float32 output from bfloat16/float16 inputs) and Triton kernels
  for the fold (forward, one pass per tile row) and the tile-to-gradient step (backward).

Dtypes: float32, float16, bfloat16, mixed as mixed precision gives them (bfloat16 hidden states from an autocast
backbone, a float32 lm_head): the logits are float32 on every path (on CUDA the 16-bit operands stay 16-bit in
the matmul, as autocast would run it, with float32 accumulation and output); gradients come back in each input's
dtype.

Rows whose label is ``ignore_index`` are dropped before the tiles (their cost is zero) and give 0 (log-prob and
KL) and no gradient. Every label outside ``[0, V)`` that is not ``ignore_index`` is an ``IndexError`` on every
path (one device sync per call). Logits are assumed finite (a ``-inf`` bias entry is not supported by the tiled
paths; the reference follows ``log_softmax``).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .dispatch import CpuKernel, register_kernel

__all__ = [
    "linear_logprob",
    "linear_logprob_cpu",
    "linear_logprob_reference",
    "linear_logprob_triton",
]

# Bound by _kernels(); the kernels read triton.language as a module global (the interpreter patches it there).
triton = None
tl = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tile shape: at most TOKEN_CHUNK tokens by TILE_ELEMENTS // tokens vocabulary entries (a multiple of
# VOCAB_ALIGN). 4M float32 elements is 16 MiB per tile buffer: small next to any lm_head, large enough that each
# matmul runs near peak. Module globals so that tests can shrink them to exercise many tiles on small shapes.
TOKEN_CHUNK = 2048
TILE_ELEMENTS = 1 << 22
VOCAB_ALIGN = 128
# On a GPU each tile is a cuBLAS matmul plus two kernel launches: 4096 x 4096 tiles (64 MiB of float32) keep the
# matmuls large and the launches few, still a fraction of TRL's 4096 x 32768 tile.
CUDA_TOKEN_CHUNK = 4096
CUDA_TILE_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------------------------
# argument checks shared by every implementation
# ---------------------------------------------------------------------------------------------------------------


def _check_args(hidden, weight, labels, bias, ignore_index, reference_hidden, reference_weight) -> None:
    name = "linear_logprob"
    for label, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a tensor, got {type(t).__name__}")
    if hidden.dtype not in _SUPPORTED_DTYPES or weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must be float32, float16 "
                        "or bfloat16")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name}: labels must hold integer token ids (int64), got {labels.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1:
        raise ValueError(f"{name}: weight must be [V, H] and hidden [..., H]; got weight {tuple(weight.shape)}, "
                         f"hidden {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} has an empty vocabulary")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden's last dim {hidden.shape[-1]} != weight's H {weight.shape[1]} "
                         f"(weight is [V, H] = {tuple(weight.shape)}, as nn.Linear stores lm_head.weight)")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}; shift labels and hidden states before calling")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: bias must be a [V] = [{weight.shape[0]}] tensor, got "
                             f"{getattr(bias, 'shape', bias)!r}")
        if bias.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: bias is {bias.dtype}: float32, float16 or bfloat16")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    if (reference_hidden is None) != (reference_weight is None):
        raise ValueError(f"{name}: TDPO mode needs both reference_hidden and reference_weight (got only "
                         f"{'reference_hidden' if reference_weight is None else 'reference_weight'})")
    if reference_hidden is not None:
        rh, rw = reference_hidden, reference_weight
        if rh.dtype not in _SUPPORTED_DTYPES or rw.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: reference_hidden ({rh.dtype}) and reference_weight ({rw.dtype}) must be "
                            "float32, float16 or bfloat16")
        if rw.dim() != 2 or rw.shape[0] != weight.shape[0]:
            raise ValueError(f"{name}: reference_weight {tuple(rw.shape)} must be [V, H_ref] with the policy's "
                             f"V = {weight.shape[0]} (the KL needs one vocabulary)")
        if tuple(rh.shape) != tuple(hidden.shape[:-1]) + (rw.shape[1],):
            raise ValueError(f"{name}: reference_hidden {tuple(rh.shape)} must be "
                             f"{tuple(hidden.shape[:-1]) + (rw.shape[1],)} (hidden's leading shape, H_ref)")
    devices = {t.device for t in (hidden, weight, labels, bias, reference_hidden, reference_weight)
               if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(labels.reshape(-1)[flat])
        raise IndexError(f"linear_logprob: label {value} (flat position {flat}) is outside the vocabulary "
                         f"[0, {vocab}) and is not ignore_index={ignore_index}; {int(bad.sum())} such labels. "
                         "Mask padding with ignore_index (default -100).")


# ---------------------------------------------------------------------------------------------------------------
# pure-torch reference
# ---------------------------------------------------------------------------------------------------------------


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reference_hidden: torch.Tensor | None = None,
    reference_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each row's label under ``softmax(hidden @ weight.T + bias)``, in float32.

    ``hidden`` is ``[N, H]`` (or ``[..., H]``), ``weight`` ``[V, H]`` (``lm_head.weight``), ``labels`` ``[N]`` (or
    ``[...]``) token ids; ``bias`` an optional ``[V]``. Returns ``logp`` of ``labels``' shape, float32, 0 where the
    label is ``ignore_index``. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (gradients in their dtypes).

    TDPO mode: given ``reference_hidden [..., H_ref]`` and ``reference_weight [V, H_ref]`` (the reference model's
    final hidden states and lm_head, same vocabulary) it returns ``(logp, kl)`` with
    ``kl = KL(pi_ref || pi) = sum_v p_ref(v) (log p_ref(v) - log p(v))`` per position (0 at ``ignore_index``).
    The reference side is treated as a constant: no gradient reaches ``reference_hidden`` or
    ``reference_weight``; ``kl``'s gradient reaches the policy inputs.

    This reference builds the full float32 ``[N, V]`` logits (the definition, used as the numerics oracle); the
    ``cpu`` and ``triton`` implementations give the same values in one tile of memory.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import linear_logprob
        >>> hidden, weight = torch.eye(2), torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
        >>> linear_logprob(hidden, weight, torch.tensor([2, -100]), backend="torch")
        tensor([-0.5514,  0.0000])
        >>> logp, kl = linear_logprob(hidden, weight, torch.tensor([2, 1]), reference_hidden=hidden,
        ...                           reference_weight=weight, backend="torch")
        >>> kl                                   # the same model on both sides: KL 0
        tensor([0., 0.])
    """
    _check_args(hidden, weight, labels, bias, ignore_index, reference_hidden, reference_weight)
    _check_range(labels, weight.shape[0], ignore_index)
    ignored = labels == ignore_index
    index = labels.long().masked_fill(ignored, 0)
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if reference_hidden is None:
        return logp
    with torch.no_grad():
        ref_log_probs = torch.log_softmax(F.linear(reference_hidden.float(), reference_weight.float()), dim=-1)
    kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).masked_fill(ignored, 0.0)
    return logp, kl


# ---------------------------------------------------------------------------------------------------------------
# the tiled pass shared by the CPU and Triton implementations (they differ in the two fold steps)
# ---------------------------------------------------------------------------------------------------------------


def _tile_shape(n_tokens: int, vocab: int, device: torch.device | None = None) -> tuple[int, int]:
    on_gpu = device is not None and device.type == "cuda"
    chunk, elements = (CUDA_TOKEN_CHUNK, CUDA_TILE_ELEMENTS) if on_gpu else (TOKEN_CHUNK, TILE_ELEMENTS)
    tokens = max(1, min(n_tokens, chunk))
    cols = max(VOCAB_ALIGN, (elements // tokens) // VOCAB_ALIGN * VOCAB_ALIGN)
    return tokens, min(vocab, cols)


@functools.lru_cache(maxsize=None)
def _cuda_mm_out_dtype_works() -> bool:
    # torch >= 2.8 multiplies bfloat16/float16 matrices on CUDA straight into a float32 result (addmm.dtype_out).
    # Older builds lack it; then the tile operands are upcast instead (same float32 numerics, more traffic).
    try:
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(2, 2, device="cuda", dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(acc[0, 0] == 2)
    except (TypeError, RuntimeError):
        return False


def _half_on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and t.dtype != torch.float32 and _cuda_mm_out_dtype_works()


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """``acc = beta * acc + a @ b`` with a float32 ``acc``, never rounding ``a @ b`` to a 16-bit dtype first."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif _half_on_cuda(a):
        torch.addmm(acc, a, b.to(a.dtype), beta=beta, out_dtype=torch.float32, out=acc)
    else:
        torch.addmm(acc, a.float(), b.float(), beta=beta, out=acc)


def _tile_logits(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # out is a float32 [n, v] view of the tile buffer; beta=0 ignores its stale contents (NaN included).
    if b is None:
        _addmm_fp32(out, h, w.t(), beta=0.0)
    else:
        out.copy_(b.float().unsqueeze(0).expand_as(out))
        _addmm_fp32(out, h, w.t())
    return out


def _operand(t: torch.Tensor) -> torch.Tensor:
    # On CPU (and CUDA without out_dtype matmuls) 16-bit operands are upcast once, not per tile.
    return t if t.dtype == torch.float32 or _half_on_cuda(t) else t.float()


def _forward_pass(h, w, b, labels, rh, rw, fold, expect=False):
    """Run the tiles; return (logp, kl or None, lse, ref_lse or None, expected), the first four float32 [n].

    With ``expect`` (a frozen head: only hidden needs a gradient) it also accumulates, online like the sums,
    ``E = sum_v p(v) W_v`` and with a reference ``E_ref = sum_v p_ref(v) W_v`` (the policy's ``W``), float32
    ``[n, H]``: then ``d logp / d hidden = W[label] - E`` and ``d KL / d hidden = E - E_ref`` and the backward needs
    no tile at all (two matmuls per tile in total, as many as the naive path, instead of three).
    """
    n, vocab = h.shape[0], w.shape[0]
    with_ref = rh is not None
    dev = h.device
    # stats rows: running max, sum of exp, label logit; with the reference: its max, its sum, the KL numerator.
    stats = torch.zeros((6 if with_ref else 3, n), dtype=torch.float32, device=dev)
    stats[0].fill_(float("-inf"))
    if with_ref:
        stats[3].fill_(float("-inf"))
    if n:
        tokens, cols = _tile_shape(n, vocab, h.device)
        buf = torch.empty(tokens * cols, dtype=torch.float32, device=dev)
        rbuf = torch.empty(tokens * cols, dtype=torch.float32, device=dev) if with_ref else None
        h_op, rh_op = _operand(h), (_operand(rh) if with_ref else None)
        if expect:
            e_sum = torch.zeros((n, w.shape[1]), dtype=torch.float32, device=dev)
            e_ref_sum = torch.zeros((n, w.shape[1]), dtype=torch.float32, device=dev) if with_ref else None
        for n0 in range(0, n, tokens):
            n1 = min(n, n0 + tokens)
            for v0 in range(0, vocab, cols):
                v1 = min(vocab, v0 + cols)
                shape = (n1 - n0, v1 - v0)
                z = _tile_logits(buf[: shape[0] * shape[1]].view(shape), h_op[n0:n1], w[v0:v1],
                                 None if b is None else b[v0:v1])
                zr = None
                if with_ref:
                    zr = _tile_logits(rbuf[: shape[0] * shape[1]].view(shape), rh_op[n0:n1], rw[v0:v1], None)
                if not expect:
                    fold.forward(z, zr, labels[n0:n1], v0, stats[:, n0:n1], False)
                    continue
                maxima = stats[0::3, n0:n1].clone()  # running max (and the reference's) before this tile
                # write_exp: afterwards z holds exp(z - m) and zr exp(zr - m_ref) with the updated maxima.
                fold.forward(z, zr, labels[n0:n1], v0, stats[:, n0:n1], True)
                rescale = torch.exp(maxima - stats[0::3, n0:n1])
                w_tile = _operand(w[v0:v1])
                for acc, e, r in ((e_sum, z, rescale[0]), (e_ref_sum, zr, rescale[-1])):
                    if acc is not None:
                        acc[n0:n1].mul_(r.unsqueeze(1))
                        _addmm_fp32(acc[n0:n1], e.to(w_tile.dtype) if w_tile.dtype != torch.float32 else e,
                                    w_tile)
    lse = stats[0] + torch.log(stats[1])
    logp = stats[2] - lse
    expected = None
    if expect and n:
        expected = (e_sum.div_(stats[1].unsqueeze(1)),
                    None if not with_ref else e_ref_sum.div_(stats[4].unsqueeze(1)))
    if not with_ref:
        return logp, None, lse, None, expected
    ref_lse = stats[3] + torch.log(stats[4])
    # KL = sum p_ref (z_ref - z) - lse_ref + lse, with sum p_ref (z_ref - z) = numerator / sum of exp.
    kl = stats[5] / stats[4] - ref_lse + lse
    return logp, kl, lse, ref_lse, expected


def _backward_pass(h, w, b, labels, lse, rh, rw, ref_lse, g_logp, g_kl, needs, fold):
    """Recompute the tiles and fold their logits-gradient into the gradients of hidden, weight and bias."""
    n, vocab = h.shape[0], w.shape[0]
    need_h, need_w, need_b = needs
    dev = h.device
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=dev) if need_h else None
    grad_w = torch.zeros_like(w, memory_format=torch.contiguous_format) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
    # Without a KL gradient the reference tiles are not needed at all.
    with_ref = rh is not None and g_kl is not None
    if n == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b
    g_logp = torch.zeros(n, dtype=torch.float32, device=dev) if g_logp is None else g_logp.float().contiguous()
    g_kl = None if not with_ref else g_kl.float().contiguous()
    tokens, cols = _tile_shape(n, vocab, h.device)
    buf = torch.empty(tokens * cols, dtype=torch.float32, device=dev)
    rbuf = torch.empty(tokens * cols, dtype=torch.float32, device=dev) if with_ref else None
    # On CUDA the 16-bit gradient GEMMs run on tensor cores from a 16-bit copy of the tile (as TRL does).
    half = _half_on_cuda(h)
    gbuf = torch.empty(tokens * cols, dtype=h.dtype, device=dev) if half else None
    h_op, rh_op = _operand(h), (_operand(rh) if with_ref else None)
    w_acc_fp32 = need_w and w.dtype != torch.float32
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        w_tile = _operand(w[v0:v1])
        # The vocabulary is the outer loop, so this block of grad_weight is complete after the token loop.
        gw = None
        if need_w:
            gw = (torch.zeros((v1 - v0, w.shape[1]), dtype=torch.float32, device=dev) if w_acc_fp32
                  else grad_w[v0:v1])
        for n0 in range(0, n, tokens):
            n1 = min(n, n0 + tokens)
            shape = (n1 - n0, v1 - v0)
            size = shape[0] * shape[1]
            z = _tile_logits(buf[:size].view(shape), h_op[n0:n1], w[v0:v1], None if b is None else b[v0:v1])
            zr = _tile_logits(rbuf[:size].view(shape), rh_op[n0:n1], rw[v0:v1], None) if with_ref else None
            out = gbuf[:size].view(shape) if half else z
            grad = fold.backward(z, zr, labels[n0:n1], v0, lse[n0:n1], None if zr is None else ref_lse[n0:n1],
                                 g_logp[n0:n1], None if g_kl is None else g_kl[n0:n1], out)
            if need_h:
                _addmm_fp32(grad_h[n0:n1], grad, w_tile)
            if need_w:
                _addmm_fp32(gw, grad.t(), h_op[n0:n1])
            if need_b:
                grad_b[v0:v1] += grad.sum(0, dtype=torch.float32)
        if w_acc_fp32:
            grad_w[v0:v1].copy_(gw)
    return grad_h, grad_w, grad_b


class _TiledLinearLogprob(torch.autograd.Function):
    """The tiled op on rows that all count (ignored rows were removed by the caller)."""

    @staticmethod
    def forward(ctx, h, w, b, labels, rh, rw, fold, grad_enabled):
        ctx.set_materialize_grads(False)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # grad_enabled: under torch.no_grad no backward will come, so the expected embedding would be wasted work
        # (needs_input_grad only reflects requires_grad).
        expect = grad_enabled and need_h and not need_w and not (b is not None and need_b)
        logp, kl, lse, ref_lse, expected = _forward_pass(h, w, b, labels, rh, rw, fold, expect)
        e, e_ref = expected if expected is not None else (None, None)
        ctx.save_for_backward(h, w, b, labels, lse, rh, rw, ref_lse, e, e_ref)
        ctx.fold = fold
        ctx.expect = expect
        if kl is None:
            return logp
        return logp, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_kl=None):
        h, w, b, labels, lse, rh, rw, ref_lse, e, e_ref = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if g_logp is None and g_kl is None:
            return None, None, None, None, None, None, None, None
        if ctx.expect:
            # Frozen head: d logp / d h = W[label] - E, d KL / d h = E - E_ref (E from the forward pass).
            grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            if e is not None:
                if g_logp is not None:
                    grad_h.addcmul_(w.index_select(0, labels).float() - e, g_logp.float().unsqueeze(1))
                if g_kl is not None and e_ref is not None:
                    grad_h.addcmul_(e - e_ref, g_kl.float().unsqueeze(1))
            return grad_h.to(h.dtype), None, None, None, None, None, None, None
        grad_h, grad_w, grad_b = _backward_pass(h, w, b, labels, lse, rh, rw, ref_lse, g_logp, g_kl,
                                                (needs[0], needs[1], b is not None and needs[2]), ctx.fold)
        return (None if grad_h is None else grad_h.to(h.dtype), grad_w,
                None if grad_b is None else grad_b.to(b.dtype), None, None, None, None, None)


def _tiled(hidden, weight, labels, bias, ignore_index, reference_hidden, reference_weight, fold):
    """Validate, drop the ignore_index rows, run the tiles, put the rows back in place."""
    _check_args(hidden, weight, labels, bias, ignore_index, reference_hidden, reference_weight)
    _check_range(labels, weight.shape[0], ignore_index)
    lead = labels.shape
    flat_labels = labels.reshape(-1).long()
    h = hidden.reshape(-1, hidden.shape[-1])
    rh = None if reference_hidden is None else reference_hidden.reshape(-1, reference_hidden.shape[-1]).detach()
    rw = None if reference_weight is None else reference_weight.detach()
    keep = flat_labels != ignore_index
    kept = None
    if not bool(keep.all()):
        kept = keep.nonzero().squeeze(1)
        # index_select is differentiable: autograd scatters the rows' gradients back into hidden.
        h, flat_labels = h.index_select(0, kept), flat_labels.index_select(0, kept)
        rh = None if rh is None else rh.index_select(0, kept)
    out = _TiledLinearLogprob.apply(h, weight, bias, flat_labels.contiguous(), rh, rw, fold, torch.is_grad_enabled())
    outs = out if isinstance(out, tuple) else (out,)
    if kept is not None:
        # Ignored rows: 0, and (index_copy being differentiable in its source) no gradient.
        outs = tuple(torch.zeros(keep.shape[0], dtype=torch.float32, device=keep.device).index_copy(0, kept, o)
                     for o in outs)
    outs = tuple(o.view(lead) for o in outs)
    return outs if len(outs) == 2 else outs[0]


# ---------------------------------------------------------------------------------------------------------------
# tile folds in torch (the CPU implementation)
# ---------------------------------------------------------------------------------------------------------------


def _local_labels(labels: torch.Tensor, start: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    local = labels - start
    inside = (local >= 0) & (local < n_cols)
    return local.clamp(0, n_cols - 1), inside


def _torch_fold_forward(z, zr, labels, start, stats, write_exp):
    # Leaves z = exp(z - m) (and zr = exp(zr - m_ref)) with the updated maxima, which write_exp callers read.
    n_cols = z.shape[1]
    local, inside = _local_labels(labels, start, n_cols)
    stats[2] += torch.where(inside, z.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
    if zr is not None:
        m_ref = torch.maximum(stats[3], zr.amax(1))
        rescale = torch.exp(stats[3] - m_ref)
        diff = zr - z  # before z is overwritten below
        e_ref = zr.sub_(m_ref.unsqueeze(1)).exp_()
        stats[4].mul_(rescale).add_(e_ref.sum(1))
        # Row-wise dot product without a second tile-sized temporary (e_ref must survive for write_exp).
        stats[5].mul_(rescale).add_(torch.einsum("ij,ij->i", e_ref, diff))
        stats[3].copy_(m_ref)
    m_new = torch.maximum(stats[0], z.amax(1))
    stats[1].mul_(torch.exp(stats[0] - m_new)).add_(z.sub_(m_new.unsqueeze(1)).exp_().sum(1))
    stats[0].copy_(m_new)


def _torch_fold_backward(z, zr, labels, start, lse, ref_lse, g_logp, g_kl, out):
    # d/dz_j of (g_logp * logp + g_kl * KL) = g_logp (onehot_j - p_j) + g_kl (p_j - p_ref_j)
    n_cols = z.shape[1]
    p = z.sub_(lse.unsqueeze(1)).exp_()
    coef = -g_logp if g_kl is None else g_kl - g_logp
    grad = p.mul_(coef.unsqueeze(1))
    if zr is not None:
        grad.sub_(zr.sub_(ref_lse.unsqueeze(1)).exp_().mul_(g_kl.unsqueeze(1)))
    local, inside = _local_labels(labels, start, n_cols)
    grad.scatter_add_(1, local.unsqueeze(1), torch.where(inside, g_logp, 0.0).unsqueeze(1))
    if out is not grad:
        out.copy_(grad)
    return out


_TORCH_FOLD = SimpleNamespace(forward=_torch_fold_forward, backward=_torch_fold_backward)


def linear_logprob_cpu(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reference_hidden: torch.Tensor | None = None,
    reference_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Tiled CPU implementation of :func:`linear_logprob_reference` (same signature and results).

    Works in one ``[token_chunk, vocab_chunk]`` float32 tile (16 MiB) plus the gradients themselves, instead of
    the reference's ``[N, V]`` logits. 16-bit inputs are computed in float32 (upcast once per call, per tile for
    the weight).
    """
    return _tiled(hidden, weight, labels, bias, ignore_index, reference_hidden, reference_weight, _TORCH_FOLD)


# ---------------------------------------------------------------------------------------------------------------
# Triton folds (plain functions here; jit-compiled by _kernels())
# ---------------------------------------------------------------------------------------------------------------


def _fold_forward_kernel(
    z_ptr, zr_ptr, stride_z, stride_zr, labels_ptr, stats_ptr, stride_stats,
    vocab_start, n_cols,
    BLOCK: tl.constexpr,
    HAS_REF: tl.constexpr,
    WRITE_EXP: tl.constexpr,
):
    # One program per tile row: one pass over the row in blocks, updating its running statistics in place;
    # with WRITE_EXP a second pass overwrites the row with exp(z - m) (and exp(z_ref - m_ref)), m the new max.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row) - vocab_start
    m = tl.load(stats_ptr + row)
    s = tl.load(stats_ptr + stride_stats + row)
    target = tl.load(stats_ptr + 2 * stride_stats + row)
    if HAS_REF:
        m_r = tl.load(stats_ptr + 3 * stride_stats + row)
        s_r = tl.load(stats_ptr + 4 * stride_stats + row)
        t = tl.load(stats_ptr + 5 * stride_stats + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        # Padded lanes load 0 (finite arithmetic everywhere) and are set to -inf only where a max or exp needs it.
        z_raw = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0)
        z = tl.where(mask, z_raw, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        # `mask &`: a label of the next tile can sit in this block's padded lanes (which hold -inf).
        target += tl.sum(tl.where(mask & (cols == label), z, 0.0), 0)
        m = m_new
        if HAS_REF:
            zr_raw = tl.load(zr_ptr + row * stride_zr + cols, mask=mask, other=0.0)
            zr = tl.where(mask, zr_raw, float("-inf"))
            m_r_new = tl.maximum(m_r, tl.max(zr, 0))
            rescale = tl.exp(m_r - m_r_new)
            e_r = tl.exp(zr - m_r_new)
            s_r = s_r * rescale + tl.sum(e_r, 0)
            t = t * rescale + tl.sum(e_r * (zr_raw - z_raw), 0)
            m_r = m_r_new
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + stride_stats + row, s)
    tl.store(stats_ptr + 2 * stride_stats + row, target)
    if HAS_REF:
        tl.store(stats_ptr + 3 * stride_stats + row, m_r)
        tl.store(stats_ptr + 4 * stride_stats + row, s_r)
        tl.store(stats_ptr + 5 * stride_stats + row, t)
    if WRITE_EXP:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0)
            tl.store(z_ptr + row * stride_z + cols, tl.exp(z - m), mask=mask)
            if HAS_REF:
                zr = tl.load(zr_ptr + row * stride_zr + cols, mask=mask, other=0.0)
                tl.store(zr_ptr + row * stride_zr + cols, tl.exp(zr - m_r), mask=mask)


def _fold_backward_kernel(
    z_ptr, zr_ptr, out_ptr, stride_z, stride_zr, stride_out, labels_ptr, lse_ptr, ref_lse_ptr,
    g_logp_ptr, g_kl_ptr,
    vocab_start, n_cols,
    BLOCK: tl.constexpr,
    HAS_REF: tl.constexpr,
):
    # grid (row, block of the tile's columns): every block is independent.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    label = tl.load(labels_ptr + row) - vocab_start
    g = tl.load(g_logp_ptr + row)
    z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0)
    p = tl.exp(z - tl.load(lse_ptr + row))
    if HAS_REF:
        g_kl = tl.load(g_kl_ptr + row)
        zr = tl.load(zr_ptr + row * stride_zr + cols, mask=mask, other=0.0)
        p_ref = tl.exp(zr - tl.load(ref_lse_ptr + row))
        grad = (g_kl - g) * p - g_kl * p_ref
    else:
        grad = -g * p
    grad += tl.where(cols == label, g, 0.0)
    tl.store(out_ptr + row * stride_out + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _kernels():
    global triton, tl
    import triton  # noqa: F811 - binds the module global the kernels read
    import triton.language as tl  # noqa: F811

    return triton.jit(_fold_forward_kernel), triton.jit(_fold_backward_kernel)


_FORWARD_BLOCK = 2048   # one program streams its row in 8 KiB float32 blocks
_BACKWARD_BLOCK = 1024


def _triton_fold_forward(z, zr, labels, start, stats, write_exp):
    fwd, _ = _kernels()
    n, n_cols = z.shape
    ref = zr if zr is not None else z
    fwd[(n,)](z, ref, z.stride(0), ref.stride(0), labels, stats, stats.stride(0), start, n_cols,
              BLOCK=min(_FORWARD_BLOCK, triton.next_power_of_2(n_cols)), HAS_REF=zr is not None, WRITE_EXP=write_exp,
              num_warps=8 if n_cols >= 2048 else 4)


def _triton_fold_backward(z, zr, labels, start, lse, ref_lse, g_logp, g_kl, out):
    _, bwd = _kernels()
    n, n_cols = z.shape
    block = min(_BACKWARD_BLOCK, triton.next_power_of_2(n_cols))
    ref = zr if zr is not None else z
    bwd[(n, triton.cdiv(n_cols, block))](
        z, ref, out, z.stride(0), ref.stride(0), out.stride(0), labels, lse,
        ref_lse if ref_lse is not None else lse, g_logp, g_kl if g_kl is not None else g_logp,
        start, n_cols, BLOCK=block, HAS_REF=zr is not None, num_warps=4,
    )
    return out


_TRITON_FOLD = SimpleNamespace(forward=_triton_fold_forward, backward=_triton_fold_backward)


def linear_logprob_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reference_hidden: torch.Tensor | None = None,
    reference_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`linear_logprob_reference` (same signature and results).

    CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``): the tiles' matmuls run in cuBLAS with float32
    outputs, the online log-sum-exp fold and the tile-to-gradient step in Triton kernels.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import linear_logprob
        >>> h = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # doctest: +SKIP
        >>> w = torch.randn(128256, 2048, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> linear_logprob(h, w, torch.randint(0, 128256, (4096,), device="cuda")).sum().backward()  # doctest: +SKIP
    """
    return _tiled(hidden, weight, labels, bias, ignore_index, reference_hidden, reference_weight, _TRITON_FOLD)


linear_logprob = register_kernel(
    "linear_logprob",
    reference=linear_logprob_reference,
    triton=linear_logprob_triton,
    cpu=CpuKernel(linear_logprob_cpu),
    description="log_softmax(hidden @ weight.T + bias)[label] in vocabulary tiles (+ KL to a reference for TDPO)",
)
