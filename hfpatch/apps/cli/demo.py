"""``hfpatch demo``: a speculative patch on the bundled SmolLM2, plain and patched side by side."""
from __future__ import annotations

import argparse

from hfpatch.apps.cli.common import add_command, positive, resolve_recipe_argument
from hfpatch.apps.demo import DEMO_RECIPE, run_demo


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "demo", handler=_cmd_demo,
        help="see a speculative patch speed up a real model, plain and patched side by side",
        description="Load the bundled SmolLM2-135M-Instruct (converted once on first use), patch a copy with the "
                    "fused 'recycling+lookup' recipe and run four short prompts (summarize, code continuation, "
                    "rewrite, question answering) plain and patched. Prints each output, whether it is "
                    "token-identical to plain generate, the tokens accepted per forward (MAT) and the speed-up. The closing "
                    "line says what the recipe promises: the default recipe is lossless (token-identical greedy "
                    "output); recycling+lookup-cpu's kernels are equal only up to float rounding.",
        examples=["hfpatch demo", "hfpatch demo --max-new-tokens 64 --threads 2",
                  "hfpatch demo --recipe recycling+lookup-cpu   # CPU: the same speculation on packed oneDNN kernels"],
    )
    parser.add_argument("--recipe", default=DEMO_RECIPE, metavar="R",
                        help=f"recipe to show (default: {DEMO_RECIPE}; recycling+lookup-cpu adds CPU kernels)")
    parser.add_argument("--max-new-tokens", type=positive, default=80, metavar="N",
                        help="greedy tokens per prompt (default: 80)")
    parser.add_argument("--threads", type=positive, metavar="N", help="torch CPU threads (default: every usable core)")


def _cmd_demo(args: argparse.Namespace) -> int:
    resolve_recipe_argument(args.recipe)  # a bad --recipe fails in one line before the model loads
    run_demo(recipe=args.recipe, max_new_tokens=args.max_new_tokens, threads=args.threads)
    return 0
