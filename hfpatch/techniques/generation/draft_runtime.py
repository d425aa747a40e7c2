"""How the draft model runs: as given, or as a private copy in another dtype and/or with packed oneDNN layers.

A draft's precision and kernels change only which tokens it proposes, never which tokens come out: the
target alone decides acceptance, so a cheaper draft keeps speculative `generate` exact. On a CPU the draft's
forwards are most of a step's cost (a 0.5B draft is a third of a 1.5B target), and two things make them
cheaper: bfloat16 weights halve the bytes read per forward, and oneDNN's packed inner product keeps a
forward over the 4-16 nodes of a DySpec round as cheap as one token (MKL's GEMM does not; see
`techniques/compute/onednn_linear.py`). Measured on the 2-core Xeon for Qwen2.5-Coder-0.5B, one core: fp32
default kernels 0.22 s (1 token) / 0.54 s (8 tokens) per forward, bfloat16 with packed layers 0.14 / 0.16 s.

The user's draft model is never modified: a requested change is made on a private copy, built tensor by
tensor in the new dtype (no second full-precision copy at any time) and dropped with the patch.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ...errors import PatchError
from ...kernels.onednn_linear import PackedLinear, onednn_available

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def copy_in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of `model` whose floating-point parameters and buffers are in `dtype`.

    Each tensor is converted once into the copy (tied weights stay tied: one source tensor, one copy); the
    peak extra memory is the copy itself.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) not in memo:
            data = param.detach().to(dtype) if param.is_floating_point() else param.detach().clone()
            memo[id(param)] = torch.nn.Parameter(data, requires_grad=False)
    for buffer in model.buffers():
        if id(buffer) not in memo:
            memo[id(buffer)] = buffer.to(dtype) if buffer.is_floating_point() else buffer.clone()
    clone = copy.deepcopy(model, memo)
    return clone.eval()


def prepare_draft(draft: torch.nn.Module, dtype: str | None, kernels: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module that drafts, and a description of how it runs (for `handle.stats`).

    `dtype`: None keeps the draft's own; "bfloat16" / "float32" drafts with a private copy in that dtype.
    `kernels`: "default" or "onednn" (packs the linear layers of a private copy; CPU drafts only).
    """
    own_dtype = next(draft.parameters()).dtype
    wanted = DTYPES[dtype] if dtype is not None else own_dtype
    if kernels == "default" and wanted == own_dtype:
        return draft, {"runtime": "the draft as given", "dtype": str(own_dtype).removeprefix("torch.")}
    if kernels == "onednn":
        device = next(draft.parameters()).device
        if device.type != "cpu":
            raise PatchError(f"draft_kernels='onednn' is for CPU drafts, but the draft is on {device}; leave "
                             "draft_kernels at 'default' there")
        ok, why = onednn_available(wanted)
        if not ok:
            raise PatchError(f"draft_kernels='onednn' cannot run here: {why}; set draft_kernels='default'")
    runner = copy_in_dtype(draft, wanted)
    info: dict[str, Any] = {"runtime": "a private copy (the given draft is untouched)",
                            "dtype": str(wanted).removeprefix("torch.")}
    if kernels == "onednn":
        counters = {"packed_calls": 0, "default_calls": 0, "repacks": 0}
        layers = [m for m in runner.modules() if type(m) is torch.nn.Linear]
        for module in layers:
            # the copy is private: its layers are replaced for good, nothing to restore
            module.forward = PackedLinear(module, counters)
        info.update(kernels="onednn", packed_layers=len(layers), counters=counters)
    return runner, info
