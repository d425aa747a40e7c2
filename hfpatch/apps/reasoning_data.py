"""Verifiable reasoning problems for preference data built from a model's own samples (no dataset download).

Problems come from reasoning-gym's generators (``pip install --no-deps reasoning-gym==0.1.25``): multi-step
addition/subtraction chains (``chain_sum``) whose every step a verifier checks exactly, and GSM8K-style word
problems (``gsm_symbolic``) whose final answer it checks. The model answers in a fixed step format taught by
one worked example in the prompt::

    Question: 23 + 60 - 71
    23 + 60 = 83
    83 - 71 = 12
    Answer: 12

so `check_chain` can tell which step went wrong first, and where (the characters of the first wrong number).

    >>> tuning, evaluation = fixed_splits(arithmetic_problems, n_tuning=100, n_evaluation=60, seed=0)
    >>> samples = sample_answers(model, tok, tuning, n_samples=8)
    >>> pairs = build_pairs(tuning, samples)          # most frequent correct vs most frequent wrong answer

reasoning-gym's package ``__init__`` imports about ten optional dependencies; `load_generator` imports just
the generator modules, under a stand-in package with the real package's path.
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hfpatch.apps.assets import AssetMissingError

__all__ = [
    "PIP_COMMAND",
    "Problem",
    "Step",
    "ChainCheck",
    "load_generator",
    "arithmetic_problems",
    "gsm_problems",
    "fixed_splits",
    "prompt_for",
    "check_chain",
    "is_correct",
    "sample_answers",
    "build_pairs",
]

PIP_COMMAND = "pip install --no-deps reasoning-gym==0.1.25"

#: The worked example every arithmetic prompt starts with (teaches the step format the verifier reads).
ARITHMETIC_EXAMPLE = "Question: 14 + 25 - 7\n14 + 25 = 39\n39 - 7 = 32\nAnswer: 32\n\n"
#: The worked example of a GSM-style prompt (the verifier reads only the final "Answer: N" line).
GSM_EXAMPLE = ("Question: Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?\n"
               "3 * 4 = 12\n12 - 2 = 10\nAnswer: 10\n\n")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem. ``terms``/``ops`` describe an arithmetic chain (``terms[0] ops[0] terms[1] ...``,
    evaluated left to right); they are empty for word problems, which are checked on ``answer`` alone."""

    id: str
    question: str
    answer: int
    terms: tuple[int, ...] = ()
    ops: tuple[str, ...] = ()
    source: str = "chain_sum"
    solution: str = ""


@dataclass(frozen=True)
class Step:
    """One ``a op b [op c ...] = r`` line of an answer; ``fields`` lists ``(name, value, (start, end))`` in
    reading order (``operand``/``op``/``result``), with character offsets in the answer text."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    result: int
    fields: tuple[tuple[str, Any, tuple[int, int]], ...] = ()


@dataclass(frozen=True)
class ChainCheck:
    """The verifier's reading of one answer.

    ``first_wrong_step`` is the index of the first step that deviates from the correct computation of the
    chain (a wrong operand or operator, or a wrong result for its own operands), and ``error_span`` the
    characters of the first wrong field of that step, ``first_wrong_char`` the first wrong character in it.
    All are None when every step is right; a missing or extra step after correct ones leaves them None too
    (there is no wrong token to point at).
    """

    steps: tuple[Step, ...]
    final: int | None
    correct: bool
    first_wrong_step: int | None
    error_span: tuple[int, int] | None
    #: the first character where the answer's text departs from the correct text of that field (``83`` written
    #: as ``84``: the ``4``); the end of the field when what is written is a prefix of the correct number
    first_wrong_char: int | None = None


# --------------------------------------------------------------------------------------------------
# reasoning-gym generators


def load_generator(module: str):
    """Import ``reasoning_gym.<module>`` (e.g. ``arithmetic.chain_sum``) without running the package's
    ``__init__`` (it imports optional dependencies this project does not install)."""
    spec = importlib.util.find_spec("reasoning_gym") if "reasoning_gym" not in sys.modules else None
    if "reasoning_gym" not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            raise AssetMissingError("reasoning-gym (problem generators)", PIP_COMMAND)
        root = list(spec.submodule_search_locations)[0]
        # Stand-in packages with the real paths: submodules import normally, the __init__ files never run.
        for name, path in (("reasoning_gym", root), ("reasoning_gym.arithmetic", f"{root}/arithmetic")):
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    return importlib.import_module(f"reasoning_gym.{module}")


def _chain_terms(expression: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    tokens = expression.split()
    return tuple(int(t) for t in tokens[0::2]), tuple(tokens[1::2])


def arithmetic_problems(n: int, seed: int, *, min_terms: int = 3, max_terms: int = 4, min_digits: int = 1,
                        max_digits: int = 2) -> list[Problem]:
    """``n`` addition/subtraction chains from reasoning-gym's ``chain_sum`` (deterministic per ``seed``)."""
    chain_sum = load_generator("arithmetic.chain_sum")
    config = chain_sum.ChainSumConfig(min_terms=min_terms, max_terms=max_terms, min_digits=min_digits,
                                      max_digits=max_digits, seed=seed, size=n)
    problems = []
    for index, item in enumerate(chain_sum.ChainSumDataset(config)):
        expression = item["metadata"]["expression"]
        terms, ops = _chain_terms(expression)
        problems.append(Problem(id=f"chain_sum/{seed}/{index}", question=expression, answer=int(item["answer"]),
                                terms=terms, ops=ops, source="chain_sum"))
    return problems


