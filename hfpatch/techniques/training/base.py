"""What every training technique shares: a trainer as the patch target, the preference batch, per-token
log-probabilities of the policy and its reference, token weights carried by the collator, and metrics.

A training technique patches one `transformers.Trainer` instance (TRL's `DPOTrainer` included), never a model
class: it wraps the instance's `compute_loss` (and `log`, and for a plain Trainer `prediction_step`) with
`primitives.wrap_method`, so `unpatch()` gives the trainer its own loss back and another trainer is untouched.
TRL installs its fused LM head as an instance-level `forward` on the policy and the reference; that stays as
it is and is what computes the per-token log-probabilities here.

The preference batch (both trainers): ``input_ids`` and ``attention_mask`` of ``2B`` right-padded rows, the B
chosen sequences (prompt + chosen completion) first and then the B rejected ones in the same order, and
``completion_mask`` (1 on completion tokens). That is what TRL's `DataCollatorForPreference` builds from
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns, and a plain Trainer is given the same (use that
collator, or your own producing the same keys). The batch has no ``labels``. Per-token weights from a dataset
column travel in the batch as ``hfpatch_token_weights`` (``[2B, T]``, aligned with ``input_ids``), put there by
`TokenWeightCollator` around the trainer's own collator.

The reference: ``trainer.ref_model`` when it is set (TRL sets it; on a plain Trainer set it yourself), else,
for a PEFT policy, the policy with its adapter disabled (TRL's convention: the adapter named "ref" when there
is one). TRL's precomputed reference values are per-sequence sums only, so they are not used: the per-token
reference values are computed in the loss.
"""
from __future__ import annotations

import dataclasses
import types
import warnings
import weakref
from collections import defaultdict
from typing import Any, ClassVar

import torch
from packaging.specifiers import SpecifierSet

from ... import arch, compat, primitives
from ...technique import Technique
from . import losses

#: The batch key carrying per-token weights (``[2B, T]``, aligned with ``input_ids``).
WEIGHTS_KEY = "hfpatch_token_weights"
#: Batch keys that are not model inputs.
NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", WEIGHTS_KEY})
#: Dataset columns a plain Trainer must keep for TRL's preference collator (TRL's own trainer keeps them).
PREFERENCE_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_mask")


