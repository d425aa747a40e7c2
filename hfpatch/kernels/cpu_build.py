"""Compiled CPU kernels: C++ sources in ``csrc/``, built on first use with torch's extension builder.

A few decode-time hot paths are dozens of small torch ops per layer and step; on a CPU their dispatch
and their separate passes over memory cost more than the arithmetic, so they have a fused C++ version
beside the pure-torch reference (the GPU gets Triton). A source is compiled once per machine, source
and torch version (``-O3 -march=native``, OpenMP) into torch's extension directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under ``hfpatch/``; later processes
load the built library in milliseconds. Building needs a C++ compiler and ninja (``pip install ninja``);
when either is missing or the build fails, the kernel reports why (``unavailable()``), one warning says
so, ``auto`` dispatch runs the reference and ``backend="cpu"`` raises ``KernelUnavailableError``.

Techniques whose decode steps dispatch to a compiled kernel build it (or load the cached build) in
``patch()`` when the model is on CPU, through ``build``, so a user's first timed decode step never compiles;
``hfpatch kernels build`` builds every source ahead of time and ``hfpatch kernels list`` shows each one's
``build_state``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from .dispatch import CpuKernel

__all__ = ["CompiledKernel", "SOURCE_DIR", "build", "build_directory", "build_state", "compiled_sources", "load",
           "missing_tools"]

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
_CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_failures: dict[str, str] = {}
_loaded: set[str] = set()


def _machine_tag() -> str:
    """Identifies what ``-march=native`` compiled for, so a shared cache never serves another CPU's build."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        flags = platform.processor()
    return flags


def _extension_name(source: str) -> str:
    digest = hashlib.sha256()
    for part in ((SOURCE_DIR / source).read_bytes(), torch.__version__.encode(), " ".join(_CFLAGS).encode(),
                 _machine_tag().encode()):
        digest.update(part)
    return f"hfpatch_{Path(source).stem}_{digest.hexdigest()[:12]}"


def build_directory(source: str) -> Path:
    """Where the library built from ``csrc/<source>`` lives on this machine."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    return Path(root).expanduser() / "hfpatch" / _extension_name(source)


@functools.lru_cache(maxsize=None)
def _load(source: str) -> ModuleType:
    from torch.utils import cpp_extension

    name = _extension_name(source)
    directory = build_directory(source)
    if not (directory / f"{name}.so").exists():
        logger.warning("hfpatch: compiling the CPU kernel %s once for this machine (about 20 s; cached in %s)",
                       source, directory)
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(SOURCE_DIR / source)], extra_cflags=list(_CFLAGS),
                              extra_ldflags=list(_LDFLAGS), build_directory=str(directory), verbose=False)


def load(source: str, *, warn: bool = True) -> ModuleType | None:
    """The extension module built from ``csrc/<source>``, or None when it cannot be built here (the
    reason: ``CompiledKernel.unavailable``). Builds at most once per process; thread-safe. A failure is
    logged once (``warn=False``: not at all, for callers that report it themselves, e.g. ``patch()``)."""
    with _lock:
        if source in _failures:
            return None
        try:
            module = _load(source)
        except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a compile error: all mean "use torch"
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            _failures[source] = reason
            if warn:
                logger.warning("hfpatch: the CPU kernel %s could not be built (%s); auto dispatch runs the "
                               "pure-torch reference instead", source, reason)
            return None
        _loaded.add(source)
        return module


def build(source: str) -> str | None:
    """Build (or load the cached build of) ``csrc/<source>`` now; None when it is ready, else why it cannot be
    built here. Logs nothing on failure: the caller says so (``patch()`` warns once, ``hfpatch kernels build``
    prints the reason). A failure is remembered for the process, as ``load`` does."""
    if load(source, warn=False) is not None:
        return None
    return _failures.get(source, "unknown error")


def build_state(source: str) -> str:
    """Where ``csrc/<source>`` stands, without building anything: ``"loaded"`` (in this process), ``"built"``
    (a cached build for this machine, source and torch version exists), ``"failed: <reason>"`` (a build was
    tried in this process) or ``"not built"``."""
    if source in _failures:
        return f"failed: {_failures[source]}"
    if source in _loaded:
        return "loaded"
    return "built" if (build_directory(source) / f"{_extension_name(source)}.so").exists() else "not built"


def compiled_sources() -> dict[str, list[str]]:
    """Each C++ source of a registered op's CPU implementation -> the ops it serves (sorted)."""
    from .dispatch import get_kernel, list_kernels

    sources: dict[str, list[str]] = {}
    for name in list_kernels():
        cpu = get_kernel(name).cpu
        if isinstance(cpu, CompiledKernel):
            sources.setdefault(cpu.source, []).append(name)
    return sources


def missing_tools() -> list[str]:
    """What a build needs and this machine lacks (empty when a C++ compiler and ninja are found), each with how
    to get it. A build can still fail for other reasons (a compile error); ``build`` says which."""
    import shutil

    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler!r} is not on PATH; e.g. apt-get install g++, or set CXX)")
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError:
        missing.append("ninja (pip install ninja)")
    return missing


class CompiledKernel(CpuKernel):
    """A CPU implementation (:class:`~hfpatch.kernels.dispatch.CpuKernel`) that calls a C++ kernel.

    ``function`` has the reference's signature and calls ``load(source)``'s entry point; dispatch asks
    ``unavailable()`` (which builds the source on first use) and ``rejects(...)`` (the inputs the C++ code
    does not take, e.g. other dtypes) before choosing it.

    Example (how ``lowrank_decode.py`` does it)::

        def my_op_cpu(x, *, scale=1.0):
            return load("my_op.cpp").my_op(x, scale)
        my_op = register_kernel("my_op", reference=my_op_reference, triton=None,
                                cpu=CompiledKernel("my_op.cpp", my_op_cpu, rejects=float32_only))
    """

    kind = "compiled CPU kernel"

    def __init__(self, source: str, function: Callable[..., Any], *,
                 rejects: Callable[..., str | None] | None = None):
        if not (SOURCE_DIR / source).is_file():
            raise FileNotFoundError(f"no C++ source {source!r} in {SOURCE_DIR}")
        super().__init__(function, rejects=rejects)
        self.source = source

    def unavailable(self) -> str | None:
        """None when the kernel is built (building it now if needed), else why it cannot run here."""
        if load(self.source) is not None:
            return None
        return f"its C++ source {self.source} did not build: {_failures.get(self.source, 'unknown error')}"

    def __repr__(self) -> str:
        return f"<hfpatch compiled CPU kernel {self.source}>"
