"""Bits per byte of SmolLM2-135M after a tokenizer transplant, per domain, vs SmolLM2 with its own tokenizer.

Each held-out document (prose: Python documentation topics; code: standard-library sources; both from
hfpatch.assets) is scored on its own: its tokens (no special tokens) follow one fixed start vector, the
original model's <|endoftext|> embedding, fed as inputs_embeds for every variant so that all start alike.
bits = sum of -log2 p(token); bytes = UTF-8 bytes of the document. Report: total bits / total bytes per
domain, and the ratio to the original model.

    python benchmarks/transplant/bpb.py --pairs gpt2 mistral --methods mean tokenadapt omp zero random \
        --docs 8 --max-chars 2000 --json bpb.json

Machine noise does not affect bits per byte (only the wall times printed beside them).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import hfpatch
from hfpatch import assets


def documents(n: int, max_chars: int) -> dict[str, list[str]]:
    # Held out: the last n of a spread of 2n documents (nothing here is tuned on the first half either).
    prose = assets.prose_documents(2 * n, min_chars=1000)[1::2]
    code = assets.code_documents(2 * n, min_chars=2000)[1::2]
    return {"prose": [d[:max_chars] for d in prose], "code": [d[:max_chars] for d in code]}


@torch.no_grad()
def bits_per_byte(model, tokenizer, docs: list[str], start: torch.Tensor) -> float:
    bits = 0.0
    nbytes = 0
    emb = model.get_input_embeddings()
    for doc in docs:
        ids = torch.tensor([tokenizer(doc, add_special_tokens=False)["input_ids"]])
        x = torch.cat([start[None, None, :].to(emb.weight.dtype), emb(ids)], dim=1)
        logits = model(inputs_embeds=x).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, :, None])[:, 0]
        bits += float(-logp.sum()) / float(torch.log(torch.tensor(2.0)))
        nbytes += len(doc.encode("utf-8"))
    return bits / nbytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["gpt2", "mistral"], choices=["gpt2", "mistral", "gemma"])
    parser.add_argument("--methods", nargs="+", default=["mean", "tokenadapt", "omp", "zero", "random"])
    parser.add_argument("--docs", type=int, default=8, help="documents per domain")
    parser.add_argument("--max-chars", type=int, default=2000, help="characters kept per document")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--omp-candidates", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = assets.load_smollm2()
    docs = documents(args.docs, args.max_chars)
    start = model.get_input_embeddings().weight[tok.convert_tokens_to_ids("<|endoftext|>")].detach().clone()
    results = {"machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
               "docs_per_domain": args.docs, "max_chars": args.max_chars, "rows": []}
    base = {dom: bits_per_byte(model, tok, d, start) for dom, d in docs.items()}
    results["rows"].append({"pair": "SmolLM2 (own tokenizer)", "method": "-", **base, "seconds": 0})
    print(f"SmolLM2 own tokenizer: " + ", ".join(f"{k} {v:.4f} bpb" for k, v in base.items()), flush=True)

    sources = {"gpt2": lambda: (str(assets.gpt2_tokenizer_dir()), None),
               "mistral": lambda: (str(assets.mistral_tokenizer_dir()), None)}
    if "gemma" in args.pairs:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from gemma_asset import gemma3_dir

        sources["gemma"] = lambda: (str(gemma3_dir()), str(gemma3_dir()))
    for pair in args.pairs:
        tok_dir, donor = sources[pair]()
        for method in args.methods:
            spec = {"type": "tokenizer_transplant", "tokenizer": tok_dir, "method": method, "k": args.k,
                    "omp_candidates": args.omp_candidates, "donor": donor if method == "omp" else None}
            t0 = time.perf_counter()
            with hfpatch.patch(model, hfpatch.Recipe([spec])) as handle:
                seconds = time.perf_counter() - t0
                scores = {dom: bits_per_byte(model, handle.tokenizer, d, start) for dom, d in docs.items()}
            row = {"pair": f"SmolLM2 -> {pair}" + (" (donor)" if spec["donor"] else ""), "method": method, **scores,
                   **{f"{dom}_ratio": scores[dom] / base[dom] for dom in scores}, "seconds": round(seconds, 1)}
            results["rows"].append(row)
            print(f"{row['pair']:<28} {method:<11} " + "  ".join(
                f"{dom} {scores[dom]:.4f} bpb (x{scores[dom] / base[dom]:.3f})" for dom in scores) +
                f"  init {seconds:.0f} s", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
