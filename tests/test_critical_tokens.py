"""cDPO's critical-token estimator (hfpatch/techniques/training/critical_tokens.py) on tiny models.

The weights are checked against a direct computation through peft's own LoRA layers, so the forward hooks the
estimator uses are held to peft's arithmetic; the model must come back exactly as it was after training and
after scoring; the recipe payload round-trips and a damaged one is refused with a message naming the problem.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_model, word_level_tokenizer

from hfpatch.techniques.training import critical_tokens as ct

WORDS = "= + 0 1 2 3 4 5 6 7 8 9"


@pytest.fixture
def tok():
    return word_level_tokenizer(128, WORDS)


def _fixed_adapters(model, seed: int = 0, r: int = 4, alpha: float = 8.0):
    """Two random (non-zero B) adapters on the MLP projections, as if trained."""
    targets = ct.mlp_target_modules(model)
    config = ct.AdapterConfig(r=r, alpha=alpha, target_modules=tuple(targets),
                              base_model=ct.base_model_fingerprint(model, targets))
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    states = []
    for _ in range(2):
        tensors = {}
        for path in targets:
            fan_in, fan_out = ct._projection_shape(modules[path])
            tensors[f"{path}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.3
            tensors[f"{path}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.3
        states.append(ct.LoraState(tensors, config))
    return states


def _peft_copy(model, adapter: ct.LoraState):
    """A deep copy of ``model`` with ``adapter`` loaded into peft's own LoRA layers."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=adapter.config.r, lora_alpha=adapter.config.alpha,
                        target_modules=list(adapter.config.target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    result = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in adapter.items()})
    assert not result.unexpected_keys
    return peft_model.eval()


def _direct(model, pos, neg, ids, b):
    """s_t from the formula, with each adapter applied by peft."""
    with torch.no_grad():
        lp_pos = torch.log_softmax(_peft_copy(model, pos)(input_ids=ids).logits.double(), -1)
        lp_neg = torch.log_softmax(_peft_copy(model, neg)(input_ids=ids).logits.double(), -1)
    s = torch.softmax((1 + b) * lp_pos - b * lp_neg, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1, dtype=s.dtype), s], dim=1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("b", [1.0, 0.5])
def test_weights_equal_direct_computation_through_peft(kind, b):
    model = tiny_model(kind)
    pos, neg = _fixed_adapters(model)
    ids = torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.zeros_like(ids, dtype=torch.bool)
    labels[:, 4:] = True
    s = ct.critical_token_weights(model, pos, neg, ids, torch.ones_like(ids), labels, b=b)
    expected = _direct(model, pos, neg, ids, b) * labels
    assert s.dtype == torch.float32 and s.shape == ids.shape
    torch.testing.assert_close(s.double(), expected, atol=1e-5, rtol=1e-4)
    assert (s[:, :4] == 0).all() and (s >= 0).all() and (s <= 1).all()
    # the adapters matter: s is not what the base model alone would give (both adapters the same)
    assert not torch.allclose(s, ct.critical_token_weights(model, pos, pos, ids, torch.ones_like(ids), labels, b=b))


def test_padding_does_not_change_weights():
    model = tiny_model("llama")
    pos, neg = _fixed_adapters(model)
    ids = torch.randint(4, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    labels = torch.zeros_like(ids, dtype=torch.bool)
    labels[:, 3:] = True
    alone = ct.critical_token_weights(model, pos, neg, ids, torch.ones_like(ids), labels)
    # left padding by 3 and right padding by 2, in one batch with a second row
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    batch = torch.cat([left, right])
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1), torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1)]).long()
    lab = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.bool), labels], 1),
                     torch.cat([labels, torch.zeros(1, 3, dtype=torch.bool)], 1)])
    s = ct.critical_token_weights(model, pos, neg, batch, mask, lab)
    torch.testing.assert_close(s[0, 3:], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s[1, :7], alone[0], atol=1e-5, rtol=1e-4)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, m.training) for n, m in model.named_modules()],
            [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            {n: type(m) for n, m in model.named_modules()})


def _assert_same(model, snap):
    state, flags, training, hooks, types = _snapshot(model)
    assert list(state) == list(snap[0]) and all(torch.equal(state[k], snap[0][k]) for k in state)
    assert flags == snap[1] and training == snap[2] and hooks == snap[3] and types == snap[4]


def test_scoring_leaves_a_plain_model_as_it_was():
    model = tiny_model("llama").train()  # inside a trainer the model is in train mode
    model.model.layers[1].eval()  # a part kept in eval on purpose stays so
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    pos, neg = _fixed_adapters(model)
    ids = torch.randint(4, 128, (2, 6))
    before = _snapshot(model)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    model.train()
    model.model.layers[1].eval()
    ct.critical_token_weights(model, pos, neg, ids, torch.ones_like(ids), torch.ones_like(ids))
    _assert_same(model, before)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, logits)


