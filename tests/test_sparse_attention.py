"""Sparse decode attention techniques (recycled_attention, tidal_decode, sink_window, quest): identity
checks, padding, selection against a plain reference, refusal, unpatch and instance isolation."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config, tiny_model

import hfpatch
from hfpatch.errors import UnsupportedModelError
from hfpatch.kernels import (
    forced_positions,
    group_attention_scores,
    lowrank_sparse_decode,
    select_positions,
    sparse_decode_attention,
)
from hfpatch.techniques.attention.recycled import RecycledAttention

RECIPES = {"recycled-attention-paper": "recycled_attention", "recycled-attention": "recycled_attention",
           "tidal-decode": "tidal_decode", "tidal-decode-paper": "tidal_decode", "sink-window": "sink_window", "quest": "quest"}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def deep_model(kind="llama", layers=6, dtype=torch.float32, seed=0):
    """A tiny model with enough layers for TidalDecode's dense / selection / sparse layers."""
    data = tiny_config(kind).to_dict()
    data.update(num_hidden_layers=layers, layer_types=None)
    config = type(tiny_config(kind))(**data)
    return tiny_model(kind, seed=seed, config=config).to(dtype)


def batch(n=2, length=48, seed=0, pad=(0, 9)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pad[:n]):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def run(model, ids, mask, new=6):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("recipe,kind,dtype", [(r, "llama", torch.float32) for r in RECIPES] + [
    ("recycled-attention-paper", "qwen3", torch.float32), ("recycled-attention-paper", "llama", torch.bfloat16),
    ("tidal-decode", "qwen2", torch.bfloat16)])
def test_budget_covering_the_context_gives_full_attention_logits(recipe, kind, dtype):
    model = deep_model(kind, dtype=dtype)
    ids, mask = batch()
    ref_seq, ref_logits = run(model, ids, mask)
    with hfpatch.patch(model, recipe, budget=ids.shape[1] + 8) as handle:
        seq, logits = run(model, ids, mask)
        stats = handle.stats[RECIPES[recipe]]
    assert stats["decode_steps"] == 5 and stats["sparse_layer_steps"] == 0
    torch.testing.assert_close(logits, ref_logits, **TOL[dtype])
    assert torch.equal(seq, ref_seq)


def test_recycled_stride_one_gives_full_attention_logits():
    model = deep_model("qwen2")
    ids, mask = batch()
    ref_seq, ref_logits = run(model, ids, mask)
    with hfpatch.patch(model, "recycled-attention-paper", budget=8, stride=1) as handle:
        seq, logits = run(model, ids, mask)
        assert handle.stats["recycled_attention"]["sparse_layer_steps"] == 0
    torch.testing.assert_close(logits, ref_logits, **TOL[torch.float32])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_small_budget_is_sparse_and_changes_the_logits(recipe):
    model = deep_model()
    ids, mask = batch()
    _, ref_logits = run(model, ids, mask, new=8)
    with hfpatch.patch(model, recipe, budget=12, sink=2, window=4) as handle:
        _, logits = run(model, ids, mask, new=8)
        stats = handle.stats[RECIPES[recipe]]
    assert stats["sparse_layer_steps"] > 0 and stats["attended_fraction_sparse_steps"] < 0.5
    # float32 on CPU: the compiled kernels when they build here (the rescored step is one fused kernel)
    op = lowrank_sparse_decode if recipe == "recycled-attention" else sparse_decode_attention
    assert stats["kernel"] == ("cpu" if op.cpu.unavailable() is None else "torch")
    torch.testing.assert_close(logits[:, 0], ref_logits[:, 0])  # the prefill step stays full attention
    assert not torch.allclose(logits[:, 1:], ref_logits[:, 1:], atol=1e-4)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_left_padded_batch_matches_each_row_alone(recipe):
    """Padding is never selected or attended, and sinks are the first real tokens of each row."""
    model = deep_model("qwen2")
    ids, mask = batch(pad=(0, 11))
    extra = {"recycled-attention-paper": {"stride": 3}, "quest": {"page_size": 1}}.get(recipe, {})  # pages: absolute
    with hfpatch.patch(model, recipe, budget=12, sink=2, window=3, **extra):
        _, logits = run(model, ids, mask, new=7)
        for row in range(2):
            keep = mask[row].bool()
            _, alone = run(model, ids[row : row + 1, keep], mask[row : row + 1, keep], new=7)
            steps = alone.shape[1]  # a row alone stops at its EOS; the batch pads on
            torch.testing.assert_close(logits[row, :steps], alone[0], atol=1e-4, rtol=1e-4)


