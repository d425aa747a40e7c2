"""Outputs a user keeps are written atomically, with unpredictable temporary names (issue 17, "Data a user keeps").

- hfpatch.files: a file or folder is replaced as a whole; an error leaves the old one and no temporary;
  a symbolic link planted at a temporary name (or at the output itself) never redirects a write.
- Recipe.save_pretrained and Recipe.download (``recipe pull``): the old fixed ``.<name>.tmp`` names are gone.
- ``hfpatch transplant``: --out is checked before any work (one line, exit 2); --force replaces the whole folder;
  SIGINT/SIGTERM in the middle leaves --out as it was and no temporary folder.
"""
from __future__ import annotations

import ast
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import probe_techniques  # noqa: F401  (registers the probe techniques)
import pytest
import torch
from tiny_models import tiny_config, tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hfpatch
from hfpatch import files
from hfpatch.apps.cli import main
from hfpatch.apps.cli import transplant as transplant_cli
from hfpatch.recipe import RECIPE_FILE, TENSOR_FILE, Recipe

REPO = Path(__file__).resolve().parent.parent


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary or set-aside entries hfpatch.files would leave in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if f".{files.TEMP_TAG}" in p.name or f".{files.ASIDE_TAG}" in p.name)


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256), to tell an output from another."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# hfpatch.files


