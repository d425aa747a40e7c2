"""``hfpatch critical-tokens`` end to end on a tiny Llama saved to a folder: train the contrastive adapters, write
the weight column, save them as a recipe, score again from the recipe; and the one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model, word_level_tokenizer

import hfpatch
from hfpatch.apps import cli
from hfpatch.recipe import Recipe
from hfpatch.techniques.training import critical_tokens as ct

WORDS = "= + 0 1 2 3 4 5 6 7 8 9"


def run_cli(capsys, *argv):
    """Run ``hfpatch argv...`` in-process; return (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *parts: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hfpatch: error:")]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, err)


def _save_tiny(folder, seed=0):
    model = tiny_model("llama", seed=seed)
    model.save_pretrained(folder)
    word_level_tokenizer(model.config.vocab_size, WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def pairs(tmp_path):
    rows = [{"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {(a + b + 3) % 10} {a}", "id": a * 4 + b}
            for a in range(3) for b in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _token_dpo_available() -> bool:
    return any(t["name"] == "token_dpo" for t in hfpatch.list_techniques())


def test_train_score_save_recipe_and_rescore(capsys, tmp_path, tiny_dir, pairs):
    if not _token_dpo_available():
        pytest.skip("the token_dpo technique (which carries the adapters in a recipe) is not in this build")
    path, rows = pairs
    out, recipe_dir = tmp_path / "scored", tmp_path / "recipe"
    code, stdout, err = run_cli(capsys, "critical-tokens", "--model", tiny_dir, "--pairs", path, "--out", out,
                                "--save-recipe", recipe_dir, "--lr", "0.02", "--epochs", "2", "--r", "4",
                                "--batch-size", "4")
    assert code == 0, err
    assert "scored" in stdout and str(recipe_dir) in stdout
    scored = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    tokenizer = word_level_tokenizer(128, WORDS)
    assert [r["id"] for r in scored] == [r["id"] for r in rows]  # order and other columns kept
    for row in scored:
        completion = ct.encode_completion(tokenizer, row["prompt"], row["rejected"])[1]
        assert len(row["rejected_weights"]) == len(completion) == 3  # digit, digit, EOS
        assert all(0.0 <= w <= 1.0 for w in row["rejected_weights"])
    summary = json.loads((out / "critical_tokens.json").read_text())
    assert summary["rows"] == 9 and summary["tokens"] == 27 and summary["r"] == 4
    assert summary["adapters"].startswith("trained on 9 chosen and 9 rejected")

    recipe = Recipe.from_pretrained(str(recipe_dir))
    assert recipe.techniques == [{"type": "token_dpo", "weights": "critical", "critical_b": 1.0}]
    assert "llama model (2 layers, vocabulary 128)" in recipe.description and str(tmp_path) not in recipe.description
    tensors = {k.removeprefix("token_dpo/"): v for k, v in recipe.tensors.items()}
    metadata = {k.removeprefix("token_dpo/"): v for k, v in recipe.tensor_metadata.items()}
    positive, _ = ct.adapters_from_tensors(tensors, metadata)
    assert positive.config.r == 4 and len(positive.config.target_modules) == 6  # 2 layers x 3 MLP projections

    # the same adapters from the recipe give the same weights
    again = tmp_path / "again"
    code, stdout, err = run_cli(capsys, "critical-tokens", "--model", tiny_dir, "--pairs", path, "--out", again,
                                "--recipe", recipe_dir, "--batch-size", "4")
    assert code == 0, err
    rescored = [json.loads(line) for line in (again / "pairs.jsonl").read_text().splitlines()]
    for first, second in zip(scored, rescored):
        assert second["rejected_weights"] == pytest.approx(first["rejected_weights"], abs=1e-5)
    assert json.loads((again / "critical_tokens.json").read_text())["adapters"] == f"recipe {recipe_dir}"

    # another model (same architecture, other weights) refuses those adapters
    other = _save_tiny(tmp_path / "other", seed=1)
    code, _, err = run_cli(capsys, "critical-tokens", "--model", other, "--pairs", path, "--out", tmp_path / "x",
                           "--recipe", recipe_dir)
    assert code == 2
    assert_one_line_error(err, "other weights", "train adapters for this model")
    assert not (tmp_path / "x").exists()


def test_scoring_from_the_command_equals_the_library(capsys, tmp_path, tiny_dir, pairs):
    path, _ = pairs
    out = tmp_path / "scored"
    code, _, err = run_cli(capsys, "critical-tokens", "--model", tiny_dir, "--pairs", path, "--out", out,
                           "--lr", "0.02", "--r", "2", "--seed", "3", "--column", "w", "--b", "0.5")
    assert code == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    positive, negative = ct.train_contrastive_adapters(
        model, tokenizer, [(r["prompt"], r["chosen"]) for r in rows], [(r["prompt"], r["rejected"]) for r in rows],
        r=2, lr=0.02, seed=3, progress=False)
    expected = ct.score_dataset(model, tokenizer, positive, negative, rows, column="w", b=0.5, progress=False)
    scored = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for got, want in zip(scored, expected):
        assert got["w"] == pytest.approx(want["w"], abs=1e-5)
    assert torch.tensor([w for r in scored for w in r["w"]]).std() > 0


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "1 =", "chosen": " 1"}\n', "has no 'rejected' column"),
    ('{"prompt": "1 =", "chosen": " 1", "rejected": 2}\n', "non-text 'rejected'"),
    ('not json\n', "line 1: not JSON"),
    ('[1, 2]\n', "expected a JSON object"),
    ('\n', "holds no pairs"),
])
def test_bad_pairs_file_is_one_line_error(capsys, tmp_path, tiny_dir, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    code, out, err = run_cli(capsys, "critical-tokens", "--model", tiny_dir, "--pairs", path, "--out", tmp_path / "o")
    assert code == 2 and not out
    assert_one_line_error(err, "--pairs", message)


def test_argument_errors_come_before_any_work(capsys, tmp_path, tiny_dir, pairs):
    path, _ = pairs
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    cases = [
        (["--pairs", tmp_path / "missing.jsonl", "--out", tmp_path / "o"], ["no such file"]),
        (["--pairs", path, "--out", tmp_path / "full"], ["--out", "not empty", "--force"]),
        (["--pairs", path, "--out", tmp_path / "o", "--save-recipe", tmp_path / "o"], ["different folders"]),
        (["--pairs", path, "--out", tmp_path / "o", "--recipe", "cdpo", "--r", "4"], ["--r", "loaded, not trained"]),
        (["--pairs", path, "--out", tmp_path / "o", "--b", "-1"], ["--b"]),
        (["--pairs", path, "--out", tmp_path / "o", "--target-modules", "nope"], ["'nope' matches no"]),
    ]
    for extra, parts in cases:
        code, out, err = run_cli(capsys, "critical-tokens", "--model", tiny_dir, *extra)
        assert code == 2 and not out, (extra, err)
        assert_one_line_error(err, *parts)
    assert (tmp_path / "full" / "keep.txt").exists() and not (tmp_path / "o").exists()


def test_a_recipe_without_adapters_is_refused(capsys, tmp_path, tiny_dir, pairs):
    if not _token_dpo_available():
        pytest.skip("a token_dpo recipe needs the token_dpo technique")
    path, _ = pairs
    Recipe([{"type": "token_dpo", "weights": "column"}], name="column-only").save_pretrained(tmp_path / "rec")
    code, _, err = run_cli(capsys, "critical-tokens", "--model", tiny_dir, "--pairs", path, "--out", tmp_path / "o",
                           "--recipe", tmp_path / "rec")
    assert code == 2
    assert_one_line_error(err, "carries no contrastive adapters", "--save-recipe")
