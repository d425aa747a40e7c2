"""hfpatch's kernel ops: each a pure-torch reference plus faster implementations of the same signature,
behind one dispatch (``dispatch.py``) that picks one per call and reports which and why.

Ops, with their implementations (``torch`` = the reference; ``triton`` for CUDA tensors; ``cpu`` for CPU
tensors):

- ``attention_with_column_sums``: softmax attention plus the attention each key received; torch, triton
- ``diverse_select``: greedy farthest-point (max-min / k-center) token selection in one launch; torch, triton
- ``group_attention_scores``: a decode step's softmax probabilities summed per KV group; torch, triton
- ``linear_logprob``: log-prob of each row's label under ``hidden @ weight.T`` in vocabulary tiles, never the
  ``[N, V]`` logits (+ the per-position KL to a reference for TDPO); torch, triton, cpu (tiled torch)
- ``logprob_gather``: log-softmax and gather of one token per row; torch, triton
- ``lowrank_sparse_decode``: low-rank re-selection + exact sparse attention; torch, cpu (compiled C++)
- ``scored_attention``: a step's full attention and its group scores; torch, cpu (one pass, float32)
- ``select_positions``: the top-``budget`` positions, forced ones in; torch, cpu (NumPy)
- ``sparse_decode_attention``: attention over an index set of the cache; torch, triton, cpu (compiled C++)

Modules: ``logprob_gather``, ``linear_logprob``, ``sparse_decode`` and ``lowrank_decode`` hold the ops of those
names, ``diverse_select`` and ``vision_attention`` (``attention_with_column_sums``) serve visual-token pruning,
``attention_scores`` the attention scores used to choose positions (``group_attention_scores``,
``scored_attention``), ``selection`` the choice itself (``select_positions``); ``dispatch`` is the registry,
``cpu_build`` builds the C++ sources of ``csrc/``, ``interpret`` says whether Triton can run here and
``launch`` sizes Triton grids. Helpers that are not ops (one torch implementation): ``forced_positions``,
``with_forced_first`` and ``attention_with_scores`` (``scored_attention`` where it runs in one pass, else None).

Auto dispatch runs Triton for CUDA tensors when triton is installed, an op's CPU implementation for CPU
tensors when it has one that builds here and takes the inputs, the reference everywhere else; override per
call with ``backend="auto"|"triton"|"cpu"|"torch"`` or for the whole process with the environment variable
``HFPATCH_KERNELS=torch``. A named backend runs or raises ``KernelUnavailableError``, never another
implementation. Importing this package never imports triton nor compiles anything.

Example:
    >>> import torch
    >>> from hfpatch.kernels import get_kernel, list_kernels, logprob_gather
    >>> list_kernels()  # doctest: +NORMALIZE_WHITESPACE
    ['attention_with_column_sums', 'diverse_select', 'group_attention_scores', 'linear_logprob',
     'logprob_gather', 'lowrank_sparse_decode', 'scored_attention', 'select_positions',
     'sparse_decode_attention']
    >>> get_kernel("select_positions").backends
    ('torch', 'cpu')
    >>> logprob_gather(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor([-1.3863, -1.3863])
    >>> logprob_gather.explain(torch.zeros(2, 4), torch.tensor([0, 3]))   # HFPATCH_KERNELS unset
    'torch (auto: cpu tensor)'
"""
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    Choice,
    CpuKernel,
    KernelOp,
    KernelUnavailableError,
    get_kernel,
    list_kernels,
    register_kernel,
    resolve_backend,
)
from .interpret import triton_available, triton_cpu_reason, triton_runs_on_cpu
from .cpu_build import CompiledKernel
from .launch import sm_count
from .logprob_gather import logprob_gather, logprob_gather_reference, logprob_gather_triton
from .linear_logprob import linear_logprob, linear_logprob_cpu, linear_logprob_reference, linear_logprob_triton
from .sparse_decode import sparse_decode_attention, sparse_decode_attention_reference, sparse_decode_attention_triton
from .attention_scores import (
    attention_with_scores,
    group_attention_scores,
    group_attention_scores_reference,
    group_attention_scores_triton,
    scored_attention,
    scored_attention_reference,
)
from .selection import forced_positions, select_positions, select_positions_reference, with_forced_first
from .lowrank_decode import lowrank_sparse_decode, lowrank_sparse_decode_reference
from .diverse_select import diverse_select, diverse_select_reference, diverse_select_triton
from .vision_attention import (
    attention_with_column_sums,
    attention_with_column_sums_reference,
    attention_with_column_sums_triton,
)

__all__ = [
    "BACKENDS",
    "Choice",
    "CompiledKernel",
    "CpuKernel",
    "ENV_VAR",
    "KernelOp",
    "KernelUnavailableError",
    "attention_with_column_sums",
    "attention_with_column_sums_reference",
    "attention_with_column_sums_triton",
    "attention_with_scores",
    "diverse_select",
    "diverse_select_reference",
    "diverse_select_triton",
    "forced_positions",
    "get_kernel",
    "group_attention_scores",
    "group_attention_scores_reference",
    "group_attention_scores_triton",
    "linear_logprob",
    "linear_logprob_cpu",
    "linear_logprob_reference",
    "linear_logprob_triton",
    "list_kernels",
    "logprob_gather",
    "logprob_gather_reference",
    "logprob_gather_triton",
    "lowrank_sparse_decode",
    "lowrank_sparse_decode_reference",
    "register_kernel",
    "resolve_backend",
    "scored_attention",
    "scored_attention_reference",
    "select_positions",
    "select_positions_reference",
    "sm_count",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_triton",
    "triton_available",
    "triton_cpu_reason",
    "triton_runs_on_cpu",
    "with_forced_first",
]
