"""hfpatch.apps.bench (speculative, common) / hfpatch.apps.demo and the `bench` / `demo` commands, on a tiny
random Llama with a character-level tokenizer built here (no real model, no network). Timings are not checked:
only that every number is there."""
from __future__ import annotations

import io
import json

import pytest
import torch
from tiny_models import tiny_model

from hfpatch.apps.bench import common, speculative
from hfpatch.apps.cli import main
from hfpatch.errors import HfpatchError

CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))


def char_tokenizer(chat_template: bool = True):
    """One token per character (ids 4..100) plus <pad>=0, <s>=1, </s>=2, <unk>=3, matching tiny_models' config."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat_template:
        tok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                             "{% if add_generation_prompt %}<s>{% endif %}")
    return tok


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), char_tokenizer()


SHORT = dict(passage_chars=160, code_chars=160)


def test_default_prompts_deterministic_with_every_category():
    first, again = speculative.default_prompts(2, **SHORT), speculative.default_prompts(2, **SHORT)
    assert first == again
    assert [p.category for p in first] == list(speculative.CATEGORIES) * 2
    assert all(p.chat != (p.category == "code") for p in first)
    texts = [p.text for p in first]
    assert len(set(texts)) == len(texts)
    assert speculative.warmup_prompt(160).text not in texts
    assert speculative.warmup_prompt().text not in [p.text for p in speculative.default_prompts(3)]
    qa = next(p for p in first if p.category == "qa")
    assert "Passage:" in qa.text and "Question:" in qa.text
    code = next(p for p in first if p.category == "code")
    assert code.text.endswith("\n") and len(code.text) <= 161
    with pytest.raises(ValueError, match="per_category"):
        speculative.default_prompts(0)


def test_load_prompts_jsonl_and_plain_text(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"category": "code", "prompt": "def f():"}\n\n{"prompt": "Hi", "chat": false}\n')
    assert speculative.load_prompts(jsonl) == [
        speculative.BenchPrompt("code", "def f():", chat=False, source="p.jsonl:1"),
        speculative.BenchPrompt("custom", "Hi", chat=False, source="p.jsonl:3")]
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\nsecond prompt\n")
    assert [(p.category, p.text, p.chat) for p in speculative.load_prompts(plain)] == [
        ("custom", "first prompt", True), ("custom", "second prompt", True)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x"}\n')
    with pytest.raises(HfpatchError, match="bad.jsonl:1"):
        speculative.load_prompts(bad)


def test_encode_prompt_uses_chat_template_except_raw_prompts():
    tok = char_tokenizer()
    chat = common.encode_prompt(tok, "ab", chat=True)["input_ids"][0].tolist()
    raw = common.encode_prompt(tok, "ab", chat=False)["input_ids"][0].tolist()
    assert chat == [1, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), 2, 1]
    assert raw == chat[1:3]
    # without a chat template the raw text is used
    assert common.encode_prompt(char_tokenizer(chat_template=False), "ab", chat=True)["input_ids"][0].tolist() == raw


def test_format_table_aligns_columns():
    rows = [["vanilla", "all", "1.00x"], None, ["ngram-lookup", "code", "12.50x"]]
    assert common.format_table(["method", "group", "speed-up"], rows, right_from=2).splitlines() == [
        "method        group  speed-up",
        "------------  -----  --------",
        "vanilla       all       1.00x",
        "",
        "ngram-lookup  code     12.50x",
    ]
    # left-aligned by default; the last column adds no trailing blanks
    assert common.format_table(["A", "B"], [["long cell", "x"], ["y", ""]]).splitlines() == [
        "A          B", "---------  -", "long cell  x", "y"]


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with common.torch_threads(1) as inside:
        assert inside == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), common.torch_threads(1):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before
    with common.torch_threads(None) as inside:  # None leaves the count alone
        assert inside == before
    assert common.usable_cores() >= 1
    assert "torch threads" in common.machine_line(common.describe_machine("cpu"))


def test_forward_counter_on_a_known_case():
    """A model whose greedy output is always token 0 (zeroed final norm), on a prompt ending in zeros: prompt
    lookup drafts 10 zeros that are all accepted, so every target forward yields 11 tokens; plain decoding
    needs one forward per token."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()
    inputs = {"input_ids": torch.tensor([[5, 6] + [0] * 30])}
    counter = speculative._ForwardCounter(model)
    try:
        for new_tokens, expected in ((30, 3), (22, 2), (11, 1), (1, 1)):
            counter.count = 0
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, prompt_lookup_num_tokens=10)
            assert out.shape[1] - 32 == new_tokens and counter.count == expected
            counter.count = 0
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            assert counter.count == new_tokens
    finally:
        counter.remove()
    assert not model._forward_hooks


