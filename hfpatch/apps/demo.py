"""``hfpatch demo``: see a lossless speculative patch at work on a real model in about a minute.

Loads the bundled SmolLM2-135M-Instruct, applies the fused ``recycling+lookup`` recipe to a copy of it, and
runs a few short prompts (summarize, code continuation, rewrite, question answering) plain and patched. For
each prompt it prints the generated text, whether the patched output is token-identical to the plain one,
the mean tokens accepted per forward (MAT) and the wall-clock speed-up.

    >>> from hfpatch.apps.demo import run_demo
    >>> result = run_demo()
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch

from hfpatch.apps import assets
from hfpatch.apps.bench.common import torch_threads, usable_cores
from hfpatch.apps.bench.speculative import VANILLA, SpeculativeBench, default_prompts, warmup_prompt
from hfpatch.catalogue import technique_class
from hfpatch.recipe import resolve_recipe

DEMO_RECIPE = "recycling+lookup"
DEMO_CATEGORIES = ("summarize", "code", "rewrite", "qa")
_LABELS = {"summarize": "summarize a passage", "code": "continue a Python file", "rewrite": "rewrite a passage",
           "qa": "answer by quoting a passage"}


def _excerpt(text: str, max_lines: int = 4, width: int = 96) -> list[str]:
    """The first lines of a generated text, each cut to ``width`` characters, to keep the screen readable."""
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()] or ["(empty)"]
    shown = [line if len(line) <= width else line[: width - 1] + "…" for line in lines[:max_lines]]
    if len(lines) > max_lines:
        shown.append("…")
    return shown


def output_promise(recipe: Any) -> tuple[str, str]:
    """(headline, closing sentence) that say what ``recipe`` promises about the outputs, from its techniques'
    families: generation techniques alone are lossless (token-identical greedy output); a compute technique
    (``onednn_linear``) is equal to the default kernels only up to float rounding; anything else (sparse
    attention) changes what the model computes."""
    if isinstance(recipe, tuple) and len(recipe) == 2 and isinstance(recipe[0], str):
        recipe = recipe[1]  # a (label, recipe) pair, as SpeculativeBench takes it
    resolved = resolve_recipe(recipe)
    families = {technique_class(t["type"]).family for t in resolved.techniques}
    drafts = "the patch drafts candidate tokens and verifies them all in one forward"
    if families <= {"generation"}:
        return ("lossless speculative generate",
                f"{drafts}; outputs stay exactly the model's own greedy choice.")
    if families == {"compute"}:
        return ("faster kernels",
                "the patch runs the model on kernels equal to the default ones up to float rounding; a near tie "
                "can pick another token than plain generate.")
    if families <= {"generation", "compute"}:
        return ("speculative generate on faster kernels",
                f"{drafts}, on kernels equal to the default ones up to float rounding; outputs are the greedy "
                "choice of the model on those kernels, so a near tie can pick another token than plain generate.")
    return ("patched generate",
            f"recipe {resolved.name!r} changes what the model computes ({', '.join(sorted(families))} "
            "techniques); outputs can differ from plain generate.")


def run_demo(
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    recipe: Any = DEMO_RECIPE,
    max_new_tokens: int = 80,
    categories: tuple[str, ...] = DEMO_CATEGORIES,
    threads: int | None = None,
    passage_chars: int = 700,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run the newcomer's demo and print it; returns the per-prompt records and the overall figures.

    Args:
        model, tokenizer: the model to show (default: the bundled SmolLM2-135M-Instruct, converted on first use).
        recipe: the recipe to apply (default: the fused ``recycling+lookup``).
        max_new_tokens: greedy tokens per prompt; 64-96 keeps the demo near a minute on 2 CPU cores.
        categories: which kinds of prompt to run, one prompt each (see ``hfpatch.apps.bench.speculative.CATEGORIES``).
        threads: ``torch.set_num_threads`` (default: every usable core); restored afterwards.
        passage_chars: length of the passages quoted in the prompts (shorter prompts, quicker demo).
        out: where to print (default: stdout).
    """
    out = out or sys.stdout

    def say(text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    started = time.perf_counter()
    headline, promise = output_promise(recipe)  # also checks the recipe before the model loads
    with torch_threads(threads or usable_cores()):
        if model is None:
            say(f"hfpatch demo: {headline} on SmolLM2-135M-Instruct")
            say("loading the bundled model (the first run converts it once, ~25 s) ...")
            model, tokenizer = assets.load_smollm2(progress=True)
            name = "SmolLM2-135M-Instruct"
        else:
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
            say(f"hfpatch demo: {headline} on {name}")
        if tokenizer is None:
            raise ValueError("run_demo(model=...) needs the model's tokenizer too")
        prompts = default_prompts(1, categories=categories, passage_chars=passage_chars)
        say(f"patching a copy of the model with hfpatch.patch(model, {recipe!r}); {torch.get_num_threads()} "
            f"CPU threads, greedy, {max_new_tokens} new tokens per prompt")
        with SpeculativeBench(model, tokenizer, [recipe], max_new_tokens=max_new_tokens, prompt_lookup=False) as bench:
            patched = bench.labels[1]
            say("warming up (one discarded run of each on another prompt) ...")
            bench.warm_up(warmup_prompt(passage_chars))
            records = []
            for index, prompt in enumerate(prompts):
                say(f"\n[{index + 1}/{len(prompts)}] {_LABELS.get(prompt.category, prompt.category)}: ", end="")

                def on_method(label: str) -> None:
                    say("plain ... " if label == VANILLA else "patched ... ", end="")

                pair = {r["method"]: r for r in bench.run_prompt(index, prompt, on_method=on_method)}
                plain, fast = pair[VANILLA], pair[patched]
                say("done")
                for line in _excerpt(fast["text"]):
                    say(f"    | {line}")
                speedup = plain["seconds"] / fast["seconds"] if fast["seconds"] > 0 else float("inf")
                say(f"    identical to plain generate: {'yes' if fast['identical'] else 'NO'}   "
                    f"MAT {fast['mat']:.2f} tokens/forward   plain {plain['seconds']:.1f} s -> patched "
                    f"{fast['seconds']:.1f} s ({speedup:.2f}x)"
                    + (f"   [fell back: {fast['fallback']}]" if fast.get("fallback") else ""))
                records.append({"category": prompt.category, "plain": plain, "patched": fast, "speedup": speedup})
        plain_s = sum(r["plain"]["seconds"] for r in records)
        fast_s = sum(r["patched"]["seconds"] for r in records)
        tokens = sum(r["patched"]["new_tokens"] for r in records)
        forwards = sum(r["patched"]["forwards"] for r in records)
        summary = {
            "model": name,
            "recipe": patched,
            "identical": sum(r["patched"]["identical"] for r in records),
            "prompts": len(records),
            "speedup": plain_s / fast_s if fast_s > 0 else None,
            "mat": tokens / forwards if forwards else None,
            "plain_s": plain_s,
            "patched_s": fast_s,
            "threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - started,
        }
    say(f"\noverall: {summary['identical']}/{summary['prompts']} outputs token-identical, "
        f"{summary['mat']:.2f} tokens per forward instead of 1, "
        f"{summary['speedup']:.2f}x faster ({plain_s:.1f} s -> {fast_s:.1f} s) "
        f"[demo took {summary['wall_s']:.0f} s]")
    say(promise)
    say("next: 'hfpatch bench' measures every recipe against transformers' prompt lookup on more prompts.")
    if recipe == DEMO_RECIPE and next(model.parameters()).device.type == "cpu":
        say("on a CPU, 'hfpatch demo --recipe recycling+lookup-cpu' runs the same speculation on packed oneDNN "
            "linear kernels (equal to the default ones up to float rounding), 2.60x faster than plain (docs/results/speculative.md).")
    return {"summary": summary, "prompts": records}
