"""Training techniques patch a Trainer instance: refusals, unpatch, a second trainer, a plain transformers
Trainer, PEFT references, and a short real training run."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import hfpatch
from hfpatch.errors import UnsupportedModelError
from hfpatch.techniques.training import losses

pytest.importorskip("trl")

from preference_fixtures import dpo_trainer, first_batch, preference_rows, tokenizer  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

TOKEN_DPO = hfpatch.Recipe([{"type": "token_dpo"}])


def _lora(model):
    from peft import LoraConfig, get_peft_model

    # random (not zero) LoRA B, so the policy differs from its adapter-disabled reference from the start
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    return get_peft_model(model, config)


def test_patching_a_model_says_a_trainer_is_needed():
    model = tiny_model("llama")
    before = dict(vars(model))
    with pytest.raises(UnsupportedModelError, match=r"needs a transformers Trainer.*hfpatch.patch\(trainer"):
        hfpatch.patch(model, TOKEN_DPO)
    assert vars(model).keys() == before.keys() and not hfpatch.active_patches(model)


def test_patching_a_trainer_with_a_model_technique_is_refused(tmp_path):
    trainer = dpo_trainer(tmp_path, rows=preference_rows(4))
    with pytest.raises(UnsupportedModelError, match=r"patches a model, not a trainer.*trainer\.model"):
        hfpatch.patch(trainer, "token-recycling")
    assert "compute_loss" not in vars(trainer)


def test_unpatch_restores_the_trainer_and_a_second_trainer_is_untouched(tmp_path):
    rows = [{**row, "w": [0.5] * 12} for row in preference_rows(4)]
    first = dpo_trainer(tmp_path / "a", rows=rows, ref_model=tiny_model("llama", seed=1).eval())
    second = dpo_trainer(tmp_path / "b", rows=rows, ref_model=tiny_model("llama", seed=1).eval())
    batch = first_batch(first)
    collator = first.data_collator
    with torch.no_grad():
        own = first.compute_loss(first.model, batch)
        second_own = second.compute_loss(second.model, batch)
    handle = hfpatch.patch(first, hfpatch.Recipe([{"type": "token_dpo", "form": "token", "weights": "column",
                                                    "column": "w"}]))
    assert hfpatch.active_patches(first) == [handle]
    assert {"compute_loss", "log"} <= set(vars(first)) and first.data_collator is not collator
    assert not {"compute_loss", "log"} & set(vars(second))
    assert type(second.data_collator) is type(collator)
    with torch.no_grad():
        patched = first.compute_loss(first.model, dict(batch, hfpatch_token_weights=torch.ones_like(batch["input_ids"],
                                                                                                   dtype=torch.float)))
        assert second.compute_loss(second.model, batch).item() == second_own.item()
    assert abs(patched.item() - own.item()) > 1e-6  # the token form is not TRL's sequence loss
    handle.unpatch()
    assert not hfpatch.active_patches(first)
    assert not {"compute_loss", "log", "prediction_step", "_set_signature_columns_if_needed"} & set(vars(first))
    assert first.data_collator is collator
    assert "w" not in (first._signature_columns or [])
    with torch.no_grad():
        assert first.compute_loss(first.model, batch).item() == own.item()


def _margin(trainer, batch):
    """Mean (chosen - rejected) log-ratio of the batch, policy vs the trainer's reference."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logps = trainer.model(**kwargs, labels=labels, fused_lm_head=True).log_probs
        ref = trainer.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs
    chosen, rejected = losses.sequence_logratios(logps, ref, batch["completion_mask"][:, 1:].bool())
    return (chosen - rejected).mean().item()


@pytest.mark.parametrize("recipe", [{"type": "token_dpo", "form": "token"}, {"type": "tdpo"}])
def test_a_short_training_run_moves_the_margin(tmp_path, recipe):
    trainer = dpo_trainer(tmp_path, rows=preference_rows(4), max_steps=6, learning_rate=3e-2)
    batch = first_batch(trainer)
    before = _margin(trainer, batch)
    with hfpatch.patch(trainer, hfpatch.Recipe([recipe])) as handle:
        trainer.train()
        stats = handle.stats[recipe["type"]]
    after = _margin(trainer, batch)
    assert after > before + 0.5, (before, after)
    assert stats["steps"] == 6
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert len(logged) == 6 and logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]


def test_trl_trainer_with_peft_uses_trls_reference_adapter(tmp_path):
    trainer = dpo_trainer(tmp_path, model=_lora(tiny_model("llama")), ref_model=None)
    assert trainer.ref_model is None
    # TRL copies an adapter it is given to train again as the reference adapter "ref": move the trained one away
    assert "ref" in trainer.model.peft_config
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B.default" in name:
                parameter.add_(0.5)
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        with hfpatch.patch(trainer, TOKEN_DPO) as handle:
            ours = trainer.compute_loss(trainer.model, batch)
            assert "'ref'" in handle.stats["token_dpo"]["reference"]
    assert abs(trl_loss.item() - math.log(2)) > 1e-4
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)


