"""`tdpo`: Token-level Direct Preference Optimization (TDPO1 / TDPO2) inside a user's trainer.

TDPO adds to DPO's margin ``D^w - D^l`` (summed log-ratios) the sequential KL divergence between the reference
and the policy, ``KL_y = sum_t KL(pi_ref(.|s_t) || pi(.|s_t))`` over each completion, computed from both full
next-token distributions:

- TDPO1: ``-log s(beta * ((D^w - D^l) + KL^w - KL^l))``
- TDPO2: ``-log s(beta * ((D^w - D^l) + alpha * (sg(KL^w) - KL^l)))`` (the paper's default; ``sg`` = no gradient)

The KL needs both full distributions: with ``kernel=True`` hfpatch's fused linear log-prob kernel computes the
log-probs and the KL per position in one pass over vocabulary tiles (from the final hidden states and lm_head);
otherwise the ordinary forward builds the logits ``[2B, T, V]`` of policy and reference. Metrics: TRL's
rewards/margins plus ``kl/chosen`` and ``kl/rejected`` (sequential KL per completion).

Example:
    >>> handle = hfpatch.patch(trainer, hfpatch.Recipe([{"type": "tdpo"}]))   # TDPO2, alpha 0.5, beta 0.1
    >>> trainer.train()
"""
from __future__ import annotations

import dataclasses

from ...catalogue import register
from ...technique import param
from . import losses
from .base import TrainerTechnique


@dataclasses.dataclass
class TDPOParams:
    variant: str = param("tdpo2", help="tdpo1: margin + KL^w - KL^l; tdpo2: margin + alpha (sg(KL^w) - KL^l)",
                         choices=("tdpo1", "tdpo2"))
    alpha: float = param(0.5, help="TDPO2's weight of the sequential-KL term (ignored by tdpo1)", ge=0.0, le=100.0)
    beta: float = param(0.1, help="DPO temperature beta", gt=0.0, le=100.0)
    kernel: bool = param(True, help="log-probs and the per-position KL from hfpatch's fused linear log-prob kernel in "
                         "one tiled pass (no [tokens, vocab] logits); False, or a model it cannot serve (stats say "
                         "why): the full logits of policy and reference")


@register
class TDPO(TrainerTechnique):
    """TDPO1/TDPO2 as a trainer's loss; see the module docstring."""

    name = "tdpo"
    summary = "token-level DPO with the sequential KL to the reference (TDPO1/TDPO2) inside a Trainer"
    Params = TDPOParams

    def apply(self, trainer, ctx) -> None:
        super().apply(trainer, ctx)
        self._info["variant"] = self.params.variant

    def loss(self, trainer, model, batch):
        logps, ref_logps, seq_kl = self.token_values(trainer, model, batch, kl=True)
        mask = batch.mask
        per_pair = losses.tdpo_loss(logps, ref_logps, mask, seq_kl, beta=self.params.beta, alpha=self.params.alpha,
                                    variant=self.params.variant)
        chosen, rejected = losses.sequence_logratios(logps, ref_logps, mask)
        metrics = self.reward_metrics(self.params.beta, chosen, rejected, logps, mask)
        kl_chosen, kl_rejected = seq_kl.detach().chunk(2)
        metrics["kl/chosen"] = kl_chosen
        metrics["kl/rejected"] = kl_rejected
        return per_pair.mean(), metrics


__all__ = ["TDPO", "TDPOParams"]
