"""`token_dpo`: token-weighted DPO inside a user's trainer (cDPO, "Critical Tokens Matter").

Each completion token's log-ratio ``Delta_t = log pi(y_t) - log pi_ref(y_t)`` is weighted before the DPO
sigmoid: chosen tokens by 1 (or a chosen weight column), rejected tokens by how critical each is to the wrong
answer. Weights come from

- ``uniform``: all 1. With ``form="sequence"`` this is exactly TRL's sigmoid DPO loss.
- ``column``: a dataset column (``column``, default ``rejected_weights``) holding one float per token of the
  tokenized rejected completion (``len(rejected_ids)`` values), e.g. written by ``hfpatch critical-tokens``
  as ``1 - s_t``; ``chosen_column`` optionally does the same for chosen tokens. The trainer's column filter
  and collator are wrapped so the column reaches the loss, padded and truncated with the tokens.
- ``critical``: scored on the fly inside the loss from the recipe's two contrastive LoRA adapters
  (``s_t = softmax((1 + b) log p_pos - b log p_neg)[y_t]``, rejected weight ``1 - s_t``), see
  `hfpatch.techniques.training.critical_tokens`.

``form="sequence"`` (the paper's) weights the summed log-ratios; ``form="token"`` (the released code's) applies
the sigmoid per aligned completion position and averages (see `losses`).

Example:
    >>> trainer = trl.DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=pairs, processing_class=tok)
    >>> recipe = hfpatch.Recipe([{"type": "token_dpo", "weights": "column", "column": "rejected_weights"}])
    >>> handle = hfpatch.patch(trainer, recipe)          # weights from the "rejected_weights" column
    >>> trainer.train()
    >>> handle.stats["token_dpo"]["rewards/margins"]
    >>> handle.unpatch()                                 # the trainer's own DPO loss again
"""
from __future__ import annotations

import dataclasses
import re

import torch

from ... import compat
from ...catalogue import register
from ...errors import RecipeError
from ...technique import TensorSpec, param
from . import losses
from .base import TokenWeightCollator, TrainerTechnique

WEIGHT_SOURCES = ("critical", "column", "uniform")
#: The payload of weights='critical': the two contrastive LoRA adapters as `critical_tokens.adapters_to_tensors`
#: writes them ("positive/<module path>.lora_A.weight" [r, in], "...lora_B.weight" [out, r], and "negative/...").
ADAPTER_TENSOR = re.compile(r"^(positive|negative)/[A-Za-z0-9_.]+\.lora_[AB]\.weight$")
ADAPTER_SPEC = TensorSpec(dtypes=("float16", "bfloat16", "float32"), ndim=2, max_shape=(1 << 18, 1 << 18),
                          help="a LoRA factor of the contrastive adapters")
FORMS = ("sequence", "token")


@dataclasses.dataclass
class TokenDPOParams:
    weights: str = param("uniform", help="where token weights come from: critical (scored in the loss from the "
                         "recipe's two contrastive adapters), column (a dataset column), uniform (all 1 = DPO)",
                         choices=WEIGHT_SOURCES)
    form: str = param("sequence", help="sequence: weighted sums of log-ratios, then the sigmoid (the cDPO paper); "
                      "token: the sigmoid per aligned completion position, averaged (the released cDPO code)",
                      choices=FORMS)
    beta: float = param(0.1, help="DPO temperature beta", gt=0.0, le=100.0)
    column: str = param("rejected_weights", help="weights='column': the dataset column with one weight per token "
                        "of the tokenized rejected completion", max_length=256)
    chosen_column: str | None = param(None, help="weights='column': an optional column of chosen-token weights "
                                      "(default: every chosen token weighs 1)", max_length=256)
    kernel: bool = param(True, help="per-token log-probs from hfpatch's fused linear log-prob kernel (hidden states x "
                         "lm_head in vocabulary tiles, no [tokens, vocab] logits; float32 logits even under bf16 "
                         "autocast, where TRL's head rounds to bf16); False, or a model it cannot serve (stats say "
                         "why): TRL's fused head on a DPOTrainer, else the full logits")
    critical_b: float = param(1.0, help="weights='critical': b in s_t = softmax((1+b) log p_pos - b log p_neg)[y_t]",
                              ge=0.0, le=100.0)


