"""Kernel registry and backend dispatch: the one way an hfpatch kernel op picks what runs.

Every op is registered with a pure-torch reference and one or more faster implementations, all with the
same signature. Each implementation has a backend name:

- ``"torch"``: the reference; runs on every device.
- ``"triton"``: a Triton kernel, for CUDA tensors (CPU tensors only under Triton's interpreter, for tests).
- ``"cpu"``: a :class:`CpuKernel`, for CPU tensors: NumPy or torch code written for the CPU, or a C++ kernel
  built on first use (``cpu_build.CompiledKernel``). It may take only some inputs (e.g. float32) and says
  which it rejects and why.

The registered op picks, per call:

1. the ``backend=`` argument of the call, when it is ``"triton"``, ``"cpu"`` or ``"torch"``;
2. else the ``HFPATCH_KERNELS`` environment variable (``auto`` | ``torch`` | ``triton`` | ``cpu``),
   read at every call so it can be flipped without re-importing;
3. else (``auto``) Triton for CUDA tensors when the op has it and triton is installed, the CPU
   implementation for CPU tensors when the op has one that can run here (built) and takes these inputs,
   the reference otherwise.

A named backend (from the argument or the environment variable) runs that implementation or raises
:class:`KernelUnavailableError` saying why; it never runs another one. Code that asks for one backend by
name (a test comparing them, a benchmark) gets it or an error. An explicit per-call backend wins over the
environment variable. Library code calls with the default ``backend="auto"``, so ``HFPATCH_KERNELS=torch``
turns every Triton and CPU implementation of hfpatch off at once.

What runs is what is reported: a call runs the implementation of the :class:`Choice` that
``op.choose(...)`` returns for the same arguments (``resolve_backend`` and ``explain`` give its backend
and reason), and no implementation hands a call on to another implementation of its op. (A reference may
call other ops, e.g. ``lowrank_sparse_decode``'s reference composes three; each of those dispatches itself.)

Triton is imported only when a Triton implementation actually runs.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .interpret import TRITON_INSTALL_HINT, triton_available, triton_cpu_reason

__all__ = [
    "BACKENDS",
    "Choice",
    "CpuKernel",
    "ENV_VAR",
    "KernelOp",
    "KernelUnavailableError",
    "get_kernel",
    "list_kernels",
    "register_kernel",
    "resolve_backend",
]

ENV_VAR = "HFPATCH_KERNELS"
BACKENDS = ("auto", "triton", "cpu", "torch")

# Device types Triton can compile for. torch reports ROCm GPUs as "cuda" too.
_TRITON_DEVICES = ("cuda",)


class KernelUnavailableError(RuntimeError):
    """Raised when ``backend="triton"`` (or ``"cpu"``) is requested but that implementation cannot run."""


@dataclass(frozen=True)
class Choice:
    """What a call runs: the backend (``"triton"``, ``"cpu"`` or ``"torch"``), why, and the implementation."""

    backend: str
    reason: str
    implementation: Callable[..., Any] = field(repr=False, compare=False)


def float32_cpu_problem(**tensors: torch.Tensor) -> str | None:
    """Why these named tensors are not all float32 CPU tensors (what the CPU implementations take), or None."""
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            return f"{name} is {tensor.dtype}: float32 only"
        if tensor.device.type != "cpu":
            return f"{name} is on {tensor.device.type}"
    return None


class CpuKernel:
    """A CPU implementation for ``register_kernel(..., cpu=...)``.

    ``function`` has the reference's signature and runs on CPU tensors. ``rejects`` (optional, the same
    signature) returns why these inputs are not for it (``"bfloat16 tensors: float32 only"``) or None; then
    ``auto`` runs the reference and ``backend="cpu"`` raises. ``function`` never hands a call on to the
    reference itself. ``cpu_build.CompiledKernel`` is the variant whose function calls a C++ kernel built on
    first use (:meth:`unavailable` says when it cannot be built).

    Example (as ``selection.py`` and ``attention_scores.py`` do it)::

        def my_op_cpu(x, *, k=1): ...                  # NumPy over x.numpy(), or torch ops for the CPU
        def my_op_cpu_rejects(x, *, k=1):
            return None if x.dtype == torch.float32 else f"{x.dtype}: float32 only"
        my_op = register_kernel("my_op", reference=my_op_reference, triton=None,
                                cpu=CpuKernel(my_op_cpu, rejects=my_op_cpu_rejects))
    """

    #: How dispatch's reasons name this kind of implementation.
    kind = "CPU implementation"

    def __init__(self, function: Callable[..., Any], *, rejects: Callable[..., str | None] | None = None):
        self.function = function
        self._rejects = rejects
        self.__signature__ = inspect.signature(function)
        functools.update_wrapper(self, function)

    def unavailable(self) -> str | None:
        """None when the implementation can run on this machine, else why not."""
        return None

    def rejects(self, *args: Any, **kwargs: Any) -> str | None:
        """Why it does not take these arguments (dtype, layout...), or None when it does."""
        return None if self._rejects is None else self._rejects(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<hfpatch CPU implementation {self.function.__name__}>"


def _env_backend() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value == "":
        return "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {', '.join(BACKENDS)}")
    return value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _triton_blocker(op: "KernelOp", device: torch.device | None) -> str | None:
    """Why the op's Triton implementation cannot run on tensors of this device, or None when it can."""
    if op.triton is None:
        return "this kernel has no Triton implementation"
    if not triton_available():
        return f"triton is not installed ({TRITON_INSTALL_HINT})"
    if device is None:
        return "the call has no tensor argument to take a device from"
    if device.type in _TRITON_DEVICES:
        return None
    if device.type == "cpu":
        return triton_cpu_reason()
    return f"Triton has no backend for {device.type!r} tensors"