def test_recycled_full_step_every_stride_and_selection_reused():
    model = deep_model(layers=3)
    ids, mask = batch(n=1, pad=(0,))
    with hfpatch.patch(model, "recycled-attention-paper", budget=10, stride=4) as handle:
        run(model, ids, mask, new=11)  # 10 decode steps: full at 0, 4, 8
        stats = handle.stats["recycled_attention"]
        technique = handle.technique("recycled_attention")
        state = technique.layers[1]
    assert stats["decode_steps"] == 10
    assert stats["full_layer_steps"] == 3 * 3 and stats["sparse_layer_steps"] == 3 * 7
    assert state.index.shape == (1, 2, 10) and state.full_len == ids.shape[1] + 9  # kv length at decode step 8
    assert state.steps_since_full == 1


def test_recycled_follow_adds_the_shifted_top_positions_once():
    """`follow`: t steps after a full step the set also holds the full step's top-`follow` positions + t,
    except those already selected or past the full step (a repeated position would be counted twice)."""
    from hfpatch.kernels import group_attention_scores
    from hfpatch.techniques.attention.base import LayerState
    from hfpatch.techniques.attention.recycled import RecycledAttention

    torch.manual_seed(0)
    technique = RecycledAttention(budget=6, sink=1, window=1, stride=8, follow=3)
    q, k = torch.randn(1, 4, 8), torch.randn(1, 2, 40, 8)
    state = LayerState(batch=1)
    assert technique.decode(0, state, q, k, None, 8 ** -0.5) is None  # the full step
    top = group_attention_scores(q, k, None, scale=8 ** -0.5).topk(3, dim=-1).indices
    assert torch.equal(state.extra["followed"], top)
    k2 = torch.cat([k, torch.randn(1, 2, 2, 8)], dim=2)  # two tokens generated since
    state.seq_len = 41
    index = technique.decode(0, state, q, k2[:, :, :41], None, 8 ** -0.5)  # t = 1
    for h in range(2):
        expected = set(state.index[0, h].tolist()) | {40} | {p + 1 for p in top[0, h].tolist() if p + 1 < 40}
        got = [p for p in index[0, h].tolist() if p >= 0]
        assert len(got) == len(set(got)) and set(got) == expected


def test_recycled_dynamic_variant():
    model = deep_model(layers=3)
    ids, mask = batch(n=1, pad=(0,))
    _, ref_logits = run(model, ids, mask, new=6)
    with hfpatch.patch(model, "recycled-attention-paper", budget=8, stride=50, drift_threshold=1.0) as handle:
        _, logits = run(model, ids, mask, new=6)  # every query has drifted (cos < 1): always a full step
        assert handle.stats["recycled_attention"]["full_steps_by_drift"] == 3 * 4  # (layer, step) pairs
    torch.testing.assert_close(logits, ref_logits, **TOL[torch.float32])
    with hfpatch.patch(model, "recycled-attention-paper", budget=8, stride=50, drift_threshold=-1.0) as handle:
        run(model, ids, mask, new=6)  # never drifts: one full step, then sparse
        stats = handle.stats["recycled_attention"]
    assert stats["full_steps_by_drift"] == 0 and stats["sparse_layer_steps"] == 3 * 4


def assert_top_positions(got, scores, valid, budget=9):
    """Each row of ``got`` [B, H, budget] = first 2 valid positions + the last 3 + the best others by ``scores``."""
    for b in range(scores.shape[0]):
        must = set(valid[b].nonzero().flatten()[:2].tolist()) | {37, 38, 39}
        for h in range(scores.shape[1]):
            order = [i for i in scores[b, h].argsort(descending=True).tolist() if i not in must and valid[b, i]]
            assert got[b, h].tolist() == sorted(must | set(order[: budget - len(must)]))


def test_selection_equals_a_straightforward_reference():
    """Top-K of the full step's softmax probabilities summed over each KV group, sinks/window forced."""
    technique = RecycledAttention(budget=9, sink=2, window=3)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :5] = False
    logits = torch.einsum("bhd,bhsd->bhs", q, k.repeat_interleave(2, 1))
    probs = torch.softmax((logits * 0.25).masked_fill(~valid[:, None], float("-inf")), -1)
    group = probs.view(2, 3, 2, 40).sum(2)
    assert_top_positions(technique.score_and_select(q, k, valid, 0.25), group, valid)
    forced = forced_positions(valid, 2, 40, 2, 3, q.device)
    assert forced[1].nonzero().flatten().tolist() == [5, 6, 37, 38, 39]
    tidal = hfpatch.catalogue.technique_class("tidal_decode")(budget=9, sink=2, window=3)
    shared = tidal.score_and_select(q, k, valid, 0.25, reduce_all_heads=True)
    assert torch.equal(shared[:, 0], shared[:, 2])
    assert torch.equal(shared[:, :1], select_positions(group.sum(1, keepdim=True), 9, forced, valid))
    # per_head=True: each query head its own top-K by q·k (the authors' code), [B, Hq, K]
    assert_top_positions(tidal.select_per_head(q, k, valid), logits, valid)


