"""Training: TRL sigmoid DPO vs cDPO vs a shuffled-weights control vs TDPO2, same pairs, seeds and steps.

SmolLM2-135M-Instruct (the bundled asset) + a LoRA adapter (peft) is trained with TRL's ``DPOTrainer`` on
preference pairs built from the model's own sampled answers to TUNING arithmetic chains (reasoning-gym
``chain_sum``, split before anything is tuned by `hfpatch.apps.reasoning_data.fixed_splits`): per problem the
most frequent correct answer (chosen) vs the most frequent wrong one (rejected). Four methods, each from the
same base model, the same LoRA initialisation seed, the same data order and the same number of steps:

- ``dpo``: TRL's own sigmoid DPO loss (the trainer unpatched);
- ``cdpo``: ``hfpatch.patch(trainer, token_dpo(weights="column"))``: the paper's sequence form with each
  rejected token weighted by cDPO's ``1 - s_t`` from two contrastive LoRA adapters trained on the tuning
  samples (all distinct correct answers -> positive, wrong ones -> negative). The weights are scored once,
  before training, by `critical_tokens.score_dataset` (the same numbers ``weights="critical"`` scores inside
  the loss: both score the base model, which is the PEFT policy's reference);
- ``shuffled``: the same weights permuted at random within each rejected answer (same multiset of weights,
  positions lost): does it matter *which* tokens get the weight?
- ``tdpo2``: ``hfpatch.patch(trainer, tdpo)`` (TDPO2, alpha 0.5).

Then greedy accuracy on held-out EVALUATION problems (another generator stream, no question shared with the
tuning split) for the base model and each trained model, and a paired comparison against DPO over problems:
exact McNemar p-value on the discordant problems and a paired bootstrap interval of the accuracy difference,
both pooled over (problem, seed) outcomes, and, because the seeds share the problems, the same comparison with
the problem as the unit (`per_problem_comparison`: a sign test on each problem's mean over seeds, McNemar on
the majority vote, a bootstrap resampling problems). Each greedy answer's format is scored too
(`answer_format`: steps then an ``Answer: N`` line, an answer line at all, ends with a number).
A cheaper, more sensitive secondary number: on held-out preference pairs (built the same way from the
evaluation problems' samples) the fraction where the trained policy's implicit reward prefers the correct
answer (log-ratio to the base model, chosen > rejected).

Answers are sampled once and reused (``--samples-file``: `benchmarks/training/critical_auroc.py` writes the same
file with the same settings), and the contrastive adapters are cached (``--adapters-file``), so a rerun only
trains and evaluates.

    python benchmarks/training/train_compare.py --samples-file /tmp/samples_80.json \\
        --adapters-file /tmp/cdpo_adapters.safetensors --out /tmp/train_compare.json
    python benchmarks/training/train_compare.py --table /tmp/train_compare.json   # the Markdown table
"""
from __future__ import annotations

import argparse
import json
import math
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

METHODS = ("dpo", "cdpo", "shuffled", "tdpo2")


# --------------------------------------------------------------------------------------------------
# data


def contrastive_answers(tuning, samples, cap: int, seed: int):
    """(correct, wrong) distinct (prompt, answer) pairs of the tuning samples; each list capped at ``cap`` by a
    fixed random subset (the adapters' training time grows with it)."""
    correct, wrong = [], []
    for problem in tuning:
        for answer in dict.fromkeys(samples[problem.id]):
            if answer.strip():
                (correct if rd.is_correct(problem, answer) else wrong).append((rd.prompt_for(problem), answer))
    rng = random.Random(seed)
    return [rng.sample(x, cap) if len(x) > cap else x for x in (correct, wrong)]


