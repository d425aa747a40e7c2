"""Which layers retrieve the needle, and which layers' own selection would keep it: the analysis behind
TidalDecode's `selection_layers` for a model.

For each needle trial (`hfpatch.apps.bench.longctx.needle_prompts`; use a seed other than the held-out one) the model
answers with full (eager) attention; at each of the first answer steps, per layer:
- need: the largest attention mass any head of the layer puts on the passcode's tokens;
- cover: the fraction of the passcode's tokens inside that layer's own top-`budget` positions ranked as
  TidalDecode ranks them (attention probabilities summed over all heads).
A layer with high need is served when the nearest selection layer at or before it has high cover.

    python benchmarks/longctx/retrieval_layers.py --length 2048 --trials 8 --budget 256 --seed 1
"""
from __future__ import annotations

import argparse

import torch

from hfpatch import compat
from hfpatch.apps import assets
from hfpatch.apps.bench import longctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1, help="the README's held-out needles use seed 0")
    ap.add_argument("--steps", type=int, default=8, help="answer tokens inspected per trial")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = assets.load_smollm2()
    model.eval().set_attn_implementation("eager")  # eager returns the attention probabilities
    kwarg = compat.cache_kwarg(model)
    layers = model.config.num_hidden_layers
    need, cover = torch.zeros(layers), torch.zeros(layers)
    steps = hits = 0
    for ids, code, start, needle in longctx.needle_prompts(tok, args.length, args.trials, args.seed):
        digits = {t for text in (" " + code, code) for t in tok(text, add_special_tokens=False).input_ids}
        span = torch.tensor([start + i for i, t in enumerate(needle) if t in digits])
        with torch.no_grad():
            res = model(input_ids=ids, use_cache=True)
            token, answer = res.logits[:, -1:].argmax(-1), []
            for _ in range(args.steps):
                answer.append(int(token))
                cache = {kwarg: compat.output_cache(res)}
                res = model(input_ids=token, use_cache=True, output_attentions=True, **cache)
                for layer, probs in enumerate(res.attentions):
                    p = probs[0, :, -1, :]  # [heads, S]
                    need[layer] += p[:, span].sum(-1).max()
                    top = p.sum(0).topk(min(args.budget, p.shape[-1])).indices
                    cover[layer] += torch.isin(span, top).float().mean()
                steps += 1
                token = res.logits[:, -1:].argmax(-1)
        hits += int(code in tok.decode(answer).replace(" ", ""))
    print(f"full attention found {hits}/{args.trials} needles; {steps} answer steps; budget {args.budget}")
    print("| layer | need (max head mass on the passcode) | cover (passcode tokens in the layer's own top-budget) |")
    print("| --- | --- | --- |")
    for layer in range(layers):
        print(f"| {layer} | {need[layer] / steps:.3f} | {cover[layer] / steps:.3f} |")


if __name__ == "__main__":
    main()
