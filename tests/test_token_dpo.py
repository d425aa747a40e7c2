"""token_dpo: the loss functions against direct transcriptions, and the patched TRL DPOTrainer against TRL's own
sigmoid DPO loss, with token weights from a dataset column through TRL's column filter and collator."""
from __future__ import annotations

import math

import pytest
import torch

import hfpatch
from hfpatch.techniques.training import losses
from hfpatch.techniques.training.base import WEIGHTS_KEY

pytest.importorskip("trl")

from preference_fixtures import dpo_trainer, first_batch, preference_rows  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def _fixed(seed=0, pairs=3, length=7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * pairs, length, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2 * pairs, length, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(2 * pairs, length, dtype=torch.bool)
    for r in range(2 * pairs):  # prompt of 2 positions, completions of different lengths, right padding
        mask[r, 2:2 + 1 + (r * 3) % (length - 2)] = True
    weights = torch.rand(2 * pairs, length, generator=g, dtype=torch.float64)
    return logps, ref, mask, weights


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_sequence_loss_matches_transcription():
    logps, ref, mask, weights = _fixed()
    beta, pairs = 0.3, logps.shape[0] // 2
    got = losses.sequence_dpo_loss(logps, ref, mask, weights, beta=beta)
    for i in range(pairs):
        sums = []
        for r in (i, pairs + i):
            sums.append(sum(weights[r, t].item() * (logps[r, t].item() - ref[r, t].item())
                            for t in range(logps.shape[1]) if mask[r, t]))
        assert got[i].item() == pytest.approx(-math.log(_sig(beta * (sums[0] - sums[1]))), abs=1e-12)
    uniform = losses.sequence_dpo_loss(logps, ref, mask, None, beta=beta)
    assert torch.allclose(uniform, losses.sequence_dpo_loss(logps, ref, mask, torch.ones_like(weights), beta=beta))


def test_token_loss_matches_transcription():
    logps, ref, mask, weights = _fixed(seed=1)
    beta, pairs = 0.5, logps.shape[0] // 2
    got = losses.token_dpo_loss(logps, ref, mask, weights, beta=beta)
    for i in range(pairs):
        rows = []
        for r in (i, pairs + i):  # the completion's weighted log-ratios in order
            rows.append([weights[r, t].item() * (logps[r, t].item() - ref[r, t].item())
                         for t in range(logps.shape[1]) if mask[r, t]])
        chosen, rejected = rows
        n = max(len(chosen), len(rejected))
        terms = []
        for k in range(n):
            dw = chosen[k] if k < len(chosen) else 0.0
            dl = rejected[k] if k < len(rejected) else 0.0
            terms.append(-math.log(_sig(beta * (dw - dl))))
        assert got[i].item() == pytest.approx(sum(terms) / n, abs=1e-12)


def test_token_loss_ignores_garbage_outside_the_mask():
    logps, ref, mask, weights = _fixed(seed=2)
    dirty = logps.masked_fill(~mask, float("-inf"))
    assert torch.equal(losses.token_dpo_loss(dirty, ref, mask, weights), losses.token_dpo_loss(logps, ref, mask, weights))
    assert torch.equal(losses.sequence_dpo_loss(dirty, ref, mask), losses.sequence_dpo_loss(logps, ref, mask))


@pytest.mark.parametrize("kernel", [True, False])
def test_uniform_sequence_form_equals_trl_sigmoid_loss(tmp_path, kernel):
    # a reference that differs from the policy, so the loss is not the trivial log 2
    trainer = dpo_trainer(tmp_path, ref_model=tiny_model("llama", seed=1).eval())
    batch = first_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_grads = torch.autograd.grad(trl_loss, list(trainer.model.parameters()))
    recipe = hfpatch.Recipe([{"type": "token_dpo", "weights": "uniform", "kernel": kernel}])
    with hfpatch.patch(trainer, recipe) as handle:
        ours = trainer.compute_loss(trainer.model, batch)
        grads = torch.autograd.grad(ours, list(trainer.model.parameters()))
        stats = handle.stats["token_dpo"]
    assert abs(trl_loss.item() - math.log(2)) > 1e-3
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for got, want in zip(grads, trl_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    source = "hfpatch linear_logprob kernel" if kernel else "TRL fused LM head; not the kernel: kernel=False"
    assert stats["logprobs"].startswith(source) and stats["reference"] == "trainer.ref_model"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in stats


def _weighted_rows(rows, trainer):
    """The rows with a rejected_weights column of one float per tokenized rejected token."""
    tok = trainer.processing_class
    out = []
    for i, row in enumerate(rows):
        prompt = tok(row["prompt"])["input_ids"]
        full = tok(row["prompt"] + row["rejected"] + tok.eos_token)["input_ids"]
        n = len(full) - len(prompt)
        out.append({**row, "rejected_weights": [round(0.1 + 0.2 * ((i + k) % 5), 2) for k in range(n)]})
    return out


def test_column_weights_reach_the_loss_through_trls_collator(tmp_path):
    probe = dpo_trainer(tmp_path / "probe", rows=preference_rows(4))
    rows = _weighted_rows(preference_rows(4), probe)
    trainer = dpo_trainer(tmp_path, rows=rows, ref_model=tiny_model("llama", seed=1).eval())
    # unpatched, TRL's signature-column filter drops the column before its collator
    assert WEIGHTS_KEY not in first_batch(trainer)
    recipe = hfpatch.Recipe([{"type": "token_dpo", "weights": "column", "column": "rejected_weights"}])
    with hfpatch.patch(trainer, recipe) as handle:
        batch = first_batch(trainer)
        weights = batch[WEIGHTS_KEY]
        pairs = len(rows)
        completion = batch["completion_mask"].bool()
        # TRL's sampler shuffles: compare the sets of per-pair weight rows
        got = sorted(tuple(round(v, 4) for v in weights[pairs + i][completion[pairs + i]].tolist()) for i in range(pairs))
        want = sorted(tuple(round(v, 4) for v in row["rejected_weights"]) for row in rows)
        assert got == want
        assert torch.all(weights[:pairs][completion[:pairs]] == 1.0)
        with torch.no_grad():
            ours = trainer.compute_loss(trainer.model, batch)
            model_kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            logps = trainer.model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
            ref = trainer.ref_model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
            want_loss = losses.sequence_dpo_loss(logps, ref, completion[:, 1:], weights[:, 1:], beta=0.1).mean()
            uniform = losses.sequence_dpo_loss(logps, ref, completion[:, 1:], None, beta=0.1).mean()
        assert ours.item() == pytest.approx(want_loss.item(), abs=1e-6)
        assert abs(ours.item() - uniform.item()) > 1e-5
        assert 0.0 < handle.stats["token_dpo"]["weights/rejected_mean"] < 1.0
    assert WEIGHTS_KEY not in first_batch(trainer)


def test_column_missing_from_the_dataset_is_a_clear_error(tmp_path):
    trainer = dpo_trainer(tmp_path, rows=preference_rows(4))
    with hfpatch.patch(trainer, hfpatch.Recipe([{"type": "token_dpo", "weights": "column"}])):
        with pytest.raises(ValueError, match="rejected_weights"):
            first_batch(trainer)


def test_token_form_on_the_trainer_matches_the_function(tmp_path):
    trainer = dpo_trainer(tmp_path, ref_model=tiny_model("llama", seed=1).eval())
    batch = first_batch(trainer)
    with torch.no_grad(), hfpatch.patch(trainer, hfpatch.Recipe([{"type": "token_dpo", "form": "token", "beta": 0.5}])):
        ours = trainer.compute_loss(trainer.model, batch)
        model_kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        logps = trainer.model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
        ref = trainer.ref_model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
        want = losses.token_dpo_loss(logps, ref, batch["completion_mask"][:, 1:].bool(), beta=0.5).mean()
    assert ours.item() == pytest.approx(want.item(), abs=1e-6)


def test_critical_weights_without_adapters_are_refused_clearly(tmp_path):
    trainer = dpo_trainer(tmp_path, rows=preference_rows(4))
    with pytest.raises(hfpatch.errors.PatchError, match="critical"):
        hfpatch.patch(trainer, hfpatch.Recipe([{"type": "token_dpo", "weights": "critical"}]))
    assert "compute_loss" not in trainer.__dict__


def _contrastive_adapters(model, seed=0):
    """Two random LoRA adapters on the model's MLP projections, as `hfpatch critical-tokens` would save them."""
    from hfpatch.techniques.training import critical_tokens as ct

    targets = ct.mlp_target_modules(model)
    config = ct.AdapterConfig(r=2, alpha=4.0, target_modules=tuple(targets),
                              base_model=ct.base_model_fingerprint(model, targets))
    g = torch.Generator().manual_seed(seed)
    sides = []
    for _ in range(2):
        state = {}
        for target in targets:
            module = model.get_submodule(target)
            state[f"{target}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g)
            state[f"{target}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g)
        sides.append(ct.LoraState(state, config))
    return sides


def test_critical_weights_are_scored_in_the_loss_from_the_recipe_adapters(tmp_path):
    from hfpatch.techniques.training import critical_tokens as ct

    trainer = dpo_trainer(tmp_path / "run", rows=preference_rows(4), ref_model=tiny_model("llama", seed=1).eval())
    positive, negative = _contrastive_adapters(trainer.model)
    tensors, metadata = ct.adapters_to_tensors(positive, negative)
    recipe = hfpatch.Recipe([{"type": "token_dpo", "weights": "critical", "critical_b": 1.0}],
                            tensors={f"token_dpo/{k}": v for k, v in tensors.items()},
                            tensor_metadata={f"token_dpo/{k}": v for k, v in metadata.items()})
    recipe.save_pretrained(tmp_path / "recipe")  # the adapters travel as the recipe's payload
    batch = first_batch(trainer)
    pairs = batch["input_ids"].shape[0] // 2
    with torch.no_grad(), hfpatch.patch(trainer, str(tmp_path / "recipe")) as handle:
        ours = trainer.compute_loss(trainer.model, batch)
        s = ct.critical_token_weights(trainer.model, positive, negative, batch["input_ids"][pairs:],
                                      batch["attention_mask"][pairs:], batch["completion_mask"][pairs:].bool())
        weights = torch.ones(batch["input_ids"].shape)
        weights[pairs:] = 1.0 - s
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        logps = trainer.model(**kwargs, labels=labels, fused_lm_head=True).log_probs
        ref = trainer.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs
        mask = batch["completion_mask"][:, 1:].bool()
        want = losses.sequence_dpo_loss(logps, ref, mask, weights[:, 1:], beta=0.1).mean()
        uniform = losses.sequence_dpo_loss(logps, ref, mask, None, beta=0.1).mean()
        stats = handle.stats["token_dpo"]
    assert ours.item() == pytest.approx(want.item(), abs=1e-6)
    assert abs(ours.item() - uniform.item()) > 1e-5
    rejected = mask[pairs:]
    mean_weight = ((weights[pairs:, 1:] * rejected).sum(1) / rejected.sum(1)).mean().item()
    assert stats["weights/rejected_mean"] == pytest.approx(mean_weight, abs=1e-6)


def test_critical_adapters_of_another_base_model_are_refused(tmp_path):
    from hfpatch.techniques.training import critical_tokens as ct

    trainer = dpo_trainer(tmp_path, rows=preference_rows(4))
    positive, negative = _contrastive_adapters(tiny_model("llama", seed=7))
    tensors, metadata = ct.adapters_to_tensors(positive, negative)
    recipe = hfpatch.Recipe([{"type": "token_dpo", "weights": "critical"}],
                            tensors={f"token_dpo/{k}": v for k, v in tensors.items()},
                            tensor_metadata={f"token_dpo/{k}": v for k, v in metadata.items()})
    with pytest.raises(hfpatch.errors.PatchError):
        hfpatch.patch(trainer, recipe)
    assert "compute_loss" not in vars(trainer)


def test_a_model_that_caps_its_logits_falls_back_to_trls_head_and_says_why(tmp_path):
    from tiny_models import tiny_config

    config = tiny_config("gemma3_text")
    config.final_logit_softcapping = 3.0  # small, so capping changes the log-probs
    trainer = dpo_trainer(tmp_path, rows=preference_rows(4), model=tiny_model("gemma3_text", config=config),
                          ref_model=tiny_model("gemma3_text", seed=1, config=config).eval())
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        with hfpatch.patch(trainer, hfpatch.Recipe([{"type": "token_dpo"}])) as handle:
            ours = trainer.compute_loss(trainer.model, batch)
            stats = handle.stats["token_dpo"]
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert stats["logprobs"].startswith("TRL fused LM head; not the kernel")
    assert "final_logit_softcapping=3.0" in stats["logprobs"]


def test_a_payload_tensor_that_is_not_an_adapter_factor_is_refused():
    with pytest.raises(hfpatch.errors.RecipeError, match="contrastive adapters"):
        hfpatch.Recipe([{"type": "token_dpo", "weights": "critical"}], tensors={"token_dpo/table": torch.zeros(2, 2)})
    with pytest.raises(hfpatch.errors.RecipeError, match="dimensions"):
        hfpatch.Recipe([{"type": "token_dpo", "weights": "critical"}],
                       tensors={"token_dpo/positive/model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 2, 2)})


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_weight_collator_truncates_and_pads_weights_with_the_tokens(truncation_mode):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from hfpatch.techniques.training.base import TokenWeightCollator

    inner = DataCollatorForPreference(pad_token_id=0, max_length=6, truncation_mode=truncation_mode)
    collator = TokenWeightCollator(inner, rejected_column="rw", chosen_column="cw", truncation_mode=truncation_mode)
    examples = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, 10, 11, 12, 13, 14, 15], "cw": [0.5, 0.25],
         "rw": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]},
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8], "rejected_ids": [9, 10], "cw": [2.0], "rw": [0.7, 0.8]},
    ]
    batch = collator(examples)
    weights, mask = batch[WEIGHTS_KEY], batch["completion_mask"].bool()
    assert weights.shape == batch["input_ids"].shape
    assert weights[0][mask[0]].tolist() == [0.5, 0.25] and weights[1][mask[1]].tolist() == [2.0]
    # the first rejected sequence (2 + 7 tokens) is cut to 6: keep_start keeps the prompt and the first 4
    # completion tokens, keep_end the last 6 completion tokens
    kept = [0.1, 0.2, 0.3, 0.4] if truncation_mode == "keep_start" else [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert weights[2][mask[2]].tolist() == pytest.approx(kept)
    assert weights[3][mask[3]].tolist() == pytest.approx([0.7, 0.8])
    assert torch.all(weights[~mask] == 1.0)
    assert "rw" in examples[0]  # the caller's examples are not changed
    with pytest.raises(ValueError, match="3 values in 'rw' but 2 tokens in 'rejected_ids'"):
        collator([dict(examples[1], rw=[0.1, 0.2, 0.3])])