def _cpu_blocker(op: "KernelOp", device: torch.device | None, args: tuple, kwargs: dict) -> str | None:
    """Why the op's CPU implementation cannot run this call, or None when it can."""
    if op.cpu is None:
        return "this kernel has no CPU implementation"
    if device is None or device.type != "cpu":
        return f"the {op.cpu.kind} runs on CPU tensors, not {getattr(device, 'type', 'no tensor')!r}"
    return op.cpu.unavailable() or op.cpu.rejects(*args, **kwargs)


def _choose(op: "KernelOp", device: torch.device | None, backend: str, args: tuple = (),
            kwargs: dict | None = None) -> Choice:
    kwargs = {} if kwargs is None else kwargs
    name = op.name
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    source = "backend argument"
    if backend == "auto":
        backend = _env_backend()
        source = f"{ENV_VAR} environment variable"
    if backend == "torch":
        return Choice("torch", f"requested by the {source}", op.reference)
    where = "tensors" if device is None else f"{device.type} tensors"
    if backend in ("triton", "cpu"):
        if backend == "triton":
            blocker, implementation = _triton_blocker(op, device), op.triton
        else:
            blocker, implementation = _cpu_blocker(op, device, args, kwargs), op.cpu
        if blocker is not None:
            raise KernelUnavailableError(
                f"{name}: backend {backend!r} (from the {source}) cannot run on {where}: {blocker}. "
                f"Use backend='auto' or 'torch' for the pure-torch reference."
            )
        return Choice(backend, f"requested by the {source}", implementation)
    # auto: Triton only where it is compiled for the device. The CPU interpreter is for tests,
    # far slower than the reference, so "auto" never picks it.
    if op.triton is not None and device is not None and device.type in _TRITON_DEVICES and triton_available():
        return Choice("triton", f"auto: {device.type} tensor and triton installed", op.triton)
    if op.cpu is not None and device is not None and device.type == "cpu":
        blocker = op.cpu.unavailable()
        if blocker is not None:
            return Choice("torch", f"auto: the {op.cpu.kind} is unavailable ({blocker})", op.reference)
        rejected = op.cpu.rejects(*args, **kwargs)
        if rejected is not None:
            return Choice("torch", f"auto: the {op.cpu.kind} does not take these inputs ({rejected})",
                          op.reference)
        return Choice("cpu", f"auto: cpu tensor and the {op.cpu.kind} takes these inputs", op.cpu)
    if device is None or device.type not in _TRITON_DEVICES:
        where = "no tensor" if device is None else f"{device.type} tensor"
        return Choice("torch", f"auto: {where}", op.reference)
    if op.triton is None:
        return Choice("torch", "auto: no Triton implementation", op.reference)
    return Choice("torch", "auto: triton not installed", op.reference)


def _same_signature(a: Callable, b: Callable) -> bool:
    pa = inspect.signature(a).parameters
    pb = inspect.signature(b).parameters
    return [(p.name, p.kind, p.default) for p in pa.values()] == [
        (p.name, p.kind, p.default) for p in pb.values()
    ]


