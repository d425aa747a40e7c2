"""Batched orthogonal matching pursuit (OMP) in torch.

`omp(targets, atoms, k)` expresses each row of `targets` [B, d] as a combination of at most k rows of
`atoms` [N, d]: greedily pick the atom most correlated with the residual (atoms compared at unit norm),
refit all picked coefficients by least squares (optionally ridge), repeat. Everything is batched over
targets and works from inner products only (the Batch-OMP formulation): the picked atoms are orthonormalised
as they come (a progressive Cholesky factor of their gram), so each step is a few batched kernels.

For large dictionaries `candidates=M` first screens the M atoms most correlated with each target and runs
the pursuit over those only (exact OMP when M >= N); that keeps a 262k-token vocabulary in minutes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def _omp_batch(dy: torch.Tensor, gram: torch.Tensor, y_sq: torch.Tensor, k: int, tol: float, ridge: float = 0.0):
    """OMP for one batch over unit-norm atoms, from inner products only (Batch-OMP, Rubinstein et al. 2008).

    `dy` [B, M]: each target's inner products with its M atoms; `gram` [B, M, M] (or [M, M] when every
    target shares the atoms): the atoms' inner products; `y_sq` [B]: squared target norms.

    The picked atoms are orthonormalised as they come (Gram-Schmidt, i.e. a progressive Cholesky factor L
    of their gram, `gram[I, I] = L L^T`), carried out in correlation space: `proj[:, i, :]` holds every
    atom's inner product with the i-th orthonormal direction. The new row of L is then a gather from
    `proj` (no triangular solve per step), the target's coordinate on the new direction is its current
    correlation with the new atom divided by L's diagonal, and the correlations of the residual drop by
    that coordinate times the new direction's row. Each step costs O(M * j) per target with a handful of
    batched kernels; the coefficients come from one triangular solve `L^T x = z` at the end.
    """
    B, M = dy.shape
    shared = gram.dim() == 2
    k = min(k, M)
    dtype, device = dy.dtype, dy.device
    rows = torch.arange(B, device=device)
    idx = torch.zeros(B, k, dtype=torch.long, device=device)
    chol = torch.zeros(B, k, k, dtype=dtype, device=device)  # L: rows [w, diag] of the picked atoms
    z = torch.zeros(B, k, dtype=dtype, device=device)  # the target's coordinates on the orthonormal directions
    proj = torch.zeros(B, k, M, dtype=dtype, device=device)  # every atom against each orthonormal direction
    used = torch.zeros(B, M, dtype=torch.bool, device=device)
    ok = torch.ones(B, dtype=torch.bool, device=device)
    corr = dy.clone()  # the residual's correlations with every atom
    residual_sq = y_sq.clone()
    n = k
    for j in range(k):
        best = corr.abs().masked_fill_(used, -1.0).argmax(dim=1)
        idx[:, j] = best
        used[rows, best] = True
        col = gram[best] if shared else gram[rows, best]  # [B, M]: the new atom against every atom
        if j:
            w = proj[:, :j, :].gather(2, best[:, None, None].expand(B, j, 1))[..., 0]  # L^-1 gram[I, new]
            diag_sq = 1.0 + ridge - (w * w).sum(dim=1)
        else:
            w = None
            diag_sq = torch.full((B,), 1.0 + ridge, dtype=dtype, device=device)
        # A target whose new atom is numerically dependent on its earlier ones keeps its fit so far (this and
        # every later atom get coefficient 0); the residual cannot shrink further in that span anyway.
        ok &= diag_sq > 1e-9
        diag = torch.where(ok, diag_sq.clamp_min(1e-9).sqrt(), torch.ones_like(diag_sq))
        chol[:, j, j] = diag
        if j:
            w = w * ok[:, None]
            chol[:, j, :j] = w
            col = col - torch.bmm(w[:, None, :], proj[:, :j, :])[:, 0]
        scale = torch.where(ok, 1.0 / diag, torch.zeros_like(diag))
        proj[:, j, :] = col * scale[:, None]
        z[:, j] = corr[rows, best] * scale
        corr -= z[:, j, None] * proj[:, j, :]
        residual_sq -= z[:, j] * z[:, j]  # exact without ridge; with it, an upper bound of the fit's gain
        if not ridge and bool((residual_sq <= (tol ** 2) * y_sq).all()):
            n = j + 1
            break
    coef = torch.linalg.solve_triangular(chol[:, :n, :n].transpose(1, 2), z[:, :n, None], upper=True)[..., 0]
    return idx[:, :n], coef


@torch.no_grad()
def omp(
    targets: torch.Tensor,
    atoms: torch.Tensor,
    k: int = 64,
    *,
    candidates: int | None = None,
    batch_size: int = 256,
    tol: float = 1e-7,
    ridge: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes of `targets` [B, d] over `atoms` [N, d]: (indices [B, k'] into atoms, coefficients [B, k']).

    `targets ≈ (coefficients[..., None] * atoms[indices]).sum(1)` with at most k non-zero coefficients per
    row (k' = min(k, N, d); rows solved exactly earlier carry zero coefficients). Atom selection compares
    unit-norm atoms, as in scikit-learn's `orthogonal_mp`; the coefficients are for the atoms as given.
    `candidates` limits each target's search to its most correlated atoms (None: all). `ridge` adds that much
    to the unit atoms' gram diagonal in every least-squares refit (0: plain OMP). `progress(n)` is
    called after each batch with the number of targets done in it.

    Example:
        >>> idx, coef = omp(y, dictionary, k=8)
        >>> approx = torch.einsum("bk,bkd->bd", coef, dictionary[idx])
    """
    if targets.dim() != 2 or atoms.dim() != 2 or targets.shape[1] != atoms.shape[1]:
        raise ValueError(f"omp: targets [B, d] and atoms [N, d] must share d; got {tuple(targets.shape)} and "
                         f"{tuple(atoms.shape)}")
    if k < 1:
        raise ValueError(f"omp: k must be >= 1, got {k}")
    dtype = torch.float64 if targets.dtype == torch.float64 else torch.float32
    atoms = atoms.to(dtype)
    norms = atoms.norm(dim=1).clamp_min(1e-30)
    unit = atoms / norms[:, None]
    N, d = atoms.shape
    screened = candidates is not None and candidates < N
    k_eff = min(k, candidates if screened else N)
    shared_gram = None if screened else unit @ unit.T
    all_idx = torch.zeros(targets.shape[0], k_eff, dtype=torch.long)
    all_coef = torch.zeros(targets.shape[0], k_eff, dtype=dtype)
    for start in range(0, targets.shape[0], batch_size):
        y = targets[start:start + batch_size].to(dtype)
        dy = y @ unit.T
        if screened:
            screen = dy.abs().topk(candidates, dim=1).indices  # [b, M]
            picked = unit[screen]
            gram = torch.bmm(picked, picked.transpose(1, 2))
            idx, coef = _omp_batch(dy.gather(1, screen), gram, (y * y).sum(1), k_eff, tol, ridge)
            idx = screen.gather(1, idx)
        else:
            idx, coef = _omp_batch(dy, shared_gram, (y * y).sum(1), k_eff, tol, ridge)
        # Coefficients were fitted on unit atoms; rescale them for the atoms as given.
        all_idx[start:start + len(y), : idx.shape[1]] = idx
        all_coef[start:start + len(y), : coef.shape[1]] = coef / norms[idx]
        if progress is not None:
            progress(len(y))
    return all_idx, all_coef


def apply_codes(indices: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """`sum_j coefficients[:, j] * rows[indices[:, j]]`: the same sparse codes applied to another space's rows."""
    out = torch.empty(indices.shape[0], rows.shape[1], dtype=rows.dtype)
    for start in range(0, indices.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        out[sl] = torch.einsum("bk,bkd->bd", coefficients[sl].to(torch.float32),
                               rows[indices[sl]].to(torch.float32)).to(rows.dtype)
    return out
