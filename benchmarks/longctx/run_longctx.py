"""Long-context quality and speed of the sparse decode attention recipes on SmolLM2-135M or Gemma 3 270M
(``--model``; CPU script).

The measurements live in ``hfpatch.apps.bench.longctx`` (also behind ``hfpatch bench long-context``); this
script exposes every size knob for the README's runs and writes the raw JSON:

    python benchmarks/longctx/run_longctx.py --niah 1024 2048 --ppl 4096 --speed 4096 --out longctx.json

``--base-recipe onednn-linear`` patches the model with that recipe first, for every method, full attention
included: the speed-ups of the sparse recipes are then measured over the same (faster) linear kernels, so
they stay the gain of sparsity alone.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from hfpatch.apps import assets
from hfpatch.apps.bench import longctx


def main():
    ap = argparse.ArgumentParser(description=__doc__ + "\n" + longctx.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--niah", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="needle codes and haystack offsets")
    ap.add_argument("--ppl", type=int, nargs="*", default=[4096])
    ap.add_argument("--ppl-tail", type=int, default=64)
    ap.add_argument("--ppl-source", choices=["prose", "code"], default="prose")
    ap.add_argument("--ppl-docs", type=int, default=2, help="documents (windows) per perplexity length")
    ap.add_argument("--speed", type=int, nargs="*", default=[4096])
    ap.add_argument("--speed-new", type=int, default=24)
    ap.add_argument("--speed-budget", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budgets", type=int, nargs="*", default=[128, 256, 512, 1024])
    ap.add_argument("--methods", nargs="*", default=list(longctx.METHODS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--base-recipe", default=None,
                    help="recipe applied to the model under every method (e.g. onednn-linear)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (SmolLM2-135M-Instruct), gemma3 (Gemma 3 270M base) or a local model folder")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in ("smollm2", "gemma3"):
        model, tok = assets.load_smollm2() if args.model == "smollm2" else assets.load_gemma3()
        name = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma 3 270M"}[args.model] + " fp32 sdpa"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(args.model)
        name = f"{args.model} fp32 sdpa"
    if args.base_recipe:
        import hfpatch

        hfpatch.patch(model, args.base_recipe)
        name += f" + {args.base_recipe} under every method"
    result = longctx.run(
        model.eval(), tok, niah_lengths=args.niah, trials=args.trials, ppl_lengths=args.ppl, ppl_docs=args.ppl_docs,
        ppl_tail=args.ppl_tail, ppl_source=args.ppl_source, budgets=args.budgets, speed_lengths=args.speed,
        speed_new=args.speed_new, speed_budget=args.speed_budget, rounds=args.rounds, methods=args.methods,
        model_name=name, seed=args.seed,
        progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(longctx.format_report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