@dataclasses.dataclass
class PreferenceBatch:
    """One preference batch, validated, with the next-token view the losses use.

    ``mask`` and ``weights`` are on next-token positions (``[2B, T - 1]``): position ``t`` scores token ``t + 1``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    model_kwargs: dict[str, Any]
    weights: torch.Tensor | None

    @classmethod
    def from_inputs(cls, inputs: dict[str, Any], where: str) -> PreferenceBatch:
        """Check the batch a trainer hands to `compute_loss` and split it into model inputs and the rest."""
        missing = [key for key in ("input_ids", "attention_mask", "completion_mask") if key not in inputs]
        if missing:
            raise ValueError(
                f"{where}: the batch has no {missing}; a preference batch holds input_ids, attention_mask and "
                "completion_mask of 2B rows (chosen then rejected), as TRL's DataCollatorForPreference builds from "
                f"prompt_ids/chosen_ids/rejected_ids columns (the batch has {sorted(inputs)})")
        if "labels" in inputs:
            raise ValueError(f"{where}: a preference batch carries no `labels` (the completion_mask says which tokens "
                             "are scored); remove the labels column or collator output")
        input_ids = inputs["input_ids"]
        if input_ids.dim() != 2 or input_ids.shape[0] % 2:
            raise ValueError(f"{where}: input_ids must be [2B, T] (B chosen rows, then their B rejected rows); got "
                             f"shape {tuple(input_ids.shape)}")
        weights = inputs.get(WEIGHTS_KEY)
        model_kwargs = {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}
        return cls(input_ids, inputs["attention_mask"], inputs["completion_mask"], model_kwargs,
                   None if weights is None else weights[:, 1:])

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def mask(self) -> torch.Tensor:
        """Completion tokens on next-token positions, bool ``[2B, T - 1]``."""
        return self.completion_mask[:, 1:].bool()

    @property
    def labels(self) -> torch.Tensor:
        """``input_ids`` with non-completion positions set to -100 (TRL's fused head scores only the others)."""
        return self.input_ids.masked_fill(self.completion_mask == 0, -100)


def weight_rows(completion_mask: torch.Tensor, rows: list[list[float] | None], truncation_mode: str,
                where: str) -> torch.Tensor:
    """A ``[rows, T]`` float tensor with each row's weights on its completion tokens (1 where a row has none).

    ``rows[r]`` holds one weight per completion token of row ``r`` before the collator truncated it; the kept
    ones are the first (``keep_start``) or last (``keep_end``) as many as the completion mask shows.
    """
    out = torch.ones(completion_mask.shape, dtype=torch.float32)
    for r, values in enumerate(rows):
        if values is None:
            continue
        positions = completion_mask[r].nonzero().flatten().cpu()
        kept = len(positions)
        if len(values) < kept:
            raise ValueError(f"{where}: row {r} has {kept} completion tokens but only {len(values)} weights")
        chosen = values[len(values) - kept:] if truncation_mode == "keep_end" else values[:kept]
        out[r, positions] = torch.tensor(chosen, dtype=torch.float32)
    return out.to(completion_mask.device)


class TokenWeightCollator:
    """Wraps a trainer's preference collator: takes per-token weight columns out of each example, calls the
    collator, and adds ``hfpatch_token_weights`` (``[2B, T]``) aligned with the padded, truncated batch.

    ``rejected_column`` (and optionally ``chosen_column``) name example fields with one float per completion
    token, as the trainer tokenized it (``len(example["rejected_ids"])`` values); the other side's weights are 1.
    """

    def __init__(self, collator, *, rejected_column: str | None, chosen_column: str | None = None,
                 truncation_mode: str = "keep_start"):
        self.collator = collator
        self.rejected_column = rejected_column
        self.chosen_column = chosen_column
        self.truncation_mode = truncation_mode

    def _take(self, examples: list[dict], column: str | None, ids_key: str) -> list[list[float] | None]:
        if column is None:
            return [None] * len(examples)
        taken = []
        for i, example in enumerate(examples):
            if column not in example:
                raise ValueError(f"token weights: example {i} has no {column!r} column (it has {sorted(example)}); "
                                 "add one float per completion token, or use weights='uniform'")
            values = [float(v) for v in example[column]]
            ids = example.get(ids_key)
            if ids is not None and len(ids) != len(values):
                raise ValueError(f"token weights: example {i} has {len(values)} values in {column!r} but "
                                 f"{len(ids)} tokens in {ids_key!r}; give one weight per token of the tokenized "
                                 "completion")
            taken.append(values)
        return taken

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        if not examples or not isinstance(examples[0], dict):
            raise ValueError("token weights need dict examples (a datasets.Dataset of prompt_ids/chosen_ids/"
                             "rejected_ids plus the weight column)")
        chosen = self._take(examples, self.chosen_column, "chosen_ids")
        rejected = self._take(examples, self.rejected_column, "rejected_ids")
        drop = {self.chosen_column, self.rejected_column}
        batch = self.collator([{k: v for k, v in example.items() if k not in drop} for example in examples])
        if "completion_mask" not in batch:
            raise ValueError("token weights: the trainer's collator produced no completion_mask; use TRL's "
                             "DataCollatorForPreference (or a collator with the same output)")
        batch[WEIGHTS_KEY] = weight_rows(batch["completion_mask"], chosen + rejected, self.truncation_mode,
                                         "token weights")
        return batch


def _gathered_mean(trainer, values: torch.Tensor) -> float:
    accelerator = getattr(trainer, "accelerator", None)
    values = values.detach().float().reshape(-1)
    if accelerator is not None:
        values = accelerator.gather(values)
    return values.mean().item() if values.numel() else 0.0


class TrainerTechnique(Technique):
    """Base class of techniques that replace a trainer's loss (`target = "trainer"`).

    Subclasses implement `loss(trainer, model, batch) -> (scalar loss, {metric: tensor with one value per pair})`,
    using `token_values` (per-token log-probs of policy and reference, and the sequential KL on request), and may
    declare dataset columns they need (`dataset_columns`) with a collator wrapper (`wrap_collator`). Their Params
    have a `kernel` field (use the fused linear log-prob kernel where it serves the model).
    """

    target: ClassVar[str] = "trainer"
    family = "training"
    #: one technique owns a trainer's loss at a time
    claims = frozenset({"trainer-loss"})

    def __init__(self, params: Any = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self._trainer_ref: Any = None

    # ----- target -------------------------------------------------------------------------------
    def supports(self, trainer) -> tuple[bool, str]:
        """A `transformers.Trainer` with a reference the loss can compute per-token values from."""
        if not compat.is_trainer(trainer):
            return False, f"{self.name} needs a transformers Trainer, got {type(trainer).__name__}"
        if getattr(trainer, "ref_model", None) is None and not compat.is_peft_model(trainer.model):
            if compat.is_trl_preference_trainer(trainer):
                return False, (
                    f"this DPOTrainer keeps no reference model (precompute_ref_log_probs=True stores per-sequence "
                    f"sums only, and {self.name} needs per-token reference values): pass ref_model= to DPOTrainer, "
                    "train a PEFT adapter (the reference is then the policy with its adapter disabled), or set "
                    "precompute_ref_log_probs=False")
            return False, (
                f"a plain Trainer has no reference model: set trainer.ref_model = <a frozen copy of the policy> "
                f"before patching, or train a PEFT adapter (the reference is then the policy with its adapter "
                "disabled)")
        return True, ""

    def dataset_columns(self) -> tuple[str, ...]:
        """Dataset columns the loss needs that the trainer would drop (its signature-column filter)."""
        return ()

    def wrap_collator(self, collator, trainer):
        """The collator to use instead of `collator` (default: the same)."""
        return collator

    def apply(self, trainer, ctx) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._is_trl = compat.is_trl_preference_trainer(trainer)
        if self._is_trl:
            version = compat.trl_version()
            self._info["trl"] = str(version)
            if version is not None and version not in SpecifierSet(",".join(compat.TESTED_TRL)):
                # the loss reads TRL's batch layout and fused head; a TRL outside the tested range may differ
                warnings.warn(f"{self.name} was tested with TRL {','.join(compat.TESTED_TRL)}; you have {version}. "
                              "It may still work; the loss identities in tests/test_token_dpo.py check it",
                              stacklevel=3)
            self._check_trl_settings(trainer)
        if getattr(trainer, "ref_model", None) is not None:
            self._info["reference"] = "trainer.ref_model"
        elif "ref" in getattr(trainer.model, "peft_config", {}):
            # TRL loads a copy of an adapter being trained again under the name "ref"
            self._info["reference"] = "the policy's PEFT adapter named 'ref'"
        else:
            self._info["reference"] = "policy with its PEFT adapter disabled"
        if compat.trainer_precomputes_reference(trainer):
            self._info["precomputed_reference"] = ("ignored: TRL precomputes per-sequence sums only; per-token "
                                                   "reference values are computed in the loss")
        ctx.record(primitives.wrap_method(trainer, "compute_loss", self._compute_loss_hook))
        ctx.record(primitives.wrap_method(trainer, "log", self._log_hook))
        if not self._is_trl:
            # a plain Trainer's prediction_step would call the model on the preference batch itself
            ctx.record(primitives.wrap_method(trainer, "prediction_step", self._prediction_step_hook))
        columns = list(self.dataset_columns()) + ([] if self._is_trl else list(PREFERENCE_COLUMNS))
        if columns:
            self._keep_columns(trainer, columns, ctx)
        collator = self.wrap_collator(trainer.data_collator, trainer)
        if collator is not trainer.data_collator:
            ctx.record(primitives.set_attribute(trainer, "data_collator", collator))
        ctx.record(self._clear)

    #: What the replaced loss computes, in TRL's `DPOConfig` terms; other settings have no effect under it.
    TRL_EQUIVALENT = {"loss_type": ["sigmoid"], "loss_weights": [1.0], "ld_alpha": None,
                      "f_divergence_type": "reverse_kl", "label_smoothing": 0.0, "use_weighting": False,
                      "router_aux_loss": False}

    def _check_trl_settings(self, trainer) -> None:
        """Say (a warning, and `stats()["ignored_trl_settings"]`) which of the trainer's DPOConfig loss settings
        the replaced loss does not follow, so a user who set, e.g., `loss_type="ipo"` or `beta=0.5` knows."""
        settings = compat.trl_loss_settings(trainer)
        ignored = {key: settings[key] for key, value in self.TRL_EQUIVALENT.items() if settings[key] != value}
        beta = getattr(self.params, "beta", None)
        if beta is not None and settings["beta"] is not None and float(settings["beta"]) != float(beta):
            ignored["beta"] = f"{settings['beta']} (the loss uses {self.name}.beta = {beta})"
        if ignored:
            self._info["ignored_trl_settings"] = ignored
            warnings.warn(f"{self.name} replaces this DPOTrainer's loss; these DPOConfig settings have no effect "
                          f"under it: {ignored}", stacklevel=3)

    def _keep_columns(self, trainer, columns: list[str], ctx) -> None:
        """Keep `columns` through the trainer's signature-column filter (`remove_unused_columns=True`)."""
        added: list[str] = compat.add_signature_columns(trainer, columns)

        def after_decided(original, *args, **kwargs):
            result = original(*args, **kwargs)
            added.extend(compat.add_signature_columns(trainer, [c for c in columns if c not in added]))
            return result

        ctx.record(primitives.wrap_method(trainer, compat.SIGNATURE_COLUMNS_METHOD, after_decided))
        ctx.record(lambda: compat.remove_signature_columns(trainer, added))

    def _clear(self) -> None:
        for mode in self._metrics.values():
            mode.clear()
        self._trainer_ref = None

    # ----- hooks --------------------------------------------------------------------------------
    def _trainer(self):
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            raise RuntimeError(f"{self.name}: the patched trainer is gone")
        return trainer

    def _compute_loss_hook(self, original, model, inputs, return_outputs=False, num_items_in_batch=None):
        trainer = self._trainer()
        batch = PreferenceBatch.from_inputs(inputs, self.name)
        loss, metrics = self.loss(trainer, model, batch)
        self._record(trainer, metrics)
        if return_outputs:
            # TRL's prediction_step reads `.logits`; a preference loss has none to offer
            return loss, types.SimpleNamespace(loss=loss, logits=None)
        return loss

    def _prediction_step_hook(self, original, model, inputs, prediction_loss_only, ignore_keys=None):
        trainer = self._trainer()
        inputs = compat.trainer_prepare_inputs(trainer, inputs)
        with torch.no_grad():
            loss = trainer.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _log_hook(self, original, logs, *args, **kwargs):
        trainer = self._trainer()
        mode = "train" if trainer.model.training else "eval"
        averaged = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            averaged = {f"eval_{key}": value for key, value in averaged.items()}
        logs.update(averaged)
        self._metrics[mode].clear()
        return original(logs, *args, **kwargs)

    def _record(self, trainer, metrics: dict[str, torch.Tensor]) -> None:
        mode = "train" if trainer.model.training else "eval"
        last = {}
        for key, values in metrics.items():
            value = _gathered_mean(trainer, values)
            self._metrics[mode][key].append(value)
            last[key] = value
        self._last = last
        self._info["steps"] = self._info.get("steps", 0) + 1

    def stats(self) -> dict[str, Any]:
        """The last batch's metrics (TRL's names: rewards/chosen, rewards/margins, ...), how the reference and the
        log-probabilities were computed, and the number of loss calls."""
        return {**self._info, **self._last}

    # ----- log-probabilities --------------------------------------------------------------------
    def loss(self, trainer, model, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _forward_token_logps(self, model, batch: PreferenceBatch, fused: bool) -> torch.Tensor:
        if fused:
            outputs = model(**batch.model_kwargs, use_cache=False, labels=batch.labels, fused_lm_head=True)
            length = batch.input_ids.shape[1] - 1
            # prompt-learning PEFT prepends virtual positions (as in TRL's own loss): keep the real tokens' ones
            return outputs.log_probs[:, -length:]
        logprobs = self._forward_logprobs(model, batch)
        return logprobs.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)

    def _forward_logprobs(self, model, batch: PreferenceBatch) -> torch.Tensor:
        """Full next-token log-distributions ``[2B, T - 1, V]`` (float32)."""
        outputs = model(**batch.model_kwargs, use_cache=False)
        # [-T:]: prompt-learning PEFT prepends virtual positions; keep the real tokens' ones
        logits = outputs.logits[:, -batch.input_ids.shape[1]:]
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)

    def _reference_call(self, trainer, fn):
        """Run `fn(reference_model)` without gradients on the trainer's reference."""
        ref_model = getattr(trainer, "ref_model", None)
        with torch.no_grad():
            if ref_model is not None:
                return fn(ref_model)
            policy = compat.trainer_unwrapped_model(trainer, trainer.model)
            with compat.reference_adapter(policy):
                return fn(trainer.model)

    # ----- the fused linear log-prob kernel -------------------------------------------------------
    def _kernel_heads(self, trainer, *, kl: bool):
        """(policy head, reference head) when the kernel can compute this trainer's log-probs exactly, else
        (None, why): the head must be a plain Linear whose output is the logits (no soft-capping or scaling)."""
        if not getattr(self.params, "kernel", False):
            return None, "kernel=False"
        from ... import kernels

        if "linear_logprob" not in kernels.list_kernels():
            return None, "this build has no linear_logprob kernel"
        policy = compat.trainer_unwrapped_model(trainer, trainer.model)
        ref_model = getattr(trainer, "ref_model", None)
        models = [policy, policy if ref_model is None else compat.trainer_unwrapped_model(trainer, ref_model)]
        heads = []
        for model in models:
            head = model.get_output_embeddings()
            if type(head) is not torch.nn.Linear:
                return None, (f"the output head is a {type(head).__name__} (e.g. an adapter on lm_head), not a "
                              "plain Linear")
            transform = compat.logit_transform(model)
            if transform:
                return None, f"the model changes its logits after the head ({transform})"
            heads.append(head)
        if kl and heads[1].bias is not None:
            return None, "the KL pass takes no reference lm_head bias"
        return tuple(heads), ""

    def _final_hidden(self, model, batch: PreferenceBatch) -> torch.Tensor:
        """The final (normed) hidden states of every position but the last, ``[2B, T - 1, H]``; the forward
        computes the logits of one position only where the model takes `logits_to_keep`."""
        kwargs = dict(batch.model_kwargs, use_cache=False, output_hidden_states=True)
        inner = arch.unwrap_model(compat.trainer_unwrapped_model(self._trainer(), model))
        if compat.forward_accepts(inner, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        hidden = model(**kwargs).hidden_states[-1]
        return hidden[:, -batch.input_ids.shape[1]:][:, :-1]  # without prompt-learning PEFT's virtual positions

    def token_values(self, trainer, model, batch: PreferenceBatch, *, kl: bool = False):
        """Per-token values of the policy and its reference on the batch's next-token positions:
        ``(logps [2B, T-1], ref_logps [2B, T-1], seq_kl [2B] or None)``; ``seq_kl`` (with ``kl=True``) is the
        sequential ``KL(pi_ref || pi)`` over completion tokens.

        With `kernel=True` (and a model it serves) hfpatch's fused linear log-prob kernel computes them from the
        final hidden states and the lm_head in vocabulary tiles, the KL in the same pass, never building the
        ``[tokens, vocab]`` logits; otherwise TRL's fused head (log-probs on a TRL trainer) or the full logits.
        ``stats()["logprobs"]`` says which ran and why.
        """
        heads, why = self._kernel_heads(trainer, kl=kl)
        mask = batch.mask
        if heads is not None:
            from ... import kernels

            head, ref_head = heads
            hidden = self._final_hidden(model, batch)
            ref_hidden = self._reference_call(trainer, lambda ref: self._final_hidden(ref, batch))
            labels = batch.input_ids[:, 1:].masked_fill(~mask, -100).reshape(-1)
            flat, ref_flat = hidden.reshape(-1, hidden.shape[-1]), ref_hidden.reshape(-1, ref_hidden.shape[-1])
            choice = kernels.linear_logprob.choose(flat, head.weight, labels, bias=head.bias)
            self._info["logprobs"] = f"hfpatch linear_logprob kernel: {choice.backend} ({choice.reason})"
            shape = mask.shape
            seq_kl = None
            if kl:
                logps, token_kl = kernels.linear_logprob(flat, head.weight, labels, bias=head.bias,
                                                         reference_hidden=ref_flat,
                                                         reference_weight=ref_head.weight)
                seq_kl = token_kl.view(shape).sum(dim=1)  # 0 off the completion (ignored labels)
            else:
                logps = kernels.linear_logprob(flat, head.weight, labels, bias=head.bias)
            with torch.no_grad():
                ref_logps = kernels.linear_logprob(ref_flat, ref_head.weight, labels, bias=ref_head.bias)
            return logps.view(shape), ref_logps.view(shape), seq_kl
        if kl:
            self._info["logprobs"] = f"full logits (log-softmax); not the kernel: {why}"
            logprobs = self._forward_logprobs(model, batch)
            ref_logprobs = self._reference_call(trainer, lambda ref: self._forward_logprobs(ref, batch))
            targets = batch.input_ids[:, 1:].unsqueeze(-1)
            seq_kl = losses.sequential_kl(ref_logprobs, logprobs, mask)
            return (logprobs.gather(-1, targets).squeeze(-1), ref_logprobs.gather(-1, targets).squeeze(-1), seq_kl)
        source = "TRL fused LM head" if self._is_trl else "full logits (log-softmax + gather)"
        self._info["logprobs"] = f"{source}; not the kernel: {why}"
        logps = self._forward_token_logps(model, batch, fused=self._is_trl)
        ref_logps = self._reference_call(trainer, lambda ref: self._forward_token_logps(ref, batch, fused=self._is_trl))
        return logps, ref_logps, None

    @staticmethod
    def reward_metrics(beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                       logps: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """TRL's DPO metrics from unweighted per-sequence log-ratios: rewards, accuracies, margins, logps."""
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
        sums = torch.where(mask, logps.detach(), torch.zeros((), dtype=logps.dtype, device=logps.device)).sum(1)
        chosen_logps, rejected_logps = sums.chunk(2)
        return {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps,
        }


__all__ = ["NON_MODEL_KEYS", "PREFERENCE_COLUMNS", "PreferenceBatch", "TokenWeightCollator", "TrainerTechnique",
           "WEIGHTS_KEY", "weight_rows"]
