"""The assembled LLaVA (real DINOv2-S/14 + trained MLP projector + SmolLM2-135M-Instruct) answering "What digit
is this?" on the EVALUATION split, unpruned and through ``hfpatch.patch(llava, <recipe>, budget=...)``:
accuracy and agreement with the unpruned model's answer per method and budget, then (``--speed``) prefill
and whole-``generate`` time per budget on this CPU, configurations interleaved round by round.

    python benchmarks/vision/llava_answers.py --threads 2 --n 200 --speed --out /tmp/vision_llava.json
    python benchmarks/vision/llava_answers.py --methods hiprune:object_layer=4 divprune random_prune:seed=0
    python benchmarks/vision/llava_answers.py --split tuning --offset 600 --n 30 --budgets 28 \
        --methods todre:threshold=0 todre:threshold=1.0,start_layer=8      # calibration: tuning digits only

``--reference earlier.json`` reuses the unpruned answers of an earlier run on the same images and model
(checked), so a run split by budget does not repeat the unpruned pass. The JSON is rewritten after every
configuration, with each image's answer, so a run cut short keeps what finished.

A method is a registered technique name with optional parameters (``name:key=value,...``); ``random_prune``
without a seed runs seeds 0 .. --random-seeds - 1. A technique not registered in this checkout is reported as missing, not
skipped silently. Greedy decoding, up to 8 new tokens; the answer is the first digit in the text ("This is the digit 7.").
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import hfpatch
from hfpatch.apps import vision_assets as va

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_quality import machine  # noqa: E402

NEW_TOKENS = 8  # "This is the digit 7." is 7 tokens, then <|im_end|>


def parse_method(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key] = json.loads(value) if value[:1] in "-0123456789[{tn" else value
    return name, params


def recipe(name: str, params: dict, budget: int) -> dict:
    return {"hfpatch_version": "1.0", "name": f"{name}-{budget}",
            "techniques": [{"type": name, "budget": budget, **params}]}


def answers(llava, pre, pixels: torch.Tensor, batch: int) -> list[int | None]:
    out = []
    for i in range(0, len(pixels), batch):
        inputs = pre(pixels[i:i + batch])
        with torch.no_grad():
            ids = llava.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        out += [pre.digit(t) for t in pre.answer(ids[:, inputs["input_ids"].shape[1]:])]
    return out


def score(got: list, labels: list[int], reference: list) -> dict:
    n = len(labels)
    return {"accuracy": sum(g == y for g, y in zip(got, labels)) / n,
            "agreement": sum(g == r for g, r in zip(got, reference)) / n,
            "unparsed": sum(g is None for g in got)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="digits of the split (from --offset on: n/10 per digit)")
    ap.add_argument("--split", choices=["evaluation", "tuning"], default="evaluation",
                    help="evaluation (report numbers) or tuning (choose settings; the projector trained on "
                         "tuning rows 0-499, so calibrate from --offset 600 on)")
    ap.add_argument("--offset", type=int, default=0, help="skip the split's first OFFSET digits (a multiple of 10 "
                    "keeps the digits balanced)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="reuse the unpruned answers stored in this earlier --out file (same split, images, model)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[round(va.NUM_PATCHES * r) for r in (1 / 9, 2 / 9, 1 / 3)])
    ap.add_argument("--methods", nargs="+",
                    default=["hiprune", "divprune", "random_prune", "pool_prune", "fastv", "todre"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--random-seeds", type=int, default=5, help="seeds of random_prune when none is given")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--speed", action="store_true", help="also time prefill and generate per budget")
    ap.add_argument("--speed-only", action="store_true", help="only the timing (no accuracy runs)")
    ap.add_argument("--speed-method", default="hiprune", help="the pruning method timed per budget")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (the first is a discarded warm-up)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    llava, tok, pre = va.assembled_llava()
    model_folder = va.assembled_llava_dir().name
    full = va.mnist_digits(args.split, n=args.offset + args.n)
    data = va.LabelledImages(pixels=full.pixels[args.offset:], labels=full.labels[args.offset:],
                             index=full.index[args.offset:], names=full.names)
    labels = data.labels.tolist()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    known = {t["name"] if isinstance(t, dict) else getattr(t, "name", t) for t in hfpatch.list_techniques()}

    t0 = time.perf_counter()
    results, missing, errors = {}, {}, {}

    def write(speed=None) -> None:
        if args.out:
            args.out.write_text(json.dumps({
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "machine": machine(),
                "command": command, "model": model_folder, "split": args.split, "offset": args.offset,
                "rows": data.index.tolist(), "labels": labels, "evaluation_images": args.n, "budgets": args.budgets,
                "results": results, "missing": missing, "errors": errors, "speed": speed}, indent=2))

    if args.reference is not None and not args.speed_only:
        ref = json.loads(args.reference.read_text())
        if ref.get("model") != model_folder or ref.get("rows") != data.index.tolist():
            raise SystemExit(f"{args.reference} holds answers of model {ref.get('model')} on rows "
                             f"{str(ref.get('rows'))[:60]}..., not of {model_folder} on these {args.n} {args.split} "
                             "digits; run without --reference")
        results["unpruned"] = ref["results"]["unpruned"]
        base = results["unpruned"]["answers"]
    elif not args.speed_only:
        base = answers(llava, pre, data.pixels, args.batch)
        results["unpruned"] = {**score(base, labels, base), "seconds": round(time.perf_counter() - t0, 1),
                               "answers": base}
        write()
        print(f"unpruned: accuracy {100 * results['unpruned']['accuracy']:.1f}% ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    for spec in ([] if args.speed_only else args.methods):
        name, params = parse_method(spec)
        if name not in known:
            missing[name] = "not registered in this checkout (hfpatch.list_techniques())"
            continue
        seeds = ([dict(params, seed=s) for s in range(args.random_seeds)] if name == "random_prune" and "seed" not in params
                 else [params])
        for budget in args.budgets:
            runs = []
            for p in seeds:
                t1 = time.perf_counter()
                try:
                    with hfpatch.patch(llava, recipe(name, p, budget)) as handle:
                        got = answers(llava, pre, data.pixels, args.batch)
                        stats = dict(handle.stats)
                except Exception as e:  # a technique still being written: report it, measure the rest
                    errors[f"{spec}@{budget}"] = f"{type(e).__name__}: {e}"
                    print(f"{spec}@{budget}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    break
                runs.append({**score(got, labels, base), "seconds": round(time.perf_counter() - t1, 1),
                             "stats": {k: str(v)[:300] for k, v in stats.items()}, "answers": got})
            if not runs:
                continue
            key = f"{spec}@{budget}"
            if len(runs) == 1:
                results[key] = runs[0]
            else:
                results[key] = {m: statistics.mean(r[m] for r in runs) for m in ("accuracy", "agreement", "unparsed")}
                results[key].update({f"{m}_min": min(r[m] for r in runs) for m in ("accuracy", "agreement")})
                results[key].update({f"{m}_max": max(r[m] for r in runs) for m in ("accuracy", "agreement")})
                results[key]["seeds"] = len(runs)
                results[key]["stats"] = runs[0]["stats"]
                results[key]["runs"] = [{m: r[m] for m in ("accuracy", "agreement", "unparsed", "answers")}
                                        for r in runs]
            print(f"{key}: accuracy {100 * results[key]['accuracy']:.1f}%, agreement "
                  f"{100 * results[key]['agreement']:.1f}%", file=sys.stderr, flush=True)
            write()

    speed = None
    if args.speed or args.speed_only:
        speed = time_budgets(llava, pre, data.pixels, args)

    ub = results["unpruned"]["accuracy"] if results else 1.0
    print("| method | tokens kept | accuracy | % of unpruned | agreement with unpruned | answers naming no digit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, r in results.items():
        method, _, budget = key.partition("@")
        budget = int(budget) if budget else va.NUM_PATCHES
        spread = (f" ({100 * r['accuracy_min']:.1f}-{100 * r['accuracy_max']:.1f})" if "accuracy_min" in r else "")
        print(f"| {method} | {budget} ({100 * budget / va.NUM_PATCHES:.0f}%) | {100 * r['accuracy']:.1f}{spread} | "
              f"{100 * r['accuracy'] / ub:.1f} | {100 * r['agreement']:.1f} | {r['unparsed']:g} |")
    if speed:
        print(f"\nspeed ({args.speed_method}, batch 1, median of {args.rounds - 1} interleaved rounds):")
        print("| tokens kept | prefill ms | prefill speed-up | generate ms | generate speed-up |")
        print("| --- | --- | --- | --- | --- |")
        for row in speed["rows"]:
            print(f"| {row['budget']} | {row['prefill_ms']:.0f} | {row['prefill_speedup']:.2f}x | "
                  f"{row['generate_ms']:.0f} | {row['generate_speedup']:.2f}x |")
    for name, why in missing.items():
        print(f"missing: {name}: {why}")
    for key, why in errors.items():
        print(f"error: {key}: {why}")
    write(speed)
    return 0


def time_budgets(llava, pre, pixels, args) -> dict:
    """Prefill (one forward over the prompt) and whole generate (8 new tokens) per budget, batch 1, the
    configurations interleaved within each round so that load from other processes hits them alike."""
    name, params = parse_method(args.speed_method)
    configs = [None] + list(args.budgets)
    times = {c: {"prefill": [], "generate": []} for c in configs}
    for r in range(args.rounds):
        inputs = pre(pixels[r % len(pixels):r % len(pixels) + 1])
        for c in configs:
            handle = hfpatch.patch(llava, recipe(name, params, c)) if c is not None else None
            try:
                with torch.no_grad():
                    t = time.perf_counter()
                    llava(**inputs)
                    prefill = time.perf_counter() - t
                    t = time.perf_counter()
                    llava.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                    gen = time.perf_counter() - t
            finally:
                if handle is not None:
                    handle.unpatch()
            if r > 0:  # round 0 is the warm-up
                times[c]["prefill"].append(prefill)
                times[c]["generate"].append(gen)
    base_p = statistics.median(times[None]["prefill"])
    base_g = statistics.median(times[None]["generate"])
    rows = []
    for c in configs:
        p, g = statistics.median(times[c]["prefill"]), statistics.median(times[c]["generate"])
        rows.append({"budget": c or va.NUM_PATCHES, "method": name if c else "unpruned", "prefill_ms": 1000 * p,
                     "generate_ms": 1000 * g, "prefill_speedup": base_p / p, "generate_speedup": base_g / g,
                     "prefill_all_ms": [round(1000 * x, 1) for x in times[c]["prefill"]],
                     "generate_all_ms": [round(1000 * x, 1) for x in times[c]["generate"]]})
    return {"method": args.speed_method, "rounds": args.rounds, "new_tokens": NEW_TOKENS, "rows": rows}


if __name__ == "__main__":
    raise SystemExit(main())
