"""Side-by-side speed benchmark of lossless speculative `generate` recipes (``hfpatch bench``).

One process, one model, runs interleaved prompt by prompt: plain greedy decoding, transformers' own prompt
lookup decoding (``prompt_lookup_num_tokens``), and each recipe. For every prompt and method it records wall
time, new tokens, the mean number of tokens accepted per target forward (MAT, the hardware-independent
figure) and whether the output is token-identical to plain decoding.

    >>> from hfpatch.apps import assets
    >>> from hfpatch.apps.bench import speculative
    >>> model, tok = assets.load_smollm2()
    >>> result = speculative.run_bench(model, tok, max_new_tokens=64, per_category=1)
    >>> print(speculative.format_report(result))
    >>> speculative.save_report(result, "bench_out")     # bench.json (+ bench.png with matplotlib)

Fairness rules the runner follows (DESIGN.md §7): every method is warmed up once on a prompt outside the
measured set and that run is discarded; the order of methods rotates from prompt to prompt so that slow
drift of the machine (thermal, other processes) does not favour one method; each recipe is applied once to
its own copy of the model and kept for the whole run, so drafter state that persists across calls (the Token
Recycling table, the n-gram memory) warms up as it would in a user's process, but never from the prompt it is
measured on.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hfpatch.apps import assets
from hfpatch.apps.bench.common import (
    describe_machine,
    encode_prompt,
    format_table,
    machine_line,
    torch_threads,
    usable_cores,
)
from hfpatch.errors import HfpatchError
from hfpatch.patcher import patch

__all__ = [
    "CATEGORIES",
    "DEFAULT_RECIPES",
    "BenchPrompt",
    "SpeculativeBench",
    "default_prompts",
    "warmup_prompt",
    "load_prompts",
    "run_bench",
    "summarize",
    "format_report",
    "save_report",
]

#: Spec-Bench-like task mix (Spec-Bench has no code task; the issue asks for one).
CATEGORIES = ("rewrite", "summarize", "code", "qa", "chat")
#: The built-in speculative recipes, in the order the report lists them.
DEFAULT_RECIPES = ("token-recycling", "ngram-lookup", "recycling+lookup")
VANILLA = "vanilla"
PROMPT_LOOKUP = "hf-prompt-lookup"

# Open-ended requests with nothing to copy from: the category where retrieval drafters get least help.
_CHAT_INSTRUCTIONS = (
    "Write a short poem about the sea at night.",
    "Explain to a beginner what a hash table is and why lookups are fast.",
    "Give me three tips for writing clear emails at work.",
    "Describe how a bicycle gear system works.",
    "What are the pros and cons of working from home?",
    "Write a short story about a robot who learns to paint.",
    "How do vaccines train the immune system? Keep it simple.",
    "Plan a one-day walking tour of a small old town.",
    "Explain the difference between weather and climate.",
    "Suggest a healthy breakfast and explain why it is healthy.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "Write a polite message declining a meeting invitation.",
    "List the main steps to start learning a new language.",
    "What makes a good team leader?",
    "Describe the water cycle in a few sentences.",
    "Give advice to someone who is nervous before a job interview.",
)


@dataclasses.dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt.

    ``chat``: wrap the text as a user message with the tokenizer's chat template when it has one (instruct
    models); code continuation prompts are raw prefixes and set it to False.
    """

    category: str
    text: str
    chat: bool = True
    source: str = ""


def _is_code_category(category: str) -> bool:
    return "code" in category.lower()


# --------------------------------------------------------------------------------------------------
# prompt sets


def _split_topic(doc: str) -> tuple[str, str]:
    """(title, body) of a pydoc topic: its first line is a title underlined with '*' or '='."""
    lines = doc.strip().splitlines()
    if len(lines) > 2 and lines[1].strip() and set(lines[1].strip()) <= set("*=-"):
        return lines[0].strip(), "\n".join(lines[2:]).strip()
    return "", doc.strip()