def gsm_problems(n: int, seed: int) -> list[Problem]:
    """``n`` GSM8K-derived word problems from reasoning-gym's ``gsm_symbolic`` (integer answers only)."""
    gsm = load_generator("arithmetic.gsm_symbolic.gsm_symbolic")
    dataset = gsm.GSMSymbolicDataset(gsm.GSMSymbolicDatasetConfig(seed=seed, size=n))
    problems = []
    for index, item in enumerate(dataset):
        try:
            answer = int(item["answer"])
        except ValueError:
            continue
        problems.append(Problem(id=f"gsm_symbolic/{seed}/{index}", question=item["question"], answer=answer,
                                source="gsm_symbolic", solution=item["metadata"].get("answer_cot", "")))
    return problems


#: Generator seed offset of the evaluation split. reasoning-gym seeds item i with ``Random(seed + i)``, so the
#: seeds S and S + 1 give the same problems shifted by one: the evaluation seed must be far from the tuning one.
EVALUATION_SEED_OFFSET = 1_000_000


def fixed_splits(make: Callable[..., list[Problem]], *, n_tuning: int, n_evaluation: int,
                 seed: int = 0, **kwargs: Any) -> tuple[list[Problem], list[Problem]]:
    """Tuning and evaluation problems from disjoint generator streams (seed ``seed`` and
    ``seed + EVALUATION_SEED_OFFSET``), fixed before anything is tuned; an evaluation problem whose question
    also occurs in the tuning split is dropped, so the two never share a question."""
    if n_tuning >= EVALUATION_SEED_OFFSET:
        raise ValueError(f"at most {EVALUATION_SEED_OFFSET - 1} tuning problems, got {n_tuning}")
    tuning = make(n_tuning, seed, **kwargs)
    seen = {p.question for p in tuning}
    evaluation = [p for p in make(n_evaluation, seed + EVALUATION_SEED_OFFSET, **kwargs) if p.question not in seen]
    return tuning, evaluation


# --------------------------------------------------------------------------------------------------
# prompts and the verifier


def prompt_for(problem: Problem) -> str:
    """The prompt: one worked example in the step format, then the problem; the model continues it."""
    example = ARITHMETIC_EXAMPLE if problem.terms else GSM_EXAMPLE
    return f"{example}Question: {problem.question}\n"


_STEP = re.compile(r"^[ \t]*(-?\d+(?:[ \t]*[+\-*][ \t]*-?\d+)+)[ \t]*=[ \t]*(-?\d+)[ \t]*$", re.M)
_FIELD = re.compile(r"(?<=\d)[ \t]*([+\-*])|(-?\d+)")
_ANSWER = re.compile(r"^[ \t]*Answer:[ \t]*(-?\d+)", re.M)


def _apply(lhs: int, op: str, rhs: int) -> int:
    return lhs + rhs if op == "+" else lhs - rhs if op == "-" else lhs * rhs


def _final(text: str) -> int | None:
    match = _ANSWER.search(text)
    return int(match.group(1)) if match else None


def is_correct(problem: Problem, answer: str) -> bool:
    """Whether the answer's ``Answer: N`` line gives the problem's answer."""
    return _final(answer) == problem.answer


def _parse_step(match: re.Match) -> Step:
    fields = []
    offset = match.start(1)
    for part in _FIELD.finditer(match.group(1)):
        if part.group(1):
            fields.append(("op", part.group(1), (offset + part.start(1), offset + part.end(1))))
        else:
            fields.append(("operand", int(part.group(2)), (offset + part.start(2), offset + part.end(2))))
    fields.append(("result", int(match.group(2)), match.span(2)))
    operands = tuple(v for name, v, _ in fields if name == "operand")
    ops = tuple(v for name, v, _ in fields if name == "op")
    return Step(operands, ops, int(match.group(2)), tuple(fields))


