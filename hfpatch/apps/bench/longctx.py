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
  are separate columns. Each method's per-step decode times (ms) of its median round are kept as well
  (``step_ms``: ``new_tokens - 1`` steps, the first token comes from the prefill), so a slow first step or a
  periodic full-attention step shows.

Point it at any supported local model and any recipe (built-in name, a recipe file, or either with
``:param=value`` overrides): :func:`check_methods` refuses, in one line each, a recipe without a sparse
attention budget, a model the recipe does not support and a length past the model's window, before anything
is measured. :func:`save_report` writes ``longctx.json`` and, with matplotlib, ``longctx.png`` (needles found,
decode speed-up and per-step decode time per method).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LogitsProcessorList

import hfpatch
from hfpatch import cache, compat
from hfpatch.apps import assets
from hfpatch.apps.bench.common import describe_machine, machine_line, pyplot
from hfpatch.errors import HfpatchError, RecipeError
from hfpatch.recipe import resolve_recipe

#: The recipe named after each technique (its best measured setting) and the two baselines.
METHODS = ("recycled-attention", "tidal-decode", "quest", "sink-window")
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


def check_recipe(spec: str) -> None:
    """Raise ``ValueError`` (one line) unless ``spec`` names a recipe this bench can measure: it must resolve
    (built-in name or file), take its ``:param=value`` overrides and have a sparse attention ``budget=``."""
    name, params = parse_method(spec)
    if not name:
        raise ValueError(f"recipe {spec!r}: expected NAME, FILE or NAME:param=value,...")
    try:
        recipe = resolve_recipe(name)
        if params:
            recipe.with_overrides(params)
    except (HfpatchError, OSError, TypeError, ValueError) as exc:
        raise ValueError(f"recipe {spec!r}: {_first_line(exc)}") from None
    try:
        recipe.with_overrides({"budget": 1, "kv_cache": "growable"})
    except RecipeError:
        types = [t["type"] for t in recipe.techniques]
        raise ValueError(f"recipe {spec!r} has no sparse decode attention (techniques {types} take no budget= "
                         "and kv_cache=); the long-context bench measures recipes such as recycled-attention or "
                         "tidal-decode") from None


