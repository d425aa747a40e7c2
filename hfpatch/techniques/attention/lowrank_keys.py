"""Approximate decode attention scores from low-rank keys (the idea of Loki, Singhania et al. 2024).

Keys of one KV head live close to a low-dimensional subspace, so q·k is well approximated by
(q P)·(k P) with P the top-``rank`` principal directions of that head's keys. Scoring every cached
position in that basis reads ``rank / head_dim`` of the key cache, cheap enough to re-select the
attended positions with the *current* query at every decode step.

Here the basis comes from the sequence itself: the uncentred principal directions of the keys cached
when a layer starts decoding a sequence (the prompt's keys, padding excluded, one basis per batch row
and KV head). The projected keys are kept in a buffer laid out ``[B, Hkv, rank, capacity]`` (a query
times it is one plain matrix product) and extended by the keys added since the previous step; the
scoring, selection and attention of a step are one kernel, ``kernels.lowrank_sparse_decode``.
"""
from __future__ import annotations

import torch


def principal_basis(key: torch.Tensor, valid: torch.Tensor | None, rank: int) -> torch.Tensor:
    """``[B, Hkv, D, rank]`` orthonormal columns: the top-``rank`` eigenvectors of each head's key Gram
    matrix (uncentred PCA of the valid cached keys)."""
    k = key.float()
    if valid is not None:
        k = k * valid[:, None, :, None]
    gram = k.transpose(-1, -2) @ k  # [B, Hkv, D, D]
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[..., -rank:].flip(-1).contiguous()


class LowRankKeys:
    """The projected key cache of one layer for one sequence: ``basis`` [B, Hkv, D, rank] and, from
    ``projected(key)``, the cached keys in that basis as a ``[B, Hkv, rank, S]`` view (the layout
    ``lowrank_sparse_decode`` scores from), extended by the keys added since the previous call.
    """

    def __init__(self, key: torch.Tensor, valid: torch.Tensor | None, rank: int):
        batch, hkv, length, dim = key.shape
        self.rank = min(rank, dim)
        self.basis = principal_basis(key, valid, self.rank).to(key.dtype)
        self.buffer = key.new_empty(batch, hkv, self.rank, length + max(length // 2, 64))
        self.length = 0

    def projected(self, key: torch.Tensor) -> torch.Tensor:
        length = key.shape[2]
        if length > self.buffer.shape[-1]:
            grown = self.buffer.new_empty(*self.buffer.shape[:3], length + length // 2)
            grown[..., :self.length] = self.buffer[..., :self.length]
            self.buffer = grown
        if length > self.length:
            new = key[:, :, self.length:length]  # [B, Hkv, n, D]
            self.buffer[..., self.length:length] = (new @ self.basis).transpose(-1, -2)
            self.length = length
        return self.buffer[..., :length]
