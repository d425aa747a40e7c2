"""Packed oneDNN linear layers: one `nn.Linear`'s forward through oneDNN's inner product on a weight reordered
once into its blocked layout (memory-bound up to a dozen tokens on a CPU, where MKL's GEMM is not).

Used by the `onednn_linear` technique (the target's layers) and by the draft model's private copy
(`techniques/generation/draft_runtime.py`).
"""
from __future__ import annotations

from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether this PyTorch build can run packed oneDNN linear layers in `dtype`, and why not."""
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN (mkldnn) support"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False, "this PyTorch build lacks torch.ops.mkldnn._linear_pointwise"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {dtype} is not supported (float32 or bfloat16)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "this CPU has no oneDNN bfloat16 support"
    return True, ""


class PackedLinear:
    """The replacement forward of one `nn.Linear` instance, holding its packed weight.

    Every call checks that the packed copy still matches the weight (same tensor, same in-place version, same
    storage, which `model.to()` changes) and that the call can use it; the checks are plain attribute reads
    because they run for every layer of every decoding step.
    """

    def __init__(self, module: torch.nn.Linear, counters: dict[str, int]):
        self.module = module
        self.original_forward = module.forward
        self.counters = counters
        self.pack()

    def pack(self) -> None:
        weight = self.module.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        # a reference, not an id: an id can be reused by a new tensor once the old one is freed
        self.source = weight
        self.version = weight._version
        self.data_ptr = weight.data_ptr()

    def stale(self) -> bool:
        weight = self.module.weight
        return weight is not self.source or weight._version != self.version or weight.data_ptr() != self.data_ptr

    @property
    def packed_bytes(self) -> int:
        weight = self.module.weight
        return weight.numel() * weight.element_size()

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's blocked tensor has no storage to copy or pickle. A copy of a patched model copies this
        # layer before the patcher restores the copy and applies the patch again with fresh packed layers
        # (see hfpatch.patcher); an empty slot would pack the copy's own weight on its first call.
        return {**self.__dict__, "packed": None, "source": None}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        needs_autograd = torch.is_grad_enabled() and (
            x.requires_grad or module.weight.requires_grad
            or (module.bias is not None and module.bias.requires_grad))
        if (needs_autograd or not x.is_cpu or not module.weight.is_cpu or x.dtype != module.weight.dtype
                or x.dtype not in SUPPORTED_DTYPES or torch.is_autocast_enabled("cpu")):
            self.counters["default_calls"] += 1
            return self.original_forward(x)
        if self.stale():
            self.pack()
            self.counters["repacks"] += 1
        self.counters["packed_calls"] += 1
        bias = module.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None if bias is None else bias.detach(),
                                                  "none", [], "")
