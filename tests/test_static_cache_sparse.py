"""Sparse decode attention under transformers' static cache (issue 16, CPU part): a static-cache decode step is
served sparse over the written prefix of the preallocated cache and gives the dynamic cache's greedy output."""
from __future__ import annotations

import types

import pytest
import torch
import transformers
from tiny_models import tiny_config, tiny_model

import hfpatch
from hfpatch.techniques.attention import base
from hfpatch.techniques.attention.base import COMPILED_REASON, written_prefix

#: recipe -> (technique name, overrides); tidal gets explicit selection layers (no probe in a unit test)
RECIPES = {
    "recycled-attention": ("recycled_attention", {}),
    "recycled-attention-paper": ("recycled_attention", {"stride": 4}),
    "tidal-decode": ("tidal_decode", {"selection_layers": [2, 4], "sink": 2, "window": 4}),
    "sink-window": ("sink_window", {}),
    "quest": ("quest", {}),
}


def model_of(kind="llama", layers=6, seed=0):
    """A tiny fp32 model deep enough for TidalDecode; keeps the config's layer kinds (the static cache reads them)."""
    data = tiny_config(kind).to_dict()
    data["num_hidden_layers"] = layers
    if data.get("layer_types"):  # the tiny config's pattern, repeated (Gemma 3: sliding, full, ...)
        data["layer_types"] = [data["layer_types"][i % len(data["layer_types"])] for i in range(layers)]
    return tiny_model(kind, seed=seed, config=type(tiny_config(kind))(**data))


def prompt(n=2, length=48, pad=(0, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pad[:n]):
        ids[row, :p], mask[row, :p] = 0, 0
    return ids, mask


def run(model, ids, mask, new=10, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("rows", [1, 2])
def test_static_cache_is_served_sparse_and_matches_the_dynamic_cache(recipe, rows):
    model = model_of()
    ids, mask = prompt(n=rows)
    name, extra = RECIPES[recipe]
    with hfpatch.patch(model, recipe, budget=12, **{"sink": 2, "window": 4, **extra}) as handle:
        dyn_seq, dyn_logits = run(model, ids, mask)
        dynamic = handle.stats[name]
        static_seq, static_logits = run(model, ids, mask, cache_implementation="static")
        static = handle.stats[name]
    assert torch.equal(static_seq, dyn_seq)  # token-identical greedy output
    torch.testing.assert_close(static_logits, dyn_logits, atol=1e-5, rtol=1e-5)
    assert static["sparse_fraction"] > 0 and static["fallback_reason"] is None
    for key in ("decode_steps", "sparse_layer_steps", "full_layer_steps", "sparse_fraction",
                "attended_fraction_sparse_steps"):
        assert static[key] == dynamic[key], key
    # the prefill of a static cache is a prefill (it used to count as a multi-token step over a cache)
    assert static["multi_token_steps"] == 0 and "note" not in static


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "phi3", "gpt2"])
def test_static_cache_matches_the_dynamic_cache_on_other_architectures(kind):
    model = model_of(kind)
    ids, mask = prompt()
    with hfpatch.patch(model, "recycled-attention-paper", budget=12, sink=2, window=4, stride=4) as handle:
        dyn_seq, dyn_logits = run(model, ids, mask)
        static_seq, static_logits = run(model, ids, mask, cache_implementation="static")
        stats = handle.stats["recycled_attention"]
    assert torch.equal(static_seq, dyn_seq) and stats["sparse_fraction"] > 0
    torch.testing.assert_close(static_logits, dyn_logits, atol=1e-5, rtol=1e-5)


def test_a_sparse_step_changes_the_static_output_like_the_dynamic_one():
    """The served static path is really sparse: its logits differ from dense static decoding."""
    model = model_of()
    ids, mask = prompt()
    _, dense = run(model, ids, mask, cache_implementation="static")
    with hfpatch.patch(model, "recycled-attention-paper", budget=12, sink=2, window=4, stride=4):
        _, sparse = run(model, ids, mask, cache_implementation="static")
    assert not torch.allclose(sparse[:, 1:], dense[:, 1:], atol=1e-4)


def test_budget_covering_the_context_equals_dense_static_decoding():
    model = model_of()
    ids, mask = prompt()
    ref_seq, ref_logits = run(model, ids, mask, cache_implementation="static")
    for recipe, (name, extra) in RECIPES.items():
        with hfpatch.patch(model, recipe, budget=ids.shape[1] + 16, **extra) as handle:
            seq, logits = run(model, ids, mask, cache_implementation="static")
            stats = handle.stats[name]
        assert torch.equal(seq, ref_seq), recipe
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        assert stats["decode_steps"] == 9 and stats["sparse_layer_steps"] == 0, recipe


