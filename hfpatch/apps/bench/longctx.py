"""Long-context benchmark of the sparse decode attention recipes (``hfpatch bench long-context``).

Three measurements, every method side by side in one process, on text from disk (Python documentation
prose and standard-library source, see ``hfpatch.apps.assets``):

* needle-in-a-haystack: a 7-digit passcode sentence inside prose at evenly spread depths, the question at
  the end; greedy decode; a trial counts when every digit is right. The prompt's prefill is shared (it is
  full attention for every method); each method then decodes from a copy of the cache, so every answer
  token after the first comes from a decode step served by the method.
* perplexity of the last tokens: prefill the first L - T tokens of a document, then teacher-force the last
  T tokens one decode step at a time; exp(mean NLL) of the tokens predicted by decode steps.
* decode speed through plain ``model.generate`` (greedy): the decode steps of one call timed from inside
  (a logits processor notes the time of each step, so the prefill is not counted), methods interleaved
  (order rotated per round), a warm-up round on a short prompt discarded, median of the measured rounds.
  The KV cache is reported as its own factor: full attention with transformers' ``DynamicCache`` (which
  concatenates the whole cache every step), full attention with hfpatch's growable cache
  (``hfpatch.cache``, preallocated and written in place) and each sparse recipe with the growable cache
  (``kv_cache="growable"``, the recipes install it), so the gain from the cache and the gain from sparsity
  are separate columns.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LogitsProcessorList

import hfpatch
from hfpatch import cache, compat
from hfpatch.apps import assets
from hfpatch.apps.bench.common import describe_machine, machine_line

METHODS = ("recycled-attention", "recycled-attention-rescored", "tidal-decode", "quest", "sink-window")
NEEDLE = "The secret passcode for the archive is {code}. Remember this passcode."
QUESTION = "\n\nQuestion: What is the secret passcode for the archive?\nAnswer: The secret passcode for the archive is"
#: A few minutes on a 2-core CPU with SmolLM2-135M; docs/results/sparse-attention.md lists the settings behind its numbers.
DEFAULTS = dict(niah_lengths=(1024, 2048), trials=5, ppl_lengths=(4096,), ppl_docs=1, ppl_tail=32,
                budgets=(256, 512), speed_lengths=(4096,), speed_new=16, speed_budget=512, rounds=1)


def machine() -> str:
    """One line naming the CPU, cores, torch threads and library versions (the speculative bench's line)."""
    return machine_line(describe_machine("cpu"))


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"recipe"`` or ``"recipe:key=value,..."`` (values as JSON, else strings; a list value as ``[2,12]``) ->
    (recipe, parameters)."""
    recipe, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [...] belong to a list value
        key, _, value = item.partition("=")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return recipe, params


def _configs(methods, budgets, length):
    yield "full", None, {}
    for method in methods:
        recipe, extra = parse_method(method)
        for budget in budgets:
            if budget < length:
                yield method, recipe, {**extra, "budget": budget}


def _key(label, params):
    return f"{label}@{params.get('budget', 'all')}"


def prefill(model, ids):
    """(cache, last-position logits) of one full-attention forward over ``ids``."""
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True)
    return compat.output_cache(res), res.logits[:, -1]


def _greedy_from_cache(model, kv, first_token, steps):
    """Greedy decode `steps` tokens after a prefill: feed `first_token`, then each argmax."""
    out, token = [int(first_token)], first_token.view(1, 1)
    kwarg = compat.cache_kwarg(model)
    with torch.no_grad():
        for _ in range(steps):
            res = model(input_ids=token, use_cache=True, **{kwarg: kv})
            kv = compat.output_cache(res)
            token = res.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
    return out


def _patched(model, recipe, params):
    return hfpatch.patch(model, recipe, **params) if recipe else contextlib.nullcontext()


def needle_prompts(tok, length, trials, seed=0):
    """The needle trials: ``(prompt ids [1, length], passcode, needle start, needle token ids)`` for each,
    a 7-digit passcode in Python-documentation prose at depths spread evenly over the trials."""
    rng = random.Random(seed)
    prose_ids = tok("\n\n".join(assets.prose_documents(40)), add_special_tokens=False).input_ids
    q_ids = tok(QUESTION, add_special_tokens=False).input_ids
    for trial in range(trials):
        code = "".join(str(rng.randint(1, 9)) for _ in range(7))
        needle = tok(" " + NEEDLE.format(code=code) + " ", add_special_tokens=False).input_ids
        start = rng.randint(0, len(prose_ids) - length - 10)
        hay = prose_ids[start:start + length - len(needle) - len(q_ids)]
        cut = int(len(hay) * (trial + 0.5) / trials)  # needle depths spread evenly over the trials
        yield torch.tensor([hay[:cut] + needle + hay[cut:] + q_ids]), code, cut, needle


def niah(model, tok, length, trials, budgets, methods=METHODS, seed=0, progress=None):
    """``{"method@budget": "hits/trials"}`` for needle retrieval at ``length`` tokens."""
    hits: dict[str, int] = {}
    for trial, (ids, code, _, _) in enumerate(needle_prompts(tok, length, trials, seed)):
        kv, logits = prefill(model, ids.to(model.device))
        first = logits.argmax(-1)
        for label, recipe, params in _configs(methods, budgets, length):
            with _patched(model, recipe, params):
                out = _greedy_from_cache(model, copy.deepcopy(kv), first, 10)
            key = _key(label, params)
            hits[key] = hits.get(key, 0) + int(code in tok.decode(out).replace(" ", ""))
        if progress:
            progress(f"niah {length}: trial {trial + 1}/{trials}")
    return {k: f"{v}/{trials}" for k, v in hits.items()}


def documents(tok, length, count, source="prose"):
    """``count`` token lists of at least ``length`` tokens from distinct documents on disk."""
    # one spare document: a few long ones tokenize shorter than 4 characters per token
    texts = (assets.prose_documents if source == "prose" else assets.code_documents)(count + 1, min_chars=length * 4)
    docs = [d for d in (tok(t, add_special_tokens=False).input_ids for t in texts) if len(d) >= length]
    if len(docs) < count:
        raise ValueError(f"only {len(docs)} {source} documents of {length} tokens on disk, {count} asked")
    return docs[:count]


def perplexity(model, length, tail, budgets, docs, methods=METHODS, progress=None):
    """Per method@budget: perplexity of the last ``tail`` tokens of each document, its ratio to full attention
    and the number of scored tokens."""
    nll: dict[str, list[float]] = {}
    kwarg = compat.cache_kwarg(model)
    for n, doc in enumerate(docs):
        ids = torch.tensor([doc[:length]], device=model.device)
        prefix = length - tail
        kv, _ = prefill(model, ids[:, :prefix])
        for label, recipe, params in _configs(methods, budgets, length):
            c = copy.deepcopy(kv)
            losses = nll.setdefault(_key(label, params), [])
            with _patched(model, recipe, params), torch.no_grad():
                for i in range(prefix, length - 1):
                    res = model(input_ids=ids[:, i:i + 1], use_cache=True, **{kwarg: c})
                    c = compat.output_cache(res)
                    losses.append(float(torch.nn.functional.cross_entropy(res.logits[:, -1], ids[:, i + 1])))
        if progress:
            progress(f"perplexity {length}: document {n + 1}/{len(docs)}")
    full = math.exp(sum(nll["full@all"]) / len(nll["full@all"]))
    out = {}
    for key, values in nll.items():
        ppl = math.exp(sum(values) / len(values))
        out[key] = {"ppl": round(ppl, 3), "vs_full": f"{(ppl / full - 1) * 100:+.2f}%", "tokens": len(values)}
    return out


class _StepClock:
    """A logits processor that only notes the time: generate calls it once per forward, so the gaps between
    its calls after the first are decode steps alone (the prefill comes before the first call)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def per_token(self) -> float:
        return (self.stamps[-1] - self.stamps[0]) / max(len(self.stamps) - 1, 1)


def speed(model, doc, length, new, budget, rounds, methods=METHODS, progress=None):
    """ms per decode token through ``model.generate`` and speed-ups vs full attention with transformers'
    DynamicCache (``vs_full_dynamic``) and vs full attention with the growable cache (``vs_full_growable``).

    Decode steps are timed inside one generate call per method and round (``_StepClock``), so the prefill
    is not counted; a first round on a 256-token prompt warms every method up and is discarded."""
    kwarg = compat.cache_kwarg(model)
    # (label, recipe, its extra parameters, whether the call brings hfpatch's growable cache itself)
    runs = [("full, DynamicCache", None, {}, False), ("full, growable cache", None, {}, True)]
    runs += [(f"{m}, growable cache", *parse_method(m), False) for m in methods]
    times: dict[str, list[float]] = {label: [] for label, *_ in runs}
    loads = [load_average()]
    for r in range(rounds + 1):
        n = length if r else min(length, 256)
        ids = torch.tensor([doc[:n]], device=model.device)
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for label, recipe, params, own_cache in order:
            clock = _StepClock()
            given = {kwarg: cache.growable_cache(model.config, n + new)} if own_cache else {}
            sparse = {"kv_cache": "growable", **params, "budget": budget}  # the recipes' growable cache
            with _patched(model, recipe, sparse):
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               logits_processor=LogitsProcessorList([clock]), **given)
            if r:  # round 0 is the warm-up
                times[label].append(clock.per_token())
        loads.append(load_average())
        if progress:
            progress(f"speed {length}: round {r}/{rounds}")
    median = {k: max(sorted(v)[len(v) // 2], 1e-9) for k, v in times.items()}
    base, own = median["full, DynamicCache"], median["full, growable cache"]
    return {"load_average_1/5/15": loads,
            "methods": {k: {"ms_per_token": round(1000 * v, 1), "vs_full_dynamic": round(base / v, 2),
                            "vs_full_growable": round(own / v, 2)} for k, v in median.items()}}


def run(model, tok, *, methods=METHODS, model_name: str = "", seed: int = 0, ppl_source: str = "prose",
        progress: Callable[[str], None] | None = None, **sizes: Any) -> dict[str, Any]:
    """Every measurement above; a JSON-able dict (see ``format_report``). ``sizes`` override ``DEFAULTS``
    (read at call time): niah_lengths, trials, ppl_lengths, ppl_docs, ppl_tail, budgets, speed_lengths,
    speed_new, speed_budget, rounds."""
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown size settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    z = {**DEFAULTS, **sizes}
    result: dict[str, Any] = {"machine": machine(), "model": model_name, "methods": list(methods),
                              "settings": {**z, "seed": seed, "ppl_source": ppl_source}, "niah": {}, "ppl": {},
                              "speed": {}}
    for length in z["niah_lengths"]:
        result["niah"][str(length)] = niah(model, tok, length, z["trials"], z["budgets"], methods, seed, progress)
        if progress:  # each finished section as a JSON line: a later failure does not lose it
            progress(json.dumps({"niah": {length: result["niah"][str(length)]}}))
    for length in z["ppl_lengths"]:
        docs = documents(tok, length, z["ppl_docs"], ppl_source)
        result["ppl"][str(length)] = perplexity(model, length, z["ppl_tail"], z["budgets"], docs, methods, progress)
        if progress:
            progress(json.dumps({"ppl": {length: result["ppl"][str(length)]}}))
    for length in z["speed_lengths"]:
        doc = documents(tok, length, 1, "code")[0]
        result["speed"][str(length)] = speed(model, doc, length, z["speed_new"], z["speed_budget"], z["rounds"],
                                             methods, progress)
    return result


def format_report(result: dict[str, Any]) -> str:
    """Needle, perplexity and speed tables, methods side by side."""
    methods = result["methods"]
    lines = [f"long-context bench: {result.get('model') or 'model'} on {result['machine']}", ""]
    header = "| check | context | budget | full | " + " | ".join(methods) + " |"
    rule = "| --- " * (4 + len(methods)) + "|"
    rows = []
    for length, cells in result["niah"].items():
        budgets = sorted({int(k.split("@")[1]) for k in cells if not k.startswith("full@")})
        for b in budgets:
            rows.append(f"| needle | {length} | {b} | {cells['full@all']} | "
                        + " | ".join(cells.get(f"{m}@{b}", "-") for m in methods) + " |")
    for length, cells in result["ppl"].items():
        budgets = sorted({int(k.split("@")[1]) for k in cells if not k.startswith("full@")})
        for b in budgets:
            def cell(m):
                c = cells.get(f"{m}@{b}")
                return "-" if c is None else f"{c['ppl']} ({c['vs_full']})"
            rows.append(f"| perplexity, last {cells['full@all']['tokens']} tokens | {length} | {b} | "
                        f"{cells['full@all']['ppl']} | " + " | ".join(cell(m) for m in methods) + " |")
    if rows:
        lines += [header, rule, *rows, ""]
    for length, data in result["speed"].items():
        lines.append(f"decode speed at {length} tokens (ms/token; speed-up vs full+DynamicCache, vs full+growable "
                     f"cache); load average before/after rounds: {', '.join(data['load_average_1/5/15'])}")
        lines.append("| method | ms/token | vs full, DynamicCache | vs full, growable cache |")
        lines.append("| --- | --- | --- | --- |")
        for label, c in data["methods"].items():
            lines.append(f"| {label} | {c['ms_per_token']} | {c['vs_full_dynamic']}x | {c['vs_full_growable']}x |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def save_report(result: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``longctx.json`` (every number of :func:`run`) into ``out_dir``; returns its path."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "longctx.json"
    path.write_text(json.dumps(result, indent=1))
    return path
