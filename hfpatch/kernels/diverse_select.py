"""Greedy diverse subset selection: which ``budget`` of ``N`` feature vectors cover the set best.

Visual-token pruning keeps the tokens that differ most from each other (DivPrune's max-min diversity,
ToDRE's greedy k-center). Both are the same farthest-point loop over the cosine distance matrix
``d(i, j) = 1 - cos(x_i, x_j)``: keep a running "distance to the nearest kept token" per token, add the
token where it is largest, update the running minimum with that token's row. They differ only in the
first pick:

- ``"max_min"`` (DivPrune): the token whose nearest other token is farthest, ``argmax_i min_{j != i} d(i, j)``;
- ``"k_center"`` (ToDRE stage 1): the token nearest the mean of the normalised features, i.e. the smallest
  row sum of ``d`` (``cos(x_i, mean)`` is proportional to the row mean of the similarity). ToDRE has no public
  code; this is the usual deterministic start of greedy k-center.

Ties go to the lowest index, so a selection is reproducible. Rows of zeros have no direction: they are at
distance 1 from everything (themselves included).

The loop is ``budget`` dependent steps. On a GPU a Python loop of that many small launches is launch-bound
(64-192 steps of a few microseconds of work each), so the Triton path runs the whole loop, first pick included,
in one program per image (one launch for the batch), reading rows of the distance matrix computed by one
batched matmul. The torch reference loops in Python, vectorised per step.
"""
from __future__ import annotations

import functools

import torch

from .dispatch import register_kernel

__all__ = ["diverse_select", "diverse_select_reference", "diverse_select_triton", "cosine_distances",
           "METHODS", "MAX_TRITON_TOKENS"]

# Bound by _kernel(); the kernel must see triton.language as a module global (see logprob_gather.py).
triton = None
tl = None

METHODS = ("max_min", "k_center")
#: The Triton program holds one image's running minimum in registers; beyond this many tokens it would spill.
MAX_TRITON_TOKENS = 16384


