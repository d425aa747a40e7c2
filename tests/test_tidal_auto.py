"""TidalDecode ``selection_layers="auto"``: the retrieval probe, its selection rule, the per-model cache and the
calibrated layers a recipe carries."""
from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_config, tiny_model

import hfpatch
from hfpatch import arch, compat
from hfpatch.errors import RecipeError
from hfpatch.recipe import Recipe
from hfpatch.techniques.attention import retrieval_probe as rp


def deep_model(layers=8, seed=0):
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    return tiny_model("llama", seed=seed, config=config)


def generate(model, new=6, length=40):
    ids = torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture(autouse=True)
def fresh_cache():
    rp.clear_cache()
    yield
    rp.clear_cache()


def test_auto_picks_sorted_layers_within_depth_and_reports_them():
    model = deep_model()
    with hfpatch.patch(model, "tidal-decode", budget=10) as handle:
        stats = handle.stats["tidal_decode"]
        layers = handle.technique("tidal_decode").selection
    assert layers == sorted(set(layers)) and layers and all(2 <= i < 8 for i in layers)
    assert stats["selection_layers"] == layers and stats["selection_source"] == "probed"


def test_rule_reproduces_the_hand_tuned_smollm2_set_and_ignores_noise():
    # need/cover of the layers the probe scored above noise on SmolLM2-135M (seed 0, budget 256)
    need, cover = [0.001] * 30, [0.0] * 30
    for layer, n, c in [(2, .053, .125), (3, .116, .125), (7, .262, .344), (14, .087, .031), (15, .095, .094),
                        (17, .493, 1.0), (18, .721, 1.0), (20, .280, .969), (23, .086, .688)]:
        need[layer], cover[layer] = n, c
    assert rp.choose_layers(rp.ProbeResult(need, cover, [True] * 30, 2048, 256), 2) == [2, 7, 12, 17, 20]
    # a sliding-window layer never selects: the gap takes the full layer nearest its middle (11), and 11..17
    # is still longer than 30 / 6 layers, so 14 splits it
    sliding = [i != 12 for i in range(30)]
    assert rp.choose_layers(rp.ProbeResult(need, cover, sliding, 2048, 256), 2) == [2, 7, 11, 14, 17, 20]
    # no head above chance (random weights): only the first layer after the dense ones
    flat = rp.ProbeResult([0.006] * 30, [0.1] * 30, [True] * 30, 2048, 256)
    assert rp.choose_layers(flat, 2) == [2]


def test_probe_is_deterministic_and_restores_the_model():
    model = deep_model()
    adapter = arch.adapter_for(model)
    implementation = model.config._attn_implementation
    functions = set(compat.attention_functions()._global_mapping)
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = rp.probe(model, adapter, budget=10)
    second = rp.probe(model, adapter, budget=10)
    assert (first.need, first.cover) == (second.need, second.cover)
    assert rp.probe(model, adapter, budget=10, seed=1).need != first.need  # the seed drives the prompt
    assert model.config._attn_implementation == implementation
    assert set(compat.attention_functions()._global_mapping) == functions
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_probe_runs_once_per_model_and_budget():
    model = deep_model()
    calls = rp.probe_calls
    with hfpatch.patch(model, "tidal-decode", budget=10):
        pass
    with hfpatch.patch(model, "tidal-decode", budget=10) as handle:
        assert handle.stats["tidal_decode"]["selection_source"] == "probed (cached in this process)"
    assert rp.probe_calls == calls + 1
    with hfpatch.patch(model, "tidal-decode", budget=12):  # the budget changes the cover cut: probe again
        pass
    assert rp.probe_calls == calls + 2


def test_recipe_carries_the_layers_and_a_later_patch_skips_the_probe(tmp_path):
    model = deep_model()
    with hfpatch.patch(model, "tidal-decode", budget=10) as handle:
        layers = handle.technique("tidal_decode").selection
        handle.to_recipe(name="calibrated").save_pretrained(tmp_path)
    entry = Recipe.from_pretrained(tmp_path).techniques[0]
    assert entry["selection_layers"] == "auto" and entry["calibrated_layers"] == layers
    assert entry["calibrated_for"].startswith("llama:")
    rp.clear_cache()  # a new process
    calls = rp.probe_calls
    with hfpatch.patch(model, Recipe.from_pretrained(tmp_path)) as handle:
        assert handle.technique("tidal_decode").selection == layers
        assert handle.stats["tidal_decode"]["selection_source"] == "loaded from the recipe"
    assert rp.probe_calls == calls


