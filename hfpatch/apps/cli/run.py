"""``hfpatch run``: generate with a local model, optionally patched by a recipe, and show what the patch did."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

import torch

import hfpatch
from hfpatch.apps.bench.common import encode_prompt, torch_threads
from hfpatch.apps.cli.common import (
    CommandError,
    add_command,
    add_generation_arguments,
    add_model_arguments,
    dumps,
    generation_kwargs,
    load_local_model,
    positive,
    read_prompt,
    resolve_recipe_argument,
)


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "run", handler=_cmd_run,
        help="generate text with a local model, optionally patched by a recipe",
        description="Load a causal LM and its tokenizer from a local folder (never from the network), apply a "
                    "recipe if given, generate from a prompt and print the new text on stdout; with a recipe, "
                    "also a short summary of what the patch did on stderr (forwards, tokens per forward, "
                    "fallback reasons; '--stats json' prints the full handle.stats on stdout instead). The recipe "
                    "and --set overrides are checked before the model is loaded; the patch is removed before "
                    "exiting.",
        examples=["hfpatch run --chat --prompt 'Name three prime numbers.'",
                  "hfpatch run --model ./my-llama --recipe my_recipe.json --prompt-file prompt.txt",
                  "hfpatch run --recipe me/my-recipe --revision v1 --set budget=512 --max-new-tokens 128",
                  "hfpatch run --do-sample --temperature 0.7 --seed 1",
                  "hfpatch run --recipe recycling+lookup-cpu --threads 2 --stats json"],
    )
    add_model_arguments(parser)
    parser.add_argument("--recipe", help="built-in recipe name, local .json file or folder, or Hub repo id")
    parser.add_argument("--revision", help="branch, tag or commit of a Hub recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a recipe parameter, repeatable ('technique.param=VALUE' when ambiguous)")
    parser.add_argument("--stats", choices=("summary", "json", "none"), default="summary",
                        help="what the patch did: a few lines on stderr (default), full handle.stats JSON on stdout, "
                             "or nothing")
    parser.add_argument("--threads", type=positive, metavar="N", help="torch CPU threads (default: torch's)")
    add_generation_arguments(parser)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is read as JSON when it parses (512, 0.5, true, [1,2]) and as text otherwise."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise CommandError(f"--set {item!r}: expected NAME=VALUE, e.g. --set budget=512")
        try:
            overrides[name] = json.loads(text)
        except ValueError:
            overrides[name] = text
    return overrides


def _generate(model, handle, inputs: dict[str, Any], kwargs: dict[str, Any], seed: int):
    """(new token ids, seconds, the patch's stats or None) of one generate call; the patch comes off after it."""
    try:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - start
        return output[0, inputs["input_ids"].shape[1]:], seconds, handle.stats if handle is not None else None
    finally:
        if handle is not None:
            handle.unpatch()


def _scalar(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def summarize_stats(stats: dict[str, dict[str, Any]]) -> list[str]:
    """A few lines from ``handle.stats``: one per distinct stats dict (techniques sharing one engine report the
    same dict and get one line), with forwards, tokens per forward (MAT) and any fallback reason first."""
    groups: list[tuple[list[str], dict[str, Any]]] = []
    for name, value in stats.items():
        for names, seen in groups:
            if seen == value:
                names.append(name)
                break
        else:
            groups.append(([name], value))
    lines = []
    for names, value in groups:
        value = value if isinstance(value, dict) else {"value": value}
        parts = []
        if value.get("fallback"):
            parts.append(f"fell back to plain generate: {value['fallback']}")
        if "forwards" in value and "new_tokens" in value:
            parts.append(f"{value['new_tokens']} new tokens in {value['forwards']} forwards")
        mat = value.get("mean_accepted_tokens_per_forward")
        if isinstance(mat, (int, float)):
            parts.append(f"MAT {mat:.2f} tokens/forward")
        if isinstance(value.get("mean_tree_nodes"), (int, float)):
            parts.append(f"tree {value['mean_tree_nodes']:.1f} nodes")
        if not parts:  # another kind of technique: its first few plain values
            plain = [(k, v) for k, v in value.items() if isinstance(v, (int, float, str, bool)) or v is None]
            parts = [f"{k}={_scalar(v)}" for k, v in plain[:4]] or ["(no statistics)"]
        lines.append(f"{' + '.join(names)}: {', '.join(parts)}")
    return lines


def _cmd_run(args: argparse.Namespace) -> int:
    if (args.revision or args.overrides) and not args.recipe:
        raise CommandError("--revision and --set need --recipe")
    # Everything the user typed is checked before the model loads (seconds to minutes).
    overrides = parse_overrides(args.overrides)
    recipe = None
    if args.recipe:
        recipe = resolve_recipe_argument(args.recipe, revision=args.revision)
        if overrides:
            recipe = recipe.with_overrides(overrides)  # a new Recipe: override names and values are validated
    prompt = read_prompt(args)
    if not prompt.strip() and not args.chat:
        raise CommandError("the prompt is empty; pass --prompt TEXT or --prompt-file FILE")
    with torch_threads(args.threads):
        model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
        kwargs = generation_kwargs(args, tokenizer)
        if args.chat and not getattr(tokenizer, "chat_template", None):
            raise CommandError("--chat: this tokenizer has no chat template; drop --chat to use the raw prompt")
        inputs = encode_prompt(tokenizer, prompt, chat=args.chat, device=model.device)
        if inputs["input_ids"].shape[-1] == 0:
            raise CommandError(f"the prompt {prompt[:40]!r} encodes to no tokens with this tokenizer")
        handle = hfpatch.patch(model, recipe) if recipe is not None else None
        new_tokens, seconds, stats = _generate(model, handle, inputs, kwargs, args.seed)
        threads = torch.get_num_threads()
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    if handle is not None and args.stats == "json":
        print(f"\n# hfpatch stats (recipe {handle.recipe.name!r}):\n{dumps(stats)}")
    elif handle is not None and args.stats == "summary":
        for line in summarize_stats(stats):
            print(f"[hfpatch] {line}", file=sys.stderr)
    rate = len(new_tokens) / seconds if seconds > 0 else float("inf")
    recipe_note = f", recipe {handle.recipe.name!r}" if handle is not None else ""
    print(f"[hfpatch] {len(new_tokens)} new tokens in {seconds:.2f} s ({rate:.1f} tokens/s), model {folder}"
          f"{recipe_note}, {'sampling' if args.do_sample else 'greedy'}, {threads} threads", file=sys.stderr)
    return 0
