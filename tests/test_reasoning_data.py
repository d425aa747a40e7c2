"""The verifiable-problem data behind the critical-token measurement (hfpatch/apps/reasoning_data.py)."""
from __future__ import annotations

import sys

import pytest
from tiny_models import tiny_model, word_level_tokenizer

from hfpatch.apps import reasoning_data as rd

def _have_reasoning_gym() -> bool:
    import importlib.util

    return "reasoning_gym" in sys.modules or importlib.util.find_spec("reasoning_gym") is not None


needs_gym = pytest.mark.skipif(not _have_reasoning_gym(), reason=f"needs reasoning-gym: {rd.PIP_COMMAND}")

CHAIN = rd.Problem(id="t/0", question="23 + 60 - 71", answer=12, terms=(23, 60, 71), ops=("+", "-"))


@pytest.mark.parametrize("answer, correct, step, wrong_text, wrong_from", [
    ("23 + 60 = 83\n83 - 71 = 12\nAnswer: 12", True, None, None, None),
    ("23 + 60 = 84\n84 - 71 = 13\nAnswer: 13", False, 0, "84", "4\n"),  # wrong result; next step right for 84
    ("23 + 60 = 83\n83 - 71 = 14\nAnswer: 14", False, 1, "14", "4\n"),  # wrong result in step 2
    ("23 + 60 = 83\n83 - 17 = 66\nAnswer: 66", False, 1, "17", "17"),    # copied the wrong number
    ("23 + 60 = 83\n83 + 71 = 154\nAnswer: 154", False, 1, "+", "+"),    # wrong operator
    ("23 + 60 = 83\n38 - 71 = -33\nAnswer: -33", False, 1, "38", "38"),  # did not carry the result
    ("23 + 60 = 8\n8 - 71 = -63\nAnswer: -63", False, 0, "8", "\n8 -"), # stopped short: the newline is wrong
    ("23 + 60 = 83\n83 - 71 = 12\nAnswer: 13", False, None, None, None), # steps right, answer wrong: no token
    ("23 + 60 - 71 = 12\nAnswer: 12", True, None, None, None),            # the whole chain on one line
    ("23 + 60 - 71 = 13\nAnswer: 13", False, 0, "13", "3\n"),
    ("23 + 60 - 71 - 5 = 7\nAnswer: 7", False, 0, "-", "- 5"),           # one operation more than the chain has
    ("23 + 60 = 83\n83 -71 = 12\nAnswer: 12", True, None, None, None),   # spacing does not matter
])
def test_check_chain_finds_the_first_locally_wrong_field(answer, correct, step, wrong_text, wrong_from):
    check = rd.check_chain(CHAIN, answer)
    assert check.correct is correct and check.first_wrong_step == step
    if wrong_text is None:
        assert check.error_span is None and check.first_wrong_char is None
    else:
        start, end = check.error_span
        assert answer[start:end] == wrong_text
        assert answer[check.first_wrong_char:].startswith(wrong_from)
        assert answer[:start].count("\n") == step  # on the line of that step
        if wrong_text == "-":
            assert start == answer.rindex("-")


def test_prompt_and_answer_cut():
    prompt = rd.prompt_for(CHAIN)
    assert prompt.startswith(rd.ARITHMETIC_EXAMPLE) and prompt.endswith("Question: 23 + 60 - 71\n")
    assert rd._cut("23 + 60 = 83\n83 - 71 = 12\nAnswer: 12\n\nQuestion: 1 + 1\n") == \
        "23 + 60 = 83\n83 - 71 = 12\nAnswer: 12"
    assert rd.is_correct(CHAIN, "Answer: 12") and not rd.is_correct(CHAIN, "12")