def test_recipe_calibrated_for_other_weights_probes_again_with_a_warning(tmp_path):
    with hfpatch.patch(deep_model(seed=0), "tidal-decode", budget=10) as handle:
        recipe = handle.to_recipe()
    other = deep_model(seed=1)  # same architecture, other weights
    calls = rp.probe_calls
    with pytest.warns(UserWarning, match="probing this model again"):
        with hfpatch.patch(other, recipe) as handle:
            assert handle.stats["tidal_decode"]["selection_source"] == "probed"
            key = handle.to_recipe().techniques[0]["calibrated_for"]
    assert rp.probe_calls == calls + 1 and key != recipe.techniques[0]["calibrated_for"]


def test_explicit_lists_and_the_paper_formula_still_work():
    model = deep_model()
    calls = rp.probe_calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hfpatch.patch(model, "tidal-decode", budget=10, selection_layers=[3, 5]) as handle:
            assert handle.technique("tidal_decode").selection == [3, 5]
            assert handle.stats["tidal_decode"]["selection_source"] == "explicit list"
            assert handle.to_recipe().techniques[0]["calibrated_layers"] is None
        with hfpatch.patch(model, "tidal-decode-paper", budget=10) as handle:
            assert handle.technique("tidal_decode").selection == [2, 3]  # 2 and round(13/32 * 8)
            assert handle.stats["tidal_decode"]["selection_source"] == "paper formula"
    assert rp.probe_calls == calls
    with pytest.raises(RecipeError, match="selection_layers must be 'auto'"):
        hfpatch.patch(model, "tidal-decode", selection_layers="best")


def test_auto_with_a_budget_covering_the_context_gives_full_attention():
    model = deep_model()
    ref_seq, ref_logits = generate(model)
    with hfpatch.patch(model, "tidal-decode", budget=4096) as handle:
        seq, logits = generate(model)
        assert handle.stats["tidal_decode"]["selection_source"] == "probed"
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_recipe_show_names_the_layers(tmp_path, capsys):
    from hfpatch.apps import cli

    with hfpatch.patch(deep_model(), "tidal-decode", budget=10) as handle:
        layers = handle.technique("tidal_decode").selection
        handle.to_recipe(name="calibrated").save_pretrained(tmp_path)
    shown = {}
    for source in (tmp_path, "tidal-decode", "tidal-decode-paper"):
        assert cli.main(["recipe", "show", str(source)]) == 0
        shown[source] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# tidal_decode selection layers")]
    assert shown[tmp_path] == [f"# tidal_decode selection layers: {layers} (calibrated for "
                               f"{Recipe.from_pretrained(tmp_path).techniques[0]['calibrated_for']}; another model "
                               "is probed again at patch time)"]
    assert shown["tidal-decode"] == ["# tidal_decode selection layers: auto (probed at patch time, once per model)"]
    assert "paper's formula" in shown["tidal-decode-paper"][0]


def gemma_like(layers=12, window=16):
    """A tiny Gemma 3 text model with Gemma 3's layout: every 6th layer full attention, the others windowed."""
    data = tiny_config("gemma3_text").to_dict()
    data.update(num_hidden_layers=layers, sliding_window=window,
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)])
    config = type(tiny_config("gemma3_text"))(**data)
    return tiny_model("gemma3_text", config=config)


def test_paper_formula_moves_to_full_attention_layers_on_a_sliding_window_model():
    """Gemma 3: the paper's layers (2 and 13/32 of 12 = 5) are not all full-attention layers; a sliding-window
    layer never runs a sparse step, so it could never select (before: the patch silently stayed full attention)."""
    model = gemma_like()
    with hfpatch.patch(model, "tidal-decode-paper", budget=8) as handle:
        generate(model, length=40)
        stats = handle.stats["tidal_decode"]
    assert stats["selection_layers"] == [5] and "full-attention" in stats["selection_source"]
    assert stats["sparse_layer_steps"] > 0  # layer 11 attends to layer 5's selection


