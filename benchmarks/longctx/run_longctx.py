"""Long-context quality and speed of the sparse decode attention recipes on SmolLM2-135M (CPU script).

Three measurements, every method side by side in one process:

* needle-in-a-haystack: a 7-digit passcode sentence inside Python-documentation prose at several depths,
  the question at the end; greedy decode; a trial counts when every digit is right. The prompt's prefill
  is shared (it is full attention for every method); each method then decodes from a copy of the cache,
  so every answer token after the first comes from a decode step served by the method.
* perplexity of the last tokens: prefill the first L - T tokens of a real document, then teacher-force the
  last T tokens one decode step at a time; report exp(mean NLL) of the tokens predicted by decode steps.
* decode speed through plain ``model.generate`` (sdpa, DynamicCache, unchanged): time(prompt + N new) -
  time(prompt + 1 new), methods interleaved, the first round discarded.

    python benchmarks/longctx/run_longctx.py --niah 1024 2048 --ppl 4096 --speed 4096 --out longctx.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import time

import torch

import hfpatch
from hfpatch import assets

METHODS = ("recycled-attention", "tidal-decode", "quest", "sink-window")
NEEDLE = "The secret passcode for the archive is {code}. Remember this passcode."
QUESTION = "\n\nQuestion: What is the secret passcode for the archive?\nAnswer: The secret passcode for the archive is"


def configs(budgets):
    yield "full", None, {}
    for method in METHODS:
        for budget in budgets:
            yield method, method, {"budget": budget}


def greedy_from_cache(model, cache, first_token, steps):
    """Greedy decode `steps` tokens after a prefill: feed `first_token`, then each argmax."""
    out, token = [int(first_token)], first_token.view(1, 1)
    kwarg = hfpatch.compat.cache_kwarg(model)
    with torch.no_grad():
        for _ in range(steps):
            res = model(input_ids=token, use_cache=True, **{kwarg: cache})
            cache = hfpatch.compat.output_cache(res)
            token = res.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
    return out


def prefill(model, ids):
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True)
    return hfpatch.compat.output_cache(res), res.logits[:, -1]


def niah(model, tok, length, trials, budgets, seed=0):
    rng = random.Random(seed)
    prose = "\n\n".join(assets.prose_documents(40))
    prose_ids = tok(prose, add_special_tokens=False).input_ids
    q_ids = tok(QUESTION, add_special_tokens=False).input_ids
    results: dict = {}
    for trial in range(trials):
        code = "".join(str(rng.randint(1, 9)) for _ in range(7))
        needle = tok(" " + NEEDLE.format(code=code) + " ", add_special_tokens=False).input_ids
        start = rng.randint(0, len(prose_ids) - length - 10)
        hay = prose_ids[start:start + length - len(needle) - len(q_ids)]
        depth = (trial + 0.5) / trials
        cut = int(len(hay) * depth)
        ids = torch.tensor([hay[:cut] + needle + hay[cut:] + q_ids])
        cache, logits = prefill(model, ids)
        first = logits.argmax(-1)
        for label, recipe, params in configs(budgets):
            c = copy.deepcopy(cache)
            if recipe is None:
                out = greedy_from_cache(model, c, first, 10)
            else:
                with hfpatch.patch(model, recipe, **params):
                    out = greedy_from_cache(model, c, first, 10)
            text = tok.decode(out)
            ok = code in text.replace(" ", "")
            key = f"{label}@{params.get('budget', 'all')}"
            results.setdefault(key, 0)
            results[key] += int(ok)
        print(f"  niah {length} trial {trial + 1}/{trials} done", file=sys.stderr, flush=True)
    return {k: f"{v}/{trials}" for k, v in results.items()}


def perplexity(model, tok, length, tail, budgets, docs):
    results: dict = {}
    for doc_ids in docs:
        ids = torch.tensor([doc_ids[:length]])
        p = length - tail
        cache, _ = prefill(model, ids[:, :p])
        kwarg = hfpatch.compat.cache_kwarg(model)
        for label, recipe, params in configs(budgets):
            c = copy.deepcopy(cache)
            nll = []
            handle = hfpatch.patch(model, recipe, **params) if recipe else None
            try:
                with torch.no_grad():
                    for i in range(p, length - 1):
                        res = model(input_ids=ids[:, i:i + 1], use_cache=True, **{kwarg: c})
                        c = hfpatch.compat.output_cache(res)
                        nll.append(float(torch.nn.functional.cross_entropy(res.logits[:, -1], ids[:, i + 1])))
            finally:
                if handle is not None:
                    handle.unpatch()
            key = f"{label}@{params.get('budget', 'all')}"
            results.setdefault(key, []).extend(nll)
        print(f"  ppl {length}: doc done", file=sys.stderr, flush=True)
    full = math.exp(sum(results["full@all"]) / len(results["full@all"]))
    return {k: {"ppl": round(math.exp(sum(v) / len(v)), 3),
                "vs_full": f"{(math.exp(sum(v) / len(v)) / full - 1) * 100:+.2f}%", "tokens": len(v)}
            for k, v in results.items()}


def speed(model, tok, length, new, budget, rounds, doc_ids):
    ids = torch.tensor([doc_ids[:length]])
    methods = [("full", None)] + [(m, m) for m in METHODS]
    times: dict = {m: [] for m, _ in methods}
    for r in range(rounds + 1):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for label, recipe in order:
            handle = hfpatch.patch(model, recipe, budget=budget) if recipe else None
            try:
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)
                t1 = time.perf_counter()
                model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
                t2 = time.perf_counter()
            finally:
                if handle is not None:
                    handle.unpatch()
            if r:  # round 0 is the warm-up
                times[label].append(((t2 - t1) - (t1 - t0)) / (new - 1))
        print(f"  speed {length}: round {r}/{rounds}", file=sys.stderr, flush=True)
    full = sorted(times["full"])[len(times["full"]) // 2]
    return {m: {"ms_per_token": round(1000 * sorted(v)[len(v) // 2], 1),
                "speedup_vs_full": round(full / sorted(v)[len(v) // 2], 2)} for m, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--niah", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--ppl", type=int, nargs="*", default=[4096])
    ap.add_argument("--ppl-tail", type=int, default=64)
    ap.add_argument("--ppl-source", choices=["prose", "code"], default="prose")
    ap.add_argument("--ppl-docs", type=int, default=2, help="documents (windows) per perplexity length")
    ap.add_argument("--speed", type=int, nargs="*", default=[4096])
    ap.add_argument("--speed-new", type=int, default=24)
    ap.add_argument("--speed-budget", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budgets", type=int, nargs="*", default=[128, 256, 512, 1024])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = assets.load_smollm2()
    model.eval()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "model": "SmolLM2-135M-Instruct fp32 sdpa", "niah": {}, "ppl": {}, "speed": {}}
    for length in args.niah:
        result["niah"][length] = niah(model, tok, length, args.trials, [b for b in args.budgets if b < length])
        print(json.dumps({"niah": {length: result["niah"][length]}}), flush=True)
    for length in args.ppl:
        need = length * 4
        texts = assets.prose_documents(args.ppl_docs + 1, min_chars=need) if args.ppl_source == "prose" else \
            assets.code_documents(args.ppl_docs + 1, min_chars=need)
        docs = [d for d in (tok(t, add_special_tokens=False).input_ids for t in texts) if len(d) >= length]
        docs = docs[:args.ppl_docs]
        result["ppl"][length] = perplexity(model, tok, length, args.ppl_tail, args.budgets, docs)
        print(json.dumps({"ppl": {length: result["ppl"][length]}}), flush=True)
    for length in args.speed:
        texts = assets.code_documents(2, min_chars=length * 5)
        doc = tok(texts[0], add_special_tokens=False).input_ids
        result["speed"][length] = speed(model, tok, length, args.speed_new, args.speed_budget, args.rounds, doc)
        print(json.dumps({"speed": {length: result["speed"][length]}}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
