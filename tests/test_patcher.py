"""patch()/unpatch() round trips on tiny models of every supported architecture."""
from __future__ import annotations

import copy

import probe_techniques  # noqa: F401  (registers the probe techniques)
import pytest
import torch
import transformers
from tiny_models import ALL_KINDS, TEXT_KINDS, tiny_config, tiny_model

import hfpatch
from hfpatch.errors import PatchConflictError, PatchError, RecipeError, UnsupportedModelError

PROBE = {"hfpatch_version": "1.0", "name": "probe", "techniques": [{"type": "probe_all_primitives"}]}


def _inputs(model):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _snapshot(model):
    """Everything unpatch must restore: weights, instance attributes, hooks, configs."""
    return {
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "instance_attrs": {name: sorted(m.__dict__) for name, m in model.named_modules()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()},
        "config_ids": {name: id(m.__dict__.get("config")) for name, m in model.named_modules()},
        "config": model.config.to_dict(),
        "attn": model.config._attn_implementation,
        "modules": {name: id(m) for name, m in model.named_modules()},
    }


def _assert_same(model, before, logits_before, inputs):
    after = _snapshot(model)
    assert after["state_dict"].keys() == before["state_dict"].keys()
    for key, value in before["state_dict"].items():
        assert torch.equal(after["state_dict"][key], value), key
    for key in ("instance_attrs", "hooks", "config_ids", "config", "attn", "modules"):
        assert after[key] == before[key], key
    assert "generate" not in model.__dict__
    assert torch.equal(_logits(model, inputs), logits_before)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_round_trip_restores_everything(kind):
    model = tiny_model(kind)
    inputs = _inputs(model)
    logits_before = _logits(model, inputs)
    before = _snapshot(model)

    handle = hfpatch.patch(model, PROBE)
    assert handle.active and hfpatch.active_patches(model) == [handle]
    patched = _logits(model, inputs)
    assert not torch.allclose(patched, logits_before)
    assert model.config.get_text_config()._attn_implementation.startswith("hfpatch_probe_")
    assert model.config.hfpatch_probe_field == 123
    assert handle.stats["probe_all_primitives"]["calls"] >= 1
    if kind in TEXT_KINDS:
        model.generate(inputs["input_ids"][:1], max_new_tokens=2, do_sample=False)
        assert handle.stats["probe_all_primitives"]["calls"] >= 1000

    handle.unpatch()
    assert not handle.active and hfpatch.active_patches(model) == []
    _assert_same(model, before, logits_before, inputs)
    handle.unpatch()  # a second unpatch is a no-op


@pytest.mark.parametrize("kind", ["llama", "gpt2", "llava"])
def test_second_instance_from_same_config_is_untouched(kind):
    config = tiny_config(kind)
    model_a = tiny_model(kind, seed=0, config=config)
    model_b = tiny_model(kind, seed=0, config=config)
    assert model_a.config is model_b.config
    inputs = _inputs(model_b)
    logits_b = _logits(model_b, inputs)
    before_b = _snapshot(model_b)
    with hfpatch.patch(model_a, PROBE):
        assert not torch.allclose(_logits(model_a, inputs), logits_b)
        _assert_same(model_b, before_b, logits_b, inputs)
        assert config._attn_implementation == "sdpa"
        assert not hasattr(config, "hfpatch_probe_field")
    assert torch.equal(_logits(model_a, inputs), logits_b)


@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_failure_mid_recipe_leaves_model_identical(kind):
    model = tiny_model(kind)
    inputs = _inputs(model)
    logits_before = _logits(model, inputs)
    before = _snapshot(model)
    recipe = {"hfpatch_version": "1.0", "name": "half", "techniques": [
        {"type": "probe_hook"}, {"type": "probe_all_primitives"}, {"type": "probe_failing"}]}
    with pytest.raises(PatchError, match=r"probe_failing.*" + kind + r".*injected failure.*restored"):
        hfpatch.patch(model, recipe)
    assert hfpatch.active_patches(model) == []
    _assert_same(model, before, logits_before, inputs)
    assert "hfpatch_probe_attr" not in model.__dict__


