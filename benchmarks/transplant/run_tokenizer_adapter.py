"""Peer driver: transplant a model to a new tokenizer with the `tokenizer-adapter` package and save the result.

Runs in the peer's own virtual environment (transformers + tokenizer-adapter, no hfpatch), started by
benchmarks/transplant/peers.py:

    /tmp/ta/bin/python benchmarks/transplant/run_tokenizer_adapter.py MODEL_DIR NEW_TOKENIZER_DIR OUT_DIR \
        --method average [--sp-to-bytelevel]

`--sp-to-bytelevel` passes the package's documented `custom_preprocessing` hook for a SentencePiece new
vocabulary over a byte-level old one (`▁` -> `Ġ`), so that pieces are looked up in the old vocabulary as is.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tokenizer_adapter import TokenizerAdapter
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("tokenizer")
    parser.add_argument("out")
    parser.add_argument("--method", default="average")
    parser.add_argument("--sp-to-bytelevel", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    old_tok = AutoTokenizer.from_pretrained(args.model)
    new_tok = AutoTokenizer.from_pretrained(args.tokenizer)
    preprocess = (lambda piece: piece.replace("\u2581", "\u0120")) if args.sp_to_bytelevel else None
    adapter = TokenizerAdapter(method=args.method, custom_preprocessing=preprocess)
    model = adapter.adapt_from_pretrained(model, new_tok, old_tok)
    model.save_pretrained(args.out)
    new_tok.save_pretrained(args.out)
    print(f"tokenizer-adapter {args.method}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
