"""``hfpatch bench`` (speculative recipes against plain greedy and transformers' prompt lookup) and
``hfpatch bench long-context`` (sparse attention recipes against full attention)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hfpatch.apps.bench import longctx, speculative
from hfpatch.apps.bench.common import torch_threads
from hfpatch.apps.cli.common import (
    CommandError,
    add_command,
    add_model_arguments,
    check_writable_folder,
    load_local_model,
    positive,
    resolve_recipe_argument,
)
from hfpatch.errors import HfpatchError

PROMPTS_NOTE = ("--prompts FILE: JSON lines {\"category\": \"summarize\", \"prompt\": \"...\"} (optional \"chat\": "
                "false for raw text), or plain text with one prompt per line. Prompts go through the chat template "
                "when the tokenizer has one, except categories that mention code.")


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "bench", handler=_cmd_bench,
        help="measure speculative recipes against plain greedy and transformers' prompt lookup",
        description="Benchmark lossless speculative recipes in one process: plain greedy generate, transformers' "
                    "own prompt lookup (prompt_lookup_num_tokens=10) and each recipe run on every prompt, "
                    "interleaved (method order rotated per prompt) after a discarded warm-up on another prompt. "
                    "Prints speed-up vs plain greedy, tokens per target forward (MAT) and how many outputs are "
                    "token-identical, overall and per prompt category, with the machine named; writes "
                    "bench.json, bench.txt and bench.png (needs matplotlib) to --out. Each recipe runs on its own "
                    "copy of the model. The default prompts are built from text on disk (Python documentation "
                    "and standard-library source) plus short chat requests. 'hfpatch bench long-context' "
                    "measures the sparse attention recipes instead.",
        examples=["hfpatch bench", "hfpatch bench --max-new-tokens 96 --per-category 5 --out results/",
                  "hfpatch bench --recipe recycling+lookup --recipe my_recipe.json --prompts prompts.jsonl",
                  "hfpatch bench --model ./gemma-3-270m --threads 2", "hfpatch bench long-context --help"],
        notes=PROMPTS_NOTE,
    )
    add_model_arguments(parser)
    parser.add_argument("--recipe", action="append", metavar="R",
                        help="recipe to measure, repeatable (default: token-recycling, ngram-lookup, recycling+lookup)")
    parser.add_argument("--prompts", metavar="FILE", help="prompt file instead of the built-in prompt set")
    parser.add_argument("--max-new-tokens", type=positive, default=128, metavar="N",
                        help="greedy tokens per generate call (default: 128)")
    parser.add_argument("--per-category", type=positive, metavar="N",
                        help="prompts per category of the built-in set (default: 3)")
    parser.add_argument("--threads", type=positive, metavar="N",
                        help="torch CPU threads (default: every usable core; 1 is steadier on a busy machine)")
    parser.add_argument("--out", default="bench_out", metavar="DIR",
                        help="folder for bench.json, bench.txt and bench.png (default: ./bench_out)")
    parser.add_argument("--long-context", action="store_true",
                        help="the older spelling of 'hfpatch bench long-context'")

    sub = parser.add_subparsers(dest="bench_command", metavar="{long-context}")
    # argument_default=SUPPRESS: options not given here keep the values (and defaults) of the bench parser, so
    # they may also come before the subcommand name.
    long_context = add_command(
        sub, "long-context", handler=_cmd_long_context, argument_default=argparse.SUPPRESS,
        help="measure sparse attention recipes against full attention on long inputs",
        description="Measure sparse attention recipes on your model, side by side with full attention: needles "
                    "found, perplexity of the last tokens, and decode speed through plain generate, timed per "
                    "step (the KV cache's share of the speed-up shown apart). Writes longctx.json and "
                    "longctx.png (needs matplotlib) to --out. The defaults take minutes on a small model.",
        examples=["hfpatch bench long-context --model ./SmolLM2-135M",
                  "hfpatch bench long-context --recipe recycled-attention --recipe my_recipe.json",
                  "hfpatch bench long-context --recipe 'tidal-decode:selection_layers=[2,12]' --budget 256",
                  "hfpatch bench long-context --needle-length 2048 --trials 20 --speed-length 8192 --no-perplexity"],
    )
    add_model_arguments(long_context, defaults=False)
    long_context.add_argument("--recipe", action="append", metavar="R",
                              help="recipe name or file [':param=value,...'], repeatable (default: "
                                   + ", ".join(longctx.METHODS) + ")")
    sizes = long_context.add_argument_group("sizes (tokens unless said)")

    def default(key: str) -> str:
        value = longctx.DEFAULTS[key]
        return f"default: {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"

    sizes.add_argument("--needle-length", type=positive, action="append", metavar="N",
                       help=f"needle prompt length, repeatable ({default('niah_lengths')})")
    sizes.add_argument("--trials", type=positive, metavar="N", help=f"needles per length ({default('trials')})")
    sizes.add_argument("--budget", type=positive, action="append", metavar="N",
                       help=f"sparse budget for needles and perplexity, repeatable ({default('budgets')})")
    sizes.add_argument("--speed-length", type=positive, action="append", metavar="N",
                       help=f"prompt length of the decode-speed run, repeatable ({default('speed_lengths')})")
    sizes.add_argument("--speed-budget", type=positive, metavar="N",
                       help=f"sparse budget of the decode-speed run ({default('speed_budget')})")
    sizes.add_argument("--new-tokens", type=positive, metavar="N",
                       help=f"tokens per timed generate call ({default('speed_new')})")
    sizes.add_argument("--rounds", type=positive, metavar="N",
                       help=f"timed rounds, the median reported ({default('rounds')})")
    sizes.add_argument("--perplexity-length", type=positive, action="append", metavar="N",
                       help=f"perplexity document length, repeatable ({default('ppl_lengths')})")
    sizes.add_argument("--no-perplexity", action="store_true", help="skip the perplexity measurement")
    long_context.add_argument("--threads", type=positive, metavar="N", help="torch CPU threads (default: torch's)")
    long_context.add_argument("--out", metavar="DIR",
                              help="folder for longctx.json and longctx.png (default: ./bench_out)")


#: long-context option (argparse dest) -> longctx.run size setting
_SIZE_OPTIONS = {"needle_length": "niah_lengths", "trials": "trials", "budget": "budgets",
                 "speed_length": "speed_lengths", "speed_budget": "speed_budget", "new_tokens": "speed_new",
                 "rounds": "rounds", "perplexity_length": "ppl_lengths"}


def _model_name(model: str | None, folder) -> str:
    return "SmolLM2-135M-Instruct (bundled)" if model is None else Path(folder).name


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.long_context:
        print("hfpatch: note: 'hfpatch bench long-context' is the new spelling of 'hfpatch bench --long-context'",
              file=sys.stderr)
        return _cmd_long_context(args)
    if args.prompts and args.per_category is not None:
        raise CommandError("--per-category applies to the built-in prompt set, not to --prompts")
    # Arguments first: a typo in the last --recipe must not cost a model load and a warm-up.
    prompts = speculative.load_prompts(args.prompts) if args.prompts else None
    check_writable_folder(Path(args.out).expanduser(), "--out")
    recipes = [(name, resolve_recipe_argument(name)) for name in args.recipe or speculative.DEFAULT_RECIPES]
    model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
    try:
        result = speculative.run_bench(
            model, tokenizer, recipes=recipes, prompts=prompts,
            per_category=args.per_category or 3, max_new_tokens=args.max_new_tokens, threads=args.threads,
            model_name=_model_name(args.model, folder), progress=_progress)
    except ValueError as exc:
        raise _usage_error(exc) from exc
    return _report(speculative, result, args.out)


def _usage_error(exc: ValueError) -> Exception:
    """A harness's ValueError (bad prompts, a recipe the model refuses) as the one-line error the user sees."""
    return exc if isinstance(exc, HfpatchError) else CommandError(str(exc))


