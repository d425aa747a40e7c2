"""Does cDPO's critical-token estimator find the mistake? AUROC against the first locally wrong step.

SmolLM2-135M-Instruct (the bundled asset) answers addition/subtraction chains from reasoning-gym's
``chain_sum`` in a step format (``23 + 60 = 83`` per line, then ``Answer: N``), so every step of a wrong
answer can be checked exactly (`hfpatch.apps.reasoning_data.check_chain`). Problems are split before
anything is tuned: tuning problems (generator seed S) give the samples the two contrastive LoRA adapters are
trained on (all distinct correct answers -> positive, all distinct wrong ones -> negative, per problem);
evaluation problems (seed S + 10^6, questions that also occur in tuning dropped) give the wrong answers scored.

For each wrong evaluation answer whose first wrong step was located, two labellings: ``first``: the one
token holding the first wrong character (``83`` written as ``84``: the token of ``4``) is the positive;
``field``: every token of the first wrong field (the whole wrong number) is positive. The tokens before the
positive(s) (the correct prefix of the answer) are the negatives; later tokens are left out (they may be
consequences of the error). Token scores:
- critical: cDPO's rejected weight 1 - s_t, s_t = softmax((1+b) log p_pos - b log p_neg)[y_t];
- -log p: the base model's surprisal of the token; entropy: the base model's predictive entropy there;
- uniform: every token the same weight (DPO), AUROC 0.5 by construction.
AUROC is pooled over all tokens (95% interval from 1000 bootstrap resamples of answers), and also averaged
per answer; the difference critical minus each baseline gets a paired interval (the same resamples). The same is reported on the tuning problems' wrong answers (in-sample, for contrast).

    python benchmarks/training/critical_auroc.py --out docs/results/critical_auroc.json

Keep it to CPU minutes: the defaults sample 6 answers for each of 64 + 64 three-term one-digit problems
(SmolLM2-135M gets about one in five right; with two digits it almost never does).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from hfpatch.apps import assets
from hfpatch.apps import reasoning_data as rd
from hfpatch.apps.bench.common import describe_machine, machine_line
from hfpatch.techniques.training import critical_tokens as ct


def auroc(positives: list[float], negatives: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney U / n_pos n_neg)."""
    if not positives or not negatives:
        return float("nan")
    scores = torch.tensor(positives + negatives, dtype=torch.float64)
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    unique, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def token_labels(tokenizer, prompt: str, answer: str, check) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """(prompt ids, completion ids, labels per completion token) for two definitions of the mistake:
    ``field``: the tokens of the first wrong field (a whole wrong number) are 1, the tokens before it 0;
    ``first``: the one token holding the first wrong character is 1, the tokens before it 0. -1: left out."""
    prompt_ids, completion_ids = ct.encode_completion(tokenizer, prompt, answer)
    text = prompt + answer + (tokenizer.eos_token or "")
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert encoded["input_ids"][: len(prompt_ids) + len(completion_ids)] == prompt_ids + completion_ids
    offsets = encoded["offset_mapping"][len(prompt_ids): len(prompt_ids) + len(completion_ids)]
    start, end = check.error_span[0] + len(prompt), check.error_span[1] + len(prompt)
    char = check.first_wrong_char + len(prompt)
    labels = {"field": [], "first": []}
    for a, b in offsets:
        if b <= a or a >= len(prompt) + len(answer):
            labels["field"].append(-1)  # EOS and zero-width tokens
            labels["first"].append(-1)
            continue
        labels["field"].append(1 if a < end and b > start else 0 if b <= start else -1)
        labels["first"].append(1 if a <= char < b else 0 if b <= char else -1)
    return prompt_ids, completion_ids, labels


def score_answers(model, tokenizer, positive, negative, items, b: float, batch_size: int = 16):
    """Per answer: labels and the four token scores over its completion tokens."""
    results = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        encoded = [(p, c) for p, c, _ in chunk]
        ids, attention, labels_mask = ct._batch(encoded, pad, torch.device("cpu"))
        s = ct.critical_token_weights(model, positive, negative, ids, attention, labels_mask, b=b)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
        surprisal = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        for row, (p, c, labels) in enumerate(chunk):
            lo, hi = len(p), len(p) + len(c)
            results.append({"labels": labels, "critical": (1 - s[row, lo:hi]).tolist(),
                            "-log p": surprisal[row, lo - 1: hi - 1].tolist(),
                            "entropy": entropy[row, lo - 1: hi - 1].tolist(), "uniform": [1.0] * len(c)})
    return results


METHODS = ("critical", "-log p", "entropy", "uniform")


