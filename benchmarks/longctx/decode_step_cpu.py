"""CPU time of one decode step at long context, per sparse-attention recipe, side by side (default kernels).

Made for a shared machine: with one torch thread, the process CPU time of a step is the work it did, whatever
the other jobs on the cores do to wall-clock time. One prefill (full attention, growable cache, last logits
only) is shared; each method then decodes ``--steps`` greedy tokens from a deep copy of the cache through the
patched model's forward (the decode step ``generate`` runs, without generate's per-step bookkeeping); methods
alternate over ``--rounds`` rounds and the first step of each run (the basis of the rescored setting, the first
selection) is reported apart from the median of the others. ``--profile LABEL`` adds a cProfile of that method's
last round (its time is then not comparable).

    python benchmarks/longctx/decode_step_cpu.py --model smollm2 --length 8192
    python benchmarks/longctx/decode_step_cpu.py --model gemma3 --length 8192
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import time

import torch

import hfpatch
from hfpatch import cache as hcache
from hfpatch import compat
from hfpatch.apps import assets
from hfpatch.apps.bench import longctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=["recycled-attention", "recycled-attention-paper",
                                                      "tidal-decode", "tidal-decode-paper"])
    ap.add_argument("--profile", default=None, help="method label to profile in the last round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = assets.load_smollm2() if args.model == "smollm2" else assets.load_gemma3()
    doc = longctx.documents(tok, args.length, 1)[0]
    ids = torch.tensor([doc[:args.length]])
    kwarg = compat.cache_kwarg(model)
    kv = hcache.growable_cache(model.config, args.length + args.steps + 8)
    start = time.perf_counter()
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kwarg: kv})
    kv, first = compat.output_cache(res), res.logits[:, -1].argmax(-1, keepdim=True)
    print(f"{args.model} {args.length} tokens, prefill {time.perf_counter() - start:.1f} s wall; "
          f"{longctx.machine()}; load {longctx.load_average()}", flush=True)
    methods = [("full attention", None, {})] + [
        (m, *longctx.parse_method(m)) for m in args.methods]

    def decode(cache, prof=None):
        token, per = first, []
        with torch.no_grad():
            for _ in range(args.steps):
                c0 = time.process_time()
                if prof:
                    prof.enable()
                out = model(input_ids=token, use_cache=True, **{kwarg: cache})
                if prof:
                    prof.disable()
                per.append(1000 * (time.process_time() - c0))
                cache, token = compat.output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        return per

    results: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
        for label, recipe, params in order:
            handle = hfpatch.patch(model, recipe, **{**params, "budget": args.budget}) if recipe else None
            try:
                prof = cProfile.Profile() if (rnd == args.rounds - 1 and label == args.profile) else None
                per = decode(copy.deepcopy(kv), prof)
                layers = handle.stats.get("tidal_decode", {}).get("selection_layers") if handle else None
            finally:
                if handle:
                    handle.unpatch()
            rest = sorted(per[1:])
            median = rest[len(rest) // 2]
            if prof is None:
                results.setdefault(label, []).append(median)
            print(f"round {rnd} {label}{f' {layers}' if layers else ''}: first step {per[0]:.1f} ms, median of the "
                  f"others {median:.1f} ms CPU{' (profiled)' if prof else ''}; load {longctx.load_average()}",
                  flush=True)
            if prof:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
                print(text.getvalue()[:5000])
    full = min(results["full attention"])
    print("\nmethod | ms CPU per decode step (best round median) | vs full attention (same growable cache)")
    for label, values in results.items():
        print(f"{label} | {min(values):.1f} | {full / min(values):.2f}x")


if __name__ == "__main__":
    main()