def check_methods(model, methods=METHODS, *, budgets=()) -> None:
    """Raise ``ValueError`` (one line) before anything is measured when a method cannot run on ``model``:
    a recipe :func:`check_recipe` refuses, or a model the recipe does not support (patched once and undone)."""
    for spec in methods:
        check_recipe(spec)
        recipe, params = parse_method(spec)
        try:
            with hfpatch.patch(model, recipe, **{"kv_cache": "growable", **params, "budget": min(budgets, default=1)}):
                pass
        except HfpatchError as exc:
            raise ValueError(f"recipe {spec!r} on this model: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    # only the last position's logits: with a large vocabulary (Gemma 3: 262k) the full [L, vocab] logits cost
    # more than the rest of the prefill (2 GB and ~0.7 TFLOP at 2k tokens)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True, **keep)
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
    probe = tok(" " + NEEDLE.format(code="1234567") + " ", add_special_tokens=False).input_ids
    shortest = len(probe) + len(q_ids) + 32  # some haystack around the needle
    if length < shortest:
        raise ValueError(f"needle length {length} is too short: the needle and the question alone take "
                         f"{len(probe) + len(q_ids)} tokens with this tokenizer; use at least {shortest}")
    if length + 10 > len(prose_ids):
        raise ValueError(f"needle length {length} is longer than the prose on disk ({len(prose_ids)} tokens with "
                         "this tokenizer); use a shorter length")
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

    def steps_ms(self) -> list[float]:
        """Each decode step's time in ms, in order (the gaps between consecutive calls)."""
        return [round(1000 * (b - a), 3) for a, b in zip(self.stamps, self.stamps[1:])]


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
    steps: dict[str, list[list[float]]] = {label: [] for label, *_ in runs}
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
                steps[label].append(clock.steps_ms())
        loads.append(load_average())
        if progress:
            progress(f"speed {length}: round {r}/{rounds}")
    median = {k: max(sorted(v)[len(v) // 2], 1e-9) for k, v in times.items()}
    # the step times of the round whose mean is the median, so step_ms and ms_per_token describe one call
    median_steps = {k: steps[k][times[k].index(sorted(v)[len(v) // 2])] for k, v in times.items()}
    base, own = median["full, DynamicCache"], median["full, growable cache"]
    return {"load_average_1/5/15": loads, "new_tokens": new,
            "methods": {k: {"ms_per_token": round(1000 * v, 1), "vs_full_dynamic": round(base / v, 2),
                            "vs_full_growable": round(own / v, 2), "step_ms": median_steps[k]}
                        for k, v in median.items()}}


def run(model, tok, *, methods=METHODS, model_name: str = "", seed: int = 0, ppl_source: str = "prose",
        progress: Callable[[str], None] | None = None, **sizes: Any) -> dict[str, Any]:
    """Every measurement above; a JSON-able dict (see ``format_report``). ``sizes`` override ``DEFAULTS``
    (read at call time): niah_lengths, trials, ppl_lengths, ppl_docs, ppl_tail, budgets, speed_lengths,
    speed_new, speed_budget, rounds."""
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown size settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    z = {**DEFAULTS, **sizes}
    check_methods(model, methods, budgets=(*z["budgets"], z["speed_budget"]))
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    result: dict[str, Any] = {"machine": machine(), "model": model_name, "methods": list(methods),
                              "settings": {**z, "seed": seed, "ppl_source": ppl_source},
                              "model_window": window, "niah": {}, "ppl": {},
                              "speed": {}}
    # Inputs first, so a length the text on disk cannot fill fails before minutes of measuring.
    for length in z["niah_lengths"]:
        next(needle_prompts(tok, length, 1, seed))
    ppl_docs = {length: documents(tok, length, z["ppl_docs"], ppl_source) for length in z["ppl_lengths"]}
    speed_docs = {length: documents(tok, length, 1, "code")[0] for length in z["speed_lengths"]}
    # Past its trained window a rotary-position model still runs but extrapolates: measured, and said so.
    longest = max((*z["niah_lengths"], *z["ppl_lengths"], *(n + z["speed_new"] for n in z["speed_lengths"])),
                  default=0)
    if window and longest > window:
        warnings.warn(f"{longest} tokens is past this model's window of {window} (max_position_embeddings): "
                      "the numbers there describe a model beyond its trained length", stacklevel=2)
    for length in z["niah_lengths"]:
        result["niah"][str(length)] = niah(model, tok, length, z["trials"], z["budgets"], methods, seed, progress)
        if progress:  # each finished section as a JSON line: a later failure does not lose it
            progress(json.dumps({"niah": {length: result["niah"][str(length)]}}))
    for length in z["ppl_lengths"]:
        result["ppl"][str(length)] = perplexity(model, length, z["ppl_tail"], z["budgets"], ppl_docs[length],
                                                methods, progress)
        if progress:
            progress(json.dumps({"ppl": {length: result["ppl"][str(length)]}}))
    for length in z["speed_lengths"]:
        result["speed"][str(length)] = speed(model, speed_docs[length], length, z["speed_new"], z["speed_budget"], z["rounds"],
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


def save_report(result: dict[str, Any], out_dir: str | os.PathLike, *, chart: bool = True) -> list[Path]:
    """Write ``longctx.json`` (every number of :func:`run`) and, with ``chart`` and matplotlib, ``longctx.png``
    (:func:`plot_report`) into ``out_dir``; returns the paths written."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "longctx.json"
    path.write_text(json.dumps(result, indent=1))
    written = [path]
    if chart:
        png = plot_report(result, out / "longctx.png")
        if png is not None:
            written.append(png)
    return written


def plot_report(result: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """One figure, a panel per measurement present: needles found per method (each needle length at the
    smallest budget below it), decode speed-up over full attention with transformers' DynamicCache (the stock
    baseline) per speed length, and per-step decode time at the longest speed length. None (with a warning)
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    methods = list(result["methods"])
    panels = [name for name in ("niah", "speed", "steps") if result["niah" if name == "niah" else "speed"]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.0 * max(len(panels), 1), 4.2), squeeze=False)
    axes = list(axes[0])
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: cycle[i % len(cycle)] for i, name in enumerate(["full", *methods])}  # one colour per method
    for ax, panel in zip(axes, panels):
        if panel == "niah":
            groups, series, labels = [], {m: [] for m in ["full", *methods]}, {m: [] for m in ["full", *methods]}
            for length, cells in result["niah"].items():
                budgets = sorted({int(k.rsplit("@", 1)[1]) for k in cells if not k.startswith("full@")})
                if not budgets:
                    continue
                groups.append(f"{length} / {budgets[0]}")
                for m in series:
                    cell = cells.get("full@all" if m == "full" else f"{m}@{budgets[0]}", "0/1")
                    hits, trials = (int(x) for x in cell.split("/"))
                    series[m].append(hits / max(trials, 1))
                    labels[m].append(cell)
            _bars(ax, groups, series, colours, labels)
            ax.set_ylim(0, 1.15)  # room for the counts above full bars
            ax.set_title("needles found (context / budget)", fontsize=10)
        elif panel == "speed":
            groups = list(result["speed"])
            series = {m: [result["speed"][n]["methods"].get(f"{m}, growable cache", {}).get("vs_full_dynamic", 0.0)
                          for n in groups] for m in methods}
            _bars(ax, [f"{n} tokens" for n in groups], series, colours,
                  {m: [f"{v:.2f}x" for v in values] for m, values in series.items()})
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.margins(y=0.12)
            ax.set_title("decode speed-up vs full attention", fontsize=10)
        else:
            longest = max(result["speed"], key=int)
            rows = result["speed"][longest]["methods"]
            for label, row in rows.items():
                steps = row.get("step_ms") or []
                method = label.rsplit(", ", 1)[0]
                style = ":" if "DynamicCache" in label else "--" if method == "full" else "-"
                ax.plot(range(1, len(steps) + 1), steps, label=label, linewidth=1.2, linestyle=style,
                        color=colours.get(method, "grey"))
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("decode step")
            ax.set_ylabel("ms")
            ax.set_title(f"decode step time at {longest} tokens", fontsize=9)
            ax.legend(fontsize=7, frameon=False)
    handles, names = axes[0].get_legend_handles_labels() if panels and panels[0] != "steps" else ([], [])
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8, frameon=False)
    fig.suptitle(f"{result.get('model') or 'model'}: {result['machine']}", fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))  # room for the legend below and the title above
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, groups: list[str], series: dict[str, list[float]], colours: dict[str, str],
          labels: dict[str, list[str]]) -> None:
    """Grouped bars: one group per x label, one bar per series, each series in its colour on every panel, its
    value written on it (a needle count of 0 has no bar to see)."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label, color=colours[label])
        ax.bar_label(bars, labels[label], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
