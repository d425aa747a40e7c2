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