def test_explicit_sliding_selection_layer_is_refused_with_the_full_layers_named():
    model = gemma_like()
    with pytest.raises(Exception, match=r"sliding-window layers.*full-attention layers \[5, 11\]"):
        hfpatch.patch(model, "tidal-decode", selection_layers=[2, 5])
    assert compat.attn_implementation(model.config) in (None, "sdpa")  # nothing left applied


def test_auto_on_a_sliding_window_model_selects_only_full_attention_layers():
    model = gemma_like()
    with hfpatch.patch(model, "tidal-decode", budget=8) as handle:
        layers = handle.stats["tidal_decode"]["selection_layers"]
    assert layers and set(layers) <= {5, 11}


def test_probe_precision_auto_matches_the_model_dtype_scores():
    """bfloat16 matrix products (where native) change the probe's scores by rounding only."""
    model = deep_model()
    adapter = arch.adapter_for(model)
    fast = rp.probe(model, adapter, budget=10, precision="auto")
    exact = rp.probe(model, adapter, budget=10, precision="model")
    assert fast.need == pytest.approx(exact.need, abs=0.02)
    with pytest.raises(ValueError, match="precision"):
        rp.probe(model, adapter, budget=10, precision="fp8")


def test_probe_in_passes_of_one_prompt_scores_as_one_batch():
    """The probe's prompts run one per forward by default (smaller activations): the scores are the batch's."""
    model = deep_model()
    adapter = arch.adapter_for(model)
    one = rp.probe(model, adapter, budget=10, precision="model")
    batched = rp.probe(model, adapter, budget=10, precision="model", rows_per_pass=rp.BATCH)
    assert one.need == pytest.approx(batched.need, abs=2e-4) and one.cover == batched.cover


def test_probe_stops_after_the_last_layer_it_scores():
    """The forward ends inside the last selectable layer's attention: its MLP and any later layer never run."""
    ran = []

    def watch(model, modules):
        return [m.register_forward_hook(lambda mod, *_: ran.append(mod)) for m in modules]

    model = deep_model(layers=6)
    layers = arch.adapter_for(model).decoder_layers()
    hooks = watch(model, [layers[-1].mlp, layers[-2].mlp])
    rp.probe(model, arch.adapter_for(model), budget=10)
    assert ran == [layers[-2].mlp] * rp.BATCH  # the last layer's MLP never ran
    for h in hooks:
        h.remove()
    ran.clear()
    model = gemma_like(layers=14)  # full attention at 5 and 11; 12, 13 sliding: never reached
    layers = arch.adapter_for(model).decoder_layers()
    hooks = watch(model, [layers[11].mlp, layers[12], layers[13]])
    result = rp.probe(model, arch.adapter_for(model), budget=8)
    assert ran == [] and [i for i, s in enumerate(result.selectable) if s] == [5, 11]
    assert model.config._attn_implementation in (None, "sdpa")  # the switch is undone after the early stop


def test_probe_reports_progress_per_pass():
    model = deep_model()
    seen = []
    rp.probe(model, arch.adapter_for(model), budget=10, progress=lambda done, total, s: seen.append((done, total)))
    assert seen == [(i + 1, rp.BATCH) for i in range(rp.BATCH)]


def test_slow_probe_logs_before_per_prompt_and_after(monkeypatch, caplog):
    """A model over SLOW_PARAMETERS gets a line before the probe, one per prompt once PROGRESS_AFTER seconds have
    passed (all of them here: 0 s), and one with the layers and the time after it."""
    monkeypatch.setattr(rp, "SLOW_PARAMETERS", 0)
    monkeypatch.setattr(rp, "PROGRESS_AFTER", 0.0)
    model = deep_model()
    with caplog.at_level("WARNING", logger=rp.logger.name):
        layers, _, cached = rp.calibrate(model, arch.adapter_for(model), budget=10, full_layers=2)
    lines = [r.getMessage() for r in caplog.records]
    assert not cached and "probing which layers" in lines[0] and f"{rp.BATCH} forward passes" in lines[0]
    progress = lines[1:-1]  # after each prompt but the last (the closing line follows it)
    assert len(progress) == rp.BATCH - 1
    assert all(line.startswith(f"hfpatch: retrieval probe {i}/{rp.BATCH} prompts (")
               for i, line in enumerate(progress, 1))
    assert str(layers) in lines[-1] and "probe took" in lines[-1]
