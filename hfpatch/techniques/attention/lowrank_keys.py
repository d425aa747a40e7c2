"""Approximate decode attention scores from low-rank keys (the idea of Loki, Singhania et al. 2024).

Keys of one KV head live close to a low-dimensional subspace, so q·k is well approximated by
(q P)·(k P) with P the top-``rank`` principal directions of that head's keys. Scoring every cached
position in that basis reads ``rank / head_dim`` of the key cache, cheap enough to re-select the
attended positions with the *current* query at every decode step.

Here the basis comes from the sequence itself: the uncentred principal directions of the keys cached
when a layer starts decoding a sequence (the prompt's keys, padding excluded, one basis per batch row
and KV head). The projected keys are kept in a buffer laid out ``[B, Hkv, rank, capacity]`` (a query
times it is one plain matrix product) and extended by the keys added since the previous step.
"""
from __future__ import annotations

import torch

from ...kernels import group_attention_scores


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
    """The projected key cache of one layer for one sequence.

    ``scores(query, key, valid, scale)`` returns ``[B, Hkv, S]`` like ``group_attention_scores`` (which
    computes it): the softmax probabilities of the approximate logits, summed over each KV group's query
    heads.
    """

    def __init__(self, key: torch.Tensor, valid: torch.Tensor | None, rank: int):
        batch, hkv, length, dim = key.shape
        self.rank = min(rank, dim)
        self.basis = principal_basis(key, valid, self.rank).to(key.dtype)
        self.buffer = key.new_empty(batch, hkv, self.rank, length + max(length // 2, 64))
        self.length = 0

    def _extend(self, key: torch.Tensor) -> None:
        length = key.shape[2]
        if length > self.buffer.shape[-1]:
            grown = self.buffer.new_empty(*self.buffer.shape[:3], length + length // 2)
            grown[..., :self.length] = self.buffer[..., :self.length]
            self.buffer = grown
        if length > self.length:
            new = key[:, :, self.length:length]  # [B, Hkv, n, D]
            self.buffer[..., self.length:length] = (new @ self.basis).transpose(-1, -2)
            self.length = length

    def scores(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None, scale: float) -> torch.Tensor:
        self._extend(key)
        batch, hq, dim = query.shape
        hkv = key.shape[1]
        projected_query = (query.to(self.basis.dtype).reshape(batch, hkv, hq // hkv, dim) @ self.basis)
        projected_keys = self.buffer[..., :key.shape[2]].transpose(-1, -2)  # [B, Hkv, S, rank] view
        return group_attention_scores(projected_query.reshape(batch, hq, self.rank), projected_keys, valid,
                                      scale=scale)
