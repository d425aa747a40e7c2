"""The scripts in examples/ run as a user would run them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.real_model
def test_speculative_example_reports_identity(tmp_path):
    env = dict(os.environ, MAX_NEW_TOKENS="24")
    out = subprocess.run([sys.executable, str(EXAMPLES / "speculative_generate.py")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "identical to plain greedy: True" in out.stdout


@pytest.mark.real_model
def test_warm_table_example_saves_a_loadable_recipe(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / "share_warm_table.py"), str(tmp_path / "warm")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "warm" / "hfpatch_recipe.safetensors").is_file()
    rows = int(out.stdout.split("starts with ")[1].split()[0])
    assert rows > 0


def _run_example(name: str, *args: str) -> str:
    """stdout of `python examples/<name> <args>`, run as a user would (its offline default: no downloads)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_draft_model_example_is_identical_and_drafts_are_accepted():
    stdout = _run_example("draft_model_generate.py", "--max-new-tokens", "24")  # DySpec tree, tiny random pair
    assert "identical to plain greedy: True" in stdout
    mat = float(stdout.split("MAT (tokens per target forward): ")[1].split()[0])
    assert mat > 1.5, stdout


@pytest.mark.slow
def test_vlm_pruning_example_keeps_fewer_tokens_and_unpatches():
    stdout = _run_example("vlm_pruning.py")
    kept, total = (int(n) for n in stdout.split("image tokens kept: ")[1].split()[0:3:2])
    assert 0 < kept < total
    assert "after unpatch, same as unpruned: True" in stdout


@pytest.mark.slow
def test_token_dpo_example_trains_a_few_steps_and_unpatches():
    pytest.importorskip("trl")
    stdout = _run_example("token_dpo_trainer.py")
    assert "'weights': 'column'" in stdout and "step 3: loss" in stdout
    assert "unpatched: compute_loss is TRL's again: True" in stdout


def test_every_example_is_short_and_says_how_to_run_it():
    for script in sorted(EXAMPLES.glob("*.py")):
        text = script.read_text()
        assert text.startswith('"""') and f"python examples/{script.name}" in text, script.name
    for name in ("draft_model_generate.py", "vlm_pruning.py", "token_dpo_trainer.py"):
        assert len((EXAMPLES / name).read_text().splitlines()) <= 65, name
