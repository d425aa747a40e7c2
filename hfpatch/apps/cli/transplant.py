"""``hfpatch transplant``: give a model a new tokenizer and save the result as a plain transformers folder."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import hfpatch
from hfpatch.apps.cli.common import (DTYPES, CommandError, add_command, load_local_model, positive,
                                     resolve_model_dir)
from hfpatch.files import OutputError, atomic_folder, check_folder_target
from hfpatch.recipe import Recipe

TECHNIQUE = "tokenizer_transplant"


def _methods() -> tuple[str, ...]:
    """The initialisation methods the transplant technique accepts (its ``method`` parameter's choices)."""
    technique = next(t for t in hfpatch.list_techniques() if t["name"] == TECHNIQUE)
    return tuple(next(p for p in technique["params"] if p["name"] == "method")["choices"])


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "transplant", handler=_cmd_transplant,
        help="swap a model's tokenizer, initialising new embedding rows without training",
        description="Load a causal LM and its tokenizer from --model, replace its vocabulary with --tokenizer's "
                    "(shared tokens keep their rows bit-for-bit; every other row is initialised by --method), and "
                    "save model + new tokenizer to --out, loadable with plain transformers. A progress bar shows "
                    "the initialisation. --out must not exist (or be empty) unless --force is given. The output "
                    "is written to a hidden temporary folder beside --out and moved into place only when "
                    "complete: an error or an interrupt leaves --out as it was, and --force replaces the whole "
                    "folder (no file of the earlier output is kept).",
        examples=["hfpatch transplant --model ./smollm2 --tokenizer ./gpt2-tok --method mean --length-bias -3 "
                  "--out ./smollm2-gpt2",
                  "hfpatch transplant --model ./smollm2 --tokenizer ./gemma-tok --donor ./gemma-270m --method omp "
                  "--out ./smollm2-gemma --force"],
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="local folder with the causal LM and its tokenizer")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="the new tokenizer (folder or Hub repo id)")
    parser.add_argument("--donor", metavar="DIR", help="a model that already uses the new tokenizer (omp only)")
    parser.add_argument("--method", default="omp", choices=_methods(), help="initialisation of new rows (default: omp)")
    parser.add_argument("--k", type=positive, default=64, help="omp: anchor tokens per new token (default: 64)")
    parser.add_argument("--length-bias", type=float, metavar="B",
                        help="donor-free: lower each new token's logit by about -B per extra old piece (default: off)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the transplanted model and tokenizer")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing non-empty --out (the whole folder, once the new one is complete)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default: float32)")


def _looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a path rather than a Hub repo id (``name`` or ``org/name``)."""
    return (os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source
            or source.strip("/").count("/") > 1 or source.endswith("/"))


def _check_source(option: str, source: str | None) -> None:
    """Fail before any work when a --tokenizer/--donor that names a local path does not exist."""
    if source is None:
        return
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CommandError(f"{option} {source}: not a folder (give the folder the tokenizer or model was "
                               "saved to, or a Hub repo id like org/name)")
    elif _looks_local(source):
        raise CommandError(f"{option} {source}: no such folder (give a local folder, or a Hub repo id like org/name)")


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while the block runs, so the temporary folder is cleaned up.

    By default SIGTERM ends the process at once, leaving a partial temporary folder behind; SIGINT already
    raises ``KeyboardInterrupt``.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        yield
        return

    def terminate(signum, frame):
        print("hfpatch: terminated", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_transplant(args: argparse.Namespace) -> int:
    # Everything the user can get wrong is checked before the model is loaded (seconds to minutes of work).
    resolve_model_dir(args.model)
    _check_source("--tokenizer", args.tokenizer)
    _check_source("--donor", args.donor)
    out = Path(args.out).expanduser()
    if not args.force and out.is_dir() and not out.is_symlink() and any(out.iterdir()):
        raise CommandError(f"--out {args.out}: already exists and is not empty; pass --force to replace it")
    try:
        out = check_folder_target(out, force=args.force)
        with _terminate_as_exit(), atomic_folder(out, force=args.force) as tmp:
            # The temporary folder exists now: a path the disk refuses has failed before the work below.
            model, _, folder = load_local_model(args.model, dtype=args.dtype, device="cpu")
            recipe = Recipe([{"type": TECHNIQUE, "tokenizer": args.tokenizer, "method": args.method,
                              "donor": args.donor, "base_tokenizer": str(folder), "k": args.k,
                              "length_bias": args.length_bias}], name="transplant")
            handle = hfpatch.patch(model, recipe)
            stats = handle.stats[TECHNIQUE]
            model.save_pretrained(tmp)  # config, weights and generation config
            handle.tokenizer.save_pretrained(tmp)
    except OutputError as exc:
        raise CommandError(f"--out {args.out}: {exc.reason}") from None
    print(f"transplanted {folder} -> {out}: {stats['new_vocab']} tokens ({stats['shared']} shared rows copied, "
          f"{stats['initialised']} initialised by {args.method}) in {stats['seconds']} s; chat template: "
          f"{stats['chat_template']}")
    return 0