def _clip(text: str, max_chars: int, boundary: str) -> str:
    """``text`` cut to at most ``max_chars`` at the last ``boundary`` (paragraph or line end) before it."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind(boundary, 0, max_chars)
    if cut < max_chars // 2:  # no boundary in the second half: a line end is the next best cut
        cut = text.rfind("\n", 0, max_chars)
    if cut < max_chars // 2:
        cut = max_chars
    return text[:cut].rstrip()


def _prose_prompt(category: str, doc: str, passage_chars: int, source: str) -> BenchPrompt:
    title, body = _split_topic(doc)
    passage = _clip(body, passage_chars, "\n\n")
    if category == "rewrite":
        text = ("Rewrite the following passage in plain, simple English. Keep every fact and example, "
                f"and keep the code unchanged.\n\n{passage}")
    elif category == "summarize":
        text = f"Summarize the following passage in a few sentences.\n\n{passage}"
    elif category == "qa":
        subject = title or "this topic"
        text = (f"Read the passage and answer the question by quoting the passage word for word.\n\n"
                f"Passage:\n{passage}\n\nQuestion: What does the passage say about {subject}?")
    else:  # pragma: no cover - callers pass prose categories only
        raise ValueError(category)
    return BenchPrompt(category, text, chat=True, source=source)


def default_prompts(per_category: int = 3, *, categories: Sequence[str] = CATEGORIES, passage_chars: int = 1200,
                    code_chars: int = 1500) -> list[BenchPrompt]:
    """The default Spec-Bench-like prompt set, built from real text on disk (no network), deterministically.

    Categories: ``rewrite`` and ``summarize`` (a Python documentation passage, chat-formatted), ``qa`` (a
    question about a passage, answered by quoting it), ``code`` (the raw first lines of a standard-library
    module, continued as plain text) and ``chat`` (a short open-ended request). Every passage and code file
    appears in one prompt only, and none is the warm-up prompt's (see :func:`warmup_prompt`), so drafter state
    carried from one prompt to the next never contains the passage being measured. Prompts are interleaved by
    category (rewrite 1, summarize 1, ..., rewrite 2, ...), so a prefix of the list covers every category.

    Example:
        >>> [p.category for p in default_prompts(1)]
        ['rewrite', 'summarize', 'code', 'qa', 'chat']
    """
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {list(CATEGORIES)}")
    prose_categories = [c for c in categories if c in ("rewrite", "summarize", "qa")]
    # An even spread always starts with the first qualifying topic: that one is the warm-up's, skip it.
    prose = _prose_documents(len(prose_categories) * per_category + 1)[1:]
    code = assets.code_documents(per_category, min_chars=2000) if "code" in categories else []
    prompts: list[BenchPrompt] = []
    used = 0
    for i in range(per_category):
        for category in categories:
            if category in prose_categories:
                title, _ = _split_topic(prose[used])
                prompts.append(_prose_prompt(category, prose[used], passage_chars,
                                             f"pydoc_data.topics: {title or used}"))
                used += 1
            elif category == "code":
                first_line = code[i].strip().splitlines()[0][:60]
                prompts.append(BenchPrompt("code", _clip(code[i], code_chars, "\n\n") + "\n", chat=False,
                                           source=f"stdlib source starting {first_line!r}"))
            else:
                index = (i * len(_CHAT_INSTRUCTIONS)) // per_category % len(_CHAT_INSTRUCTIONS)
                prompts.append(BenchPrompt("chat", _CHAT_INSTRUCTIONS[index], chat=True, source="built-in"))
    return prompts


def _prose_documents(n: int) -> list[str]:
    try:
        return assets.prose_documents(n, min_chars=800)
    except ValueError as exc:
        raise ValueError(f"{exc} (the default prompt set has one passage per prose prompt; lower "
                         "per_category)") from None


def warmup_prompt(passage_chars: int = 1200) -> BenchPrompt:
    """A prompt outside every default prompt set: the passage of ``default_prompts`` no prompt uses.

    It is a rewrite request, so it exercises the drafters the way the measured prompts do.
    """
    docs = assets.prose_documents(1, min_chars=800)  # the first qualifying topic, which default_prompts skips
    title, _ = _split_topic(docs[0])
    prompt = _prose_prompt("rewrite", docs[0], passage_chars, f"pydoc_data.topics: {title}")
    return dataclasses.replace(prompt, category="warm-up")


def load_prompts(path: str | os.PathLike) -> list[BenchPrompt]:
    """Read prompts from a file: JSON lines ``{"category": ..., "prompt": ...}`` (optional ``"chat": bool``),
    or plain text with one prompt per line (category ``custom``).

    The file is JSON lines when its name ends in ``.jsonl`` or its first non-blank line starts with ``{``.
    Without ``"chat"``, a prompt is chat-formatted unless its category mentions code.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HfpatchError(f"cannot read prompts from {path}: {exc}") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise HfpatchError(f"{path} holds no prompts")
    prompts = []
    if path.suffix == ".jsonl" or lines[0][1].lstrip().startswith("{"):
        for number, line in lines:
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise HfpatchError(f"{path}:{number}: not a JSON object ({exc})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
                raise HfpatchError(f'{path}:{number}: expected {{"category": ..., "prompt": "<text>"}}')
            category = str(entry.get("category") or "custom")
            chat = entry.get("chat", not _is_code_category(category))
            if not isinstance(chat, bool):
                raise HfpatchError(f'{path}:{number}: "chat" must be true or false')
            prompts.append(BenchPrompt(category, entry["prompt"], chat=chat, source=f"{path.name}:{number}"))
    else:
        prompts = [BenchPrompt("custom", line, chat=True, source=f"{path.name}:{number}") for number, line in lines]
    return prompts


# --------------------------------------------------------------------------------------------------
# the runner


class _ForwardCounter:
    """Counts calls of a model's top-level forward (one per target forward pass, however generate drives it)."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self._hook = model.register_forward_hook(self._hook_fn)

    def _hook_fn(self, module, args, output) -> None:
        self.count += 1

    def remove(self) -> None:
        self._hook.remove()


@dataclasses.dataclass
class _Method:
    label: str
    kind: str  # "vanilla" | "prompt_lookup" | "recipe"
    model: torch.nn.Module
    handle: Any = None
    extra_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    counter: _ForwardCounter | None = None


def _recipe_label(spec: Any) -> tuple[str, Any]:
    """(label, recipe) from a recipe argument or a (label, recipe) pair."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec), spec
    if isinstance(spec, dict):
        return str(spec.get("name", "custom")), spec
    return str(getattr(spec, "name", "custom")), spec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class SpeculativeBench:
    """Methods to compare (plain greedy, transformers' prompt lookup, recipes), ready to run prompt by prompt.

    Each recipe is applied once to its own deep copy of ``model`` (the model itself stays unpatched and runs
    the two baselines), so holding it costs one model copy per recipe in memory. Use as a context manager,
    or call :meth:`close`, to unpatch and free the copies.

    Example:
        >>> with SpeculativeBench(model, tok, ["recycling+lookup"], max_new_tokens=64) as b:
        ...     b.warm_up(warmup_prompt())
        ...     records = b.run_prompt(0, default_prompts(1)[0])
    """

    def __init__(self, model: torch.nn.Module, tokenizer, recipes: Sequence[Any] = DEFAULT_RECIPES, *,
                 max_new_tokens: int = 128, prompt_lookup: bool = True, prompt_lookup_num_tokens: int = 10,
                 keep_text: bool = True):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_new_tokens = max_new_tokens
        self.keep_text = keep_text
        self.generate_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
        pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None and tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            self.generate_kwargs["pad_token_id"] = tokenizer.eos_token_id  # else generate() warns every call
        self.methods: list[_Method] = [_Method(VANILLA, "vanilla", model)]
        if prompt_lookup:
            self.methods.append(_Method(PROMPT_LOOKUP, "prompt_lookup", model,
                                        extra_kwargs={"prompt_lookup_num_tokens": prompt_lookup_num_tokens}))
        self.recipes: dict[str, dict[str, Any]] = {}
        self.baselines: dict[str, str] = {}
        try:
            for spec in recipes:
                label, recipe = _recipe_label(spec)
                if label in self.recipes or label in (VANILLA, PROMPT_LOOKUP):
                    raise ValueError(f"two methods are labelled {label!r}; pass (label, recipe) pairs")
                # A copy per recipe: patches on one model would conflict (each takes over generate), and
                # unpatching between prompts would throw away the drafters' warm state.
                clone = copy.deepcopy(model)
                handle = patch(clone, recipe)
                self.methods.append(_Method(label, "recipe", clone, handle))
                self.recipes[label] = {
                    "recipe": handle.recipe.name,
                    "techniques": [t.name for t in handle.techniques],
                    "compute_techniques": [t.name for t in handle.techniques if t.family == "compute"],
                    "definition": handle.recipe.to_dict(),
                }
            self.baselines = kernel_baselines(self.recipes)
            for method in self.methods:
                if method.counter is None:
                    # The baselines share one model, hence one counter.
                    shared = next((m.counter for m in self.methods if m.model is method.model and m.counter), None)
                    method.counter = shared or _ForwardCounter(method.model)
        except BaseException:
            self.close()
            raise

    @property
    def labels(self) -> list[str]:
        """Method labels in their base order (vanilla, prompt lookup, then recipes)."""
        return [m.label for m in self.methods]

    def close(self) -> None:
        """Unpatch every recipe copy and remove the forward counters."""
        for method in self.methods:
            if method.counter is not None:
                method.counter.remove()
                method.counter = None
            if method.handle is not None and method.handle.active:
                method.handle.unpatch()
        self.methods = [m for m in self.methods if m.kind != "recipe"]

    def __enter__(self) -> SpeculativeBench:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _generate(self, method: _Method, inputs: dict[str, torch.Tensor]) -> tuple[list[int], float, int]:
        """(new token ids, wall seconds, counted target forwards) of one generate call."""
        method.counter.count = 0
        with torch.inference_mode(), warnings.catch_warnings():
            # transformers repeats generation-flag warnings on every call; they say nothing about speed.
            warnings.simplefilter("ignore", UserWarning)
            _sync(self.device)
            start = time.perf_counter()
            output = method.model.generate(**inputs, **self.generate_kwargs, **method.extra_kwargs)
            _sync(self.device)
            seconds = time.perf_counter() - start
        sequences = output.sequences if hasattr(output, "sequences") else output
        return sequences[0, inputs["input_ids"].shape[1]:].tolist(), seconds, method.counter.count

    def warm_up(self, prompt: BenchPrompt) -> None:
        """Run every method once on ``prompt`` and discard the result (first-call allocations, lazy init)."""
        inputs = encode_prompt(self.tokenizer, prompt.text, chat=prompt.chat, device=self.device)
        for method in self.methods:
            self._generate(method, inputs)

    def run_prompt(self, index: int, prompt: BenchPrompt,
                   on_method: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """Run every method on one prompt, in an order rotated by ``index``; one record per method.

        Records come back in the base method order; ``identical`` compares each output with plain decoding.
        ``on_method`` is called with each method's label just before it runs (for progress displays).
        """
        inputs = encode_prompt(self.tokenizer, prompt.text, chat=prompt.chat, device=self.device)
        shift = index % len(self.methods)
        order = self.methods[shift:] + self.methods[:shift]
        raw: dict[str, dict[str, Any]] = {}
        for position, method in enumerate(order):
            if on_method is not None:
                on_method(method.label)
            tokens, seconds, forwards = self._generate(method, inputs)
            raw[method.label] = {"tokens": tokens, "seconds": seconds, "forwards": forwards, "position": position}
        reference = raw[VANILLA]["tokens"]
        records = []
        for method in self.methods:
            run = raw[method.label]
            tokens = run["tokens"]
            record: dict[str, Any] = {
                "prompt": index,
                "category": prompt.category,
                "method": method.label,
                "order": run["position"],
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "new_tokens": len(tokens),
                "seconds": run["seconds"],
                "tokens_per_s": len(tokens) / run["seconds"] if run["seconds"] > 0 else float("inf"),
                "forwards_counted": run["forwards"],
                "identical": tokens == reference,
                "first_mismatch": _first_mismatch(tokens, reference),
                "fallback": None,
            }
            record["forwards"] = run["forwards"]
            base = self.baselines.get(method.label)
            if base is not None:
                record["baseline"] = base
                record["identical_to_baseline"] = tokens == raw[base]["tokens"]
            if method.handle is not None:
                # the generation engine's statistics (a compute technique in the recipe keeps its own)
                stats = next((s for s in method.handle.stats.values() if s and "fallback" in s), {})
                record["fallback"] = stats.get("fallback")
                if "forwards" in stats:
                    record["forwards"] = stats["forwards"]
                for key in ("mean_tree_nodes", "mean_accepted_drafts_per_step", "draft_time_s", "verify_time_s"):
                    if key in stats:
                        record[key] = stats[key]
                record["mat"] = stats.get("mean_accepted_tokens_per_forward")
            if record.get("mat") is None:
                # Baselines (and a recipe that fell back): MAT from counted forwards; plain decoding gives 1.0.
                record["mat"] = len(tokens) / run["forwards"] if run["forwards"] else None
            if self.keep_text:
                record["text"] = self.tokenizer.decode(tokens, skip_special_tokens=True)
            records.append(record)
        return records


def run_bench(
    model: torch.nn.Module,
    tokenizer,
    *,
    recipes: Sequence[Any] = DEFAULT_RECIPES,
    prompts: Sequence[BenchPrompt] | None = None,
    per_category: int = 3,
    max_new_tokens: int = 128,
    threads: int | None = None,
    prompt_lookup: bool = True,
    prompt_lookup_num_tokens: int = 10,
    warmup: BenchPrompt | None = None,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``recipes`` against plain greedy decoding and transformers' prompt lookup; return all numbers.

    Args:
        model, tokenizer: a loaded causal LM (left unpatched) and its tokenizer.
        recipes: recipe names, paths, dicts or ``Recipe`` objects, or ``(label, recipe)`` pairs.
        prompts: the prompts to measure (default: ``default_prompts(per_category)``).
        max_new_tokens: greedy tokens per generate call (fewer when the model stops at EOS).
        threads: ``torch.set_num_threads`` for the run (default: every usable core); restored afterwards.
        prompt_lookup: include transformers' ``prompt_lookup_num_tokens`` baseline.
        warmup: the discarded warm-up prompt (default: :func:`warmup_prompt`); must not be a measured prompt.
        progress: called with one line of text per finished prompt.

    Returns:
        A JSON-serialisable dict: ``machine``, ``config``, ``prompts``, ``runs`` (one record per prompt and
        method) and ``summary`` (see :func:`summarize`).
    """
    prompts = list(prompts) if prompts is not None else default_prompts(per_category)
    if not prompts:
        raise ValueError("no prompts to benchmark")
    warmup = warmup if warmup is not None else warmup_prompt()
    if any(p.text == warmup.text for p in prompts):
        raise ValueError("the warm-up prompt is one of the measured prompts; drafters would have seen it")
    say = progress or (lambda line: None)
    with torch_threads(threads or usable_cores()):
        device = next(model.parameters()).device
        machine = describe_machine(device)
        started = time.time()
        with SpeculativeBench(model, tokenizer, recipes, max_new_tokens=max_new_tokens, prompt_lookup=prompt_lookup,
                              prompt_lookup_num_tokens=prompt_lookup_num_tokens) as bench:
            say(f"warm-up: {len(bench.methods)} methods on a prompt outside the measured set")
            bench.warm_up(warmup)
            runs: list[dict[str, Any]] = []
            for index, prompt in enumerate(prompts):
                records = bench.run_prompt(index, prompt)
                runs += records
                say(f"[{index + 1}/{len(prompts)}] {prompt.category:<10} " + " | ".join(
                    f"{r['method']} {r['seconds']:.1f}s MAT {r['mat']:.2f}{'' if r['identical'] else ' DIFFERS'}"
                    for r in records))
            labels = bench.labels
            recipe_info = dict(bench.recipes)
        try:
            machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        except (AttributeError, OSError):
            pass
    result = {
        "machine": machine,
        "config": {
            "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(device),
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "methods": labels,
            "recipes": recipe_info,
            "prompt_lookup_num_tokens": prompt_lookup_num_tokens if prompt_lookup else None,
            "started": started,
            "wall_s": time.time() - started,
        },
        "warmup_prompt": dataclasses.asdict(warmup),
        "prompts": [dataclasses.asdict(p) for p in prompts],
        "runs": runs,
    }
    result["summary"] = summarize(result)
    return result


# --------------------------------------------------------------------------------------------------
# summary, report, files


def _aggregate(runs: list[dict[str, Any]], vanilla: list[dict[str, Any]], pld: list[dict[str, Any]] | None) -> dict:
    seconds = sum(r["seconds"] for r in runs)
    tokens = sum(r["new_tokens"] for r in runs)
    forwards = sum(r["forwards"] for r in runs)
    base = sum(r["seconds"] for r in vanilla)
    row = {
        "prompts": len(runs),
        "new_tokens": tokens,
        "seconds": seconds,
        "forwards": forwards,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        # Ratio of sums: long generations weigh in by their length, as in Spec-Bench.
        "speedup": base / seconds if seconds > 0 else None,
        "mat": tokens / forwards if forwards else None,
        "identical": sum(bool(r["identical"]) for r in runs),
        "fallbacks": sum(r.get("fallback") is not None for r in runs),
    }
    if pld:
        pld_seconds = sum(r["seconds"] for r in pld)
        pld_tokens = sum(r["new_tokens"] for r in pld)
        pld_forwards = sum(r["forwards"] for r in pld)
        pld_mat = pld_tokens / pld_forwards if pld_forwards else None
        row["speedup_vs_prompt_lookup"] = pld_seconds / seconds if seconds > 0 else None
        row["mat_vs_prompt_lookup"] = row["mat"] / pld_mat if row["mat"] and pld_mat else None
    return row


def kernel_baselines(recipes: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Recipe label -> label of the measured recipe made of exactly its compute techniques.

    A recipe such as `recycling+lookup-cpu` (faster kernels + speculation) is then also compared with the
    same kernels alone, so the speed-up of the speculation is reported apart from the kernels'.
    """
    found = {}
    for label, info in recipes.items():
        compute = info.get("compute_techniques") or []
        if not compute or len(compute) == len(info["techniques"]):
            continue
        for other, other_info in recipes.items():
            if other != label and other_info["techniques"] == compute:
                found[label] = other
                break
    return found


def _fused_label(result: dict[str, Any]) -> str | None:
    """The recipe combining several drafters (the fused recipe), preferring recycling+lookup."""
    recipes = result["config"]["recipes"]
    fused = [label for label, info in recipes.items() if len(info["techniques"]) > 1]
    if "recycling+lookup" in fused:
        return "recycling+lookup"
    return fused[0] if fused else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per method, overall and per category: speed-up vs plain decoding (sum of its times / sum of the
    method's), tokens/s, MAT (new tokens / target forwards), identical outputs, fallbacks, and the ratios to
    transformers' prompt lookup; plus the fused recipe's headline figures."""
    runs = result["runs"]
    labels = result["config"]["methods"]
    categories = list(dict.fromkeys(r["category"] for r in runs))
    summary: dict[str, Any] = {"methods": {}, "categories": categories}
    for label in labels:
        per_group = {}
        for group in ["all", *categories]:
            picked = [r for r in runs if group in ("all", r["category"])]
            of = lambda name: [r for r in picked if r["method"] == name]  # noqa: E731
            pld = of(PROMPT_LOOKUP) if PROMPT_LOOKUP in labels and label != PROMPT_LOOKUP else None
            per_group[group] = _aggregate(of(label), of(VANILLA), pld)
        summary["methods"][label] = per_group
        base = next((r["baseline"] for r in runs if r["method"] == label and "baseline" in r), None)
        for group, row in per_group.items() if base else ():
            picked = [r for r in runs if r["method"] == label and group in ("all", r["category"])]
            base_seconds = sum(r["seconds"] for r in runs if r["method"] == base and group in ("all", r["category"]))
            row["baseline"] = base
            row["speedup_vs_baseline"] = base_seconds / row["seconds"] if row["seconds"] > 0 else None
            row["identical_to_baseline"] = sum(bool(r["identical_to_baseline"]) for r in picked)
    fused = _fused_label(result)
    if fused is not None:
        row = summary["methods"][fused]["all"]
        summary["fused"] = {
            "recipe": fused,
            "speedup": row["speedup"],
            "mat": row["mat"],
            "mat_vs_prompt_lookup": row.get("mat_vs_prompt_lookup"),
            "speedup_vs_prompt_lookup": row.get("speedup_vs_prompt_lookup"),
            "identical": f"{row['identical']}/{row['prompts']}",
        }
    return summary


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_report(result: dict[str, Any]) -> str:
    """The plain-text report: setup, machine, one table (overall, then per category), the fused recipe's line."""
    config, summary, machine = result["config"], result["summary"], result["machine"]
    has_pld = PROMPT_LOOKUP in config["methods"]
    lines = [
        f"hfpatch bench: {config['model']} ({config['model_class']}, {config['dtype']}, {config['device']}), "
        f"greedy, max_new_tokens={config['max_new_tokens']}, {len(result['prompts'])} prompts, "
        f"{len(config['methods'])} methods interleaved, warm-up discarded",
        f"machine: {machine_line(machine)}",
    ]
    if "load_average" in machine:
        end = machine.get("load_average_end")
        lines.append(f"load average (1/5/15 min) at start {machine['load_average']}" +
                     (f", at end {end}" if end else ""))
        # Other processes on the cores stall every multi-threaded op; tree forwards (many tokens) suffer far
        # more than one-token decoding, so a busy machine biases timings against speculative methods.
        busiest = max(machine["load_average"][0], (end or [0.0])[0])
        if machine["device"] == "cpu" and busiest > machine["usable_cores"] + 0.5:
            lines.append(f"WARNING: the machine was busy (load {busiest:.1f} on {machine['usable_cores']} cores): "
                         "timings are unreliable and penalise speculative methods; MAT and identity are unaffected. "
                         "Rerun on a quiet machine" + (" (or with --threads 1)." if machine["torch_threads"] > 1 else "."))
    lines.append("")
    headers = ["category", "method", "prompts", "tokens", "tok/s", "speed-up", "MAT", "identical"]
    if has_pld:
        headers += ["MAT/PLD", "speed/PLD"]
    rows: list[list[str] | None] = []
    for group in ["all", *summary["categories"]]:
        if rows:
            rows.append(None)
        for label in config["methods"]:
            row = summary["methods"][label][group]
            cells = [group, label, str(row["prompts"]), str(row["new_tokens"]), _fmt(row["tokens_per_s"], ".1f"),
                     _fmt(row["speedup"], ".2f", "x"), _fmt(row["mat"], ".2f"),
                     f"{row['identical']}/{row['prompts']}" + (f" ({row['fallbacks']} fell back)"
                                                                if row["fallbacks"] else "")]
            if has_pld:
                cells += [_fmt(row.get("mat_vs_prompt_lookup"), ".2f", "x"),
                          _fmt(row.get("speedup_vs_prompt_lookup"), ".2f", "x")]
            rows.append(cells)
    lines.append(format_table(headers, rows, right_from=2))
    lines.append("")
    lines.append(f"speed-up = sum of {VANILLA} seconds / sum of the method's seconds over the same prompts; "
                 "MAT = new tokens / target forwards (prefill included; vanilla = 1.00); "
                 f"PLD = {PROMPT_LOOKUP} (transformers' prompt_lookup_num_tokens="
                 f"{config['prompt_lookup_num_tokens']}).")
    fused = summary.get("fused")
    if fused is not None:
        def ratio(key: str, text: str) -> str:
            return f"{text} {_fmt(fused.get(key), '.2f', 'x')}"

        parts = [ratio("mat_vs_prompt_lookup", "MAT vs PLD"), ratio("speedup", "speed-up vs vanilla"),
                 ratio("speedup_vs_prompt_lookup", "speed vs PLD")] if has_pld else [ratio("speedup", "speed-up")]
        lines.append(f"fused recipe {fused['recipe']!r}: " + "; ".join(parts) + f"; identical {fused['identical']}")
    for label in config["methods"]:
        row = summary["methods"][label]["all"]
        if row.get("baseline"):
            lines.append(f"{label} over its kernels alone ({row['baseline']}): speed-up "
                         f"{_fmt(row['speedup_vs_baseline'], '.2f', 'x')} from the rest of the recipe; output "
                         f"identical to {row['baseline']}'s {row['identical_to_baseline']}/{row['prompts']}")
    fallbacks = sorted({(r["method"], r["fallback"]) for r in result["runs"] if r.get("fallback")})
    for label, reason in fallbacks:
        lines.append(f"note: {label} fell back to plain decoding: {reason}")
    differs = [r for r in result["runs"] if not r["identical"]]
    for r in differs:
        lines.append(f"note: {r['method']} output differs from {VANILLA} on prompt {r['prompt']} ({r['category']}) "
                     f"from new token {r['first_mismatch']}")
    return "\n".join(lines)


def save_report(result: dict[str, Any], out_dir: str | os.PathLike, *, chart: bool = True) -> list[Path]:
    """Write ``bench.json`` (every number), ``bench.txt`` (the report) and, with matplotlib, ``bench.png``.

    Returns the paths written. Without matplotlib the chart is skipped with a warning (install the ``bench``
    extra: ``pip install hfpatch[bench]``).
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "bench.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(path)
    path = out / "bench.txt"
    path.write_text(format_report(result) + "\n", encoding="utf-8")
    written.append(path)
    if chart:
        png = plot_report(result, out / "bench.png")
        if png is not None:
            written.append(png)
    return written


def plot_report(result: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Bar chart of speed-up and MAT per method and category; None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no chart was drawn (pip install 'hfpatch[bench]' "
                      "or pip install matplotlib)", stacklevel=2)
        return None
    summary, config = result["summary"], result["config"]
    groups = ["all", *summary["categories"]]
    labels = [m for m in config["methods"] if m != VANILLA]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(groups) * 2), 4.2))
    width = 0.8 / max(len(labels), 1)
    for ax, key, title in ((axes[0], "speedup", "speed-up vs plain greedy (wall clock)"),
                           (axes[1], "mat", "tokens per target forward (MAT)")):
        for i, label in enumerate(labels):
            values = [summary["methods"][label][g][key] or 0.0 for g in groups]
            ax.bar([x + (i - (len(labels) - 1) / 2) * width for x in range(len(groups))], values, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title, fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    machine = result["machine"]
    where = machine.get("gpu") or machine["cpu"]
    fig.suptitle(f"{config['model']} {config['dtype']}, {config['max_new_tokens']} new tokens, {where}, "
                 f"{machine['torch_threads']} threads", fontsize=9)
    rows = (len(labels) + 3) // 4
    fig.tight_layout(rect=(0, 0.04 + 0.05 * rows, 1, 1))  # room for the legend below the plots
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