def test_precomputed_reference_sums_without_a_reference_model_are_refused(tmp_path):
    trainer = dpo_trainer(tmp_path, rows=preference_rows(4), ref_model=None, precompute_ref_log_probs=True)
    assert trainer.ref_model is None
    with pytest.raises(UnsupportedModelError, match="precompute_ref_log_probs"):
        hfpatch.patch(trainer, TOKEN_DPO)


def test_trl_loss_settings_the_replaced_loss_does_not_follow_are_reported(tmp_path):
    trainer = dpo_trainer(tmp_path, rows=preference_rows(4), beta=0.5, loss_type=["ipo"])
    with pytest.warns(UserWarning, match="loss_type"):
        handle = hfpatch.patch(trainer, TOKEN_DPO)
    ignored = handle.stats["token_dpo"]["ignored_trl_settings"]
    assert ignored["loss_type"] == ["ipo"] and "token_dpo.beta = 0.1" in ignored["beta"]
    handle.unpatch()


def _plain_trainer(tmp_path, model, rows=None):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = tokenizer()
    data = []
    for row in rows or preference_rows(4):
        prompt = tok(row["prompt"])["input_ids"]
        data.append({"prompt_ids": prompt, "chosen_ids": tok(row["chosen"])["input_ids"] + [2],
                     "rejected_ids": tok(row["rejected"])["input_ids"] + [2]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(data),
                   data_collator=DataCollatorForPreference(pad_token_id=0))


def test_plain_trainer_with_peft(tmp_path):
    trainer = _plain_trainer(tmp_path, _lora(tiny_model("llama")))
    with hfpatch.patch(trainer, TOKEN_DPO) as handle:
        batch = first_batch(trainer)  # the preference columns survived the trainer's column filter
        assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
        with torch.no_grad():
            ours = trainer.compute_loss(trainer.model, batch)
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logps = torch.log_softmax(trainer.model(**kwargs).logits[:, :-1], -1)
            with trainer.model.disable_adapter():
                ref = torch.log_softmax(trainer.model(**kwargs).logits[:, :-1], -1)
            tokens = batch["input_ids"][:, 1:].unsqueeze(-1)
            want = losses.sequence_dpo_loss(logps.gather(-1, tokens).squeeze(-1), ref.gather(-1, tokens).squeeze(-1),
                                            batch["completion_mask"][:, 1:].bool()).mean()
        assert ours.item() == pytest.approx(want.item(), abs=1e-6)
        trainer.train()
        assert handle.stats["token_dpo"]["steps"] >= 2
        assert any("rewards/margins" in entry for entry in trainer.state.log_history)
        assert trainer.evaluate(trainer.train_dataset)["eval_loss"] > 0
    assert not {"compute_loss", "prediction_step", "log"} & set(vars(trainer))


def test_plain_trainer_without_a_reference_is_refused(tmp_path):
    trainer = _plain_trainer(tmp_path, tiny_model("llama"))
    with pytest.raises(UnsupportedModelError, match="ref_model"):
        hfpatch.patch(trainer, TOKEN_DPO)
    trainer.ref_model = copy.deepcopy(trainer.model).eval()
    with hfpatch.patch(trainer, TOKEN_DPO) as handle:
        trainer.train()
        assert handle.stats["token_dpo"]["reference"] == "trainer.ref_model"


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): the same loss, metrics and update as one process."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent / "ddp_token_dpo.py")
    with socket.socket() as s:  # a free port for the rendezvous (several test runs may share the machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(port), script, str(tmp_path / "two.pt")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (a["world"], b["world"]) == (1, 2)
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert b["margins"] == pytest.approx(a["margins"], abs=1e-6)
    assert b["weights"] == pytest.approx(a["weights"], abs=1e-6)
    for name, value in a["state"].items():
        torch.testing.assert_close(b["state"][name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["cdpo", "tdpo"])
def test_builtin_training_recipes_patch_a_trainer_and_come_off(tmp_path, name):
    rows = [{**row, "rejected_weights": [0.5] * 12} for row in preference_rows(4)]
    trainer = dpo_trainer(tmp_path, rows=rows, ref_model=tiny_model("llama", seed=1).eval())
    batch = first_batch(trainer)
    with torch.no_grad():
        own = trainer.compute_loss(trainer.model, batch).item()
    handle = hfpatch.patch(trainer, name)
    assert [t.name for t in handle.techniques] == [{"cdpo": "token_dpo", "tdpo": "tdpo"}[name]]
    assert "compute_loss" in vars(trainer)
    handle.unpatch()
    assert "compute_loss" not in vars(trainer)
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == own