def check_chain(problem: Problem, answer: str) -> ChainCheck:
    """Read every ``a op b [op c ...] = r`` line of ``answer`` and find the first one that deviates from the
    chain.

    A step with k operators performs the next k operations of the chain: its first operand must be the
    previous step's result (``terms[0]`` for the first step), then each operator and operand must be the
    chain's next ones, and its result must be its own operands evaluated left to right. Fields are compared
    in reading order; the first that differs is the error. A result is judged against the step's own
    operands (locally wrong), so an error carried forward from an earlier wrong step is not counted again.
    """
    if not problem.terms:
        raise ValueError(f"{problem.id}: check_chain needs an arithmetic chain; word problems have no step list")
    steps = [_parse_step(match) for match in _STEP.finditer(answer)]
    first, span, char = None, None, None
    previous, position = problem.terms[0], 0  # position: operations of the chain done so far
    for index, step in enumerate(steps):
        if position >= len(problem.ops):
            break  # extra steps after a complete chain: nothing more to check
        value = step.operands[0]
        for op, operand in zip(step.ops, step.operands[1:]):
            value = _apply(value, op, operand)
        expected = [previous]
        for k in range(len(step.ops)):
            if position + k < len(problem.ops):
                expected += [problem.ops[position + k], problem.terms[position + k + 1]]
            else:
                expected += [None, None]  # more operations than the chain has: wrong from here
        expected.append(value)
        wrong = next(((actual, want, where) for (_, actual, where), want in zip(step.fields, expected)
                      if actual != want), None)
        if wrong is not None:
            actual, want, span = wrong
            written, correct = str(actual), "" if want is None else str(want)
            same = next((i for i, (a, b) in enumerate(zip(written, correct)) if a != b), min(len(written), len(correct)))
            first, char = index, span[0] + same
            break
        previous, position = step.result, position + len(step.ops)
    final = _final(answer)
    return ChainCheck(tuple(steps), final, final == problem.answer, first, span, char)


# --------------------------------------------------------------------------------------------------
# sampling and pairs


def _cut(text: str) -> str:
    """The answer up to and including its ``Answer: N`` line (the model goes on with a new question)."""
    match = _ANSWER.search(text)
    if match:
        return text[: match.end()]
    return text.split("\n\n")[0].rstrip()


def sample_answers(model, tokenizer, problems: Sequence[Problem], *, n_samples: int = 8, temperature: float = 0.8,
                   top_p: float = 1.0, max_new_tokens: int = 48, batch_size: int = 64, seed: int = 0,
                   progress: bool = True) -> dict[str, list[str]]:
    """``n_samples`` sampled answers per problem (problem id -> texts), each cut after its ``Answer: N`` line.

    Prompts are left-padded into batches; sampling is seeded once, so a run is reproducible on one machine.
    """
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    jobs = [(p, prompt_for(p)) for p in problems for _ in range(n_samples)]
    out: dict[str, list[str]] = collections.defaultdict(list)
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(jobs), batch_size), desc="sampling answers", disable=not progress,
                          leave=False):
            chunk = jobs[start: start + batch_size]
            batch = tokenizer([prompt for _, prompt in chunk], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                generated = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p,
                                           top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for (problem, _), text in zip(chunk, texts):
                out[problem.id].append(_cut(text))
    finally:
        tokenizer.padding_side = padding_side
    return dict(out)


def cached_answers(path, model, tokenizer, problems: Sequence[Problem], **sampling: Any) -> dict[str, list[str]]:
    """The answers a study samples (`sample_answers(model, tokenizer, problems, **sampling)`), read back from the
    JSON file `path` when an earlier run wrote it (and written there otherwise; `path` None: no file). A file that
    lacks some of `problems` was written with other settings: `ValueError` saying so."""
    path = Path(path) if path is not None else None
    if path is not None and path.exists():
        samples = json.loads(path.read_text())
        missing = [p.id for p in problems if p.id not in samples]
        if missing:
            raise ValueError(f"{path}: no samples for {len(missing)} problems (e.g. {missing[0]}); it was written "
                             "with other problem settings (counts, terms, digits or seed)")
        return samples
    samples = sample_answers(model, tokenizer, problems, **sampling)
    if path is not None:
        path.write_text(json.dumps(samples))
    return samples


def build_pairs(problems: Sequence[Problem], samples: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Preference pairs: per problem, its most frequent correct answer (chosen) vs its most frequent wrong one
    (rejected), ties broken by first occurrence; problems without both are skipped. Rows carry ``prompt``,
    ``chosen``, ``rejected`` (answers start with no leading space: the prompt ends with a newline), ``id``
    and the sample counts."""
    rows = []
    for problem in problems:
        texts = samples.get(problem.id, [])
        right = collections.Counter(t for t in texts if is_correct(problem, t))
        wrong = collections.Counter(t for t in texts if not is_correct(problem, t) and t.strip())
        if not right or not wrong:
            continue
        rows.append({"id": problem.id, "prompt": prompt_for(problem), "chosen": right.most_common(1)[0][0],
                     "rejected": wrong.most_common(1)[0][0], "n_correct": sum(right.values()),
                     "n_samples": len(texts)})
    return rows
