"""tdpo: TDPO1/TDPO2 against a direct transcription of the formulas on fixed tensors, and on TRL's DPOTrainer."""
from __future__ import annotations

import math

import pytest
import torch

import hfpatch
from hfpatch.techniques.training import losses

pytest.importorskip("trl")

from preference_fixtures import dpo_trainer, first_batch  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def _fixed(seed=0, pairs=3, length=6, vocab=5):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(2 * pairs, length, vocab, generator=g, dtype=torch.float64), -1)
    ref_logprobs = torch.log_softmax(torch.randn(2 * pairs, length, vocab, generator=g, dtype=torch.float64), -1)
    tokens = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    mask = torch.zeros(2 * pairs, length, dtype=torch.bool)
    for r in range(2 * pairs):
        mask[r, 1:1 + 1 + (r * 2) % (length - 1)] = True
    return logprobs, ref_logprobs, tokens, mask


def _transcribed(logprobs, ref_logprobs, tokens, mask, beta, alpha, variant):
    """TDPO written out: per pair, the summed log-ratios and the sequential KL term by term."""
    pairs = logprobs.shape[0] // 2
    out = []
    for i in range(pairs):
        d, kl = [], []
        for r in (i, pairs + i):
            d_r, kl_r = 0.0, 0.0
            for t in range(logprobs.shape[1]):
                if not mask[r, t]:
                    continue
                y = tokens[r, t].item()
                d_r += logprobs[r, t, y].item() - ref_logprobs[r, t, y].item()
                kl_r += sum(math.exp(ref_logprobs[r, t, v].item()) * (ref_logprobs[r, t, v].item() - logprobs[r, t, v].item())
                            for v in range(logprobs.shape[2]))
            d.append(d_r)
            kl.append(kl_r)
        if variant == "tdpo1":
            z = (d[0] - d[1]) + (kl[0] - kl[1])
        else:
            z = (d[0] - d[1]) + alpha * (kl[0] - kl[1])
        out.append(-math.log(1.0 / (1.0 + math.exp(-beta * z))))
    return out


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_matches_transcription(variant):
    logprobs, ref_logprobs, tokens, mask = _fixed()
    logps = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref_logps = ref_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    seq_kl = losses.sequential_kl(ref_logprobs, logprobs, mask)
    got = losses.tdpo_loss(logps, ref_logps, mask, seq_kl, beta=0.2, alpha=0.7, variant=variant)
    want = _transcribed(logprobs, ref_logprobs, tokens, mask, 0.2, 0.7, variant)
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    logprobs, ref_logprobs, tokens, mask = _fixed(seed=1)
    logps = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref_logps = ref_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for variant, chosen_has_grad in (("tdpo2", False), ("tdpo1", True)):
        seq_kl = losses.sequential_kl(ref_logprobs, logprobs, mask).requires_grad_(True)
        losses.tdpo_loss(logps, ref_logps, mask, seq_kl, variant=variant).sum().backward()
        chosen, rejected = seq_kl.grad.chunk(2)
        assert bool(chosen.abs().sum() > 0) is chosen_has_grad
        assert rejected.abs().sum() > 0


@pytest.mark.parametrize("kernel", [True, False])
def test_tdpo_on_the_dpo_trainer_matches_the_function(tmp_path, kernel):
    trainer = dpo_trainer(tmp_path, ref_model=tiny_model("llama", seed=1).eval())
    batch = first_batch(trainer)
    recipe = hfpatch.Recipe([{"type": "tdpo", "variant": "tdpo1", "beta": 0.3, "kernel": kernel}])
    with torch.no_grad(), hfpatch.patch(trainer, recipe) as h:
        ours = trainer.compute_loss(trainer.model, batch)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logprobs = torch.log_softmax(trainer.model(**kwargs).logits[:, :-1].float(), -1)
        ref_logprobs = torch.log_softmax(trainer.ref_model(**kwargs).logits[:, :-1].float(), -1)
        stats = h.stats["tdpo"]
    tokens = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    want = _transcribed(logprobs.double(), ref_logprobs.double(), tokens, mask, 0.3, 0.0, "tdpo1")
    assert ours.item() == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert stats["kl/chosen"] > 0 and stats["kl/rejected"] > 0 and "rewards/margins" in stats
    assert stats["logprobs"].startswith("hfpatch linear_logprob kernel" if kernel else "full logits")


def test_tdpo_kernel_and_full_logits_give_the_same_gradients(tmp_path):
    trainer = dpo_trainer(tmp_path, ref_model=tiny_model("llama", seed=1).eval())
    batch = first_batch(trainer)
    grads = {}
    for kernel in (True, False):
        with hfpatch.patch(trainer, hfpatch.Recipe([{"type": "tdpo", "kernel": kernel}])):
            loss = trainer.compute_loss(trainer.model, batch)
            grads[kernel] = (loss.item(), torch.autograd.grad(loss, list(trainer.model.parameters())))
    assert grads[True][0] == pytest.approx(grads[False][0], abs=1e-6)
    for got, want in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_tdpo2_with_alpha_zero_is_trls_sigmoid_dpo(tmp_path):
    trainer = dpo_trainer(tmp_path, ref_model=tiny_model("llama", seed=1).eval())
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        with hfpatch.patch(trainer, hfpatch.Recipe([{"type": "tdpo", "alpha": 0.0}])):
            ours = trainer.compute_loss(trainer.model, batch)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
