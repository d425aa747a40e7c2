"""``hfpatch kernels list`` and ``hfpatch kernels build``: hfpatch's kernel ops, what dispatch picks on this
machine, and the compiled CPU kernels built ahead of time.

``list`` never builds anything: a compiled kernel that is not built yet is reported as such (auto dispatch
builds it on first use, and the sparse attention techniques build it in ``patch()`` when the model is on CPU).
``build`` compiles every compiled CPU source now (or loads the cached build), one line of progress each, and
fails with one line naming what is missing when there is no C++ compiler or ninja.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from hfpatch.apps.cli.common import CommandError, add_command, dumps, fit_table, missing_subcommand
from hfpatch.kernels import ENV_VAR, CompiledKernel, cpu_build, get_kernel, list_kernels, triton_available


def register(subparsers) -> None:
    group = add_command(
        subparsers, "kernels", handler=lambda args: missing_subcommand(group),
        help="list hfpatch's kernel ops and their backends, or build the compiled CPU kernels now",
        description="hfpatch's kernel ops each have a pure-torch reference and faster implementations (Triton for "
                    "CUDA tensors, a compiled C++ or NumPy one for CPU tensors); dispatch picks one per call. "
                    f"{ENV_VAR}=torch turns every fast implementation off.",
        examples=["hfpatch kernels list", "hfpatch kernels list --json", "hfpatch kernels build"],
    )
    sub = group.add_subparsers(dest="kernels_command", metavar="{list,build}")
    listing = add_command(
        sub, "list", handler=_cmd_list,
        help="each op, its backends, which one auto dispatch picks here and why, and the build state",
        description="List every registered kernel op: its backends, what auto dispatch picks on this machine for "
                    "CPU tensors and for CUDA tensors (and why), and for a compiled CPU kernel the state of its C++ "
                    "source (loaded, built, not built, failed). Builds nothing.",
        examples=["hfpatch kernels list", "hfpatch kernels list --json"],
    )
    listing.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    add_command(
        sub, "build", handler=_cmd_build,
        help="compile every compiled CPU kernel now (cached per machine; about 20 s each the first time)",
        description="Build the C++ sources of hfpatch's compiled CPU kernels with torch's extension builder "
                    "(-O3 -march=native), or load the cached build, so that no patch() or generate() compiles. "
                    "Needs a C++ compiler and ninja.",
        examples=["hfpatch kernels build", "TORCH_EXTENSIONS_DIR=/shared/cache hfpatch kernels build"],
        notes="Builds are cached in $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) under hfpatch/, one "
              "per source, torch version and CPU.",
    )


def _auto_on_cpu(op, env: str) -> str:
    """What auto dispatch picks for CPU tensors here (without building anything), and why."""
    if env == "torch":
        return f"torch ({ENV_VAR}=torch)"
    if op.cpu is None:
        return "torch (no CPU implementation)"
    if isinstance(op.cpu, CompiledKernel):
        state = cpu_build.build_state(op.cpu.source)
        if state.startswith("failed"):
            return f"torch (the compiled kernel {state})"
        if state == "not built":
            return "cpu once built (the first call or patch() builds it; or run 'hfpatch kernels build')"
    return f"cpu ({op.cpu.kind}) for the inputs it takes, else torch"


def _auto_on_cuda(op, env: str) -> str:
    if env == "torch":
        return f"torch ({ENV_VAR}=torch)"
    if op.triton is None:
        return "torch (no Triton implementation)"
    if not triton_available():
        return "torch (triton is not installed)"
    return "triton" + ("" if torch.cuda.is_available() else " (no CUDA device on this machine)")


def kernel_rows() -> list[dict[str, Any]]:
    """One dict per registered op: name, backends, auto pick on CPU and CUDA tensors, compiled source + state."""
    env = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    rows = []
    for name in list_kernels():
        op = get_kernel(name)
        compiled = isinstance(op.cpu, CompiledKernel)
        rows.append({
            "name": name,
            "backends": list(op.backends),
            "auto_cpu": _auto_on_cpu(op, env),
            "auto_cuda": _auto_on_cuda(op, env),
            "compiled_source": op.cpu.source if compiled else None,
            "build_state": cpu_build.build_state(op.cpu.source) if compiled else None,
            "description": op.description,
        })
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    rows = kernel_rows()
    if args.json:
        print(dumps(rows))
        return 0
    table = [[r["name"], ", ".join(r["backends"]), r["auto_cpu"], r["auto_cuda"],
              f"{r['compiled_source']}: {r['build_state']}" if r["compiled_source"] else "-"] for r in rows]
    print(fit_table(["OP", "BACKENDS", "AUTO ON CPU TENSORS", "AUTO ON CUDA TENSORS", "COMPILED SOURCE"], table))
    env = os.environ.get(ENV_VAR)
    sources = cpu_build.compiled_sources()
    where = f"; builds cached under {cpu_build.build_directory(next(iter(sources))).parent}" if sources else ""
    print((f"\n{ENV_VAR}={env!r}" if env else f"\n{ENV_VAR} unset (auto)") + where)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    sources = cpu_build.compiled_sources()
    if not sources:
        print("no compiled CPU kernels are registered; nothing to build")
        return 0
    missing = cpu_build.missing_tools()
    if missing:
        raise CommandError(f"cannot build the compiled CPU kernels: missing {' and '.join(missing)}; until then "
                           "hfpatch runs the pure-torch reference (same results, slower)")
    failed = []
    for i, (source, ops) in enumerate(sources.items(), 1):
        state = cpu_build.build_state(source)
        action = "loading the cached build of" if state in ("built", "loaded") else "compiling (about 20 s)"
        print(f"[{i}/{len(sources)}] {action} {source} (ops: {', '.join(ops)}) ...", flush=True)
        start = time.perf_counter()
        reason = cpu_build.build(source)
        if reason is None:
            print(f"      ready in {time.perf_counter() - start:.1f} s: {cpu_build.build_directory(source)}")
        else:
            print(f"      FAILED: {reason}")
            failed.append(f"{source} ({reason})")
    if failed:
        raise CommandError(f"could not build {'; '.join(failed)}; hfpatch runs the pure-torch reference for these "
                           "ops (same results, slower)")
    return 0
