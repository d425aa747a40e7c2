"""``hfpatch run``: generate with a local model, optionally patched by a recipe, and show what the patch did."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

import torch

import hfpatch
from hfpatch.apps.bench.common import encode_prompt
from hfpatch.apps.cli.common import (
    CommandError,
    add_command,
    add_generation_arguments,
    add_model_arguments,
    dumps,
    generation_kwargs,
    load_local_model,
    read_prompt,
)


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "run", handler=_cmd_run,
        help="generate text with a local model, optionally patched by a recipe",
        description="Load a causal LM and its tokenizer from a local folder (never from the network), apply a "
                    "recipe if given, generate from a prompt and print the new text; with a recipe, also print "
                    "what each technique did (handle.stats). The patch is removed before exiting.",
        examples=["hfpatch run --chat --prompt 'Name three prime numbers.'",
                  "hfpatch run --model ./my-llama --recipe my_recipe.json --prompt-file prompt.txt",
                  "hfpatch run --recipe me/my-recipe --revision v1 --set budget=512 --max-new-tokens 128",
                  "hfpatch run --do-sample --temperature 0.7 --seed 1"],
    )
    add_model_arguments(parser)
    parser.add_argument("--recipe", help="built-in recipe name, local .json file or folder, or Hub repo id")
    parser.add_argument("--revision", help="branch, tag or commit of a Hub recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a recipe parameter, repeatable ('technique.param=VALUE' when ambiguous)")
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


def _cmd_run(args: argparse.Namespace) -> int:
    if (args.revision or args.overrides) and not args.recipe:
        raise CommandError("--revision and --set need --recipe")
    overrides = parse_overrides(args.overrides)
    prompt = read_prompt(args)
    model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
    kwargs = generation_kwargs(args, tokenizer)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise CommandError("--chat: this tokenizer has no chat template; drop --chat to use the raw prompt")
    inputs = encode_prompt(tokenizer, prompt, chat=args.chat, device=model.device)
    handle = hfpatch.patch(model, args.recipe, revision=args.revision, **overrides) if args.recipe else None
    new_tokens, seconds, stats = _generate(model, handle, inputs, kwargs, args.seed)
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    if handle is not None:
        print(f"\n# hfpatch stats (recipe {handle.recipe.name!r}):\n{dumps(stats)}")
    rate = len(new_tokens) / seconds if seconds > 0 else float("inf")
    print(f"[hfpatch] {len(new_tokens)} new tokens in {seconds:.2f} s ({rate:.1f} tokens/s), model {folder}, "
          f"{'sampling' if args.do_sample else 'greedy'}", file=sys.stderr)
    return 0