def test_a_callers_static_cache_is_used_in_place():
    """A StaticCache passed by the caller: served sparse, its buffers neither copied nor reallocated."""
    model = model_of()
    ids, mask = prompt()
    with hfpatch.patch(model, "recycled-attention", budget=12, sink=2, window=4) as handle:
        ref_seq, _ = run(model, ids, mask)
        cache = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1] + 32)
        seq, _ = run(model, ids, mask, cache=cache)
        pointers = [layer.keys.data_ptr() for layer in cache.layers]
        assert "passed a cache" in handle.stats["recycled_attention"]["kv_cache"]
        assert handle.stats["recycled_attention"]["sparse_fraction"] > 0
        # the same cache again after reset(): the same buffers, the same answer
        cache.reset()
        again, _ = run(model, ids, mask, cache=cache)
        assert [layer.keys.data_ptr() for layer in cache.layers] == pointers
        assert handle.stats["recycled_attention"]["sparse_fraction"] > 0
    assert torch.equal(seq, ref_seq) and torch.equal(again, ref_seq)
    assert int(cache.layers[0].cumulative_length) == ids.shape[1] + 9


def test_forward_calls_on_a_static_cache_match_the_dynamic_cache():
    """A decode loop of plain forward calls (no generate, no attention mask given): same logits on both caches."""
    model = model_of()
    ids = prompt(n=1)[0]

    def decode(cache):
        with torch.no_grad():
            out = model(ids, cache=cache)
            steps = []
            for _ in range(6):
                out = model(out.logits[:, -1:].argmax(-1), cache=cache)
                steps.append(out.logits[:, -1])
        return torch.stack(steps)

    with hfpatch.patch(model, "recycled-attention-paper", budget=12, sink=2, window=4, stride=4) as handle:
        static = decode(transformers.StaticCache(config=model.config, max_cache_len=80))
        assert handle.stats["recycled_attention"]["sparse_fraction"] > 0
        dynamic = decode(transformers.DynamicCache(config=model.config))
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)


def test_sliding_window_layers_stay_dense_under_a_static_cache():
    """Gemma 3 style: the static cache's sliding layers are ring buffers; only full layers run sparse."""
    model = model_of("gemma3_text", layers=4)
    ids, mask = prompt(length=40)
    with hfpatch.patch(model, "recycled-attention-paper", budget=12, sink=2, window=4, stride=4) as handle:
        dyn_seq, _ = run(model, ids, mask)
        static_seq, _ = run(model, ids, mask, cache_implementation="static")
        stats = handle.stats["recycled_attention"]
    assert torch.equal(static_seq, dyn_seq)
    assert stats["sparse_layer_steps"] > 0 and stats["decode_steps"] == 9
    assert stats["sparse_layer_steps"] + stats["full_layer_steps"] == 9 * 2  # the two full-attention layers


def test_unpatch_restores_static_decoding_and_a_second_instance_is_untouched():
    model, twin = model_of(), model_of()
    ids, mask = prompt()
    ref_seq, ref_logits = run(model, ids, mask, cache_implementation="static")
    hooks = dict(model.model._forward_pre_hooks)
    handle = hfpatch.patch(model, "recycled-attention", budget=12, sink=2, window=4)
    assert len(model.model._forward_pre_hooks) == len(hooks) + 1  # the cache-type pre-hook
    twin_seq, twin_logits = run(twin, ids, mask, cache_implementation="static")
    run(model, ids, mask, cache_implementation="static")
    assert handle.stats["recycled_attention"]["sparse_fraction"] > 0
    handle.unpatch()
    seq, logits = run(model, ids, mask, cache_implementation="static")
    assert torch.equal(twin_seq, ref_seq) and torch.equal(seq, ref_seq)
    torch.testing.assert_close(twin_logits, ref_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
    assert model.config._attn_implementation == twin.config._attn_implementation == "sdpa"
    assert handle.techniques[0]._prefix_seen is None  # no reference to a mask is kept after unpatch
    assert dict(model.model._forward_pre_hooks) == hooks and not twin.model._forward_pre_hooks


def test_a_compiled_forward_falls_back_to_dense_and_says_why(monkeypatch):
    """Traced by torch.compile (what generate does with a static cache on CUDA) the selection cannot run: the
    step is dense attention and stats carry the reason. Real dynamo (backend="eager") was checked by hand: 14 s
    on the shared machine, too slow for the suite; here the decode steps see the same answer dynamo gives."""
    model = model_of()
    ids, mask = prompt(n=1)
    _, dense = run(model, ids, mask, new=4, cache_implementation="static")
    traced = []

    def after_each_forward(input_ids, scores):  # the prefill runs eagerly, the decode steps "compiled"
        traced.append(True)
        return scores

    monkeypatch.setattr(base, "_compiling", lambda: bool(traced))
    with hfpatch.patch(model, "recycled-attention-paper", budget=12, sink=2, window=4, stride=4) as handle:
        _, logits = run(model, ids, mask, new=4, cache_implementation="static",
                        logits_processor=transformers.LogitsProcessorList([after_each_forward]))
        stats = handle.stats["recycled_attention"]
    assert stats["fallback_reason"] == COMPILED_REASON and "disable_compile=True" in COMPILED_REASON
    assert stats["sparse_layer_steps"] == 0 and stats["sparse_fraction"] == 0.0
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=1e-5)


