"""Launch sizes shared by the Triton wrappers: how many programs keep a device busy.

The split-K kernels (``sparse_decode_attention``, ``group_attention_scores``) cut the positions of each
(batch row, KV head) into slices so that a decode step with few heads still fills the GPU.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["sm_count", "target_programs"]


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (the current device when it has no index); cached."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def target_programs(device: torch.device) -> int:
    """How many programs a split-K launch aims for: two per multiprocessor on CUDA (one runs while the next
    waits), 4 elsewhere (Triton's CPU interpreter, where only correctness matters)."""
    return 2 * sm_count(device) if device.type == "cuda" else 4
