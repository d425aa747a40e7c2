"""Kernel registry and backend dispatch.

Every kernel is registered together with a pure-torch reference that has the same signature, plus a
Triton implementation (GPU), a compiled CPU one (``cpu_build``), or both. The registered op picks, per
call:

1. the ``backend=`` argument of the call, when it is ``"triton"``, ``"cpu"`` or ``"torch"``;
2. else the ``HFPATCH_KERNELS`` environment variable (``auto`` | ``torch`` | ``triton`` | ``cpu``),
   read at every call so it can be flipped without re-importing;
3. else (``auto``) Triton for CUDA tensors when triton is installed, the compiled CPU kernel for CPU
   tensors when the op has one and it builds on this machine, the reference otherwise.

An explicit per-call backend wins over the environment variable: code that asks for one backend by
name (a test comparing both, a benchmark) must get it or an error, never the other one silently.
Library code calls with the default ``backend="auto"``, so ``HFPATCH_KERNELS=torch`` turns every
Triton and compiled CPU kernel of hfpatch off at once.

Triton is imported only when a Triton implementation actually runs.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .interpret import TRITON_INSTALL_HINT, triton_available, triton_cpu_reason

__all__ = [
    "BACKENDS",
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
    """Raised when ``backend="triton"`` (or ``"cpu"``) is requested but that kernel cannot run."""


@dataclass(frozen=True)
class _Choice:
    backend: str  # "triton", "cpu" or "torch"
    reason: str


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


def _triton_blocker(device: torch.device | None) -> str | None:
    """Why Triton cannot run on tensors of this device, or None when it can."""
    if not triton_available():
        return f"triton is not installed ({TRITON_INSTALL_HINT})"
    if device is None:
        return "the call has no tensor argument to take a device from"
    if device.type in _TRITON_DEVICES:
        return None
    if device.type == "cpu":
        return triton_cpu_reason()
    return f"Triton has no backend for {device.type!r} tensors"


def _cpu_blocker(op: "KernelOp", device: torch.device | None) -> str | None:
    """Why the op's compiled CPU kernel cannot run on tensors of this device, or None when it can."""
    if op.cpu is None:
        return "this kernel has no compiled CPU implementation"
    if device is None or device.type != "cpu":
        return f"the compiled kernel runs on CPU tensors, not {getattr(device, 'type', 'no tensor')!r}"
    return op.cpu.unavailable()


def _choose(op: "KernelOp", device: torch.device | None, backend: str) -> _Choice:
    name = op.name
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    source = "backend argument"
    if backend == "auto":
        backend = _env_backend()
        source = f"{ENV_VAR} environment variable"
    if backend == "torch":
        return _Choice("torch", f"requested by the {source}")
    where = "tensors" if device is None else f"{device.type} tensors"
    if backend == "triton":
        blocker = "this kernel has no Triton implementation" if op.triton is None else _triton_blocker(device)
        if blocker is not None:
            raise KernelUnavailableError(
                f"{name}: backend 'triton' (from the {source}) cannot run on {where}: {blocker}. "
                f"Use backend='auto' or 'torch' for the pure-torch reference."
            )
        return _Choice("triton", f"requested by the {source}")
    if backend == "cpu":
        blocker = _cpu_blocker(op, device)
        if blocker is not None:
            raise KernelUnavailableError(
                f"{name}: backend 'cpu' (from the {source}) cannot run on {where}: {blocker}. "
                f"Use backend='auto' or 'torch' for the pure-torch reference."
            )
        return _Choice("cpu", f"requested by the {source}")
    # auto: Triton only where it is compiled for the device. The CPU interpreter is for tests,
    # far slower than the reference, so "auto" never picks it.
    if op.triton is not None and device is not None and device.type in _TRITON_DEVICES and triton_available():
        return _Choice("triton", f"auto: {device.type} tensor and triton installed")
    if op.cpu is not None and device is not None and device.type == "cpu":
        blocker = op.cpu.unavailable()
        if blocker is None:
            return _Choice("cpu", "auto: cpu tensor and the compiled CPU kernel built")
        return _Choice("torch", f"auto: the compiled CPU kernel is unavailable ({blocker})")
    if device is None or device.type not in _TRITON_DEVICES:
        where = "no tensor" if device is None else f"{device.type} tensor"
        return _Choice("torch", f"auto: {where}")
    if op.triton is None:
        return _Choice("torch", "auto: no Triton implementation")
    return _Choice("torch", "auto: triton not installed")


def _same_signature(a: Callable, b: Callable) -> bool:
    pa = inspect.signature(a).parameters
    pb = inspect.signature(b).parameters
    return [(p.name, p.kind, p.default) for p in pa.values()] == [
        (p.name, p.kind, p.default) for p in pb.values()
    ]


class KernelOp:
    """A registered kernel: call it like its reference, plus ``backend=``.

    Attributes ``reference``, ``triton`` and ``cpu`` are the implementations (call them directly to
    bypass dispatch; ``triton`` or ``cpu`` may be None); ``name`` is the registry key.

    Example:
        >>> import torch
        >>> from hfpatch.kernels import logprob_gather
        >>> logits = torch.randn(2, 5); index = torch.tensor([0, 3])
        >>> logprob_gather(logits, index).shape                  # CPU tensor: the reference runs
        torch.Size([2])
        >>> logprob_gather.resolve_backend(logits, index)
        'torch'
    """

    def __init__(self, name: str, reference: Callable, triton: Callable | None, description: str = "",
                 cpu: Callable | None = None):
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

    def resolve_backend(self, *args: Any, backend: str = "auto", **kwargs: Any) -> str:
        """Which backend a call with these arguments would use: ``"triton"``, ``"cpu"`` or ``"torch"``.

        Raises the same errors as the call itself (e.g. ``backend="triton"`` on a CPU tensor
        without the interpreter). Useful to record in stats what actually ran.
        """
        device = getattr(_first_tensor(args, kwargs), "device", None)
        return _choose(self, device, backend).backend

    def explain(self, *args: Any, backend: str = "auto", **kwargs: Any) -> str:
        """Like :meth:`resolve_backend`, with the reason: ``"torch (auto: cpu tensor)"``."""
        device = getattr(_first_tensor(args, kwargs), "device", None)
        choice = _choose(self, device, backend)
        return f"{choice.backend} ({choice.reason})"

    def __call__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> Any:
        device = getattr(_first_tensor(args, kwargs), "device", None)
        choice = _choose(self, device, backend)
        impl = {"triton": self.triton, "cpu": self.cpu}.get(choice.backend) or self.reference
        return impl(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<hfpatch kernel {self.name!r}>"


_REGISTRY: dict[str, KernelOp] = {}


def register_kernel(
    name: str, *, reference: Callable, triton: Callable | None, description: str = "", replace: bool = False,
    cpu: Callable | None = None,
) -> KernelOp:
    """Register a Triton implementation (and/or a compiled CPU one) beside its pure-torch reference and
    return the op.

    All callables must have the same signature (checked here), must not take a ``backend``
    parameter (the op adds it), and the Triton one must import triton itself, lazily, so that
    importing hfpatch never imports triton. A ``cpu`` implementation is a ``cpu_build.CompiledKernel``
    (it builds its C++ source on first use and says when it cannot).

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
        raise TypeError(f"kernel {name!r}: give a Triton implementation, a compiled CPU one, or both")
    for label, impl in (("Triton", triton), ("compiled CPU", cpu)):
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