def test_unsupported_model_is_refused_with_supported_list():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertForMaskedLM(config)
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*supported model types: gemma3, gemma3_text, gpt2, idefics3, llama"):
        hfpatch.patch(model, PROBE)
    assert not model._forward_hooks


def test_base_model_without_head_is_refused():
    model = transformers.LlamaModel(tiny_config("llama"))
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        hfpatch.patch(model, PROBE)


def test_composition_rules():
    model = tiny_model("llama")
    inputs = _inputs(model)
    base = _logits(model, inputs)
    first = hfpatch.patch(model, PROBE)
    with_probe = _logits(model, inputs)
    with pytest.raises(PatchConflictError, match="'attention'.*probe_all_primitives"):
        hfpatch.patch(model, PROBE)
    second = hfpatch.patch(model, {"hfpatch_version": "1.0", "name": "hook", "techniques": [{"type": "probe_hook"}]})
    assert torch.allclose(_logits(model, inputs), with_probe + 1.0)
    with pytest.raises(PatchError, match="newer patches"):
        first.unpatch()
    assert first.active and second.active
    assert hfpatch.unpatch(model) == 2
    assert not first.active and not second.active
    assert torch.equal(_logits(model, inputs), base)


def test_conflict_inside_one_recipe():
    model = tiny_model("llama")
    recipe = {"hfpatch_version": "1.0", "name": "twice", "techniques": [
        {"type": "probe_all_primitives"}, {"type": "probe_all_primitives"}]}
    with pytest.raises(PatchConflictError, match="this recipe"):
        hfpatch.patch(model, recipe)
    assert "generate" not in model.__dict__


def test_keyword_overrides():
    model = tiny_model("llama")
    with hfpatch.patch(model, PROBE, scale=0.25) as handle:
        assert handle.technique("probe_all_primitives").params.scale == 0.25
    both = {"hfpatch_version": "1.0", "name": "both", "techniques": [{"type": "probe_all_primitives"},
                                                                      {"type": "probe_hook"}]}
    with pytest.raises(RecipeError, match="'budget' is ambiguous"):
        hfpatch.patch(model, both, budget=3)
    with pytest.raises(RecipeError, match="'nope' matches no technique"):
        hfpatch.patch(model, both, nope=3)
    with pytest.raises(RecipeError, match=r"scale: must be > 0.0"):
        hfpatch.patch(model, PROBE, scale=-1.0)
    with hfpatch.patch(model, both, **{"probe_hook.budget": 3}) as handle:
        assert handle.technique("probe_hook").params.budget == 3
        assert handle.technique("probe_all_primitives").params.budget == 16
    assert hfpatch.active_patches(model) == []


def test_requirements_are_checked():
    model = tiny_model("llama")
    recipe = dict(PROBE, requirements={"model_types": ["qwen2"]})
    with pytest.raises(RecipeError, match="for model types \\['qwen2'\\], not 'llama'"):
        hfpatch.patch(model, recipe)
    recipe = dict(PROBE, requirements={"transformers": "<5"})
    with pytest.raises(RecipeError, match="needs transformers<5"):
        hfpatch.patch(model, recipe)


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    inputs = _inputs(model)
    before = _logits(lora, inputs)
    with hfpatch.patch(lora, PROBE) as handle:
        assert hfpatch.active_patches(lora) == [handle]
        assert not torch.allclose(_logits(lora, inputs), before)
        lora.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=2, do_sample=False)
        assert handle.stats["probe_all_primitives"]["calls"] >= 1000
    assert torch.equal(_logits(lora, inputs), before)


