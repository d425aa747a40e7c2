"""The statistics and the answer-format scoring of benchmarks/training/train_compare.py (no model, no assets)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "training"))

import train_compare as tc  # noqa: E402


def test_answer_format_reads_the_step_format():
    assert tc.answer_format("3 + 4 = 7\n7 - 2 = 5\nAnswer: 5") == {
        "answer_line": True, "step_format": True, "ends_with_number": True}
    # an answer line without steps, or prose before it, is not the step format
    assert tc.answer_format("Answer: 5")["step_format"] is False
    loose = tc.answer_format("The sum is 7\nAnswer: 7")
    assert loose["answer_line"] and not loose["step_format"]
    # no answer line: ends with a number or not
    assert tc.answer_format("The answer is 32") == {"answer_line": False, "step_format": False,
                                                    "ends_with_number": True}
    assert tc.answer_format("17 + 21 +")["ends_with_number"] is False


def test_format_summary_shares_and_flags():
    summary = tc.format_summary(["1 + 1 = 2\nAnswer: 2", "Output: 8", ""])
    assert summary["step_format"] == {"share": round(1 / 3, 4), "per_problem": [1, 0, 0]}
    assert summary["ends_with_number"]["per_problem"] == [1, 1, 0]


def test_sign_test_exact_and_ties_dropped():
    # 6 better, 0 worse: two-sided p = 2 / 2^6
    out = tc.sign_test([1, 0.5, 1, 1, 0.25, 1, 0, 0])
    assert out == {"better": 6, "worse": 0, "ties": 2, "p": 0.0312}
    # small p-values keep their digits (not rounded to 0)
    assert tc.sign_test([1] * 30)["p"] == float(f"{2 / 2 ** 30:.3g}") > 0
    assert tc.sign_test([0, 0])["p"] == 1.0


def test_sign_flip_test_weighs_how_much_each_problem_changed():
    # 3 problems a bit better, 1 problem much worse: the mean difference is 0, so no evidence either way,
    # although the sign test counts 3 problems against 1
    differences = [0.25, 0.25, 0.25, -0.75]
    assert tc.sign_flip_test(differences, seed=0, resamples=500) == 1.0
    assert tc.sign_flip_test([1.0] * 12, seed=0, resamples=2000) < 0.002  # all 12 better: 2 of 4096 sign patterns
    assert tc.sign_flip_test([0, 0], seed=0, resamples=10) == 1.0


def test_per_problem_comparison_counts_a_problem_once_over_seeds():
    # 3 seeds x 4 problems. Pooled, b is right 3 more times (all on problem 0); per problem, only one problem
    # differs, so the sign test has one discordant problem (p = 1), while pooled McNemar sees 3 discordant pairs.
    a = [[0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1]]
    b = [[1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 0, 1]]
    out = tc.per_problem_comparison(a, b, seed=0, resamples=200)
    assert out["sign_test_on_means"] == {"better": 1, "worse": 0, "ties": 3, "p": 1.0}
    assert out["majority_mcnemar"]["better"] == 1 and out["majority_accuracy"] == [0.5, 0.75]
    assert out["accuracy_difference"] == 0.25
    low, high = out["cluster_bootstrap_ci95"]
    assert 0.0 <= low <= 0.25 <= high <= 1.0
    pooled = tc.mcnemar([bool(x) for run in a for x in run], [bool(x) for run in b for x in run])
    assert pooled["better"] == 3


def test_compare_adds_per_problem_and_format_to_each_method():
    fmt = {"step_format": {"share": 0.5, "per_problem": [1, 0]}}
    runs = [{"method": "dpo", "seed": s, "per_problem": [0, 1], "format": fmt} for s in (0, 1)]
    runs += [{"method": "cdpo", "seed": s, "per_problem": [1, 1],
              "format": {"step_format": {"share": 1.0, "per_problem": [1, 1]}}} for s in (0, 1)]
    out = tc.compare(runs, seed=0)["cdpo vs dpo"]
    assert out["seeds"] == [0, 1] and out["accuracy_difference"] == 0.5
    assert out["per_problem"]["sign_test_on_means"]["better"] == 1
    assert out["step_format"] == {"shares": [0.5, 1.0], "mcnemar": {"better": 2, "worse": 0, "p": 0.5}}
    # cDPO is also compared with its shuffled-weights control
    assert "cdpo vs shuffled" not in tc.compare(runs, seed=0)
    shuffled = [{**run, "method": "shuffled", "per_problem": [0, 1]} for run in runs if run["method"] == "cdpo"]
    vs_control = tc.compare(runs + shuffled, seed=0)["cdpo vs shuffled"]
    assert vs_control["accuracy_difference"] == 0.5 and vs_control["per_problem"]["sign_test_on_means"]["better"] == 1
    # a method with only some of DPO's seeds is compared on the seeds both have
    partial = tc.compare(runs[:2] + runs[2:3], seed=0)["cdpo vs dpo"]
    assert partial["seeds"] == [0]


def test_extend_samples_adds_only_the_missing_problems(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    path = tmp_path / "samples.json"
    path.write_text(json.dumps({"a": ["kept"]}))
    calls = []

    def fake_sample(model, tokenizer, problems, **kwargs):
        calls.append(([p.id for p in problems], kwargs["seed"]))
        return {p.id: ["new"] * kwargs["n_samples"] for p in problems}

    monkeypatch.setattr(tc.rd, "sample_answers", fake_sample)
    args = SimpleNamespace(samples=2, temperature=0.8, max_new_tokens=8, seed0=0)
    problems = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]
    assert tc.extend_samples(path, None, None, problems, args) == 1
    assert calls == [(["b"], 1)]  # a new seed, not the first call's stream again
    assert json.loads(path.read_text()) == {"a": ["kept"], "b": ["new", "new"]}
    assert tc.extend_samples(path, None, None, problems, args) == 0 and len(calls) == 1


def test_markdown_table_has_a_row_per_method_and_the_base():
    fmt = {"step_format": {"share": 0.5, "per_problem": [1, 0]}}
    runs = [{"method": m, "seed": s, "per_problem": [0, 1] if m == "dpo" else [1, 1], "correct": 1 if m == "dpo" else 2,
             "format": fmt, "heldout_pairs": {"prefers_chosen": 0.75}} for s in (0, 1) for m in ("dpo", "cdpo")]
    result = {"data": {"heldout_problems": 2}, "runs": runs,
              "base": {"correct": 0, "accuracy": 0.0, "format": fmt}, "comparisons": tc.compare(runs, 0)}
    lines = tc.markdown_table(result).splitlines()
    assert len(lines) == 5 and lines[2].startswith("| base model")
    assert lines[3].startswith("| dpo | 1/2 | 1/2 | 50.0% | 50.0% |")
    assert "| cdpo | 2/2 | 2/2 | 100.0% |" in lines[4] and "+50.0" in lines[4]


def test_table_of_an_unfinished_run_keeps_only_finished_seeds(tmp_path, capsys):
    import json

    fmt = {"step_format": {"share": 1.0, "per_problem": [1, 1]}}
    runs = [{"method": m, "seed": s, "per_problem": [1, 0], "correct": 1, "format": fmt,
             "heldout_pairs": {"prefers_chosen": 0.5}} for s in (0, 1) for m in ("dpo", "cdpo")][:3]  # seed 1: dpo only
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"settings": {"seed0": 0}, "data": {"heldout_problems": 2}, "runs": runs}))
    assert tc.main(["--table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed 1" not in out.splitlines()[0] and "left out, their seed unfinished: dpo/1" in out