def shuffled_within(rows, column: str, out_column: str, seed: int):
    """Copies of ``rows`` with ``out_column``: each row's ``column`` values permuted at random (same values,
    positions lost)."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        values = list(row[column])
        rng.shuffle(values)
        out.append({**row, out_column: values})
    return out


def load_or_train_adapters(model, tokenizer, correct, wrong, path: Path | None, args):
    from safetensors.torch import load_file, save_file

    if path is not None and path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        return ct.adapters_from_tensors(load_file(str(path)), metadata), True
    positive, negative = ct.train_contrastive_adapters(model, tokenizer, correct, wrong, r=args.adapter_r,
                                                       alpha=2.0 * args.adapter_r, lr=3e-4, epochs=1,
                                                       seed=args.seed0)
    if path is not None:
        tensors, metadata = ct.adapters_to_tensors(positive, negative)
        save_file(tensors, str(path), metadata=metadata)
    return (positive, negative), False


def extend_samples(path: Path, model, tokenizer, problems, args) -> int:
    """Sample the problems of ``problems`` that the samples file ``path`` lacks (same settings, seed
    ``args.seed0 + 1`` so the new answers are not a replay of the first call's random stream) and add them to
    the file; returns how many problems were added. Lets a larger run reuse a smaller run's answers."""
    samples = json.loads(path.read_text())
    missing = [p for p in problems if p.id not in samples]
    if missing:
        print(f"sampling {len(missing)} problems missing from {path}", flush=True)
        samples.update(rd.sample_answers(model, tokenizer, missing, n_samples=args.samples,
                                         temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                         seed=args.seed0 + 1, progress=False))
        path.write_text(json.dumps(samples))
    return len(missing)


# --------------------------------------------------------------------------------------------------
# evaluation


def greedy_answers(model, tokenizer, problems, *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answer per problem (left-padded batches), cut after its ``Answer: N`` line as when sampling."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    model.eval()
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start: start + batch_size]
            batch = tokenizer([rd.prompt_for(p) for p in chunk], return_tensors="pt", padding=True)
            with torch.no_grad():
                generated = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(rd._cut(t) for t in texts)
    finally:
        tokenizer.padding_side = side
    return out


def pair_preference(model, tokenizer, pairs) -> dict:
    """On preference pairs: the share where the policy's log-ratio to its reference (the adapter disabled) is
    higher for the chosen answer than for the rejected one, and the mean margin (summed log-ratios)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    margins = []
    model.eval()
    for row in pairs:
        encoded = [ct.encode_completion(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
        ids, attention, labels = ct._batch(encoded, pad, torch.device("cpu"))

        def summed(m):
            with torch.no_grad():
                logp = torch.log_softmax(m(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
            token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            return (token * labels[:, 1:]).sum(1)

        policy = summed(model)
        with model.disable_adapter():
            reference = summed(model)
        ratio = policy - reference
        margins.append(float(ratio[0] - ratio[1]))
    return {"pairs": len(margins), "prefers_chosen": round(sum(m > 0 for m in margins) / max(1, len(margins)), 4),
            "mean_margin": round(sum(margins) / max(1, len(margins)), 4)}


def answer_format(answer: str) -> dict:
    """How closely one greedy answer keeps the prompt's step format (the answer as `greedy_answers` cuts it):

    - ``answer_line``: it has an ``Answer: N`` line (what `reasoning_data.is_correct` reads);
    - ``step_format``: every non-empty line is an ``a op b [op c ...] = r`` step, except a final ``Answer: N``
      line, and there is at least one step (the worked example's shape);
    - ``ends_with_number``: its last non-space character is a digit (a number is the last thing said).
    """
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    answer_line = rd._final(answer) is not None
    steps_then_answer = (len(lines) >= 2 and rd._ANSWER.match(lines[-1]) is not None
                         and all(rd._STEP.match(line) for line in lines[:-1]))
    text = answer.rstrip()
    return {"answer_line": answer_line, "step_format": steps_then_answer,
            "ends_with_number": bool(text) and text[-1].isdigit()}


def format_summary(answers: list[str]) -> dict:
    """Per-problem `answer_format` flags (0/1 lists) and their shares over ``answers``."""
    flags = [answer_format(a) for a in answers]
    out = {}
    for key in ("answer_line", "step_format", "ends_with_number"):
        values = [int(f[key]) for f in flags]
        out[key] = {"share": round(sum(values) / max(1, len(values)), 4), "per_problem": values}
    return out


def _p(p: float) -> float:
    """A p-value to 3 significant figures (a fixed number of decimals would print small ones as 0)."""
    return float(f"{min(1.0, p):.3g}")


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact two-sided McNemar test of paired outcomes: b right where a wrong (n10) vs the reverse (n01)."""
    n10 = sum(1 for x, y in zip(a, b) if y and not x)
    n01 = sum(1 for x, y in zip(a, b) if x and not y)
    return {"better": n10, "worse": n01, "p": _two_sided_binomial(n10, n01)}


def _two_sided_binomial(better: int, worse: int) -> float:
    """Exact two-sided p of a ``better`` / ``worse`` split under a fair coin (McNemar's and the sign test's)."""
    n = better + worse
    tail = sum(math.comb(n, k) for k in range(0, min(better, worse) + 1)) / 2 ** n if n else 1.0
    return _p(2 * tail)


def paired_bootstrap(a: list[bool], b: list[bool], seed: int, resamples: int = 2000) -> list[float]:
    """95% interval of accuracy(b) - accuracy(a) over problems resampled with replacement."""
    return _bootstrap_ci([y - x for x, y in zip(a, b)], seed, resamples)


def _bootstrap_ci(differences: list[float], seed: int, resamples: int) -> list[float]:
    """95% percentile interval of the mean of ``differences`` over resamples drawn with replacement."""
    rng = random.Random(seed)
    n = len(differences)
    means = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        means.append(sum(differences[i] for i in idx) / n)
    means.sort()
    return [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples) - 1], 4)]