def _report(harness, result: dict, out: str) -> int:
    """Print a harness's report and write its files (``format_report`` / ``save_report`` of that module)."""
    print(harness.format_report(result))
    written = harness.save_report(result, out)
    print(f"[hfpatch] wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _check_long_context_method(spec: str) -> None:
    """Resolve a long-context ``NAME[:param=value,...]`` and its parameters before the model loads."""
    name, _ = longctx.parse_method(spec)
    if not name:
        raise CommandError(f"--recipe {spec!r}: expected NAME, FILE or NAME:param=value,...")
    resolve_recipe_argument(name)  # one-line errors for a missing file or an unknown name, without the Hub
    try:
        longctx.check_recipe(spec)
    except ValueError as exc:
        raise CommandError(f"--{exc}") from None


def _long_context_sizes(args: argparse.Namespace) -> dict:
    """The size settings given on the command line, as ``longctx.run`` keywords."""
    sizes = {key: getattr(args, option) for option, key in _SIZE_OPTIONS.items() if hasattr(args, option)}
    if getattr(args, "no_perplexity", False):
        if "ppl_lengths" in sizes:
            raise CommandError("--no-perplexity and --perplexity-length contradict each other; give one")
        sizes["ppl_lengths"] = ()
    return {key: tuple(value) if isinstance(value, list) else value for key, value in sizes.items()}


def _cmd_long_context(args: argparse.Namespace) -> int:
    methods = tuple(args.recipe or longctx.METHODS)
    for spec in args.recipe or ():
        _check_long_context_method(spec)
    sizes = _long_context_sizes(args)
    check_writable_folder(Path(args.out).expanduser(), "--out")
    with torch_threads(args.threads):
        model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
        try:
            result = longctx.run(model.eval(), tokenizer, methods=methods,
                                 model_name=_model_name(args.model, folder), progress=_progress, **sizes)
        except ValueError as exc:  # a recipe the model refuses, a length the text on disk cannot fill
            raise _usage_error(exc) from exc
    return _report(longctx, result, args.out)
