"""How stale may a sparse decode step's position set be? Perplexity of the last tokens of long documents
when each decode step attends to `budget` positions chosen in different ways (analysis behind
`recycled_attention`'s `rescore_rank`; docs/results/sparse-attention.md).

Variants (all with 4 sinks + a 32-token window inside the budget, like the recipes):
  exact-every:N   the exact top-`budget` positions of the current query's attention probabilities (summed per
                  KV group), re-selected every N steps and reused in between (N=1: an oracle selection per step)
  stale-rerank:C  the paper's full step every 16 steps keeps its top-C positions; each step in between re-ranks
                  those C with its own query (exactly) and attends to the best `budget` of them
  rescore:R       `recycled_attention(rescore_rank=R, stride=64)`: per-step selection by rank-R key scores
  paper           `recycled_attention` at the paper's fixed stride 16

    python benchmarks/longctx/selection_staleness.py --length 8192 --source code \
        exact-every:1 exact-every:2 exact-every:4 exact-every:8 stale-rerank:2048 rescore:8 rescore:16 paper

Tune on `--source code` (the held-out perplexity documents of docs/results/sparse-attention.md are prose).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys

import torch

import hfpatch
from hfpatch import compat
from hfpatch.apps import assets
from hfpatch.apps.bench import longctx
from hfpatch.kernels import group_attention_scores


def exact_every(technique, every):
    """Replace the technique's decode: exact selection every `every` steps, attended sparsely."""
    def decode(layer, state, query, key, valid, scale):
        length = key.shape[2]
        if technique.covers_all(length):
            return None
        if state.index is None or state.steps_since_full + 1 >= every:
            state.steps_since_full, state.full_len = 0, length
            state.index = technique.score_and_select(query, key, valid, scale)
            return state.index
        state.steps_since_full += 1
        return technique.with_recent(state.index, state.full_len, length)
    return decode


def stale_rerank(technique, candidates):
    """Replace the technique's decode: the full step keeps top-`candidates`; later steps re-rank them."""
    params = technique.params

    def decode(layer, state, query, key, valid, scale):
        length = key.shape[2]
        if state.index is None or state.steps_since_full + 1 >= params.stride:
            state.steps_since_full, state.full_len = 0, length
            saved, params.budget = params.budget, candidates
            try:
                state.index = technique.score_and_select(query, key, valid, scale)
            finally:
                params.budget = saved
            return None
        state.steps_since_full += 1
        pool = state.index  # [B, Hkv, C]
        b, hkv, c = pool.shape
        keys = key.gather(2, pool[..., None].expand(b, hkv, c, key.shape[-1]))
        scores = group_attention_scores(query, keys, scale=scale)
        forced = (pool < params.sink) | (pool >= state.full_len - params.window)
        pick = scores.masked_fill(forced, float("inf")).topk(min(params.budget, c), dim=-1).indices
        return technique.with_recent(pool.gather(2, pick), state.full_len, length)
    return decode


def patched(model, spec, budget):
    kind, _, value = spec.partition(":")
    if kind == "paper":
        return hfpatch.patch(model, "recycled-attention-paper", budget=budget)
    if kind == "rescore":
        return hfpatch.patch(model, "recycled-attention-paper", budget=budget, rescore_rank=int(value), stride=64)
    handle = hfpatch.patch(model, "recycled-attention-paper", budget=budget)
    technique = handle.technique("recycled_attention")
    technique.decode = {"exact-every": exact_every, "stale-rerank": stale_rerank}[kind](technique, int(value))
    return handle


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--tail", type=int, default=64)
    ap.add_argument("--source", choices=["prose", "code"], default="code")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = assets.load_smollm2()
    model.eval()
    kwarg = compat.cache_kwarg(model)
    nll: dict[str, list[float]] = {}
    for n, doc in enumerate(longctx.documents(tok, args.length, args.docs, args.source)):
        ids = torch.tensor([doc[:args.length]])
        prefix = args.length - args.tail
        cache, _ = longctx.prefill(model, ids[:, :prefix])
        for spec in ["full", *args.variants]:
            handle = contextlib.nullcontext() if spec == "full" else patched(model, spec, args.budget)
            c, losses = copy.deepcopy(cache), nll.setdefault(spec, [])
            with handle, torch.no_grad():
                for i in range(prefix, args.length - 1):
                    res = model(input_ids=ids[:, i:i + 1], use_cache=True, **{kwarg: c})
                    c = compat.output_cache(res)
                    losses.append(float(torch.nn.functional.cross_entropy(res.logits[:, -1], ids[:, i + 1])))
        print(f"document {n + 1}/{args.docs} done", file=sys.stderr, flush=True)
    full = math.exp(sum(nll["full"]) / len(nll["full"]))
    print(f"{args.source} documents, {args.length} tokens, budget {args.budget}, last {args.tail - 1} tokens x "
          f"{args.docs} documents")
    print("| selection | perplexity | vs full |\n| --- | --- | --- |")
    for spec, values in nll.items():
        ppl = math.exp(sum(values) / len(values))
        print(f"| {spec} | {ppl:.3f} | {(ppl / full - 1) * 100:+.2f}% |")


if __name__ == "__main__":
    main()
