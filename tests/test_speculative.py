"""Lossless speculative generate: token identity, sampling distribution, fallbacks, tables, KV compaction."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import TEXT_KINDS, tiny_config, tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hfpatch
from hfpatch import compat
from hfpatch.errors import PatchError, RecipeError, UnsupportedModelError
from hfpatch.techniques.generation.tree import DraftTree

RECIPES = ("token-recycling", "ngram-lookup", "recycling+lookup")
# recycling+lookup sizes its trees from measured step times; tests that count forwards fix the cost model so
# that what they count does not depend on the machine's load.
DETERMINISTIC = {"recycling+lookup": {"node_cost": 0.03}}


def _prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Random prompts with internal repetition (so n-gram lookup has something to find), various lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        part = torch.randint(3, 120, (1, 3 + (i * 5) % 17), generator=g)
        prompts.append(torch.cat([part, part, part[:, : 1 + i % 3]], dim=1))
    return prompts


def _stats(handle) -> dict:
    """Engine statistics of the last call (every drafter of a recipe reports the same shared engine)."""
    return next(iter(handle.stats.values()))


@pytest.mark.parametrize("kind", TEXT_KINDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_greedy_token_identical_on_every_decoder_family(kind, recipe):
    config = tiny_config(kind)
    if kind == "gemma3_text":
        config.sliding_window = 256  # sequences + trees stay inside the window: served, not a fallback
    model = tiny_model(kind, config=config)
    prompts = _prompts(4, seed=len(kind))
    lengths = [1, 2, 17, 33]
    expected = [model.generate(p, max_new_tokens=n, do_sample=False) for p, n in zip(prompts, lengths)]
    with hfpatch.patch(model, recipe, **DETERMINISTIC.get(recipe, {})) as handle:
        for p, n, ref in zip(prompts, lengths, expected):
            out = model.generate(p, max_new_tokens=n, do_sample=False)
            assert torch.equal(out, ref), (kind, recipe, n)
            stats = _stats(handle)
            assert stats["fallback"] is None
            assert stats["new_tokens"] == n
        assert stats["forwards"] < n, "drafts were never accepted: the test would not exercise the tree path"
    assert "generate" not in model.__dict__


def test_prompts_shorter_than_the_ngram_size():
    model = tiny_model("llama")
    for length in (1, 2, 3):
        prompt = torch.tensor([[5, 9, 11][:length]])
        ref = model.generate(prompt, max_new_tokens=12, do_sample=False)
        with hfpatch.patch(model, "recycling+lookup", max_ngram=4):
            assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), ref)


def test_eos_inside_an_accepted_run_cuts_where_vanilla_does():
    model = tiny_model("qwen2")
    prompt = _prompts(1, seed=3)[0]
    free_run = model.generate(prompt, max_new_tokens=40, do_sample=False)[0, prompt.shape[1]:].tolist()
    with hfpatch.patch(model, "recycling+lookup", node_cost=0.03) as handle:
        model.generate(prompt, max_new_tokens=40, do_sample=False)  # warms the table on this very text
        # The latest-first-produced token: the warm drafters predict the run up to it within one tree.
        eos = max(set(free_run), key=free_run.index)
        cut = free_run.index(eos) + 1
        ref = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
        out = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
        stats = _stats(handle)
    assert cut >= 3 and ref.shape[1] == prompt.shape[1] + cut and ref[0, -1].item() == eos
    assert torch.equal(out, ref)
    assert stats["forwards"] < stats["new_tokens"], "the EOS was not inside an accepted run"


def test_max_length_inside_an_accepted_run():
    model = tiny_model("llama")
    prompt = _prompts(1, seed=5)[0]
    expected = {n: model.generate(prompt, max_new_tokens=n, do_sample=False) for n in (3, 5, 7, 11, 13)}
    with hfpatch.patch(model, "ngram-lookup", draft_length=10, branches=4, max_nodes=24) as handle:
        model.generate(prompt, max_new_tokens=20, do_sample=False)  # the memory now predicts the whole run
        for n, ref in expected.items():
            out = model.generate(prompt, max_new_tokens=n, do_sample=False)
            assert torch.equal(out, ref)
            # prefill gives 1 token, then each verify forward up to draft_length (10) + 1 bonus token
            assert _stats(handle)["new_tokens"] == n and _stats(handle)["forwards"] <= 1 + -(-(n - 1) // 11)


def test_logits_processors_and_return_dict_match_vanilla():
    model = tiny_model("llama")
    prompt = _prompts(1, seed=7)[0]
    kwargs = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = model.generate(prompt, **kwargs)
    with hfpatch.patch(model, "recycling+lookup") as handle:
        out = model.generate(prompt, **kwargs)
        assert _stats(handle)["fallback"] is None
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == 20
    for a, b in zip(out.scores, ref.scores):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compacted_cache_equals_sequential_cache():
    model = tiny_model("qwen3")
    prompt = _prompts(1, seed=11)[0]
    ref = model.generate(prompt, max_new_tokens=25, do_sample=False, return_dict_in_generate=True)
    with hfpatch.patch(model, "recycling+lookup") as handle:
        model.generate(prompt, max_new_tokens=25, do_sample=False)  # warm the drafters
        out = model.generate(prompt, max_new_tokens=25, do_sample=False, return_dict_in_generate=True)
        assert _stats(handle)["mean_accepted_tokens_per_forward"] > 1.5
    assert torch.equal(out.sequences, ref.sequences)
    out_cache, ref_cache = compat.output_cache(out), compat.output_cache(ref)
    assert out_cache.get_seq_length() == ref_cache.get_seq_length() == out.sequences.shape[1] - 1
    for mine, theirs in zip(out_cache.layers, ref_cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)


def test_streamer_sees_the_same_tokens():
    from test_generate_options import Recorder

    model = tiny_model("llama")
    prompt = _prompts(1, seed=2)[0]

    vanilla, patched = Recorder(), Recorder()
    model.generate(prompt, max_new_tokens=15, do_sample=False, streamer=vanilla)
    with hfpatch.patch(model, "recycling+lookup"):
        model.generate(prompt, max_new_tokens=15, do_sample=False, streamer=patched)
    assert patched.chunks == vanilla.chunks


def _register_notree():
    AttentionInterface.register("hfpatch_test_notree", sdpa_attention_forward)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionMaskInterface.register("hfpatch_test_notree", sdpa_mask)


@pytest.mark.parametrize("case", ["beam", "batch", "backend", "sliding", "attentions", "padding"])
def test_unservable_requests_fall_back_and_say_why(case):
    kind = "gemma3_text" if case == "sliding" else "llama"
    model = tiny_model(kind)
    prompt = _prompts(1, seed=4)[0]
    kwargs = dict(max_new_tokens=8, do_sample=False)
    expected_reason = {"beam": "beam search", "batch": "batch size 2", "backend": "cannot take a tree mask",
                       "sliding": "does not fit the window (16)", "attentions": "output_attentions", "padding": "padded input"}[case]
    if case == "beam":
        kwargs["num_beams"] = 2
    elif case == "batch":
        prompt = torch.cat([prompt, prompt])
    elif case == "backend":
        _register_notree()
        model.set_attn_implementation("hfpatch_test_notree")
    elif case == "attentions":
        model.set_attn_implementation("eager")
        kwargs.update(return_dict_in_generate=True, output_attentions=True)
    elif case == "padding":
        kwargs["attention_mask"] = torch.cat([torch.zeros(1, 2, dtype=torch.long),
                                              torch.ones(1, prompt.shape[1] - 2, dtype=torch.long)], dim=1)
    ref = model.generate(prompt, **kwargs)
    # sliding: a 23-node tree cannot fit the 16-token window (prompts longer than the window are served:
    # tests/test_sliding_window_spec.py)
    overrides = {"template": "cpu-23"} if case == "sliding" else {}
    with hfpatch.patch(model, "token-recycling", **overrides) as handle:
        out = model.generate(prompt, **kwargs)
        assert expected_reason in _stats(handle)["fallback"]
    ref_ids = ref.sequences if hasattr(ref, "sequences") else ref
    out_ids = out.sequences if hasattr(out, "sequences") else out
    assert torch.equal(out_ids, ref_ids)


def test_vlm_is_refused():
    with pytest.raises(UnsupportedModelError, match="token_recycling supports model types"):
        hfpatch.patch(tiny_model("llava"), "token-recycling")


def test_second_instance_untouched_and_unpatch_restores_generate():
    a, b = tiny_model("llama"), tiny_model("llama")
    prompt = _prompts(1)[0]
    original = type(a).generate
    with hfpatch.patch(a, "token-recycling") as handle:
        assert "generate" in a.__dict__ and "generate" not in b.__dict__
        b.generate(prompt, max_new_tokens=5, do_sample=False)
        assert _stats(handle) == {}
    assert "generate" not in a.__dict__ and a.generate.__func__ is original


def test_table_is_hot_across_calls_and_resettable():
    model = tiny_model("llama")
    prompt = _prompts(1, seed=9)[0]
    with hfpatch.patch(model, "token-recycling") as handle:
        technique = handle.technique("token_recycling")
        model.generate(prompt, max_new_tokens=30, do_sample=False)
        cold = _stats(handle)["forwards"]
        model.generate(prompt, max_new_tokens=30, do_sample=False)
        hot = _stats(handle)["forwards"]
        assert hot < cold
        technique.reset()
        assert int((technique.drafter.table >= 0).sum()) == 0
        model.generate(prompt, max_new_tokens=30, do_sample=False)
        assert _stats(handle)["forwards"] == cold


def test_warm_table_round_trip_through_the_hub(hub_server):
    model = tiny_model("llama")
    prompt = _prompts(1, seed=13)[0]
    with hfpatch.patch(model, "token-recycling") as handle:
        model.generate(prompt, max_new_tokens=30, do_sample=False)
        recipe = handle.to_recipe(name="warm")
        table = handle.technique("token_recycling").drafter.table.clone()
    repo = hub_server.new_repo_id("warm-table")
    recipe.push_to_hub(repo)
    loaded = hfpatch.Recipe.from_pretrained(repo)
    assert loaded.tensor_metadata["token_recycling/vocab_size"] == "128"
    other = tiny_model("llama")
    with hfpatch.patch(other, loaded) as handle:
        assert torch.equal(handle.technique("token_recycling").drafter.table, table)
        out = other.generate(prompt, max_new_tokens=30, do_sample=False)
        hot_forwards = _stats(handle)["forwards"]
    assert torch.equal(out, model.generate(prompt, max_new_tokens=30, do_sample=False))
    assert hot_forwards < 30
    bigger = tiny_model("llama")
    bigger.resize_token_embeddings(130)
    with pytest.raises(PatchError, match=r"table has shape \(128, 8\).*\(130, 8\)"):
        hfpatch.patch(bigger, loaded)
    assert "generate" not in bigger.__dict__


def test_bad_template_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="no parent"):
        hfpatch.patch(model, "token-recycling", template=[[0, 1]])
    with pytest.raises(RecipeError, match="ranks in"):
        hfpatch.patch(model, "token-recycling", template=[[9]])
    with pytest.raises(RecipeError, match="is not one of"):
        hfpatch.patch(model, "token-recycling", template="huge")


def test_tree_mask_and_positions():
    tree = DraftTree(root_token=5, max_nodes=10)
    assert tree.add_path(0, [7, 9]) == 2
    assert tree.add_path(0, [7, 3]) == 2
    assert tree.add_path(0, [8]) == 1
    assert tree.tokens == [5, 7, 9, 3, 8] and tree.parents == [-1, 0, 1, 1, 0]
    mask = tree.attention_mask(past_length=2, dtype=torch.float32, device=torch.device("cpu"))
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 1, 0],
        [1, 1, 1, 0, 0, 0, 1],
    ]
    assert mask.min().item() == torch.finfo(torch.float32).min
    assert tree.position_ids(2, torch.device("cpu")).tolist() == [[2, 3, 4, 4, 3]]
    small = DraftTree(root_token=1, max_nodes=2, max_depth=1)
    assert small.add_path(0, [4, 5]) == 1 and small.add_path(0, [6]) == 1 and small.add_path(0, [7]) == 0


def _chi_square_p_value(counts_a: dict, counts_b: dict) -> float:
    """Two-sample chi-square test of homogeneity; categories with few observations are pooled."""
    keys = sorted(set(counts_a) | set(counts_b), key=lambda k: -(counts_a.get(k, 0) + counts_b.get(k, 0)))
    table, pooled = [], [0, 0]
    for key in keys:
        a, b = counts_a.get(key, 0), counts_b.get(key, 0)
        if a + b >= 10:
            table.append((a, b))
        else:
            pooled[0] += a
            pooled[1] += b
    if sum(pooled):
        table.append(tuple(pooled))
    n_a, n_b = sum(r[0] for r in table), sum(r[1] for r in table)
    stat = 0.0
    for a, b in table:
        total = a + b
        for observed, n in ((a, n_a), (b, n_b)):
            expected = total * n / (n_a + n_b)
            stat += (observed - expected) ** 2 / expected
    dof = len(table) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def _sample_counts(model, prompt: torch.Tensor, seed0: int, runs: int, **kwargs) -> dict:
    """How often each sequence of new tokens comes out of `runs` sampled generate calls, the i-th seeded with
    seed0 + i (the same seeds give plain decoding and a patched model the same random streams)."""
    counts: dict = {}
    new = kwargs["max_new_tokens"]
    for i in range(runs):
        torch.manual_seed(seed0 + i)
        seq = tuple(model.generate(prompt, **kwargs)[0, -new:].tolist())
        counts[seq] = counts.get(seq, 0) + 1
    return counts


def test_sampling_distribution_matches_vanilla():
    model = tiny_model("llama", seed=3)
    prompt = torch.tensor([[5, 17, 33, 5, 17]])
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=0.7, top_k=4)
    runs = 400

    def sample_counts(seed0: int) -> dict:
        return _sample_counts(model, prompt, seed0, runs, **kwargs)

    vanilla = sample_counts(0)
    # The wider 40-node tree gives sampled paths more drafted children to descend into.
    with hfpatch.patch(model, "token-recycling", template="cpu-40") as handle:
        patched = sample_counts(10_000)
        assert _stats(handle)["fallback"] is None
        table = handle.technique("token_recycling").drafter.table
        assert int((table >= 0).all(dim=1).sum()) > 0
    accepted_check = None
    with hfpatch.patch(model, "token-recycling", template="cpu-40") as handle:
        total_forwards = total_tokens = 0
        for i in range(50):
            torch.manual_seed(i)
            model.generate(prompt, **kwargs)
            total_forwards += _stats(handle)["forwards"]
            total_tokens += _stats(handle)["new_tokens"]
        accepted_check = total_tokens / total_forwards
    assert accepted_check > 1.2, "drafts were rarely accepted: the test would not exercise the tree path"
    p_value = _chi_square_p_value(vanilla, patched)
    assert p_value > 1e-3, (p_value, vanilla, patched)
    # The same test detects a real difference: vanilla restricted to the top 2 tokens is rejected.
    shifted: dict = {}
    for i in range(runs):
        torch.manual_seed(20_000 + i)
        seq = tuple(model.generate(prompt, **dict(kwargs, top_k=2))[0, -3:].tolist())
        shifted[seq] = shifted.get(seq, 0) + 1
    assert _chi_square_p_value(vanilla, shifted) < 1e-3
    assert not math.isnan(p_value)


PROMPTS_REAL = [
    "Summarize: The quick brown fox jumps over the lazy dog. The dog sleeps while the fox runs away.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Rewrite this sentence in formal English: gonna grab some food, brb.",
    "List three colors of the rainbow.",
]


@pytest.mark.real_model
def test_real_smollm2_greedy_identical(smollm2):
    model, tok = smollm2
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS_REAL]
    encoded = [tok(text, return_tensors="pt") for text in chats[:3]] + [tok(PROMPTS_REAL[1], return_tensors="pt")]
    lengths = [40, 33, 1, 47]
    expected = [model.generate(**e, max_new_tokens=n, do_sample=False) for e, n in zip(encoded, lengths)]
    total_tokens = total_forwards = 0
    with hfpatch.patch(model, "recycling+lookup", node_cost=0.03) as handle:
        for e, n, ref in zip(encoded, lengths, expected):
            out = model.generate(**e, max_new_tokens=n, do_sample=False)
            assert torch.equal(out, ref), tok.decode(out[0])
            total_tokens += _stats(handle)["new_tokens"]
            total_forwards += _stats(handle)["forwards"]
    assert total_tokens / total_forwards > 1.2


def test_composes_with_a_sparse_attention_technique_in_one_recipe():
    """Tree verification runs through a sparse-attention function that honours the tree mask."""
    model = tiny_model("llama")
    prompt = _prompts(1, seed=21)[0]
    ref = model.generate(prompt, max_new_tokens=24, do_sample=False)
    recipe = {"hfpatch_version": "1.0", "name": "both", "techniques": [
        {"type": "sink_window", "budget": 4096}, {"type": "token_recycling"}]}
    with hfpatch.patch(model, recipe) as handle:
        model.generate(prompt, max_new_tokens=24, do_sample=False)
        out = model.generate(prompt, max_new_tokens=24, do_sample=False)
        engine_stats = handle.stats["token_recycling"]
        attention_stats = handle.stats["sink_window"]
    assert engine_stats["fallback"] is None and engine_stats["forwards"] < 24
    assert attention_stats["multi_token_steps"] > 0
    assert torch.equal(out, ref)  # budget >= context: the sparse technique is exact here