def test_generate_turns_off_transformers_auto_compile_of_static_decoding_on_an_accelerator():
    cuda = types.SimpleNamespace(device=torch.device("cuda"), generation_config=transformers.GenerationConfig())
    cpu = types.SimpleNamespace(device=torch.device("cpu"), generation_config=transformers.GenerationConfig())
    assert base._auto_compile_off(cuda, {"cache_implementation": "static"})
    assert base._auto_compile_off(cuda, {"cache": types.SimpleNamespace(is_compileable=True)})
    assert not base._auto_compile_off(cuda, {"cache": types.SimpleNamespace(is_compileable=False)})
    assert not base._auto_compile_off(cuda, {})  # dynamic cache: transformers does not compile
    assert not base._auto_compile_off(cpu, {"cache_implementation": "static"})  # nor on CPU
    # a caller who asks for compilation keeps it (and the compiled steps report the dense fallback)
    assert not base._auto_compile_off(cuda, {"cache_implementation": "static",
                                             "compile_config": transformers.CompileConfig()})
    assert not base._auto_compile_off(cuda, {"cache_implementation": "static", "disable_compile": False})


def test_generate_passes_disable_compile_and_says_so(monkeypatch):
    """Where transformers would compile (an accelerator; faked here), the patched generate passes
    disable_compile=True, decodes sparse, and stats say auto-compile was turned off."""
    model = model_of()
    ids, mask = prompt(n=1)
    seen = []
    monkeypatch.setattr(base, "_auto_compile_off", lambda model, kwargs: seen.append(kwargs) or True)
    with hfpatch.patch(model, "recycled-attention", budget=12, sink=2, window=4) as handle:
        run(model, ids, mask, new=4, cache_implementation="static")
        stats = handle.stats["recycled_attention"]
    assert seen and stats["auto_compile"].startswith("off") and stats["sparse_fraction"] > 0
    assert stats["fallback_reason"] is None


def test_the_mask_is_read_once_per_forward_and_not_for_dynamic_multi_token_calls(monkeypatch):
    """Host reads: one per forward that needs one (shared by the layers), none for a dynamic-cache prefill."""
    model = model_of()
    ids, mask = prompt()  # padded: every forward gets a 4-D mask
    reads = []
    real = base.written_prefix

    def counted(attention_mask, batch, query_length, length):
        if attention_mask is not None:
            reads.append(query_length)
        return real(attention_mask, batch, query_length, length)

    monkeypatch.setattr(base, "written_prefix", counted)
    with hfpatch.patch(model, "recycled-attention", budget=12, sink=2, window=4):
        run(model, ids, mask, new=5)
        assert reads == [1] * 4  # four decode forwards of six layers each; the dynamic prefill reads nothing
        reads.clear()
        run(model, ids, mask, new=5, cache_implementation="static")
        assert reads == [ids.shape[1]] + [1] * 4  # the static prefill needs its prefix too


def test_written_prefix_reads_the_mask():
    causal = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    assert written_prefix(causal, 2, 1, 10) == (10, None)  # dynamic cache: everything is written
    static = causal.clone()
    static[..., 7:] = False  # unwritten tail of a static cache
    assert written_prefix(static, 2, 1, 10) == (7, None)
    padded = static.clone()
    padded[1, ..., :3] = False  # left padding of row 1
    n, valid = written_prefix(padded, 2, 1, 10)
    assert n == 7 and valid.tolist() == [[True] * 7, [False] * 3 + [True] * 4]
    additive = torch.zeros(1, 1, 1, 10).masked_fill(~static[:1], torch.finfo(torch.float32).min)
    assert written_prefix(additive, 1, 1, 10) == (7, None)
    # a prefill without a mask is sdpa's top-left causal attention: it never reads past the query length
    assert written_prefix(None, 1, 6, 10) == (6, None) and written_prefix(None, 1, 1, 10) == (10, None)
    # a multi-token step (tree verification): the prefix reaches the last position any query may read
    tree = torch.zeros(1, 1, 3, 10, dtype=torch.bool)
    tree[..., :5] = True
    tree[0, 0, 0, 5] = tree[0, 0, 1, 6] = True  # two siblings, the last query sees only its own node
    assert written_prefix(tree, 1, 3, 10)[0] == 7
