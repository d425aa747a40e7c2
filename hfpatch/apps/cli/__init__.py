"""The ``hfpatch`` command line.

    hfpatch techniques [NAME] [--family F] [--json]
    hfpatch recipes [--json]
    hfpatch recipe show NAME_OR_PATH [--revision R] [--json]
    hfpatch recipe validate PATH [PATH ...]
    hfpatch recipe push DIR REPO_ID [--revision BRANCH] [--private]
    hfpatch recipe pull REPO_ID [--revision R] --out DIR [--force]
    hfpatch run [--model DIR] [--recipe R] [--prompt TEXT | --prompt-file F] [--chat] [--max-new-tokens N]
                [--threads N] [--stats summary|json|none] ...
    hfpatch bench [--model DIR] [--recipe R ...] [--prompts FILE] [--max-new-tokens N] [--out DIR] ...
    hfpatch bench long-context [--model DIR] [--recipe R ...] [--threads N] [--out DIR]
    hfpatch demo [--recipe R] [--max-new-tokens N] [--threads N]
    hfpatch transplant --model DIR --tokenizer DIR --out DIR [--method M] [--donor DIR] ...
    hfpatch kernels list [--json] | hfpatch kernels build
    hfpatch critical-tokens [--model DIR] --pairs FILE.jsonl --out DIR [--save-recipe DIR | --recipe R] ...

Exit codes: 0 success, 1 ``recipe validate`` found invalid recipes, 2 an error the user can fix (printed as
one line on stderr, never a traceback; ``-v`` adds the traceback), 130 interrupted. Usage errors are that one
line too (``common.HfpatchArgumentParser``), and each handler checks its arguments (paths, repo ids, recipes,
overrides, output folders, Hub reachability) before it loads a model or does other slow work.

Each command group is one module of this package with a ``register(subparsers)`` function, listed in
``GROUPS``. A module declares its subcommands with ``common.add_command`` (one-line help, description,
examples, handler) and its handlers call library or application functions; a handler raises ``HfpatchError``
(``common.CommandError`` for plain usage problems) for anything the user can fix.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Sequence

import hfpatch
from hfpatch.apps.cli import bench, common, critical_tokens, demo, kernels, listing, recipe, run, transplant

__all__ = ["GROUPS", "build_parser", "main"]

logger = logging.getLogger(__name__)

#: The command groups, in the order ``hfpatch --help`` lists their commands.
GROUPS = (listing, recipe, run, bench, demo, transplant, kernels, critical_tokens)


def build_parser() -> argparse.ArgumentParser:
    """The ``hfpatch`` argument parser with the subcommands of every module in ``GROUPS``."""
    # HfpatchArgumentParser (inherited by every subparser) keeps usage errors to one 'hfpatch: error:' line.
    parser = common.HfpatchArgumentParser(
        prog="hfpatch",
        description="One-line, reversible patches that add research techniques to Hugging Face transformers "
                    "models. Each command has its own --help.",
        epilog="examples:\n  hfpatch techniques\n  hfpatch recipes\n  hfpatch recipe show NAME_OR_PATH\n"
               "  hfpatch run --chat --prompt 'Name three prime numbers.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hfpatch {hfpatch.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what hfpatch does, and show tracebacks of errors")
    parser.set_defaults(handler=lambda args: common.missing_subcommand(parser))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hfpatch`` command with ``argv`` (default: ``sys.argv[1:]``) and return its exit code.

    Example:
        >>> from hfpatch.apps.cli import main
        >>> main(["recipe", "validate", "my_recipe/"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; keep main() returning an int
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    with warnings.catch_warnings():
        warnings.showwarning = common.show_warning
        try:
            return int(args.handler(args) or 0)
        except KeyboardInterrupt:
            print("hfpatch: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            message = common.error_message(exc)
            if message is None:
                raise
            if args.verbose:
                logger.exception("hfpatch %s failed", args.command)
            print(f"hfpatch: error: {message}", file=sys.stderr)
            return 2