def sign_test(differences: list[float]) -> dict:
    """Exact two-sided sign test of per-problem differences (ties, i.e. zero differences, dropped)."""
    better = sum(1 for d in differences if d > 0)
    worse = sum(1 for d in differences if d < 0)
    return {"better": better, "worse": worse, "ties": len(differences) - better - worse,
            "p": _two_sided_binomial(better, worse)}


def sign_flip_test(differences: list[float], seed: int, resamples: int = 10000) -> float:
    """Two-sided paired randomisation test of the mean of per-problem differences: under the null each problem's
    difference is as likely to have either sign, so flip signs at random and count sums at least as far from 0
    as the observed one. Unlike the sign test it weighs each problem by how much it changed, so it tests the
    accuracy difference itself (the sign test can favour a method that is right on more problems once but
    wrong more often in total)."""
    observed = abs(sum(differences)) - 1e-9
    nonzero = [d for d in differences if d]
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in nonzero)) >= observed for _ in range(resamples))
    return _p((hits + 1) / (resamples + 1))


def per_problem_comparison(a_runs: list[list[int]], b_runs: list[list[int]], seed: int,
                           resamples: int = 2000) -> dict:
    """Method b against method a with the problem as the unit: each problem's outcome is its mean over the
    seeds (the seeds share the problems, so their outcomes are not independent), then a sign-flip randomisation
    test of the mean difference over problems, an exact sign test over problems (ties dropped), the same test on the majority vote over seeds (McNemar on per-problem majority;
    an even split counts as wrong), and a 95% bootstrap interval of the accuracy difference resampling problems
    (every seed of a drawn problem comes with it)."""
    seeds = len(a_runs)
    n = len(a_runs[0])
    mean_a = [sum(run[i] for run in a_runs) / seeds for i in range(n)]
    mean_b = [sum(run[i] for run in b_runs) / seeds for i in range(n)]
    differences = [y - x for x, y in zip(mean_a, mean_b)]
    majority_a = [x > 0.5 for x in mean_a]
    majority_b = [x > 0.5 for x in mean_b]
    return {"problems": n, "seeds": seeds, "accuracy_difference": round(sum(differences) / n, 4),
            "permutation_p": sign_flip_test(differences, seed), "sign_test_on_means": sign_test(differences), "majority_mcnemar": mcnemar(majority_a, majority_b),
            "majority_accuracy": [round(sum(majority_a) / n, 4), round(sum(majority_b) / n, 4)],
            "cluster_bootstrap_ci95": _bootstrap_ci(differences, seed, resamples)}


# --------------------------------------------------------------------------------------------------
# training