def test_scoring_a_peft_model_uses_its_base_and_restores_its_adapter():
    from peft import LoraConfig, get_peft_model

    plain = tiny_model("llama")
    pos, neg = _fixed_adapters(plain)
    ids = torch.randint(4, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    mask, labels = torch.ones_like(ids), torch.ones_like(ids)
    expected = ct.critical_token_weights(plain, pos, neg, ids, mask, labels)
    # the user's policy: a PEFT model whose own adapter (non-zero) is being trained
    policy = get_peft_model(copy.deepcopy(plain), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj", "q_proj"],
                                                             init_lora_weights=False))
    policy.train()
    with torch.no_grad():
        policy_logits = policy.eval()(input_ids=ids).logits
    policy.train()
    before = _snapshot(policy)
    s = ct.critical_token_weights(policy, pos, neg, ids, mask, labels)
    torch.testing.assert_close(s, expected, atol=1e-5, rtol=1e-4)  # scored on the base, user adapter off
    _assert_same(policy, before)
    assert policy.active_adapter == "default"
    with torch.no_grad():
        assert torch.equal(policy.eval()(input_ids=ids).logits, policy_logits)


def test_training_restores_the_model_and_separates_right_from_wrong(tok):
    model = tiny_model("llama")
    with torch.no_grad():  # a random tiny head cannot be confident (logits ~0.1); scale it so LoRA can learn
        model.lm_head.weight.mul_(50)
    model.lm_head.weight.requires_grad_(False)
    model.model.layers[0].mlp.train()  # mixed modes come back as they were
    before = _snapshot(model)
    correct = [(f"{a} + {b} =", f" {a + b}") for a in range(4) for b in range(4) if a + b < 10]
    wrong = [(p, f" {(int(p[0]) + int(p[4]) + 3) % 10}") for p, _ in correct]
    pos, neg = ct.train_contrastive_adapters(model, tok, correct, wrong, r=4, alpha=8, lr=2e-2, epochs=4,
                                             batch_size=4, progress=False)
    _assert_same(model, before)
    assert not hasattr(model, "peft_config")
    assert pos.config == neg.config and pos.config.r == 4 and len(pos) == 2 * len(pos.config.target_modules)
    assert pos.config.target_modules == tuple(ct.mlp_target_modules(model))
    assert any(not torch.equal(pos[k], neg[k]) for k in pos)
    # the answer digit of a wrong completion is critical (high 1 - s); of a correct one, it is not
    rows = ct.score_dataset(model, tok, pos, neg,
                            [{"prompt": p, "rejected": a} for p, a in correct + wrong], progress=False)
    first = torch.tensor([r["rejected_weights"][0] for r in rows])
    assert first[len(correct):].mean() > first[: len(correct)].mean() + 0.1


def test_training_refuses_bad_input(tok):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    with pytest.raises(ct.CriticalTokensError, match="no wrong answers"):
        ct.train_contrastive_adapters(model, tok, [("1 =", " 1")], [], progress=False)
    with pytest.raises(ct.CriticalTokensError, match="matches no Linear"):
        ct.train_contrastive_adapters(model, tok, [("1 =", " 1")], [("1 =", " 2")], target_modules=["nope"],
                                      progress=False)
    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["up_proj"]))
    with pytest.raises(ct.CriticalTokensError, match="plain base model"):
        ct.train_contrastive_adapters(wrapped, tok, [("1 =", " 1")], [("1 =", " 2")], progress=False)


def test_score_dataset_aligns_one_weight_per_rejected_token(tok):
    model = tiny_model("llama")
    pos, neg = _fixed_adapters(model)
    rows = [{"prompt": "1 + 2 =", "chosen": " 3", "rejected": " 4 5 6", "id": 0},
            {"prompt": "7 =", "chosen": " 7", "rejected": " 8", "id": 1}]
    out = ct.score_dataset(model, tok, pos, neg, rows, batch_size=2, progress=False)
    assert [r["id"] for r in out] == [0, 1] and "rejected_weights" not in rows[0]
    for row in out:
        prompt_ids, completion_ids = ct.encode_completion(tok, row["prompt"], row["rejected"])
        assert completion_ids[-1] == tok.eos_token_id  # EOS appended, as TRL does
        ids = torch.tensor([prompt_ids + completion_ids])
        labels = torch.zeros_like(ids)
        labels[:, len(prompt_ids):] = 1
        s = ct.critical_token_weights(model, pos, neg, ids, torch.ones_like(ids), labels)
        assert row["rejected_weights"] == pytest.approx((1 - s[0, len(prompt_ids):]).tolist(), abs=1e-5)
    with pytest.raises(ct.CriticalTokensError, match="no 'rejected' column"):
        ct.score_dataset(model, tok, pos, neg, [{"prompt": "1"}], progress=False)
    with pytest.raises(ct.CriticalTokensError, match="already has"):
        ct.score_dataset(model, tok, pos, neg, out, progress=False)


