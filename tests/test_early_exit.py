"""early_exit: the target's first layers draft (sharing its cached KV); DEL picks the exit and the length."""
from __future__ import annotations

import pytest
import torch
from test_speculative import _chi_square_p_value, _prompts, _sample_counts, _stats
from tiny_models import tiny_config, tiny_model

import hfpatch
from hfpatch.errors import PatchError, UnsupportedModelError


def _deep(kind: str = "llama", layers: int = 4, seed: int = 0):
    config = tiny_config(kind)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * layers
    return tiny_model(kind, seed=seed, config=config)


def _agreeing(kind: str = "llama"):
    """A 4-layer model whose layers after the second barely move the residual stream, so its early exits agree
    with the full model (like a model trained to exit early); a random one's exits agree ~17% of the time."""
    model = _deep(kind)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("params", [{}, {"exit_layer": 2, "draft_length": 3}], ids=["del", "fixed"])
def test_greedy_token_identical(kind, params):
    model = _agreeing(kind)
    prompts = _prompts(3, seed=4)
    lengths = [1, 8, 25]
    expected = [model.generate(p, max_new_tokens=n, do_sample=False) for p, n in zip(prompts, lengths)]
    with hfpatch.patch(model, "early-exit", **params) as handle:
        for p, n, ref in zip(prompts, lengths, expected):
            out = model.generate(p, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
            assert torch.equal(out.sequences, ref), (kind, params, n)
            assert _stats(handle)["fallback"] is None
        stats = _stats(handle)
        drafter = stats["drafters"]["early_exit"]
        assert stats["forwards"] < 25 and drafter["accepted_tokens"] > 0
        assert drafter["observations"] > 0  # every candidate exit was scored on the verified positions
        if params:
            assert set(drafter["exit_chosen"]) == {2}
    assert all(not layer._forward_hooks for layer in model.model.layers)
    assert "generate" not in model.__dict__


def test_the_targets_cache_is_never_written_by_the_draft():
    """The draft's view shares the target's KV tensors; its updates go to new tensors."""
    model = _deep()
    prompt = _prompts(1, seed=9)[0]
    ref = model.generate(prompt, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    with hfpatch.patch(model, "early-exit", exit_layer=1, draft_length=4):
        out = model.generate(prompt, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    from hfpatch import compat

    mine, theirs = compat.output_cache(out), compat.output_cache(ref)
    for a, b in zip(mine.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)


def test_del_stops_drafting_within_a_few_steps_when_the_exits_disagree():
    """A random model's exits rarely agree: the first scored steps replace the prior, and DEL decodes plainly
    (the drafts it tried first cost forwards a slow-moving estimate used to keep paying for)."""
    model = _deep("qwen3")
    with torch.no_grad():  # the last layers dominate the residual stream: the exits' argmax is mostly wrong
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(8.0)
            layer.mlp.down_proj.weight.mul_(8.0)
    prompts = _prompts(3, seed=4)
    with hfpatch.patch(model, "early-exit") as handle:
        for p in prompts:
            model.generate(p, max_new_tokens=25, do_sample=False)
        drafter = _stats(handle)["drafters"]["early_exit"]
    assert drafter["drafted_tokens"] <= 4
    assert drafter["exit_chosen"].get(0, 0) >= 60  # of ~75 steps, plain decoding
    assert 0 < drafter["head_cost_in_layers"] < 1  # a tiny vocabulary's head costs less than a layer


def test_del_picks_plain_decoding_when_no_exit_agrees():
    model = _deep()
    with hfpatch.patch(model, "early-exit", prior_agreement=0.0) as handle:
        drafter = handle.technique("early_exit").drafter
        drafter.agreement = {layer: 0.01 for layer in drafter.agreement}
        assert drafter.choose() == (0, 0)
        drafter.agreement[1] = 0.95
        layer, length = drafter.choose()
        assert layer == 1 and length > 1


@pytest.mark.slow
def test_sampling_distribution_matches_vanilla():
    model = _deep(seed=3)
    prompt = torch.tensor([[5, 17, 33, 5, 17]])
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=0.7, top_k=4)
    runs = 300

    def counts(seed0: int, **extra) -> dict:
        return _sample_counts(model, prompt, seed0, runs, **{**kwargs, **extra})

    vanilla = counts(0)
    with hfpatch.patch(model, "early-exit", exit_layer=2, draft_length=2) as handle:
        patched = counts(10_000)
        # an argmax draft against a top-4 sample: accepted about a quarter of the time here
        assert _stats(handle)["drafters"]["early_exit"]["accepted_tokens"] > 0.15 * runs
    assert _chi_square_p_value(vanilla, patched) > 1e-3
    assert _chi_square_p_value(vanilla, counts(20_000, top_k=2)) < 1e-3


def test_refusals():
    with pytest.raises(UnsupportedModelError, match="early_exit supports model types"):
        hfpatch.patch(tiny_model("gemma3_text"), "early-exit")
    with pytest.raises(PatchError, match=r"exit layers must be in \[1, 1\]"):
        hfpatch.patch(tiny_model("llama"), "early-exit", exit_layer=2)
