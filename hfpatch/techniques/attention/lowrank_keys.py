"""Approximate decode attention scores from low-rank keys (the idea of Loki, Singhania et al. 2024).

Keys of one KV head live close to a low-dimensional subspace, so q·k is well approximated by
(q P)·(k P) with P the top-``rank`` principal directions of that head's keys. Scoring every cached
position in that basis reads ``rank / head_dim`` of the key cache, cheap enough to re-select the
attended positions with the *current* query at every decode step.

Here the basis comes from the sequence itself: the uncentred principal directions of the keys cached
when a layer starts decoding a sequence (the prompt's keys, padding excluded, one basis per batch row
and KV head). The projected keys are kept in a buffer laid out ``[B, Hkv, rank, capacity]`` (a query
times it is one plain matrix product) and extended by the keys added since the previous step; the
projection of those keys, the scoring, selection and attention of a step are one kernel,
``kernels.lowrank_sparse_decode``.
"""
from __future__ import annotations

import torch


#: keys the basis is estimated from at most (evenly strided over the cache): a D x D Gram matrix is well
#: estimated from a few thousand keys, and over all of an 8k cache it cost ~1.3 ms per layer on 2 cores
BASIS_SAMPLE = 2048


def principal_basis(key: torch.Tensor, valid: torch.Tensor | None, rank: int) -> torch.Tensor:
    """``[B, Hkv, D, rank]`` orthonormal columns: the top-``rank`` eigenvectors of each head's key Gram
    matrix (uncentred PCA of the valid cached keys; of every n-th one past ``BASIS_SAMPLE`` keys)."""
    step = max(1, key.shape[2] // BASIS_SAMPLE)
    k = key[:, :, ::step].float()
    if valid is not None:
        k = k * valid[:, None, ::step, None]
    gram = k.transpose(-1, -2) @ k  # [B, Hkv, D, D]
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[..., -rank:].flip(-1).contiguous()


class LowRankKeys:
    """The projected key cache of one layer for one sequence: ``basis`` [B, Hkv, D, rank] and a buffer
    of the cached keys in that basis, laid out ``[B, Hkv, rank, capacity]`` (the layout
    ``lowrank_sparse_decode`` scores from). The keys cached at creation are projected here, once; the
    ones added later are projected by the kernel itself, which ``projected`` tells how many there are.
    """

    def __init__(self, key: torch.Tensor, valid: torch.Tensor | None, rank: int):
        batch, hkv, length, dim = key.shape
        self.rank = min(rank, dim)
        self.basis = principal_basis(key, valid, self.rank).to(key.dtype)
        self.buffer = key.new_empty(batch, hkv, self.rank, length + max(length // 2, 64))
        self.buffer[..., :length] = (key @ self.basis).transpose(-1, -2)
        self.length = length

    def projected(self, key: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(buffer view [B, Hkv, rank, S], fresh)``: the last ``fresh`` positions are not projected yet
        (the caller's kernel writes them); the buffer grows, keeping what it holds, past its capacity."""
        length = key.shape[2]
        if length > self.buffer.shape[-1]:
            grown = self.buffer.new_empty(*self.buffer.shape[:3], length + length // 2)
            grown[..., :self.length] = self.buffer[..., :self.length]
            self.buffer = grown
        fresh = max(length - self.length, 0)
        self.length = length
        return self.buffer[..., :length], fresh
