"""The README's Python blocks run, so they cannot rot.

Each ```python block of README.md is executed as written, with three substitutions that keep the test offline
and fast: the model and tokenizer it loads from the Hub become a tiny random Llama and a word-level tokenizer
with a chat template (built here), ``max_new_tokens`` is cut to a few tokens, and the Hub repo it pushes to is
a fresh repo on the local test Hub (``hub_server``). The objects a block uses without building them (``vlm``,
``trainer``, ``small_model``) are a tiny LLaVA, a TRL DPOTrainer on a tiny Llama, and a shallower Llama of the
same vocabulary. Any exception in a block fails the test, naming the block's first line in the README.
"""
from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest
from tiny_models import tiny_model, word_level_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"

MODEL_LOAD = re.compile(r"AutoModelForCausalLM\.from_pretrained\(\s*\"[^\"]+\"\s*\)")
TOKENIZER_LOAD = re.compile(r"AutoTokenizer\.from_pretrained\(\s*\"[^\"]+\"\s*\)")
HUB_REPO = re.compile(r"\"me/[\w.-]+\"")
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> {% endif %}")


def python_blocks() -> list[tuple[int, str]]:
    """(line number of the opening fence, code) for every ```python block of the README."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index + 1
            end = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
            blocks.append((index + 1, "\n".join(lines[start:end])))
            index = end
        index += 1
    return blocks


def offline_source(code: str, repo_id: str) -> str:
    """The block with its Hub loads, generation lengths and Hub repo replaced (see the module docstring)."""
    code = MODEL_LOAD.sub("_readme_model()", code)
    code = TOKENIZER_LOAD.sub("_readme_tokenizer()", code)
    code = re.sub(r"max_new_tokens=\d+", "max_new_tokens=6", code)
    return HUB_REPO.sub(repr(repo_id), code)


def test_the_readme_has_the_quick_start_block():
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    quick_start = blocks[0][1]
    # The substitutions below must find what they replace, or the test would run something else.
    assert MODEL_LOAD.search(quick_start) and TOKENIZER_LOAD.search(quick_start) and HUB_REPO.search(quick_start)


def _stand_ins(code: str, tmp_path: Path) -> dict:
    """Tiny stand-ins for the objects a block uses but does not build (only those it names)."""
    found = {}
    if re.search(r"\bvlm\b", code):
        found["vlm"] = tiny_model("llava")
    if re.search(r"\bsmall_model\b", code):
        config = tiny_model("llama").config
        config.num_hidden_layers = 1
        found["small_model"] = tiny_model("llama", seed=1, config=config)
    if re.search(r"\btrainer\b", code):
        pytest.importorskip("trl")
        from preference_fixtures import dpo_trainer, preference_rows

        rows = [{**row, "rejected_weights": [0.5] * 12} for row in preference_rows(4)]
        found["trainer"] = dpo_trainer(tmp_path / "trainer", rows=rows)
    return found


@pytest.mark.parametrize("line, code", python_blocks(), ids=lambda v: f"README.md:{v}" if isinstance(v, int) else "")
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch, hub_server):
    import hfpatch

    model = tiny_model("llama")
    tokenizer = word_level_tokenizer(model.config.vocab_size, "write a haiku about diffs the quick brown fox",
                                     CHAT_TEMPLATE)
    namespace = {"__name__": "readme", "_readme_model": lambda: model, "_readme_tokenizer": lambda: tokenizer,
                 **_stand_ins(code, tmp_path)}
    monkeypatch.chdir(tmp_path)  # the block saves "warm/" into the working directory
    source = offline_source(code, hub_server.new_repo_id("readme"))
    try:
        exec(compile(source, f"README.md:{line}", "exec"), namespace)
    except Exception as exc:
        pytest.fail(f"the README's python block at line {line} raised {type(exc).__name__}: {exc}\n"
                    f"{traceback.format_exc()}")
    finally:
        hfpatch.unpatch(model)
        for name in ("vlm", "trainer"):
            if name in namespace:
                hfpatch.unpatch(namespace[name])
    assert hfpatch.active_patches(model) == []