def test_tidal_layers_dense_selection_and_sparse():
    model = deep_model(layers=8)
    ids, mask = batch(n=1, pad=(0,))
    with hfpatch.patch(model, "tidal-decode-paper", budget=10) as handle:
        run(model, ids, mask, new=5)
        stats = handle.stats["tidal_decode"]
        assert handle.technique("tidal_decode").selection == [2, 3]  # paper: layer 2 and round(13/32 * 8)
    # per decode step: layers 0, 1 dense, 2 and 3 select (full), 4..7 sparse
    assert stats["full_layer_steps"] == 4 * 4 and stats["sparse_layer_steps"] == 4 * 4
    with hfpatch.patch(model, "tidal-decode", budget=10, selection_layers=[5]) as handle:
        run(model, ids, mask, new=5)
        assert handle.stats["tidal_decode"]["sparse_layer_steps"] == 4 * 2
    with hfpatch.patch(model, "tidal-decode", budget=10, selection_layers=[1]) as handle:
        run(model, ids, mask, new=5)  # a selection layer inside the dense ones stays dense and selects nothing
        assert handle.stats["tidal_decode"]["sparse_layer_steps"] == 0
    with pytest.raises(hfpatch.errors.PatchError, match="outside the model's 8 layers"):
        hfpatch.patch(model, "tidal-decode", selection_layers=[8])
    assert model.config._attn_implementation == "sdpa"


def test_tidal_selection_layer_attends_fully_and_selects_in_one_pass():
    """On CPU in float32 a selection layer computes its full attention and its scores together
    (`attention_with_scores`): the output is full attention, the chosen set the shared top-K."""
    from hfpatch.kernels import attention_with_scores
    from hfpatch.techniques.attention.base import LayerState
    from hfpatch.techniques.attention.tidal import TidalDecode

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False
    out, scores = attention_with_scores(q, k, v, valid, 0.4)
    mask = valid[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.4)[:, :, 0]
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(scores, group_attention_scores(q, k, valid, scale=0.4), **TOL[torch.float32])
    assert attention_with_scores(q.double(), k.double(), v.double(), valid, 0.4) is None  # not float32: sdpa path
    tidal = TidalDecode(budget=9, sink=1, window=2)
    tidal.selection, tidal._current = [3], None
    got, index = tidal.attend(3, LayerState(batch=2), q, k, v, valid, 0.4)
    assert index is None  # full attention, computed here
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    assert torch.equal(tidal._current[2], tidal.score_and_select(q, k, valid, 0.4, reduce_all_heads=True))


def test_quest_page_bounds_bound_every_key_score():
    model = deep_model(layers=3)
    ids, mask = batch(n=1, length=45, pad=(0,))
    with hfpatch.patch(model, "quest", budget=16, page_size=8, full_layers=1) as handle:
        run(model, ids, mask, new=4)
        state = handle.technique("quest").layers[2]
        stats = handle.stats["quest"]
    assert stats["sparse_layer_steps"] == 2 * 3
    assert state.extra["pages_done"] == 48 and state.extra["kmin"].shape[2] == 6  # 48 cached -> 6 pages
    assert (state.extra["kmin"] <= state.extra["kmax"]).all()


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_refuses_other_attention_backends(impl):
    model = deep_model()
    model.config._attn_implementation = impl  # what loading with that backend records
    with pytest.raises(UnsupportedModelError, match=rf"needs the 'sdpa'.*uses '{impl}'.*attn_implementation='sdpa'"):
        hfpatch.patch(model, "recycled-attention-paper")
    assert hfpatch.patch.__module__ and not hfpatch.active_patches(model) if hasattr(hfpatch, "active_patches") else True


