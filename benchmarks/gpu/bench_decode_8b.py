#!/usr/bin/env python
"""What a GPU user decodes with: whole decode steps and tree verification on a Llama-3-8B-shaped model.

    python benchmarks/gpu/bench_decode_8b.py --json decode8b.json              # H200, bf16, ~5 minutes
    python benchmarks/gpu/bench_decode_8b.py --device cpu --tiny --quick       # CPU smoke run of the script

The model has Llama-3-8B's shapes (32 layers, hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336,
vocabulary 128256) and random bf16 weights built on the device itself, so no weights travel; speed does not
depend on what the weights are. Two measurements, side by side in one process:

1. Decode through ``model.generate`` at 32k / 64k / 128k context, batch 1 and 8 (cases whose KV cache would not
   fit are skipped and listed): ms per decode step (the median gap between logits-processor calls, synchronised,
   so the prefill is not counted) for dense attention (DynamicCache), dense with ``cache_implementation="static"``
   (which transformers compiles on CUDA), and each sparse recipe (``--recipes``, budget ``--budget``) on its
   default cache and on the static cache (served sparse over the written prefix; the patched ``generate`` turns
   transformers' auto-compile off for it, since a traced step could only run dense), plus what ``handle.stats``
   says the recipe did (``sparse_fraction``, fallback reasons). Target (issue 16): >= 1.5x dense at 64k.
2. Tree verification: one forward of a 16 / 32 / 64 / 80-node draft tree (additive tree mask, explicit
   positions, the way the speculative engine verifies) over a ``--tree-context`` prefix, against a one-token
   decode step over the same prefix. The ratio decides which trees pay on this GPU. Target: 64 nodes <= 1.3x.

Not a test: pytest does not collect it. Prints markdown tables; ``--json`` writes every number.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--lengths", default="32768,65536,131072", help="context lengths, comma list")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma list")
    p.add_argument("--new", type=int, default=24, help="decode steps timed per call (default 24)")
    p.add_argument("--budget", type=int, default=2048, help="sparse recipes' budget (default 2048)")
    p.add_argument("--recipes", default="recycled-attention,tidal-decode", help="sparse recipes, comma list")
    p.add_argument("--tree-sizes", default="16,32,64,80", help="draft tree node counts, comma list")
    p.add_argument("--tree-context", type=int, default=2048, help="prefix length for the tree timings")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per case, interleaved (default 3)")
    p.add_argument("--memory-fraction", type=float, default=0.85,
                   help="skip decode cases whose KV cache + weights exceed this fraction of device memory")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of small width (smoke runs)")
    p.add_argument("--quick", action="store_true", help="one length, batch 1, one round")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.lengths = "512,1024" if args.lengths == p.get_default("lengths") else args.lengths
        args.budget, args.tree_context = min(args.budget, 128), min(args.tree_context, 256)
    if args.quick:
        args.lengths, args.batches, args.rounds = args.lengths.split(",")[0], "1", 1
    return args


def build_model(args):
    import torch
    import transformers

    shape = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
    if args.tiny:
        shape = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=1024)
    config = transformers.LlamaConfig(**shape, max_position_embeddings=262144, rope_theta=500000.0,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    # Small random weights keep activations finite over 32 layers; speed does not depend on the values.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = None  # random weights must not stop early
    return model.eval(), config, dtype


class StepClock:
    """A logits processor that notes when each forward finished (synchronised on CUDA)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.sync()
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return 1000 * statistics.median(gaps)


def kv_bytes(config, length, batch, dtype_bytes) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * length * batch * dtype_bytes


def decode_table(model, config, args) -> tuple[list[dict], list[str]]:
    import torch
    from transformers import LogitsProcessorList

    import hfpatch

    rows, skipped = [], []
    dtype_bytes = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * dtype_bytes
    capacity = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else float("inf")
    methods = [("dense", None, {}), ("dense, static cache", None, {"cache_implementation": "static"})]
    methods += [(name, name, {}) for name in args.recipes.split(",") if name]
    # the static cache is a served sparse path too (patched generate() turns transformers' auto-compile off)
    methods += [(f"{name}, static cache", name, {"cache_implementation": "static"})
                for name in args.recipes.split(",") if name]
    for length in (int(n) for n in args.lengths.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            need = weights + 1.3 * kv_bytes(config, length + args.new, batch, dtype_bytes)
            if need > args.memory_fraction * capacity:
                skipped.append(f"{length} tokens x batch {batch}: needs ~{need / 2**30:.0f} GiB")
                continue
            ids = torch.randint(3, config.vocab_size, (batch, length), device=args.device)
            times = {label: [] for label, *_ in methods}
            stats = {}
            for r in range(args.rounds + 1):  # round 0 warms up (kernel builds, allocator) and is discarded
                for label, recipe, extra in methods[r % len(methods):] + methods[:r % len(methods)]:
                    clock = StepClock(args.device)
                    handle = hfpatch.patch(model, recipe, budget=args.budget) if recipe else None
                    try:
                        with torch.no_grad():
                            model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                           logits_processor=LogitsProcessorList([clock]), **extra)
                        if handle is not None:
                            stats[label] = json.loads(json.dumps(handle.stats, default=str))
                    finally:
                        if handle is not None:
                            handle.unpatch()
                    if r:
                        times[label].append(clock.step_ms())
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            dense = statistics.median(times["dense"])
            for label, *_ in methods:
                ms = statistics.median(times[label])
                rows.append({"length": length, "batch": batch, "method": label, "ms_per_step": round(ms, 3),
                             "vs_dense": round(dense / ms, 2), "stats": stats.get(label)})
            print(f"# decoded {length} x {batch}", file=sys.stderr, flush=True)
    return rows, skipped


