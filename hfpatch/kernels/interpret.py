"""Can Triton run here, and on which devices?

Triton needs a GPU driver, except under its interpreter (``TRITON_INTERPRET=1``), which runs
``@triton.jit`` kernels on CPU tensors with numpy. Triton decides between compiled and interpreted
functions when each function is decorated, and ``triton.language`` decorates its own helpers
(``tl.max``, ``tl.sum``...) when triton is first imported. So the variable must be set *before*
triton is imported: setting it later produces kernels that fail with "Cannot call @triton.jit'd
outside of the scope of a kernel". Nothing here imports triton.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

__all__ = ["triton_available", "triton_runs_on_cpu", "triton_cpu_reason", "TRITON_INSTALL_HINT"]

TRITON_INSTALL_HINT = "pip install 'hfpatch[triton]' (Linux only)"

# The spellings Triton's own env_bool parser accepts as true (checked against triton 3.9).
_TRUTHY = frozenset({"1", "true", "on", "yes", "y"})


def _env_truthy(name: str) -> bool:
    # No strip(): Triton reads " 1" as false, and this must agree with it.
    return os.environ.get(name, "").lower() in _TRUTHY


@functools.lru_cache(maxsize=None)
def _triton_spec_found() -> bool:
    # A filesystem lookup; cached because dispatch asks on every CUDA call before triton is imported.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it).

    Example:
        >>> from hfpatch.kernels import triton_available
        >>> triton_available() in (True, False)
        True
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    return _triton_spec_found()


def _imported_in_interpreter_mode() -> bool | None:
    """For an already imported triton: were its helpers built for the interpreter?

    Returns None when this cannot be told (an unexpected triton layout).
    """
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # noqa: BLE001 - any failure just means "cannot tell"
        return None
    helper = getattr(tl, "max", None)
    if helper is None or not callable(helper):
        return None
    return isinstance(helper, InterpretedFunction)


def triton_runs_on_cpu() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process.

    True when triton is installed and ``TRITON_INTERPRET=1`` was in the environment when triton was
    imported (or is set now and triton has not been imported yet, so it will be honoured). Tests
    use it to skip kernel comparisons with a clear reason.

    Example:
        >>> from hfpatch.kernels import triton_cpu_reason, triton_runs_on_cpu
        >>> triton_runs_on_cpu() == (triton_cpu_reason() is None)
        True
    """
    return triton_cpu_reason() is None


def triton_cpu_reason() -> str | None:
    """Why Triton kernels cannot run on CPU tensors here, or None when they can.

    Example:
        >>> from hfpatch.kernels import triton_cpu_reason
        >>> reason = triton_cpu_reason()   # e.g. "TRITON_INTERPRET=1 is not set ..."
    """
    if not triton_available():
        return f"triton is not installed ({TRITON_INSTALL_HINT})"
    if "triton" not in sys.modules:
        if _env_truthy("TRITON_INTERPRET"):
            return None
        return (
            "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is first imported"
        )
    mode = _imported_in_interpreter_mode()
    if mode is None:
        # Unknown triton layout: the variable is the best evidence left.
        mode = _env_truthy("TRITON_INTERPRET")
    if mode:
        return None
    if _env_truthy("TRITON_INTERPRET"):
        return (
            "TRITON_INTERPRET=1 was set after triton had already been imported, so Triton built "
            "compiled (GPU) functions; set it before triton is first imported (e.g. at the very top "
            "of the script or in the shell)"
        )
    return (
        "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 in the "
        "environment before triton is first imported (triton is already imported without it)"
    )


def exact_float32_dots(tensor) -> bool:
    """Whether a kernel's `tl.dot` over `tensor` should run in exact float32 (IEEE, not TF32).

    float32 inputs want exact float32 dots. Under the CPU interpreter every dtype is upcast: its `tl.dot` on
    bfloat16 operands returns garbage (triton 3.9), and speed does not matter there.
    """
    import torch  # local: this module stays importable without pulling in anything heavy

    return tensor.dtype == torch.float32 or tensor.device.type != "cuda"
