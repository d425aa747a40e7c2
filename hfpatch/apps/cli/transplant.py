"""``hfpatch transplant``: give a model a new tokenizer and save the result as a plain transformers folder."""
from __future__ import annotations

import argparse
from pathlib import Path

import hfpatch
from hfpatch.apps.cli.common import DTYPES, CommandError, add_command, load_local_model, positive
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
                    "the initialisation. --out must not exist (or be empty) unless --force is given.",
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
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default: float32)")


def _cmd_transplant(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CommandError(f"--out {args.out}: already exists and is not empty; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out}: exists and is not a folder")
    model, _, folder = load_local_model(args.model, dtype=args.dtype, device="cpu")
    recipe = Recipe([{"type": TECHNIQUE, "tokenizer": args.tokenizer, "method": args.method, "donor": args.donor,
                      "base_tokenizer": str(folder), "k": args.k, "length_bias": args.length_bias}], name="transplant")
    handle = hfpatch.patch(model, recipe)
    stats = handle.stats[TECHNIQUE]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    handle.tokenizer.save_pretrained(out)
    print(f"transplanted {folder} -> {out}: {stats['new_vocab']} tokens ({stats['shared']} shared rows copied, "
          f"{stats['initialised']} initialised by {args.method}) in {stats['seconds']} s; chat template: "
          f"{stats['chat_template']}")
    return 0