def summarise(results, key: str, seed: int = 0, resamples: int = 1000) -> dict:
    """AUROC of each method against the ``key`` labels: pooled (with a bootstrap interval over answers) and
    the mean over answers."""
    answers = [a for a in results if 1 in a["labels"][key] and 0 in a["labels"][key]]

    def split(answer, method):
        labels = answer["labels"][key]
        return ([v for v, l in zip(answer[method], labels) if l == 1],
                [v for v, l in zip(answer[method], labels) if l == 0])

    def pooled(group, method):
        parts = [split(a, method) for a in group]
        return auroc([v for p, _ in parts for v in p], [v for _, n in parts for v in n])

    out = {"answers": len(answers), "positive_tokens": sum(l == 1 for a in answers for l in a["labels"][key]),
           "negative_tokens": sum(l == 0 for a in answers for l in a["labels"][key])}
    rng = random.Random(seed)
    # one set of resampled answer lists for every method, so differences between methods are paired
    draws = [[answers[rng.randrange(len(answers))] for _ in answers] for _ in range(resamples)]
    boots = {method: [pooled(draw, method) for draw in draws] for method in METHODS}

    def interval(values):
        values = sorted(values)
        return [round(values[int(0.025 * resamples)], 4), round(values[int(0.975 * resamples) - 1], 4)]

    for method in METHODS:
        per_answer = [auroc(*split(a, method)) for a in answers]
        out[method] = {"auroc": round(pooled(answers, method), 4), "ci95": interval(boots[method]),
                       "per_answer_mean": round(sum(per_answer) / max(1, len(per_answer)), 4)}
    for baseline in ("-log p", "entropy"):
        difference = [a - b for a, b in zip(boots["critical"], boots[baseline])]
        out[f"critical minus {baseline}"] = {
            "auroc": round(out["critical"]["auroc"] - out[baseline]["auroc"], 4), "ci95": interval(difference),
            "share_of_resamples_above_0": round(sum(d > 0 for d in difference) / resamples, 4)}
    return out


def located(problems, samples, tokenizer):
    """Distinct wrong answers with a located first wrong step, as (prompt ids, completion ids, labels)."""
    items = []
    for problem in problems:
        for answer in dict.fromkeys(samples.get(problem.id, [])):
            check = rd.check_chain(problem, answer)
            if check.correct or check.error_span is None:
                continue
            items.append(token_labels(tokenizer, rd.prompt_for(problem), answer, check))
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-tuning", type=int, default=64)
    parser.add_argument("--n-evaluation", type=int, default=64)
    parser.add_argument("--samples", type=int, default=6, help="answers sampled per problem")
    parser.add_argument("--terms", type=int, default=3, help="numbers per chain")
    parser.add_argument("--digits", type=int, default=1, help="largest number of digits per number")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=28)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--b", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared machine more threads were slower: contention)")
    parser.add_argument("--out", type=Path, help="write the results (JSON) here")
    parser.add_argument("--max-scored", type=int, default=300,
                        help="score at most this many wrong evaluation answers (a third of it in-sample)")
    parser.add_argument("--scores-out", type=Path, help="write every scored answer's labels and scores here")
    parser.add_argument("--pairs-out", type=Path,
                        help="write the tuning and evaluation preference pairs (JSON Lines, prompt/chosen/rejected) "
                             "to FILE.tuning.jsonl / FILE.evaluation.jsonl, for hfpatch critical-tokens or a trainer")
    parser.add_argument("--samples-file", type=Path,
                        help="sampled answers: read them from this JSON file if it exists, else write them to it")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:  # the commit the run starts from (the tree may move on while it runs)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    started = time.perf_counter()
    timings = {}
    model, tokenizer = assets.load_smollm2()
    tuning, evaluation = rd.fixed_splits(rd.arithmetic_problems, n_tuning=args.n_tuning,
                                         n_evaluation=args.n_evaluation, seed=args.seed, min_terms=args.terms,
                                         max_terms=args.terms, max_digits=args.digits)
    t = time.perf_counter()
    # --samples-file: reuse the answers of an earlier run with the same settings
    samples = rd.cached_answers(args.samples_file, model, tokenizer, tuning + evaluation, n_samples=args.samples,
                                temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    timings["sampling_s"] = round(time.perf_counter() - t, 1)

    if args.pairs_out:
        for name, problems in (("tuning", tuning), ("evaluation", evaluation)):
            path = args.pairs_out.with_suffix(f".{name}.jsonl")
            path.write_text("".join(json.dumps(row) + "\n" for row in rd.build_pairs(problems, samples)))

    def accuracy(problems):
        texts = [(p, x) for p in problems for x in samples[p.id]]
        return round(sum(rd.is_correct(p, x) for p, x in texts) / len(texts), 4)

    correct, wrong = [], []
    for problem in tuning:
        for answer in dict.fromkeys(samples[problem.id]):
            (correct if rd.is_correct(problem, answer) else wrong).append((rd.prompt_for(problem), answer))
    t = time.perf_counter()
    positive, negative = ct.train_contrastive_adapters(model, tokenizer, correct, wrong, r=args.r, alpha=args.alpha,
                                                       lr=args.lr, epochs=args.epochs, seed=args.seed)
    timings["adapters_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    report, per_answer = {}, {}
    for name, problems, cap in (("evaluation", evaluation, args.max_scored),
                                ("tuning (in-sample)", tuning, args.max_scored // 3)):
        items = located(problems, samples, tokenizer)
        if len(items) > cap:  # a fixed random subset keeps the scoring to CPU minutes
            items = random.Random(args.seed).sample(items, cap)
        scored = score_answers(model, tokenizer, positive, negative, items, args.b)
        report[name] = {key: summarise(scored, key, seed=args.seed) for key in ("first", "field")}
        per_answer[name] = scored
    timings["scoring_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine_line(describe_machine()),
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "problems": {"tuning": len(tuning), "evaluation": len(evaluation)},
              "sample_accuracy": {"tuning": accuracy(tuning), "evaluation": accuracy(evaluation)},
              "adapter_training_answers": {"correct": len(correct), "wrong": len(wrong)},
              "pairs": {"tuning": len(rd.build_pairs(tuning, samples)),
                        "evaluation": len(rd.build_pairs(evaluation, samples))},
              "auroc": report, "timings": timings}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.scores_out:  # every scored answer's labels and token scores, for a closer look
        args.scores_out.write_text(json.dumps(per_answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