def test_build_pairs_takes_the_most_frequent_correct_and_wrong_answers():
    other = rd.Problem(id="t/1", question="1 + 1 + 1", answer=3, terms=(1, 1, 1), ops=("+", "+"))
    right_a, right_b = "23 + 60 = 83\n83 - 71 = 12\nAnswer: 12", "23+60=83\n83-71=12\nAnswer: 12"
    wrong_a, wrong_b = "23 + 60 = 84\nAnswer: 13", "Answer: 5"
    samples = {"t/0": [right_a, wrong_a, right_b, right_b, wrong_b, wrong_b, wrong_a, wrong_b],
               "t/1": ["1 + 1 = 2\n2 + 1 = 3\nAnswer: 3"] * 3}  # no wrong answer: no pair
    rows = rd.build_pairs([CHAIN, other], samples)
    assert len(rows) == 1
    assert rows[0]["chosen"] == right_b and rows[0]["rejected"] == wrong_b
    assert rows[0]["prompt"] == rd.prompt_for(CHAIN) and rows[0]["n_correct"] == 3 and rows[0]["n_samples"] == 8


@needs_gym
def test_generators_and_fixed_splits():
    tuning, evaluation = rd.fixed_splits(rd.arithmetic_problems, n_tuning=20, n_evaluation=20, seed=5,
                                         min_terms=3, max_terms=3, max_digits=2)
    again = rd.fixed_splits(rd.arithmetic_problems, n_tuning=20, n_evaluation=20, seed=5, min_terms=3,
                            max_terms=3, max_digits=2)
    assert (tuning, evaluation) == again  # fixed: the same problems on every run
    assert len(tuning) == 20 and 18 <= len(evaluation) <= 20  # a few shared questions at most
    assert not {p.question for p in tuning} & {p.question for p in evaluation}
    for problem in tuning + evaluation:
        assert len(problem.terms) == 3 and len(problem.ops) == 2
        value = problem.terms[0]
        for op, term in zip(problem.ops, problem.terms[1:]):
            value = value + term if op == "+" else value - term
        assert value == problem.answer
        # the worked solution in the step format passes the verifier
        lines, acc = [], problem.terms[0]
        for op, term in zip(problem.ops, problem.terms[1:]):
            new = acc + term if op == "+" else acc - term
            lines.append(f"{acc} {op} {term} = {new}")
            acc = new
        check = rd.check_chain(problem, "\n".join(lines) + f"\nAnswer: {acc}")
        assert check.correct and check.first_wrong_step is None
    word = rd.gsm_problems(5, seed=0)
    assert word and all(p.solution.strip().endswith(f"#### {p.answer}") for p in word)
    with pytest.raises(ValueError, match="word problems"):
        rd.check_chain(word[0], "Answer: 1")


def test_sample_answers_on_a_tiny_model():
    model = tiny_model("llama")
    tok = word_level_tokenizer(128, "Question: Answer: = + - 0 1 2 3 4 5 6 7 8 9 14 25 7 39 32 23 60 71")
    samples = rd.sample_answers(model, tok, [CHAIN], n_samples=3, max_new_tokens=5, batch_size=2, progress=False)
    assert list(samples) == ["t/0"] and len(samples["t/0"]) == 3
    assert tok.padding_side == "right"  # restored after left-padding the prompts


def test_cached_answers_reads_back_what_it_wrote_and_refuses_a_file_of_other_problems(tmp_path, monkeypatch):
    problems = [rd.Problem(id=f"p{i}", question="1 + 1", answer=2) for i in range(2)]
    calls = []

    def fake_sample(model, tokenizer, problems, **sampling):
        calls.append(sampling)
        return {p.id: ["Answer: 2"] for p in problems}

    monkeypatch.setattr(rd, "sample_answers", fake_sample)
    path = tmp_path / "samples.json"
    first = rd.cached_answers(path, None, None, problems, n_samples=1)
    again = rd.cached_answers(path, None, None, problems, n_samples=1)
    assert first == again and len(calls) == 1 and path.exists()
    with pytest.raises(ValueError, match="no samples for 1 problems"):
        rd.cached_answers(path, None, None, problems + [rd.Problem(id="other", question="2 + 2", answer=4)])