def train_one(method: str, model, tokenizer, rows, args, seed: int, workdir: Path) -> dict:
    """Wrap ``model`` in a fresh LoRA (seeded), train it with a DPOTrainer (patched per ``method``) and return
    the PEFT model and what the trainer logged. The caller unloads the adapter afterwards."""
    import hfpatch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(seed)
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    policy = get_peft_model(model, config)
    keep = ["prompt", "chosen", "rejected"] + (["rejected_weights"] if method == "cdpo" else
                                               ["shuffled_weights"] if method == "shuffled" else [])
    data = Dataset.from_list([{k: row[k] for k in keep} for row in rows])
    dpo_config = DPOConfig(output_dir=str(workdir / f"{method}-{seed}"), per_device_train_batch_size=args.batch_size,
                           max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                           warmup_steps=0, beta=args.beta, loss_type=["sigmoid"], seed=seed, data_seed=seed,
                           report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                           dataloader_num_workers=0, disable_tqdm=True, bf16=False, max_length=args.max_length,
                           gradient_checkpointing=False)  # short sequences: recomputing only costs time
    trainer = DPOTrainer(model=policy, ref_model=None, args=dpo_config, train_dataset=data,
                         processing_class=tokenizer)
    handle = None
    if method in ("cdpo", "shuffled"):
        column = "rejected_weights" if method == "cdpo" else "shuffled_weights"
        handle = hfpatch.patch(trainer, hfpatch.Recipe([{"type": "token_dpo", "weights": "column", "column": column,
                                                          "form": "sequence", "beta": args.beta}]))
    elif method == "tdpo2":
        handle = hfpatch.patch(trainer, hfpatch.Recipe([{"type": "tdpo", "variant": "tdpo2", "alpha": 0.5,
                                                          "beta": args.beta}]))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    tail = logs[-max(1, len(logs) // 4):]  # the last quarter of the steps

    def mean(key):
        values = [entry[key] for entry in tail if key in entry]
        return round(sum(values) / len(values), 4) if values else None

    info = {"train_s": round(seconds, 1), "steps": len(logs), "final_loss": mean("loss"),
            "final_margin": mean("rewards/margins"), "final_reward_accuracy": mean("rewards/accuracies"),
            "mean_rejected_weight": mean("weights/rejected_mean")}
    if handle is not None:
        stats = handle.stats
        info["patch_stats"] = {k: v for k, v in next(iter(stats.values())).items()
                               if k in ("weights", "form", "logprobs", "reference", "variant", "steps")} \
            if isinstance(stats, dict) and stats else str(stats)
        handle.unpatch()
    return policy, info


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-tuning", type=int, default=80)
    parser.add_argument("--n-evaluation", type=int, default=80, help="evaluation problems of the samples file")
    parser.add_argument("--n-heldout", type=int, default=120, help="held-out problems for greedy accuracy (the "
                        "evaluation stream; the samples file's evaluation problems are its first ones)")
    parser.add_argument("--samples", type=int, default=6, help="answers sampled per problem (if not in the file)")
    parser.add_argument("--terms", type=int, default=3)
    parser.add_argument("--digits", type=int, default=1, help="most digits per term")
    parser.add_argument("--min-digits", type=int, default=1, help="fewest digits per term")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=28)
    parser.add_argument("--samples-file", type=Path, help="sampled answers: read if it exists, else written")
    parser.add_argument("--extend-samples", action="store_true", help="a --samples-file that lacks some of this "
                        "run's problems (written for fewer of them) gets them sampled, with the same settings and "
                        "the seed --seed0 + 1, and added to the file; the answers already there are kept")
    parser.add_argument("--adapters-file", type=Path, help="contrastive adapters (safetensors): read if it exists, "
                        "else trained and written")
    parser.add_argument("--adapter-answers", type=int, default=120, help="at most this many correct and this many "
                        "wrong distinct answers train the contrastive adapters")
    parser.add_argument("--adapter-r", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--epochs", type=float, help="train this many passes over the pairs instead of --steps "
                        "(steps = ceil(epochs * pairs / batch size))")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of the trained policy (alpha = 2r)")
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--eval-batch", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed0", type=int, default=0, help="the split / sampling / adapter seed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/train_compare"))
    parser.add_argument("--no-base", action="store_true", help="skip the base model's greedy answers (another "
                        "process of a split run evaluates them)")
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge these results files of one split run")
    parser.add_argument("--out", type=Path, help="write the results (JSON) here")
    parser.add_argument("--table", type=Path, help="only print this results file as a Markdown table")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        # an unfinished run: only the seeds every method finished, so each row has the same seeds
        runs = result.get("runs", [])
        methods = set(run["method"] for run in runs)
        complete = {s for s in {run["seed"] for run in runs}
                    if methods <= {run["method"] for run in runs if run["seed"] == s}}
        dropped = [f"{run['method']}/{run['seed']}" for run in runs if run["seed"] not in complete]
        result["runs"] = [run for run in runs if run["seed"] in complete]
        result["comparisons"] = compare(result["runs"], result["settings"]["seed0"])
        print(markdown_table(result))
        if dropped:
            print(f"\n(left out, their seed unfinished: {', '.join(dropped)})")
        return 0
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    result: dict = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
                    "machine": machine_line(describe_machine()),
                    "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    def save():
        result["timings"] = timings
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    model, tokenizer = assets.load_smollm2()
    kwargs = dict(min_terms=args.terms, max_terms=args.terms, min_digits=args.min_digits, max_digits=args.digits)
    tuning, evaluation = rd.fixed_splits(rd.arithmetic_problems, n_tuning=args.n_tuning,
                                         n_evaluation=args.n_evaluation, seed=args.seed0, **kwargs)
    _, heldout = rd.fixed_splits(rd.arithmetic_problems, n_tuning=args.n_tuning, n_evaluation=args.n_heldout,
                                 seed=args.seed0, **kwargs)
    t = time.perf_counter()
    if args.extend_samples and args.samples_file is not None and args.samples_file.exists():
        extend_samples(args.samples_file, model, tokenizer, tuning + evaluation, args)
    try:
        samples = rd.cached_answers(args.samples_file, model, tokenizer, tuning + evaluation, n_samples=args.samples,
                                    temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                    seed=args.seed0)
    except ValueError as exc:  # a samples file of other --n-tuning/--n-evaluation/--terms/--digits settings
        raise SystemExit(str(exc)) from None
    timings["sampling_s"] = round(time.perf_counter() - t, 1)
    pairs = rd.build_pairs(tuning, samples)
    eval_pairs = rd.build_pairs(evaluation, samples)
    if args.epochs is not None:
        args.steps = max(1, math.ceil(args.epochs * len(pairs) / args.batch_size))
        result["settings"]["steps"] = args.steps
    result["data"] = {"tuning_problems": len(tuning), "heldout_problems": len(heldout),
                      "tuning_pairs": len(pairs), "heldout_pairs": len(eval_pairs), "steps": args.steps,
                      "tuning_sample_accuracy": round(sum(rd.is_correct(p, a) for p in tuning for a in samples[p.id])
                                                      / max(1, sum(len(samples[p.id]) for p in tuning)), 4)}

    rows = pairs
    if {"cdpo", "shuffled"} & set(args.methods):
        # contrastive adapters and the critical weights of every rejected tuning answer
        correct, wrong = contrastive_answers(tuning, samples, args.adapter_answers, args.seed0)
        t = time.perf_counter()
        (positive, negative), cached = load_or_train_adapters(model, tokenizer, correct, wrong, args.adapters_file,
                                                              args)
        timings["adapters_s"] = round(time.perf_counter() - t, 1)
        result["data"]["adapter_answers"] = {"correct": len(correct), "wrong": len(wrong), "cached": cached}
        rows = ct.score_dataset(model, tokenizer, positive, negative, pairs, progress=False)
        weights = [w for row in rows for w in row["rejected_weights"]]
        result["data"]["rejected_weights"] = {
            "tokens": len(weights), "mean": round(sum(weights) / len(weights), 4),
            "share_above_0.5": round(sum(w > 0.5 for w in weights) / len(weights), 4)}
        save()

    # base model (its greedy answers are deterministic: one process of a split run may skip them)
    base_answers, base_correct = None, None
    if not args.no_base:
        t = time.perf_counter()
        base_answers = greedy_answers(model, tokenizer, heldout, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.eval_batch)
        timings["eval_base_s"] = round(time.perf_counter() - t, 1)
        base_correct = [rd.is_correct(p, a) for p, a in zip(heldout, base_answers)]
        result["base"] = {"accuracy": round(sum(base_correct) / len(heldout), 4), "correct": sum(base_correct),
                          "per_problem": [int(x) for x in base_correct], "format": format_summary(base_answers),
                          "answers": base_answers}
        print(f"base: {sum(base_correct)}/{len(heldout)} held-out problems right", flush=True)
        save()

    result["runs"] = []
    for seed in args.seeds:
        seeded = shuffled_within(rows, "rejected_weights", "shuffled_weights", seed) if rows is not pairs else pairs
        for method in args.methods:
            t = time.perf_counter()
            policy, info = train_one(method, model, tokenizer, seeded, args, seed, args.workdir)
            answers = greedy_answers(policy, tokenizer, heldout, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.eval_batch)
            right = [rd.is_correct(p, a) for p, a in zip(heldout, answers)]
            info.update(method=method, seed=seed, accuracy=round(sum(right) / len(heldout), 4), correct=sum(right),
                        per_problem=[int(x) for x in right], format=format_summary(answers), answers=answers,
                        heldout_pairs=pair_preference(policy, tokenizer, eval_pairs))
            if base_correct is not None:
                info.update(vs_base=mcnemar(base_correct, right),
                            changed_answers=sum(a != b for a, b in zip(answers, base_answers)))
            model = policy.unload()  # the base model back, without this run's adapter
            info["total_s"] = round(time.perf_counter() - t, 1)
            result["runs"].append(info)
            print(json.dumps({k: v for k, v in info.items() if k not in ("per_problem", "answers", "format")}
                             | {"step_format": info["format"]["step_format"]["share"]}), flush=True)
            save()
    result["comparisons"] = compare(result["runs"], args.seed0)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps({"base": result.get("base"), "comparisons": result["comparisons"]}, indent=2))
    return 0