def test_model_loaded_with_device_map(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    inputs = _inputs(model)
    before = _logits(model, inputs)
    with hfpatch.patch(model, PROBE):
        assert not torch.allclose(_logits(model, inputs), before)
    assert torch.equal(_logits(model, inputs), before)


def test_patch_rejects_non_models():
    with pytest.raises(TypeError, match="torch model"):
        hfpatch.patch(object(), PROBE)
    with pytest.raises(TypeError, match="recipe must be"):
        hfpatch.patch(tiny_model("llama"), 42)


def test_config_copy_keeps_unrelated_instances():
    """Deep-copying the config for a patch must not be visible through copy.deepcopy of the model either."""
    model = tiny_model("llama")
    clone = copy.deepcopy(model)
    with hfpatch.patch(model, PROBE):
        assert clone.config._attn_implementation == "sdpa"


def test_training_loss_hook_on_one_trainer_instance(tmp_path):
    """wrap_method is the training-loss hook: it wraps one Trainer's compute_loss, and the undo restores it."""
    from hfpatch import primitives

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (4, 8))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    other = transformers.Trainer(model=tiny_model("llama"), args=args, train_dataset=dataset)
    seen = []

    def scaled_loss(original, model, inputs, *a, **k):
        loss = original(model, inputs, *a, **k)
        seen.append(float(loss.detach() if not isinstance(loss, tuple) else loss[0].detach()))
        return loss * 0.5 if not isinstance(loss, tuple) else (loss[0] * 0.5, *loss[1:])

    undo = primitives.wrap_method(trainer, "compute_loss", scaled_loss)
    assert "compute_loss" not in other.__dict__
    trainer.train()
    assert len(seen) == 2
    undo()
    assert "compute_loss" not in trainer.__dict__
    assert trainer.compute_loss.__func__ is transformers.Trainer.compute_loss


def test_wrapped_generate_and_forward_keep_their_signature_and_metadata():
    """hfpatch's method wrappers are transparent to introspection (wrapt): signature, __wrapped__, name, doc."""
    import inspect

    from hfpatch import primitives

    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    before = {"generate": inspect.signature(model.generate), "forward": inspect.signature(mlp.forward)}
    calls = []

    def counting(original, *args, **kwargs):
        calls.append(original.__name__)
        return original(*args, **kwargs)

    undo_generate = primitives.wrap_method(model, "generate", counting)
    undo_forward = primitives.wrap_method(mlp, "forward", counting)
    for owner, name in ((model, "generate"), (mlp, "forward")):
        wrapped = getattr(owner, name)
        assert inspect.signature(wrapped) == before[name]
        assert wrapped.__name__ == name and wrapped.__doc__ == getattr(type(owner), name).__doc__
        assert wrapped.__wrapped__ == getattr(type(owner), name).__get__(owner)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, do_sample=False)
    assert calls[0] == "generate" and "forward" in calls
    undo_forward()
    undo_generate()
    assert "generate" not in vars(model) and "forward" not in vars(mlp)


@pytest.mark.parametrize("recipe", sorted(r["name"] for r in hfpatch.list_recipes()))
def test_every_builtin_recipe_round_trips_exactly(recipe):
    """The strict snapshot round trip for every built-in recipe: used through generate, then unpatched."""
    families = {t.family for t in hfpatch.recipe.resolve_recipe(recipe).build_techniques()}
    if "training" in families:
        pytest.skip("training recipes patch a Trainer, not a model: tests/test_trainer_patch.py round-trips them")
    if "vision" in families:  # vision recipes patch VLMs only; in-LLM pruning (fastv) needs a few decoder layers
        config = tiny_config("llava")
        config.text_config.num_hidden_layers = 4
        model = tiny_model("llava", config=config)
    else:
        model = tiny_model("llama")
    inputs = _inputs(model)
    logits_before = _logits(model, inputs)
    before = _snapshot(model)
    prompt = inputs["input_ids"][:1]
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    from test_draft_model import builtin_recipe_overrides

    with hfpatch.patch(model, recipe, **builtin_recipe_overrides(recipe, model)):
        model.generate(prompt, max_new_tokens=4, do_sample=False)
    _assert_same(model, before, logits_before, inputs)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), expected)