def test_files_imports_nothing_from_hfpatch_but_errors():
    tree = ast.parse((REPO / "hfpatch" / "files.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
                 if alias.name.startswith("hfpatch")}
    assert imported == {"errors"}


def test_atomic_write_replaces_a_planted_link_never_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.json").symlink_to(victim)
    files.atomic_write_text(out / "data.json", "new")
    assert victim.read_text() == "precious"
    assert not (out / "data.json").is_symlink() and (out / "data.json").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == ["data.json"]


def test_atomic_write_keeps_the_old_file_and_mode_when_writing_fails(tmp_path):
    path = tmp_path / "data.bin"
    files.atomic_write_bytes(path, b"old")
    os.chmod(path, 0o640)

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.bin"]
    files.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o640


def test_atomic_folder_replaces_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "out"
    with files.atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.{files.TEMP_TAG}")
        (tmp / "a.txt").write_text("1")
        (tmp / "stale.txt").write_text("old")
    assert _tree(target).keys() == {"a.txt", "stale.txt"}
    assert (target.stat().st_mode & 0o777) == 0o777 & ~files._umask()  # not mkdtemp's 0700

    with pytest.raises(RuntimeError), files.atomic_folder(target, force=True) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "1" and _leftovers(tmp_path) == []

    with files.atomic_folder(target, force=True) as tmp:
        (tmp / "a.txt").write_text("2")
    assert _tree(target).keys() == {"a.txt"} and (target / "a.txt").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_folder_refuses_before_the_block_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    (tmp_path / "link").symlink_to(full)
    cases = {tmp_path / "file": "not a folder", full: "not empty", tmp_path / "link": "symbolic link",
             tmp_path / "file" / "out": "is not a folder"}
    for target, words in cases.items():
        with pytest.raises(files.OutputError, match=words), files.atomic_folder(target):
            pytest.fail("the block ran")
    assert _tree(full) == {"keep": hashlib.sha256(b"x").hexdigest()} and _leftovers(tmp_path) == []


def test_an_interrupt_during_the_swap_waits_until_the_new_folder_is_in_place(tmp_path, monkeypatch):
    """Ctrl-C between "old folder moved aside" and "new folder moved in" would otherwise lose both."""
    target = tmp_path / "out"
    with files.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("old")
    rename = os.rename

    def interrupted_rename(src, dst):
        rename(src, dst)
        if Path(src) == target:  # the old folder has just been moved aside
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt), files.atomic_folder(target, force=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new" and os.listdir(tmp_path) == ["out"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_remove_folder(tmp_path):
    (tmp_path / "gone" / "sub").mkdir(parents=True)
    files.remove_folder(tmp_path / "gone")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# recipes


def _recipe_with_tensors() -> Recipe:
    return Recipe([{"type": "probe_all_primitives", "budget": 4}], name="with-tensors",
                  tensors={"probe_all_primitives/table": torch.arange(21).reshape(7, 3)},
                  tensor_metadata={"probe_all_primitives/tokenizer": "sha256:abc"})


def _plant(folder: Path, victim: Path) -> list[Path]:
    """Symbolic links at every temporary name hfpatch used to write through (``.<file>.tmp``)."""
    links = []
    for name in (RECIPE_FILE, TENSOR_FILE):
        link = folder / f".{name}.tmp"
        link.symlink_to(victim)
        links.append(link)
    return links


def test_save_pretrained_cannot_be_redirected_by_planted_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "recipe"
    out.mkdir()
    links = _plant(out, victim)
    recipe = _recipe_with_tensors()
    recipe.save_pretrained(out)
    assert victim.read_text() == "precious" and all(link.is_symlink() for link in links)
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == sorted([RECIPE_FILE, TENSOR_FILE])
    loaded = Recipe.from_pretrained(out)
    assert torch.equal(loaded.tensors["probe_all_primitives/table"], recipe.tensors["probe_all_primitives/table"])


def test_recipe_download_cannot_be_redirected_by_planted_links(hub_server, tmp_path):
    repo_id = hub_server.new_repo_id("atomic")
    recipe = _recipe_with_tensors()
    recipe.push_to_hub(repo_id)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "pulled"
    out.mkdir()
    links = _plant(out, victim)
    Recipe.download(repo_id, out, cache_dir=tmp_path / "cache")
    assert victim.read_text() == "precious" and all(link.is_symlink() for link in links)
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == sorted([RECIPE_FILE, TENSOR_FILE])
    assert Recipe.from_pretrained(out).to_dict() == Recipe.from_pretrained(repo_id).to_dict()


# --------------------------------------------------------------------------------------------------
# hfpatch transplant


def _tokenizer(folder: Path, vocab_size: int, extra: str = "") -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 4, "def add(a, b): return a + b" + extra],
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return len(fast)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(model folder with its tokenizer, new tokenizer folder) for a fast transplant."""
    root = tmp_path_factory.mktemp("transplant")
    vocab = _tokenizer(root / "model", 280)
    config = tiny_config("llama")
    config.vocab_size = vocab
    tiny_model("llama", config=config).save_pretrained(root / "model")
    _tokenizer(root / "new_tok", 300, extra=" print(add(1, 2))")
    return root / "model", root / "new_tok"


def _args(inputs, out, *extra):
    return ["transplant", "--model", str(inputs[0]), "--tokenizer", str(inputs[1]), "--method", "mean",
            "--out", str(out), *extra]


def test_force_replaces_the_whole_output_folder(inputs, tmp_path):
    out = tmp_path / "out"
    assert main(_args(inputs, out)) == 0
    first = _tree(out)
    for stale in ("chat_template.jinja", "added_tokens.json", "model.safetensors.index.json"):
        (out / stale).write_text("{}")  # as an earlier output with another tokenizer or sharding would leave
    assert main(_args(inputs, out, "--force")) == 0
    assert _tree(out).keys() == first.keys()
    assert _leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["out"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(out))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the transplant starts loading the model."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the command line was checked")

    monkeypatch.setattr(transplant_cli, "load_local_model", load)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hfpatch: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_out_fails_in_one_line_before_any_work(inputs, tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    cases = {tmp_path / "file": "exists and is not a folder", tmp_path / "file" / "out": "is not a folder",
             full: "pass --force"}
    if sys.platform.startswith("linux") and Path("/sys/kernel").is_dir():
        cases[Path("/sys/hfpatch-out")] = "cannot write in /sys"  # sysfs refuses mkdir, even to root
    for out, words in cases.items():
        assert main(_args(inputs, out)) == 2, out
        assert words in _one_line_error(capsys), out
    assert _tree(full) == {"keep": hashlib.sha256(b"x").hexdigest()} and _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_fails_before_any_work(inputs, tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(_args(inputs, locked / "out")) == 2
        assert "cannot write in" in _one_line_error(capsys)
    finally:
        locked.chmod(0o700)


def test_missing_local_tokenizer_says_no_such_folder(inputs, tmp_path, capsys, no_work):
    for option, value in (("--tokenizer", "/nonexistent"), ("--tokenizer", "./no/such/tok"), ("--donor", "../gone")):
        args = _args(inputs, tmp_path / "out")
        if option == "--donor":
            args += ["--donor", value]
        else:
            args[args.index("--tokenizer") + 1] = value
        assert main(args) == 2
        err = _one_line_error(capsys)
        assert f"{option} {value}: no such folder" in err and "Repo id" not in err
    assert os.listdir(tmp_path) == []


def test_unwritable_out_subprocess_exits_2_fast_without_traceback(inputs, tmp_path):
    (tmp_path / "file").write_text("x")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "hfpatch", *_args(inputs, tmp_path / "file" / "out")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "is not a folder" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 60  # exits at once instead of after the transplant (imports dominate)


@pytest.mark.parametrize("signum,old_output", [(signal.SIGINT, True), (signal.SIGTERM, False),
                                               (signal.SIGTERM, True)])
def test_interrupted_transplant_leaves_out_as_it_was(inputs, tmp_path, signum, old_output):
    out = tmp_path / "out"
    if old_output:
        assert main(_args(inputs, out)) == 0
    before = _tree(out) if old_output else None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "hfpatch", *_args(inputs, out, "--force")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(f".out.{files.TEMP_TAG}") for p in tmp_path.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the temporary folder never appeared"
            time.sleep(0.005)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if signum == signal.SIGINT else 128 + signum), err
    assert "Traceback" not in err
    assert err.strip() == ("hfpatch: interrupted" if signum == signal.SIGINT else "hfpatch: terminated"), err
    if old_output:
        assert _tree(out) == before
    else:
        assert not out.exists()
    assert _leftovers(tmp_path) == [] and os.listdir(tmp_path) == (["out"] if old_output else [])


def test_interrupt_between_weights_and_tokenizer_keeps_the_old_output(inputs, tmp_path, monkeypatch, capsys):
    """The case the issue names: config and weights written, the tokenizer not yet."""
    out = tmp_path / "out"
    assert main(_args(inputs, out)) == 0
    before = _tree(out)

    def interrupted(self, *args, **kwargs):
        assert any(p.name == "model.safetensors" for p in Path(args[0]).iterdir())  # the weights are written
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    assert main(_args(inputs, out, "--force", "--length-bias", "-3")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _tree(out) == before and os.listdir(tmp_path) == ["out"]