def compare(runs: list[dict], seed: int) -> dict:
    """Each method against DPO on the seeds both have.

    Pooled over (problem, seed) outcomes: exact McNemar and a paired bootstrap interval (these treat the seeds'
    outcomes on one problem as independent, which they are not). With the problem as the unit
    (`per_problem_comparison`): sign test on per-seed means, majority-vote McNemar, cluster bootstrap. And the
    answers' format (`answer_format`): the share of greedy answers in the step format, pooled McNemar against
    DPO's."""
    outcomes = {(run["method"], run["seed"]): run for run in runs}
    dpo_seeds = {s for m, s in outcomes if m == "dpo"}
    comparisons = {}
    for method in dict.fromkeys(m for m, _ in outcomes):
        seeds = sorted(s for s in dpo_seeds if (method, s) in outcomes)
        if method == "dpo" or not seeds:
            continue
        a = [bool(x) for s in seeds for x in outcomes[("dpo", s)]["per_problem"]]
        b = [bool(x) for s in seeds for x in outcomes[(method, s)]["per_problem"]]
        entry = {"seeds": seeds, "accuracy_difference": round((sum(b) - sum(a)) / len(a), 4),
                 "mcnemar": mcnemar(a, b), "bootstrap_ci95": paired_bootstrap(a, b, seed),
                 "per_problem": per_problem_comparison([outcomes[("dpo", s)]["per_problem"] for s in seeds],
                                                       [outcomes[(method, s)]["per_problem"] for s in seeds], seed)}
        if all("format" in outcomes[(m, s)] for m in ("dpo", method) for s in seeds):
            fa = [bool(x) for s in seeds for x in outcomes[("dpo", s)]["format"]["step_format"]["per_problem"]]
            fb = [bool(x) for s in seeds for x in outcomes[(method, s)]["format"]["step_format"]["per_problem"]]
            entry["step_format"] = {"shares": [round(sum(fa) / len(fa), 4), round(sum(fb) / len(fb), 4)],
                                    "mcnemar": mcnemar(fa, fb)}
        comparisons[f"{method} vs dpo"] = entry
    # cDPO against its own control: the same weights at the wrong positions (does *where* the weight sits matter?)
    seeds = sorted(s for m, s in outcomes if m == "cdpo" and ("shuffled", s) in outcomes)
    if seeds:
        a = [bool(x) for s in seeds for x in outcomes[("shuffled", s)]["per_problem"]]
        b = [bool(x) for s in seeds for x in outcomes[("cdpo", s)]["per_problem"]]
        comparisons["cdpo vs shuffled"] = {
            "seeds": seeds, "accuracy_difference": round((sum(b) - sum(a)) / len(a), 4), "mcnemar": mcnemar(a, b),
            "bootstrap_ci95": paired_bootstrap(a, b, seed),
            "per_problem": per_problem_comparison([outcomes[("shuffled", s)]["per_problem"] for s in seeds],
                                                  [outcomes[("cdpo", s)]["per_problem"] for s in seeds], seed)}
    return comparisons


