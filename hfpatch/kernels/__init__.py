"""Triton kernels, each beside its pure-torch reference, behind one dispatch rule.

Triton runs for CUDA tensors when triton is installed, the reference everywhere else; override per
call with ``backend="auto"|"triton"|"torch"`` or for the whole process with the environment
variable ``HFPATCH_KERNELS=torch``. Importing this package never imports triton.

Example:
    >>> import torch
    >>> from hfpatch.kernels import logprob_gather, list_kernels
    >>> list_kernels()
    ['group_attention_scores', 'logprob_gather', 'sparse_decode_attention']
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
from .logprob_gather import logprob_gather, logprob_gather_reference, logprob_gather_triton
from .sparse_decode import sparse_decode_attention, sparse_decode_attention_reference, sparse_decode_attention_triton
from .topk_select import (
    group_attention_scores,
    group_attention_scores_reference,
    group_attention_scores_triton,
    select_positions,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KernelOp",
    "KernelUnavailableError",
    "get_kernel",
    "group_attention_scores",
    "group_attention_scores_reference",
    "group_attention_scores_triton",
    "list_kernels",
    "logprob_gather",
    "logprob_gather_reference",
    "logprob_gather_triton",
    "register_kernel",
    "resolve_backend",
    "select_positions",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_triton",
    "triton_available",
    "triton_cpu_reason",
    "triton_runs_on_cpu",
]