class KernelOp:
    """A registered kernel: call it like its reference, plus ``backend=``.

    Attributes ``reference``, ``triton`` and ``cpu`` are the implementations (call them directly to
    bypass dispatch; ``triton`` or ``cpu`` may be None), ``backends`` the names of those it has, ``name``
    the registry key.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import logprob_gather
        >>> logits = torch.randn(2, 5); index = torch.tensor([0, 3])
        >>> logprob_gather(logits, index).shape                  # CPU tensor: the reference runs
        torch.Size([2])
        >>> logprob_gather.resolve_backend(logits, index)
        'torch'
        >>> logprob_gather.backends
        ('torch', 'triton')
    """

    def __init__(self, name: str, reference: Callable, triton: Callable | None, description: str = "",
                 cpu: CpuKernel | None = None):
        self.name = name
        self.reference = reference
        self.triton = triton
        self.cpu = cpu
        self.description = description or (inspect.getdoc(reference) or "").split("\n", 1)[0]
        functools.update_wrapper(self, reference)
        self.__name__ = self.__qualname__ = name
        # help() and IDEs show the reference's parameters plus the dispatch keyword.
        ref_sig = inspect.signature(reference)
        params = list(ref_sig.parameters.values())
        extra = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto")
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + [extra] + var_kw
        self.__signature__ = ref_sig.replace(parameters=params)

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this op has an implementation for: ``"torch"`` first, then ``"triton"``, ``"cpu"``."""
        return ("torch",) + tuple(name for name, impl in (("triton", self.triton), ("cpu", self.cpu))
                                  if impl is not None)

    def choose(self, *args: Any, backend: str = "auto", **kwargs: Any) -> Choice:
        """The :class:`Choice` a call with these arguments makes: backend, reason and the implementation that
        runs. Raises the same errors as the call itself (e.g. ``backend="triton"`` on a CPU tensor without the
        interpreter)."""
        device = getattr(_first_tensor(args, kwargs), "device", None)
        return _choose(self, device, backend, args, kwargs)

    def resolve_backend(self, *args: Any, backend: str = "auto", **kwargs: Any) -> str:
        """Which backend a call with these arguments would use: ``"triton"``, ``"cpu"`` or ``"torch"``.

        Raises the same errors as the call itself. Useful to record in stats what actually ran.
        """
        return self.choose(*args, backend=backend, **kwargs).backend

    def explain(self, *args: Any, backend: str = "auto", **kwargs: Any) -> str:
        """Like :meth:`resolve_backend`, with the reason: ``"torch (auto: cpu tensor)"``."""
        choice = self.choose(*args, backend=backend, **kwargs)
        return f"{choice.backend} ({choice.reason})"

    def __call__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> Any:
        return self.choose(*args, backend=backend, **kwargs).implementation(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<hfpatch kernel {self.name!r}>"


_REGISTRY: dict[str, KernelOp] = {}


def register_kernel(
    name: str, *, reference: Callable, triton: Callable | None, description: str = "", replace: bool = False,
    cpu: CpuKernel | None = None,
) -> KernelOp:
    """Register a Triton implementation and/or a CPU one beside the pure-torch reference; return the op.

    All callables must have the same signature (checked here), must not take a ``backend``
    parameter (the op adds it), and the Triton one must import triton itself, lazily, so that
    importing hfpatch never imports triton. A ``cpu`` implementation is a :class:`CpuKernel`
    (or a ``cpu_build.CompiledKernel``, which builds its C++ source on first use and says when it cannot).
    No implementation may call another implementation of the same op: dispatch reports what runs.

    Example (how ``logprob_gather.py`` does it)::

        def my_op_reference(x, *, scale=1.0): ...      # pure torch
        def my_op_triton(x, *, scale=1.0): ...         # imports triton inside, launches the kernel
        my_op = register_kernel("my_op", reference=my_op_reference, triton=my_op_triton)
        y = my_op(x)                                   # Triton on CUDA, the reference elsewhere
        y = my_op(x, backend="torch")                  # force the reference for this call
    """
    if not name or not isinstance(name, str):
        raise ValueError("kernel name must be a non-empty string")
    if "backend" in inspect.signature(reference).parameters:
        raise TypeError(f"kernel {name!r}: 'backend' is reserved for dispatch; rename the parameter")
    if triton is None and cpu is None:
        raise TypeError(f"kernel {name!r}: give a Triton implementation, a CPU one, or both")
    if cpu is not None and not isinstance(cpu, CpuKernel):
        raise TypeError(f"kernel {name!r}: cpu= takes a CpuKernel (or a cpu_build.CompiledKernel), got {cpu!r}")
    for label, impl in (("Triton", triton), ("CPU", cpu)):
        if impl is not None and not _same_signature(reference, impl):
            raise TypeError(
                f"kernel {name!r}: the {label} implementation's signature {inspect.signature(impl)} "
                f"differs from the reference's {inspect.signature(reference)}"
            )
    if name in _REGISTRY and not replace:
        existing = _REGISTRY[name]
        if existing.reference is reference and existing.triton is triton and existing.cpu is cpu:
            return existing
        raise ValueError(f"kernel {name!r} is already registered (pass replace=True to override)")
    op = KernelOp(name, reference, triton, description, cpu=cpu)
    _REGISTRY[name] = op
    return op


def get_kernel(name: str) -> KernelOp:
    """The registered op called ``name``.

    Example:
        >>> from hfpatch.kernels import get_kernel
        >>> get_kernel("logprob_gather").name
        'logprob_gather'
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"no kernel named {name!r} (registered: {known})") from None


def list_kernels() -> list[str]:
    """Names of all registered kernels, sorted.

    Example:
        >>> from hfpatch.kernels import list_kernels
        >>> "logprob_gather" in list_kernels()
        True
    """
    return sorted(_REGISTRY)


def resolve_backend(name: str, *args: Any, backend: str = "auto", **kwargs: Any) -> str:
    """Which backend kernel ``name`` would use for these arguments (``"triton"``/``"cpu"``/``"torch"``).

    Example:
        >>> import torch
        >>> from hfpatch.kernels import resolve_backend
        >>> resolve_backend("logprob_gather", torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))
        'torch'
    """
    return get_kernel(name).resolve_backend(*args, backend=backend, **kwargs)