def tree_mask(nodes: int, past: int, dtype, device):
    """An additive mask for a random tree of ``nodes`` nodes after ``past`` cached positions, and each node's
    depth (its position offset): node i's parent is a random earlier node (node 0 is the root)."""
    import torch

    g = torch.Generator().manual_seed(nodes)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, nodes)]
    allowed = torch.zeros(nodes, nodes, dtype=torch.bool)
    depth = [0] * nodes
    for i, parent in enumerate(parents):
        allowed[i, i] = True
        if parent >= 0:
            allowed[i] |= allowed[parent]
            depth[i] = depth[parent] + 1
    mask = torch.full((nodes, past + nodes), torch.finfo(dtype).min, dtype=dtype)
    mask[:, :past] = 0
    mask[:, past:] = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    return mask[None, None].to(device), torch.tensor(depth, device=device)


def tree_table(model, config, args) -> list[dict]:
    import torch

    from hfpatch import compat

    kwarg = compat.cache_kwarg(model)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    past = args.tree_context
    ids = torch.randint(3, config.vocab_size, (1, past), device=args.device)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = compat.output_cache(out)
    dtype = next(model.parameters()).dtype
    sizes = [1] + [int(n) for n in args.tree_sizes.split(",")]
    inputs = {}
    for n in sizes:
        mask, depth = tree_mask(n, past, dtype, args.device)
        inputs[n] = (torch.randint(3, config.vocab_size, (1, n), device=args.device), mask, (past + depth)[None])
    times = {n: [] for n in sizes}
    for r in range(args.rounds * 5 + 2):
        for n in sizes:
            tokens, mask, positions = inputs[n]
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                model(tokens, attention_mask=mask, position_ids=positions, use_cache=True, **{kwarg: cache})
            sync()
            if r >= 2:
                times[n].append(1000 * (time.perf_counter() - start))
            cache.crop(-n)  # the verified nodes leave the cache again (crop takes a negative count)
    one = statistics.median(times[1])
    return [{"nodes": n, "ms": round(statistics.median(times[n]), 3), "vs_one_token": round(statistics.median(times[n]) / one, 2)}
            for n in sizes]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    model, config, dtype = build_model(args)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    import transformers

    print(f"# {machine}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}, "
          f"{'tiny' if args.tiny else 'Llama-3-8B'}-shaped random weights")
    trees = tree_table(model, config, args)
    print(f"\n## Tree verification over {args.tree_context} cached tokens (batch 1)\n")
    print("| nodes | ms per forward | vs one-token decode |\n| --- | --- | --- |")
    for row in trees:
        print(f"| {row['nodes']} | {row['ms']} | {row['vs_one_token']} |")
    decode, skipped = decode_table(model, config, args)
    print(f"\n## Decode through generate, {args.new} steps, budget {args.budget}\n")
    print("| context | batch | method | ms per step | vs dense | served sparse |\n| --- | --- | --- | --- | --- | --- |")
    for row in decode:
        served = ""
        if row["stats"]:
            served = "; ".join(f"{k}: sparse_fraction {v.get('sparse_fraction', 0):.2f}" + (
                f", fallback {v['fallback_reason']}" if v.get("fallback_reason") else "") + (
                ", auto-compile off" if v.get("auto_compile") else "")
                for k, v in row["stats"].items() if isinstance(v, dict))
        print(f"| {row['length']} | {row['batch']} | {row['method']} | {row['ms_per_step']} | {row['vs_dense']} | "
              f"{served} |")
    for line in skipped:
        print(f"- skipped: {line}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                         "trees": trees, "decode": decode, "skipped": skipped}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