def test_short_bench_run(tiny, tmp_path):
    model, tok = tiny
    prompts = speculative.default_prompts(1, **SHORT)[1:3]  # summarize (chat template) and code (raw)
    lines = []
    threads = torch.get_num_threads()
    result = speculative.run_bench(model, tok, prompts=prompts, max_new_tokens=8, threads=1,
                                   warmup=speculative.warmup_prompt(160), model_name="tiny-llama",
                                   progress=lines.append)
    assert torch.get_num_threads() == threads  # restored after the run
    labels = ["vanilla", "hf-prompt-lookup", *speculative.DEFAULT_RECIPES]
    assert result["config"]["methods"] == labels
    assert len(lines) == 3 and lines[0].startswith("warm-up")
    assert len(result["runs"]) == 2 * len(labels)
    # method order rotates from prompt to prompt
    assert [r["order"] for r in result["runs"] if r["prompt"] == 0] == list(range(len(labels)))
    assert [r["order"] for r in result["runs"] if r["prompt"] == 1] == [4, 0, 1, 2, 3]
    for run in result["runs"]:
        assert run["identical"] and run["fallback"] is None and run["first_mismatch"] is None
        assert run["new_tokens"] >= 1 and run["seconds"] > 0 and run["mat"] >= 1.0
        if run["method"] == "vanilla":
            assert run["mat"] == 1.0 and run["forwards"] == run["new_tokens"]
        if run["method"] in speculative.DEFAULT_RECIPES:  # the engine's own count agrees with the hook's
            assert run["forwards"] == run["forwards_counted"]
    summary = result["summary"]
    assert summary["categories"] == ["summarize", "code"]
    for label in labels:
        for group in ("all", "summarize", "code"):
            row = summary["methods"][label][group]
            assert {"speedup", "mat", "tokens_per_s", "identical", "prompts", "fallbacks"} <= set(row)
            assert row["mat"] >= 1.0 and row["identical"] == row["prompts"]
    assert summary["methods"]["vanilla"]["all"]["speedup"] == pytest.approx(1.0)
    fused = summary["fused"]
    assert fused["recipe"] == "recycling+lookup" and fused["mat_vs_prompt_lookup"] > 0
    machine = result["machine"]
    assert {"cpu", "cores", "torch_threads", "torch", "transformers"} <= set(machine)
    assert machine["torch_threads"] == 1
    report = speculative.format_report(result)
    assert "fused recipe 'recycling+lookup': MAT vs PLD" in report and "tiny-llama" in report
    assert "target >=" not in report and "targets" not in summary["fused"]  # targets live in benchmarks/README.md
    for label in labels:
        assert label in report
    written = speculative.save_report(result, tmp_path / "out", chart=False)
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["summary"]["fused"]["recipe"] == "recycling+lookup" and len(written) == 2
    assert not model._forward_hooks and "generate" not in vars(model)  # the user's model stays unpatched