@register
class TokenDPO(TrainerTechnique):
    """Token-weighted DPO (cDPO) as a trainer's loss; see the module docstring."""

    name = "token_dpo"
    summary = "token-weighted DPO (cDPO critical tokens, a weight column, or uniform = DPO) inside a Trainer"
    Params = TokenDPOParams

    @classmethod
    def check_tensor(cls, key, dtype, shape, where) -> None:
        """Only the contrastive adapters' LoRA factors (names by module path, so not a fixed `tensor_specs`)."""
        if not ADAPTER_TENSOR.match(key):
            raise RecipeError(f"{where}: tensor {cls.name + '/' + key!r} is not one {cls.name} reads (it reads the "
                              "contrastive adapters 'token_dpo/positive|negative/<module>.lora_A|lora_B.weight' that "
                              "`hfpatch critical-tokens` saves)")
        ADAPTER_SPEC.check(f"{cls.name}/{key}", dtype, shape, where)

    # ----- columns and collator -------------------------------------------------------------------
    def dataset_columns(self) -> tuple[str, ...]:
        if self.params.weights != "column":
            return ()
        return tuple(c for c in (self.params.column, self.params.chosen_column) if c is not None)

    def wrap_collator(self, collator, trainer):
        if self.params.weights != "column":
            return collator
        return TokenWeightCollator(collator, rejected_column=self.params.column,
                                   chosen_column=self.params.chosen_column,
                                   truncation_mode=compat.trainer_truncation_mode(trainer))

    def apply(self, trainer, ctx) -> None:
        if self.params.weights == "critical":
            self._critical = _load_critical(self)
            critical_tokens, positive, _ = self._critical
            # adapters trained on another base model would score garbage: refuse at patch time
            critical_tokens.check_base_model(positive, compat.trainer_unwrapped_model(trainer, trainer.model))
        super().apply(trainer, ctx)
        self._info["weights"] = self.params.weights
        self._info["form"] = self.params.form

    # ----- loss --------------------------------------------------------------------------------------
    def _weights(self, trainer, model, batch) -> torch.Tensor | None:
        if self.params.weights == "uniform":
            return None
        if self.params.weights == "column":
            if batch.weights is None:
                raise ValueError(
                    f"token_dpo(weights='column'): the batch carries no token weights; the trainer's collator was "
                    f"replaced after patching, or the dataset has no {self.params.column!r} column")
            return batch.weights
        return self._critical_weights(trainer, batch)

    def _critical_weights(self, trainer, batch) -> torch.Tensor:
        critical_tokens, positive, negative = self._critical
        pairs = batch.pairs
        policy = compat.trainer_unwrapped_model(trainer, trainer.model)
        with torch.no_grad():
            scores = critical_tokens.critical_token_weights(
                policy, positive, negative, batch.input_ids[pairs:], batch.attention_mask[pairs:],
                batch.completion_mask[pairs:].bool(), b=self.params.critical_b)
        weights = torch.ones(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
        weights[pairs:] = 1.0 - scores.to(weights)
        return weights[:, 1:]

    def loss(self, trainer, model, batch):
        logps, ref_logps, _ = self.token_values(trainer, model, batch)
        mask = batch.mask
        weights = self._weights(trainer, model, batch)
        if self.params.form == "sequence":
            per_pair = losses.sequence_dpo_loss(logps, ref_logps, mask, weights, beta=self.params.beta)
        else:
            per_pair = losses.token_dpo_loss(logps, ref_logps, mask, weights, beta=self.params.beta)
        chosen, rejected = losses.sequence_logratios(logps, ref_logps, mask)
        metrics = self.reward_metrics(self.params.beta, chosen, rejected, logps, mask)
        if weights is not None:
            # the mean weight of each pair's rejected completion tokens (the mean critical weight for cDPO)
            _, rejected_mask = mask.chunk(2)
            _, rejected_weights = weights.chunk(2)
            counted = rejected_mask.float()
            metrics["weights/rejected_mean"] = ((rejected_weights * counted).sum(1) / counted.sum(1).clamp(min=1.0))
        return per_pair.mean(), metrics


def _load_critical(technique: TokenDPO):
    """(critical_tokens module, positive adapter, negative adapter) from the recipe's tensor payload."""
    try:
        from . import critical_tokens
    except ImportError as exc:
        raise RecipeError(
            "token_dpo(weights='critical') needs hfpatch.techniques.training.critical_tokens, which this build "
            f"lacks ({exc}); score tokens offline with `hfpatch critical-tokens` and use weights='column'") from exc
    if not technique.tensors:
        raise RecipeError(
            "token_dpo(weights='critical') needs the two contrastive adapters in the recipe's tensor payload (a "
            "recipe saved by `hfpatch critical-tokens`); this recipe has none. Use weights='column' with a weight "
            "column, or patch with the recipe that carries the adapters")
    positive, negative = critical_tokens.adapters_from_tensors(technique.tensors, technique.tensor_metadata)
    return critical_tokens, positive, negative


__all__ = ["TokenDPO", "TokenDPOParams"]
