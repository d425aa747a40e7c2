"""Piece-based initialisations of new-token rows: TokenAdapt's local/global hybrid, and the plain mean.

Each new token comes with its decomposition into old tokens (`alignment.Alignment.pieces`).

- `mean`: the mean of the old pieces' rows.
- TokenAdapt (local + global, training-free):
  - local: a softmax-weighted mean of the pieces' rows; a piece's logit is (its cosine similarity to the
    pieces' mean + its share of the token's bytes) / temperature, so long pieces that agree with the
    whole count most;
  - global: the `global_k` old tokens most similar (cosine) to the local estimate, softmax-weighted by
    similarity / temperature, in the model's own embedding space (or in an external space given as
    `space`, a [old_vocab, d'] matrix, with queries in the same space);
  - hybrid: `local_weight * local + (1 - local_weight) * global` (0.7 / 0.3 as in the paper).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def pad_pieces(pieces: list[list[int]], max_pieces: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, P] piece ids (0-padded) and a [T, P] mask; longer decompositions are cut at `max_pieces`."""
    width = max(1, min(max_pieces, max((len(p) for p in pieces), default=1)))
    ids = torch.zeros(len(pieces), width, dtype=torch.long)
    mask = torch.zeros(len(pieces), width, dtype=torch.bool)
    for row, p in enumerate(pieces):
        p = p[:width]
        if p:
            ids[row, : len(p)] = torch.tensor(p)
            mask[row, : len(p)] = True
    return ids, mask


def _by_chunks(fn: Callable[[slice], torch.Tensor], total: int, width: int, chunk: int = 4096) -> torch.Tensor:
    """Concatenate fn(rows) over row chunks: the [T, P, d] gathers below would need tens of GiB at once for a
    262k vocabulary whose longest tokens have 64 pieces."""
    return torch.cat([fn(slice(s, s + chunk)) for s in range(0, total, chunk)]) if total else \
        torch.zeros(0, width)


def mean_of_pieces(rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the piece rows per token ([T, d]); a token without pieces gets the mean of all rows."""
    overall = rows.float().mean(dim=0)

    def part(sl: slice) -> torch.Tensor:
        m = mask[sl]
        picked = rows[ids[sl]].float() * m[..., None]
        count = m.sum(dim=1, keepdim=True)
        out = picked.sum(dim=1) / count.clamp_min(1)
        out[count[:, 0] == 0] = overall
        return out

    return _by_chunks(part, ids.shape[0], rows.shape[1])


def local_estimate(rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, piece_len: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """TokenAdapt's local estimate: pieces weighted by similarity to the whole and by relative length."""
    def part(sl: slice) -> torch.Tensor:
        m = mask[sl]
        picked = rows[ids[sl]].float()  # [t, P, d]
        mean = mean_of_pieces(rows, ids[sl], m)
        sim = torch.nn.functional.cosine_similarity(picked, mean[:, None, :], dim=-1)  # [t, P]
        lengths = piece_len[sl].float()
        share = lengths / lengths.sum(dim=1, keepdim=True).clamp_min(1)
        logits = ((sim + share) / temperature).masked_fill(~m, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)
        out = (weights[..., None] * picked).sum(dim=1)
        empty = ~m.any(dim=1)
        out[empty] = mean[empty]
        return out

    return _by_chunks(part, ids.shape[0], rows.shape[1])


def global_estimate(queries: torch.Tensor, space: torch.Tensor, rows: torch.Tensor, top_k: int, temperature: float,
                    *, exclude: torch.Tensor | None = None, batch_size: int = 1024,
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Softmax-weighted mean of the `rows` of the `top_k` old tokens whose `space` vectors are most similar
    (cosine) to each query. `exclude` marks old tokens never to use (e.g. special tokens)."""
    unit = torch.nn.functional.normalize(space.float(), dim=1)
    out = torch.empty(queries.shape[0], rows.shape[1], dtype=torch.float32)
    for start in range(0, queries.shape[0], batch_size):
        q = torch.nn.functional.normalize(queries[start:start + batch_size].float(), dim=1)
        sim = q @ unit.T
        if exclude is not None:
            sim[:, exclude] = float("-inf")
        top = sim.topk(min(top_k, sim.shape[1]), dim=1)
        weights = torch.softmax(top.values / temperature, dim=1)
        out[start:start + len(q)] = torch.einsum("bk,bkd->bd", weights, rows[top.indices].float())
        if progress is not None:
            progress(len(q))
    return out


def tokenadapt(rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, piece_len: torch.Tensor, *,
               temperature: float = 0.5, global_k: int = 3, local_weight: float = 0.7,
               space: torch.Tensor | None = None, queries: torch.Tensor | None = None,
               exclude: torch.Tensor | None = None, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """TokenAdapt's hybrid estimate of new rows ([T, d]) from the old `rows` [old_vocab, d]."""
    local = local_estimate(rows, ids, mask, piece_len, temperature)
    if local_weight >= 1.0:
        return local
    if space is None:
        space, queries = rows, local
    elif queries is None:
        raise ValueError("tokenadapt: an external similarity space needs queries in that space")
    glob = global_estimate(queries, space, rows, global_k, temperature, exclude=exclude, progress=progress)
    return local_weight * local + (1.0 - local_weight) * glob
