"""Where the CPU time of one decode step goes at long context: output head vs MLPs vs attention projections vs
attention itself, for a model's full attention and for sparse recipes, at any context length without a prefill.

The KV cache is filled with random keys and values of the right shapes (hfpatch's growable cache, sliding-window
layers keeping their window as transformers does); the time of a decode step does not depend on the values, so
a 32k context costs no 32k prefill. Each step is one forward of one token through the model (what ``generate``
runs per step, without its bookkeeping), timed as process CPU time with one torch thread, so other jobs on a
shared core change the wall clock but not the numbers much. Forward hooks attribute each step's time to:

- head: the output projection (``lm_head``; Gemma 3's is the tied 262,144 x 640 embedding matrix);
- MLP: every decoder layer's MLP;
- attention projections: q/k/v/o projections;
- attention: the rest of each attention module (norms of q/k, rotary, cache update, the scores and the
  weighted sum over the cache), apart for full-attention layers (what a sparse technique changes) and
  sliding-window layers (which attend to their window whatever the technique);
- other: everything else (embedding, layer norms, residual adds, mask construction).

It also prints the bytes a step reads by the same split (fp32 weights and the KV cache it attends to) and the
speed-up a perfect sparse attention (free attention in every full-attention layer) could give at most, by bytes
and by the measured time of the full-attention step.

    python benchmarks/longctx/decode_breakdown.py --model gemma3 --lengths 8192 32768
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import hfpatch
from hfpatch import cache as hcache
from hfpatch import compat
from hfpatch.apps import assets
from hfpatch.apps.bench import longctx

PARTS = ("head", "mlp", "attention projections", "attention, full layers", "attention, sliding layers", "other")


def filled_cache(model, length: int, seed: int = 0):
    """A growable cache holding `length` positions of random keys/values in every layer (float32)."""
    text = model.config.get_text_config(decoder=True)
    kv_heads = text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = hcache.growable_cache(model.config, length + 64)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(text.num_hidden_layers):
        k = torch.randn(1, kv_heads, length, dim, generator=gen)
        v = torch.randn(1, kv_heads, length, dim, generator=gen)
        kv.update(k, v, layer)
    return kv


class Clock:
    """Forward hooks that add each module's process CPU time to a part (nested parts subtract)."""

    def __init__(self, model):
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.handles = []
        layers = model.model.layers if hasattr(model, "model") else model.layers
        self._watch(model.lm_head, "head")
        for layer in layers:
            self._watch(layer.mlp, "mlp")
            kind = "attention, sliding layers" if getattr(layer.self_attn, "sliding_window", None) else \
                "attention, full layers"
            self._watch(layer.self_attn, kind)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                self._watch(getattr(layer.self_attn, name), "attention projections", inside=kind)

    def _watch(self, module, part, inside=None):
        started = {}

        def pre(*_):
            started["t"] = time.process_time()

        def post(*_):
            spent = time.process_time() - started["t"]
            self.totals[part] += spent
            if inside:
                self.totals[inside] -= spent

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()


def weight_bytes(model) -> dict[str, float]:
    """MB of fp32 weights a decode step reads, per part (the embedding reads one row: counted as 0)."""
    text = model.config.get_text_config(decoder=True)
    layers = model.model.layers
    mb = lambda mods: sum(p.numel() for m in mods for p in m.parameters()) * 4 / 1e6  # noqa: E731
    return {
        "head": model.lm_head.weight.numel() * 4 / 1e6,
        "mlp": mb([l.mlp for l in layers]),
        "attention projections": mb([getattr(l.self_attn, n) for l in layers for n in ("q_proj", "k_proj", "v_proj", "o_proj")]),
        "layers": text.num_hidden_layers,
    }


def kv_bytes(model, length: int) -> tuple[float, float]:
    """(MB of K and V read by the full-attention layers, MB read by the sliding-window layers) at `length`."""
    text = model.config.get_text_config(decoder=True)
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_position = 2 * text.num_key_value_heads * dim * 4 / 1e6  # K and V, fp32
    kinds = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    window = getattr(text, "sliding_window", None) or length
    full = sum(1 for k in kinds if "sliding" not in k)
    return full * length * per_position, (len(kinds) - full) * min(window, length) * per_position


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="gemma3")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--methods", nargs="*", default=["recycled-attention"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = assets.load_smollm2() if args.model == "smollm2" else assets.load_gemma3()
    kwarg = compat.cache_kwarg(model)
    weights = weight_bytes(model)
    print(f"{args.model}; {longctx.machine()}; load {longctx.load_average()}; {args.threads} thread(s)")
    print(f"weights read per step (fp32 MB): head {weights['head']:.0f}, MLP {weights['mlp']:.0f}, "
          f"attention projections {weights['attention projections']:.0f}")
    for length in args.lengths:
        full_kv, sliding_kv = kv_bytes(model, length)
        total = weights["head"] + weights["mlp"] + weights["attention projections"] + full_kv + sliding_kv
        print(f"\n{length} tokens: KV read per step {full_kv:.0f} MB (full-attention layers) + {sliding_kv:.0f} MB "
              f"(sliding-window layers); total {total:.0f} MB; bound of a perfect sparse attention by bytes: "
              f"{total / (total - full_kv):.3f}x")
        base = filled_cache(model, length)
        token = torch.tensor([[1000]])
        print("method | ms CPU / step (median) | " + " | ".join(PARTS))
        for label, recipe, params in [("full attention", None, {})] + [(m, *longctx.parse_method(m)) for m in args.methods]:
            handle = hfpatch.patch(model, recipe, **{**params, "budget": args.budget}) if recipe else None
            clock = Clock(model)
            steps, parts = [], []
            try:
                cache = copy.deepcopy(base)
                with torch.no_grad():
                    for _ in range(args.steps):
                        clock.totals = dict.fromkeys(PARTS, 0.0)
                        start = time.process_time()
                        out = model(input_ids=token, use_cache=True, **{kwarg: cache})
                        spent = time.process_time() - start
                        cache = compat.output_cache(out)
                        clock.totals["other"] = spent - sum(clock.totals.values())
                        steps.append(spent)
                        parts.append(dict(clock.totals))
            finally:
                clock.remove()
                if handle:
                    handle.unpatch()
            order = sorted(range(1, len(steps)), key=lambda i: steps[i])  # the first step is set-up (basis etc.)
            mid = order[len(order) // 2]
            cells = " | ".join(f"{1000 * parts[mid][p]:.1f} ({100 * parts[mid][p] / steps[mid]:.0f}%)" for p in PARTS)
            print(f"{label} | {1000 * steps[mid]:.1f} | {cells}", flush=True)
            if recipe is None:
                free = steps[mid] / (steps[mid] - parts[mid]["attention, full layers"])
                print(f"  bound of a perfect sparse attention by this step's time (full layers' attention free): "
                      f"{free:.2f}x", flush=True)


if __name__ == "__main__":
    main()