def markdown_table(result: dict) -> str:
    """The results file as a Markdown table: per-seed correct counts, mean accuracy, the answers' step-format
    share, pooled McNemar and the per-problem sign test / cluster bootstrap against DPO, held-out pairs."""
    runs = result.get("runs", [])
    seeds = sorted({run["seed"] for run in runs})
    n = result["data"]["heldout_problems"]
    head = (["method"] + [f"seed {s}" for s in seeds] +
            ["accuracy", "step format", "vs DPO pooled (better/worse, McNemar p)",
             "vs DPO per problem (permutation p; better/worse problems, sign p)", "diff. vs DPO, points (cluster bootstrap 95%)",
             "held-out pairs preferred"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = result.get("base")
    if base:
        lines.append("| " + " | ".join(["base model (greedy)"] + [f"{base['correct']}/{n}"] * len(seeds) +
                                      [f"{100 * base['accuracy']:.1f}%",
                                       f"{100 * base['format']['step_format']['share']:.1f}%", "", "", "", ""]) + " |")
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = {run["seed"]: run for run in runs if run["method"] == method}
        correct = sum(r["correct"] for r in mine.values())
        fmt = sum(r["format"]["step_format"]["share"] for r in mine.values()) / len(mine) if all(
            "format" in r for r in mine.values()) else None
        cmp = result.get("comparisons", {}).get(f"{method} vs dpo")
        cells = [method] + [f"{mine[s]['correct']}/{n}" if s in mine else "" for s in seeds]
        cells += [f"{100 * correct / (n * len(mine)):.1f}%", "" if fmt is None else f"{100 * fmt:.1f}%"]
        if cmp:
            m, pp = cmp["mcnemar"], cmp["per_problem"]
            sign = pp["sign_test_on_means"]
            low, high = pp["cluster_bootstrap_ci95"]
            cells += [f"{m['better']}/{m['worse']}, p = {m['p']}",
                      f"p = {pp['permutation_p']}; {sign['better']}/{sign['worse']}, p = {sign['p']}",
                      f"{100 * pp['accuracy_difference']:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})"]
        else:
            cells += ["", "", ""]
        cells.append(" / ".join(f"{mine[s]['heldout_pairs']['prefers_chosen']:.2f}" for s in seeds if s in mine))
        lines.append("| " + " | ".join(cells) + " |")
    control = result.get("comparisons", {}).get("cdpo vs shuffled")
    if control:
        m, pp = control["mcnemar"], control["per_problem"]
        sign, (low, high) = pp["sign_test_on_means"], pp["cluster_bootstrap_ci95"]
        lines.append(f"\ncdpo vs its shuffled control: pooled {m['better']}/{m['worse']}, McNemar p = {m['p']}; per "
                     f"problem permutation p = {pp['permutation_p']}, {sign['better']}/{sign['worse']}, "
                     f"sign p = {sign['p']}; "
                     f"{100 * pp['accuracy_difference']:+.1f} points ({100 * low:+.1f} to {100 * high:+.1f})")
    return "\n".join(lines)


def merge(paths: list[Path], out: Path | None) -> int:
    """Join the JSON results of processes that trained different methods on the same settings (one of them
    evaluated the base model) and compare every method with DPO."""
    parts = [json.loads(p.read_text()) for p in paths]
    ignore = {"methods", "seeds", "out", "no_base", "adapters_file"}
    settings = [{k: v for k, v in part["settings"].items() if k not in ignore} for part in parts]
    if any(s != settings[0] for s in settings[1:]):
        raise SystemExit("these results were run with different settings; merge only the halves of one run")
    merged = {**parts[0], "command": [part["command"] for part in parts], "commit": [part["commit"] for part in parts],
              "runs": [run for part in parts for run in part.get("runs", [])],
              "timings": [part.get("timings") for part in parts]}
    for part in parts:
        for key in ("base", "data"):
            if key in part:
                merged[key] = {**merged.get(key, {}), **part[key]}
    base = merged.get("base", {}).get("per_problem")
    if base is not None:
        for run in merged["runs"]:
            run["vs_base"] = mcnemar([bool(x) for x in base], [bool(x) for x in run["per_problem"]])
    merged["comparisons"] = compare(merged["runs"], merged["settings"]["seed0"])
    print(json.dumps({"base": merged.get("base", {}).get("accuracy"), "comparisons": merged["comparisons"]}, indent=2))
    if out:
        out.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