def test_encode_completion_matches_trl_tokenisation(tok):
    """TRL 1.16 appends EOS and splits prompt + completion at the common prefix with the prompt alone."""
    prompt_ids, completion_ids = ct.encode_completion(tok, "1 + 2 =", " 3")
    assert prompt_ids == tok("1 + 2 =")["input_ids"]
    assert prompt_ids + completion_ids == tok("1 + 2 = 3</s>")["input_ids"]
    assert ct.encode_completion(tok, "1 =", " 3</s>")[1] == completion_ids  # an EOS already there is kept once
    with pytest.raises(ct.CriticalTokensError, match="plain-text"):
        ct.encode_completion(tok, [{"role": "user", "content": "hi"}], "x")


def test_payload_round_trip_through_a_safetensors_file(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    pos, neg = _fixed_adapters(model)
    tensors, metadata = ct.adapters_to_tensors(pos, neg)
    assert set(metadata) == {"critical_tokens_format", "r", "alpha", "target_modules", "base_model"}
    assert all(k.startswith(("positive/", "negative/")) for k in tensors) and len(tensors) == 2 * len(pos)
    save_file(tensors, tmp_path / "payload.safetensors", metadata=metadata)
    from safetensors import safe_open

    with safe_open(tmp_path / "payload.safetensors", "pt") as f:
        loaded_meta = f.metadata()
    pos2, neg2 = ct.adapters_from_tensors(load_file(tmp_path / "payload.safetensors"), loaded_meta)
    assert pos2.config == pos.config and set(pos2) == set(pos)
    assert all(torch.equal(pos2[k], pos[k]) and torch.equal(neg2[k], neg[k]) for k in pos)
    ids = torch.randint(4, 128, (1, 6))
    assert torch.equal(ct.critical_token_weights(model, pos, neg, ids, torch.ones_like(ids), torch.ones_like(ids)),
                       ct.critical_token_weights(model, pos2, neg2, ids, torch.ones_like(ids), torch.ones_like(ids)))


def _damage(kind, tensors, metadata):
    tensors, metadata = dict(tensors), dict(metadata)
    first = next(iter(tensors))
    if kind == "metadata":
        del metadata["r"]
    elif kind == "format":
        metadata["critical_tokens_format"] = "99"
    elif kind == "json":
        metadata["target_modules"] = "[not json"
    elif kind == "missing":
        del tensors[first]
    elif kind == "extra":
        tensors["positive/evil.lora_A.weight"] = torch.zeros(4, 4)
    elif kind == "rank":
        tensors[first] = torch.zeros(3, tensors[first].shape[1])
    elif kind == "nan":
        tensors[first] = tensors[first].clone().fill_(float("nan"))
    elif kind == "dtype":
        tensors[first] = tensors[first].long()
    elif kind == "alpha":
        metadata["alpha"] = "-1"
    return tensors, metadata


@pytest.mark.parametrize("kind, message", [
    ("metadata", "metadata lacks"), ("format", "format '99'"), ("json", "not a JSON list"),
    ("missing", "missing tensors"), ("extra", "unexpected tensors"), ("rank", "rank r=4"),
    ("nan", "NaN"), ("dtype", "2-D float"), ("alpha", "alpha > 0"),
])
def test_damaged_payload_is_refused(kind, message):
    model = tiny_model("llama")
    tensors, metadata = ct.adapters_to_tensors(*_fixed_adapters(model))
    with pytest.raises(ct.CriticalTokensError, match=message):
        ct.adapters_from_tensors(*_damage(kind, tensors, metadata))


def test_base_model_check_accepts_a_dtype_copy_and_refuses_other_weights():
    model = tiny_model("llama")
    pos, _ = _fixed_adapters(model)
    ct.check_base_model(pos, model)
    ct.check_base_model(pos, copy.deepcopy(model).to(torch.bfloat16))  # same weights, another dtype
    with pytest.raises(ct.CriticalTokensError, match="other weights"):
        ct.check_base_model(pos, tiny_model("llama", seed=1))
    with pytest.raises(ct.CriticalTokensError, match="model_type|another architecture"):
        ct.check_base_model(pos, tiny_model("qwen2"))
    assert json.loads(ct.adapters_to_tensors(pos, pos)[1]["base_model"])["model_type"] == "llama"


def test_scoring_refuses_mismatched_inputs():
    model = tiny_model("llama")
    pos, neg = _fixed_adapters(model)
    ids = torch.randint(4, 128, (1, 5))
    with pytest.raises(ct.CriticalTokensError, match="bare state dict"):
        ct.critical_token_weights(model, dict(pos), neg, ids, torch.ones_like(ids), torch.ones_like(ids))
    with pytest.raises(ct.CriticalTokensError, match=r"\[batch, tokens\]"):
        ct.critical_token_weights(model, pos, neg, ids, torch.ones(1, 4), torch.ones_like(ids))
    other = tiny_model("gpt2")
    with pytest.raises(ct.CriticalTokensError, match="another architecture"):
        ct.critical_token_weights(other, pos, neg, ids, torch.ones_like(ids), torch.ones_like(ids))