def _check_args(features: torch.Tensor, budget: int, method: str) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"diverse_select: features must be a tensor, got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(f"diverse_select: features must be [N, D] or [B, N, D], got shape {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"diverse_select: features must be floating point, got {features.dtype}")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"diverse_select: budget must be an int, got {budget!r}")
    if budget < 1:
        raise ValueError(f"diverse_select: budget must be >= 1 (tokens to keep), got {budget}")
    if method not in METHODS:
        raise ValueError(f"diverse_select: method must be one of {list(METHODS)}, got {method!r}")
    if features.shape[-2] == 0:
        raise ValueError("diverse_select: features has no tokens (N = 0)")


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` for every pair of rows, float32, ``[..., N, N]``; zero rows are at distance 1."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - x @ x.transpose(-1, -2)


def _batched(features: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (features, False) if features.dim() == 3 else (features.unsqueeze(0), True)


def diverse_select_reference(features: torch.Tensor, budget: int, method: str = "max_min") -> torch.Tensor:
    """Indices (sorted ascending, int64) of ``min(budget, N)`` mutually distant rows of ``features``.

    ``features`` is ``[N, D]`` (returns ``[k]``) or ``[B, N, D]`` (returns ``[B, k]``, each image selected on
    its own). ``method`` is ``"max_min"`` (DivPrune) or ``"k_center"`` (ToDRE stage 1); see the module
    docstring for the first pick of each. ``budget >= N`` keeps every row.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import diverse_select
        >>> pts = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]])
        >>> diverse_select(pts, 2)          # the opposite pair, not token 0 and its near-twin 1
        tensor([0, 3])
    """
    _check_args(features, budget, method)
    x, single = _batched(features)
    B, N, _ = x.shape
    k = min(budget, N)
    if k == N:
        out = torch.arange(N, device=x.device).expand(B, N).clone()
        return out[0] if single else out
    dist = cosine_distances(x)
    rows = torch.arange(B, device=x.device)
    if method == "max_min":
        eye = torch.eye(N, dtype=torch.bool, device=x.device)
        nearest = dist.masked_fill(eye, float("inf")).amin(dim=-1)
        if N == 1:
            nearest = torch.zeros_like(nearest)
        first = nearest.argmax(dim=-1)
    else:
        first = dist.sum(dim=-1).argmin(dim=-1)
    picks = torch.empty(B, k, dtype=torch.long, device=x.device)
    picks[:, 0] = first
    running = dist[rows, first].clone()
    running[rows, first] = float("-inf")
    for step in range(1, k):
        nxt = running.argmax(dim=-1)  # torch returns the first maximum: ties go to the lowest index
        picks[:, step] = nxt
        running = torch.minimum(running, dist[rows, nxt])
        running[rows, nxt] = float("-inf")
    out = picks.sort(dim=-1).values
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------
# Triton: the whole greedy loop in one program per image
# ---------------------------------------------------------------------------------------------


def _greedy_kernel(
    dist_ptr, out_ptr,
    N, K,
    stride_b, stride_r, stride_c,
    MAX_MIN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < N
    base = dist_ptr + b * stride_b

    # First pick, from one pass over the rows (the matrix is symmetric, so row r's entries are column r's).
    if MAX_MIN:
        acc = tl.full((BLOCK_N,), float("inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
    for r in range(0, N):
        row = tl.load(base + r * stride_r + cols * stride_c, mask=valid, other=0.0)
        if MAX_MIN:
            acc = tl.minimum(acc, tl.where(cols == r, float("inf"), row))
        else:
            acc = acc + row
    if MAX_MIN:
        # A single token has no other token: its "nearest distance" is 0, and it is picked.
        acc = tl.where(acc == float("inf"), 0.0, acc)
        first = tl.argmax(tl.where(valid, acc, float("-inf")), axis=0, tie_break_left=True)
    else:
        first = tl.argmin(tl.where(valid, acc, float("inf")), axis=0, tie_break_left=True)

    out_row = out_ptr + b * K
    tl.store(out_row, first.to(tl.int64))
    running = tl.load(base + first * stride_r + cols * stride_c, mask=valid, other=0.0)
    running = tl.where(valid & (cols != first), running, float("-inf"))
    for step in range(1, K):
        nxt = tl.argmax(running, axis=0, tie_break_left=True)
        tl.store(out_row + step, nxt.to(tl.int64))
        row = tl.load(base + nxt * stride_r + cols * stride_c, mask=valid, other=0.0)
        # Kept tokens sit at -inf, and min(-inf, x) keeps them there.
        running = tl.where(cols == nxt, float("-inf"), tl.minimum(running, row))


@functools.lru_cache(maxsize=None)
def _kernel():
    global triton, tl
    import triton  # noqa: F811 - binds the module global the kernel reads
    import triton.language as tl  # noqa: F811

    return triton.jit(_greedy_kernel)


def diverse_select_triton(features: torch.Tensor, budget: int, method: str = "max_min") -> torch.Tensor:
    """Triton implementation of :func:`diverse_select_reference` (same signature and results).

    Three launches whatever the budget: the distance matrix (one batched matmul), the greedy loop (one
    program per image) and the final sort. Up to ``MAX_TRITON_TOKENS`` tokens per image.

    Example:
        >>> feats = torch.randn(8, 576, 4096, device="cuda", dtype=torch.bfloat16)   # doctest: +SKIP
        >>> diverse_select(feats, 64, backend="triton").shape                          # doctest: +SKIP
        torch.Size([8, 64])
    """
    _check_args(features, budget, method)
    x, single = _batched(features)
    B, N, _ = x.shape
    if N > MAX_TRITON_TOKENS:
        raise ValueError(f"diverse_select: the Triton kernel takes at most {MAX_TRITON_TOKENS} tokens per image, "
                         f"got {N}; call it with backend='torch' or split the image")
    k = min(budget, N)
    if k == N:
        out = torch.arange(N, device=x.device).expand(B, N).clone()
        return out[0] if single else out
    kernel = _kernel()
    dist = cosine_distances(x).contiguous()
    picks = torch.empty(B, k, dtype=torch.long, device=x.device)
    block = triton.next_power_of_2(N)
    warps = 8 if block >= 4096 else (4 if block >= 1024 else 1)
    kernel[(B,)](dist, picks, N, k, dist.stride(0), dist.stride(1), dist.stride(2),
                 MAX_MIN=method == "max_min", BLOCK_N=block, num_warps=warps)
    out = picks.sort(dim=-1).values
    return out[0] if single else out


diverse_select = register_kernel(
    "diverse_select",
    reference=diverse_select_reference,
    triton=diverse_select_triton,
    description="greedy farthest-point selection of budget tokens by cosine distance (DivPrune max-min, "
                "k-center), the whole loop in one launch",
)
