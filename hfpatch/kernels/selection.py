"""Selection of positions: the ``budget`` best positions per row of a score tensor, forced ones always in.

Op (registered in ``dispatch``):

``select_positions(scores, budget, forced, valid)``: a sorted index set ``[B, H, budget]`` per row of
``scores`` [B, H, S] (e.g. ``group_attention_scores``), with the ``forced`` positions (sinks, the recent
window, the current token) always in and padding (``valid`` False) never in unless a row has fewer valid
positions than the budget.

- reference (torch): ``torch.topk``, then a sort. On CUDA this is what runs: over float32 scores, 4 bytes
  per KV-head position, 1/(2·D) of the key traffic of the scoring pass for bf16 keys.
- cpu: NumPy's introselect (``numpy.argpartition``), then a sort: ATen's CPU topk copies every row into a
  vector of (value, index) pairs first, which cost 2-3x more per decode step at 8k positions once the
  model's weights had flushed the caches (0.25 vs 0.09 ms per [3, 8192] call, measured).

Which of several tied positions is kept is unspecified, and may differ between the two.

Helpers (plain torch, one implementation for every device, not dispatched): ``forced_positions`` builds the
``[B, S]`` mask of sinks, window and current token; ``with_forced_first`` sets those positions of a copy of
the scores to +inf so that a top-k keeps them.
"""
from __future__ import annotations

import numpy
import torch

from .dispatch import CpuKernel, register_kernel

__all__ = [
    "forced_positions",
    "select_positions",
    "select_positions_cpu",
    "select_positions_reference",
    "with_forced_first",
]


def _ranked(scores: torch.Tensor, forced: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """float32 scores with forced positions at +inf and padding at -inf: the top-k of this is the selection."""
    s = scores.float()
    if forced is not None:
        s = s.masked_fill(forced[:, None, :], float("inf"))
    if valid is not None:
        s = s.masked_fill(~valid.bool()[:, None, :], float("-inf"))
    return s


def select_positions_reference(
    scores: torch.Tensor,
    budget: int,
    forced: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``budget`` best positions per row of ``scores`` [B, H, S], sorted ascending: ``[B, H, budget]`` int64.

    Positions where ``forced`` [B, S] is True come first (sinks, recent window, the current token);
    positions where ``valid`` [B, S] is False come last (padding; attention masks them anyway when a row
    has fewer valid positions than ``budget``). Which of several tied positions is kept is unspecified.
    ``budget`` is clipped to S.

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
    s = _ranked(scores, forced, valid)
    k = min(int(budget), s.shape[-1])
    return torch.topk(s, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def select_positions_cpu(
    scores: torch.Tensor,
    budget: int,
    forced: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_positions_reference` with NumPy's introselect (CPU tensors)."""
    s = _ranked(scores, forced, valid)
    length = s.shape[-1]
    k = min(int(budget), length)
    if k == 0:
        return torch.empty(*s.shape[:-1], 0, dtype=torch.int64)
    rows = s.detach().reshape(-1, length).numpy()
    top = numpy.argpartition(rows, length - k, axis=-1)[:, length - k:]
    top.sort(axis=-1)
    return torch.from_numpy(top).reshape(*s.shape[:-1], k)


select_positions = register_kernel(
    "select_positions",
    reference=select_positions_reference,
    triton=None,
    cpu=CpuKernel(select_positions_cpu),
)


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
