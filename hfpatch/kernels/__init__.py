"""Triton kernels (and a few compiled CPU kernels), each beside its pure-torch reference, behind one
dispatch rule.

Triton runs for CUDA tensors when triton is installed, a kernel's compiled CPU version (``cpu_build``)
for CPU tensors when it has one and it builds here, the reference everywhere else; override per call
with ``backend="auto"|"triton"|"cpu"|"torch"`` or for the whole process with the environment variable
``HFPATCH_KERNELS=torch``. Importing this package never imports triton nor compiles anything.

Example:
    >>> import torch
    >>> from hfpatch.kernels import logprob_gather, list_kernels
    >>> list_kernels()
    ['group_attention_scores', 'logprob_gather', 'lowrank_sparse_decode', 'sparse_decode_attention']
    >>> logprob_gather(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor([-1.3863, -1.3863])
"""
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    KernelOp,
    KernelUnavailableError,
    get_kernel,
    list_kernels,
    register_kernel,
    resolve_backend,
)
from .interpret import triton_available, triton_cpu_reason, triton_runs_on_cpu
from .cpu_build import CompiledKernel
from .logprob_gather import logprob_gather, logprob_gather_reference, logprob_gather_triton
from .sparse_decode import sparse_decode_attention, sparse_decode_attention_reference, sparse_decode_attention_triton
from .topk_select import (
    attention_with_scores,
    forced_positions,
    group_attention_scores,
    group_attention_scores_reference,
    group_attention_scores_triton,
    select_positions,
    with_forced_first,
)
from .lowrank_decode import lowrank_sparse_decode, lowrank_sparse_decode_reference

__all__ = [
    "BACKENDS",
    "CompiledKernel",
    "ENV_VAR",
    "KernelOp",
    "KernelUnavailableError",
    "attention_with_scores",
    "forced_positions",
    "get_kernel",
    "group_attention_scores",
    "group_attention_scores_reference",
    "group_attention_scores_triton",
    "list_kernels",
    "logprob_gather",
    "logprob_gather_reference",
    "logprob_gather_triton",
    "lowrank_sparse_decode",
    "lowrank_sparse_decode_reference",
    "register_kernel",
    "resolve_backend",
    "select_positions",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_triton",
    "triton_available",
    "triton_cpu_reason",
    "triton_runs_on_cpu",
    "with_forced_first",
]
