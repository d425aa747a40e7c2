"""Token-level preference losses as pure functions on tensors (no trainer, no model).

Every function takes the per-token values of one preference batch in the layout TRL's preference collator
produces: ``2B`` rows, the ``B`` chosen completions first and then their ``B`` rejected completions, so row
``i`` and row ``B + i`` are one pair. Positions are next-token positions (already shifted): ``logps[r, t]`` is
the log-probability of token ``t + 1`` of row ``r`` given the tokens before it, and ``mask[r, t]`` says whether
that token is a completion token (prompt and padding positions are ignored). ``weights`` (optional, the same
shape) multiply each token's log-ratio; ``None`` means all ones.

The formulas (``Delta_t = log pi(y_t) - log pi_ref(y_t)``, ``s = sigmoid``):

- sequence DPO (the cDPO paper's form): ``-log s(beta * (sum_t w^w_t Delta^w_t - sum_t w^l_t Delta^l_t))``.
  With every weight 1 it is TRL's ``sigmoid`` DPO loss.
- token DPO (the released cDPO code's form): the two completions are aligned by completion position ``k``
  (the k-th completion token of each), a missing position counting as ``Delta = 0``; per position
  ``-log s(beta * (w^w_k Delta^w_k - w^l_k Delta^l_k))``, averaged over the positions where either completion
  has a token, then over pairs.
- TDPO1: ``-log s(beta * ((D^w - D^l) + KL^w - KL^l))``; TDPO2: ``-log s(beta * ((D^w - D^l) + alpha *
  (sg(KL^w) - KL^l)))``, where ``D = sum_t Delta_t`` and ``KL = sum_t KL(pi_ref(.|s_t) || pi(.|s_t))`` is the
  sequential KL from the full next-token distributions (``sequential_kl``).

Each loss returns per-pair values (shape ``[B]``); a trainer takes their mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rows, rejected rows) of a ``[2B, ...]`` tensor; raises on an odd number of rows."""
    if values.shape[0] % 2:
        raise ValueError(f"a preference batch has 2B rows (chosen then rejected); got {values.shape[0]} rows")
    return values.chunk(2, dim=0)


def _check(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None) -> None:
    if logps.dim() != 2 or logps.shape != ref_logps.shape or logps.shape != mask.shape:
        raise ValueError(f"logps, ref_logps and mask must all be [2B, T]; got {tuple(logps.shape)}, "
                         f"{tuple(ref_logps.shape)} and {tuple(mask.shape)}")
    if weights is not None and weights.shape != logps.shape:
        raise ValueError(f"weights must have the shape of logps {tuple(logps.shape)}; got {tuple(weights.shape)}")
    split_pairs(logps)


def token_logratios(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """``w_t * (log pi - log pi_ref)`` on completion tokens, 0 elsewhere; shape ``[2B, T]``."""
    _check(logps, ref_logps, mask, weights)
    # torch.where, not a product: a masked position may hold -inf or garbage (padding), which must not leak
    delta = torch.where(mask.bool(), logps - ref_logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
    return delta if weights is None else delta * weights.to(delta.dtype)


def sequence_logratios(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) weighted sums ``sum_t w_t Delta_t`` per sequence, each of shape ``[B]``."""
    return split_pairs(token_logratios(logps, ref_logps, mask, weights).sum(dim=1))


def sequence_dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      weights: torch.Tensor | None = None, *, beta: float = 0.1) -> torch.Tensor:
    """Per-pair weighted sequence DPO loss ``-log s(beta * (sum w^w Delta^w - sum w^l Delta^l))``, shape ``[B]``."""
    chosen, rejected = sequence_logratios(logps, ref_logps, mask, weights)
    return -F.logsigmoid(beta * (chosen - rejected))


def align_completions(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's completion values to the left: ``out[r, k]`` is the value at the k-th completion token of
    row ``r`` (0 past its end). Returns (aligned values, aligned validity mask), both ``[rows, T]``."""
    mask = mask.bool()
    index = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    aligned = torch.zeros_like(values).scatter_add(1, index, torch.where(mask, values, zero))
    lengths = mask.sum(dim=1, keepdim=True)
    valid = torch.arange(values.shape[1], device=values.device).unsqueeze(0) < lengths
    return aligned, valid


def token_dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor | None = None, *, beta: float = 0.1) -> torch.Tensor:
    """Per-pair token-form DPO loss (the released cDPO code's form), shape ``[B]``.

    The chosen and rejected completions of a pair are aligned by completion position; per position
    ``-log s(beta * (w^w_k Delta^w_k - w^l_k Delta^l_k))`` with a missing token counting as ``Delta = 0``,
    averaged over the positions where either completion has a token. A pair without any completion token
    gives 0.
    """
    weighted = token_logratios(logps, ref_logps, mask, weights)
    aligned, valid = align_completions(weighted, mask)
    chosen, rejected = split_pairs(aligned)
    chosen_valid, rejected_valid = split_pairs(valid)
    either = (chosen_valid | rejected_valid).to(logps.dtype)
    per_position = -F.logsigmoid(beta * (chosen - rejected)) * either
    return per_position.sum(dim=1) / either.sum(dim=1).clamp(min=1.0)


def token_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(pi_ref(.|s_t) || pi(.|s_t))`` per position from full log-distributions ``[rows, T, V]``; ``[rows, T]``."""
    if ref_logprobs.shape != logprobs.shape or logprobs.dim() != 3:
        raise ValueError(f"ref_logprobs and logprobs must both be [rows, T, V]; got {tuple(ref_logprobs.shape)} "
                         f"and {tuple(logprobs.shape)}")
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(dim=-1)


def sequential_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sequential KL ``sum_t KL(pi_ref(.|s_t) || pi(.|s_t))`` over completion positions, shape ``[rows]``."""
    kl = token_kl(ref_logprobs, logprobs)
    return torch.where(mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(dim=1)


def tdpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, seq_kl: torch.Tensor, *,
              beta: float = 0.1, alpha: float = 0.5, variant: str = "tdpo2") -> torch.Tensor:
    """Per-pair TDPO loss, shape ``[B]``.

    ``seq_kl`` is ``sequential_kl(...)`` of the same batch (``[2B]``). ``variant`` "tdpo1":
    ``-log s(beta * ((D^w - D^l) + KL^w - KL^l))``; "tdpo2": ``-log s(beta * ((D^w - D^l) + alpha * (sg(KL^w) -
    KL^l)))`` (``alpha`` is ignored by tdpo1).
    """
    chosen, rejected = sequence_logratios(logps, ref_logps, mask)
    if seq_kl.shape != (logps.shape[0],):
        raise ValueError(f"seq_kl must have one value per row ({logps.shape[0]}); got {tuple(seq_kl.shape)}")
    kl_chosen, kl_rejected = split_pairs(seq_kl)
    margin = chosen - rejected
    if variant == "tdpo1":
        logits = margin + (kl_chosen - kl_rejected)
    elif variant == "tdpo2":
        logits = margin + alpha * (kl_chosen.detach() - kl_rejected)
    else:
        raise ValueError(f"variant must be 'tdpo1' or 'tdpo2', got {variant!r}")
    return -F.logsigmoid(beta * logits)


__all__ = ["align_completions", "sequence_dpo_loss", "sequence_logratios", "sequential_kl", "split_pairs",
           "tdpo_loss", "token_dpo_loss", "token_kl", "token_logratios"]