def test_kernel_recipe_is_also_compared_with_its_kernels_alone(tiny):
    """recycling+lookup-cpu = onednn_linear + speculation: the bench pairs it with the measured onednn-linear
    recipe, so the speculation's own speed-up and identity are reported apart from the kernels'."""
    assert speculative.kernel_baselines({
        "k": {"techniques": ["onednn_linear"], "compute_techniques": ["onednn_linear"]},
        "k+spec": {"techniques": ["onednn_linear", "ngram_lookup"], "compute_techniques": ["onednn_linear"]},
        "spec": {"techniques": ["ngram_lookup"], "compute_techniques": []},
    }) == {"k+spec": "k"}
    model, tok = tiny
    result = speculative.run_bench(model, tok, recipes=["onednn-linear", "recycling+lookup-cpu"], max_new_tokens=6,
                                   prompts=[speculative.BenchPrompt("custom", "abcabcabc")], threads=1,
                                   warmup=speculative.BenchPrompt("w", "xyz"))
    run = next(r for r in result["runs"] if r["method"] == "recycling+lookup-cpu")
    assert run["baseline"] == "onednn-linear" and run["identical_to_baseline"]
    assert run["mean_tree_nodes"] >= 0  # the engine's statistics, not the kernel technique's
    row = result["summary"]["methods"]["recycling+lookup-cpu"]["all"]
    base = next(r for r in result["runs"] if r["method"] == "onednn-linear")
    assert row["speedup_vs_baseline"] == pytest.approx(base["seconds"] / run["seconds"])
    assert "baseline" not in result["summary"]["methods"]["onednn-linear"]["all"]
    report = speculative.format_report(result)
    assert "recycling+lookup-cpu over its kernels alone (onednn-linear): speed-up" in report


def test_plot_report(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    model, tok = tiny
    result = speculative.run_bench(model, tok, recipes=["ngram-lookup"],
                                   prompts=[speculative.BenchPrompt("custom", "abcabc")], max_new_tokens=4, threads=1,
                                   warmup=speculative.BenchPrompt("w", "xyz"))
    png = speculative.plot_report(result, tmp_path / "chart.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_refuses_warmup_inside_the_measured_set(tiny):
    model, tok = tiny
    prompt = speculative.BenchPrompt("custom", "abc")
    with pytest.raises(ValueError, match="warm-up"):
        speculative.run_bench(model, tok, prompts=[prompt], warmup=prompt, max_new_tokens=2)


def test_bench_and_demo_commands(tiny, tmp_path, capsys):
    model, tok = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello hello hello\nabc abc abc abc\n")
    code = main(["bench", "--model", str(folder), "--recipe", "ngram-lookup", "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--threads", "1", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "ngram-lookup" in captured.out and "[2/2] custom" in captured.err
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["config"]["methods"] == ["vanilla", "hf-prompt-lookup", "ngram-lookup"]
    assert main(["bench", "--prompts", str(prompts), "--per-category", "2"]) == 2
    assert "--per-category" in capsys.readouterr().err
    assert main(["bench", "--max-new-tokens", "0"]) == 2
    assert main(["demo", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "recycling+lookup" in help_text and "--recipe" in help_text


def test_run_demo_on_a_given_model(tiny):
    from hfpatch.apps.demo import run_demo

    model, tok = tiny
    out = io.StringIO()
    result = run_demo(model=model, tokenizer=tok, max_new_tokens=6, categories=("summarize", "code"),
                      passage_chars=160, threads=1, out=out)
    text = out.getvalue()
    assert result["summary"]["identical"] == 2 and result["summary"]["mat"] >= 1.0
    assert "[2/2] continue a Python file: " in text and "identical to plain generate: yes" in text
    assert "overall: 2/2 outputs token-identical" in text
    assert "hfpatch demo --recipe recycling+lookup-cpu" in text  # the CPU hint after the default recipe
    out = io.StringIO()
    result = run_demo(model=model, tokenizer=tok, recipe="recycling+lookup-cpu", max_new_tokens=4,
                      categories=("code",), passage_chars=160, threads=1, out=out)
    assert result["summary"]["recipe"] == "recycling+lookup-cpu" and result["summary"]["prompts"] == 1
    assert "hfpatch demo --recipe" not in out.getvalue()