def test_unpatch_restores_and_second_instance_untouched():
    from transformers import AttentionInterface

    model = deep_model()
    twin = type(model)(model.config).eval()  # built from the same config object
    twin.load_state_dict(model.state_dict())
    ids, mask = batch()
    _, ref = run(model, ids, mask)
    before = set(AttentionInterface._global_mapping)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for recipe in RECIPES:
        handle = hfpatch.patch(model, recipe, budget=10)
        assert model.config._attn_implementation.startswith("hfpatch_")
        assert twin.config._attn_implementation == "sdpa"
        _, twin_logits = run(twin, ids, mask)
        torch.testing.assert_close(twin_logits, ref, atol=0, rtol=0)
        handle.unpatch()
        assert model.config._attn_implementation == "sdpa"
        assert set(AttentionInterface._global_mapping) == before
        _, after = run(model, ids, mask)
        torch.testing.assert_close(after, ref, atol=0, rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_shared_parameter_names_and_recipes():
    model = deep_model(layers=3)
    for recipe, name in RECIPES.items():
        with hfpatch.patch(model, recipe, budget=512, sink=2, window=8) as handle:
            params = handle.technique(name).params
            assert (params.budget, params.sink, params.window) == (512, 2, 8)
    names = {r["name"] for r in hfpatch.list_recipes()} if hasattr(hfpatch, "list_recipes") else set(RECIPES)
    assert set(RECIPES) <= names
    with pytest.raises(hfpatch.errors.RecipeError, match="budget"):
        hfpatch.patch(model, "quest", budget=0)


def test_with_a_speculative_drafter_in_one_recipe_output_stays_exact():
    """Today the speculative engine only trusts the 'sdpa'/'eager' names with its tree mask, so with an
    attention technique in the same recipe it falls back to plain generate and says why; output is exact."""
    model = deep_model(layers=3)
    ids = batch(n=1, pad=(0,))[0]
    ids = torch.cat([ids, ids[:, :20]], 1)  # repetition for the n-gram drafter
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    recipe = {"hfpatch_version": "1.0", "name": "lookup+recycled", "techniques": [
        {"type": "ngram_lookup"}, {"type": "recycled_attention", "budget": 4096}]}
    with hfpatch.patch(model, recipe) as handle:
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        stats = handle.stats
    assert torch.equal(out, ref)
    assert "tree mask" in (stats["ngram_lookup"]["fallback"] or "") or stats["recycled_attention"]["multi_token_steps"]
    assert stats["recycled_attention"]["decode_steps"] > 0


# ------------------------------------------------------------------------------------------------------
# compiled CPU kernels are built in patch(), never inside the first decode step

@pytest.fixture
def build_calls(monkeypatch):
    """Record (and stub) cpu_build.build: the sources patch() asks to build."""
    from hfpatch.kernels import cpu_build

    calls = []
    monkeypatch.setattr(cpu_build, "build", lambda source: calls.append(source))
    return calls


@pytest.mark.parametrize("recipe", ["recycled-attention", "recycled-attention-paper", "tidal-decode-paper",
                                    "sink-window", "quest"])
def test_patch_builds_the_compiled_cpu_kernel_of_a_cpu_model(build_calls, recipe, monkeypatch):
    monkeypatch.delenv("HFPATCH_KERNELS", raising=False)
    model = deep_model(layers=3)
    with hfpatch.patch(model, recipe) as handle:
        assert build_calls == ["sparse_decode.cpp"]  # before any generate
        assert handle.stats[RECIPES[recipe]]["kernel_fallback"] is None


def test_patch_does_not_build_for_the_reference_or_for_other_dtypes(build_calls, monkeypatch):
    model = deep_model(layers=3)
    monkeypatch.setenv("HFPATCH_KERNELS", "torch")
    with hfpatch.patch(model, "recycled-attention") as handle:
        assert "HFPATCH_KERNELS=torch" in handle.stats["recycled_attention"]["kernel_fallback"]
    monkeypatch.delenv("HFPATCH_KERNELS")
    with hfpatch.patch(deep_model(layers=3, dtype=torch.bfloat16), "recycled-attention") as handle:
        assert "float32" in handle.stats["recycled_attention"]["kernel_fallback"]
    assert build_calls == []


def test_patch_says_once_when_the_kernel_cannot_build_and_stats_name_the_fallback(monkeypatch):
    """A failed build (simulated: the builder's recorded failure, as after a missing compiler) is one warning
    at patch time; decode steps then run the reference and the stats say which and why."""
    from hfpatch.kernels import cpu_build

    monkeypatch.delenv("HFPATCH_KERNELS", raising=False)
    monkeypatch.setitem(cpu_build._failures, "sparse_decode.cpp", "RuntimeError: Ninja is required to load C++ extensions")
    model = deep_model(layers=3)
    ids = batch(n=1, pad=(0,))[0]
    with pytest.warns(RuntimeWarning) as caught:
        handle = hfpatch.patch(model, "recycled-attention-paper", budget=8, stride=4)
    messages = [str(w.message) for w in caught if "could not be built" in str(w.message)]
    assert len(messages) == 1
    assert "Ninja is required" in messages[0] and "hfpatch kernels build" in messages[0]
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # nothing more is said while decoding
        model.generate(ids, max_new_tokens=6, do_sample=False)
    stats = handle.stats["recycled_attention"]
    assert stats["kernel_fallback"].startswith("reference (torch)") and "Ninja is required" in stats["kernel_fallback"]
    assert stats["sparse_layer_steps"] > 0 and stats["kernel"] == "torch"
    handle.unpatch()
