"""Critical-token estimation for token-level DPO (cDPO, "Critical Tokens Matter").

Two LoRA adapters are trained on the same base model: a *positive* one on answers a verifier judged correct
and a *negative* one on wrong answers. A token ``y_t`` of a wrong answer is *critical* when the positive
adapter finds it much less likely than the negative one. With ``z`` the per-position log-probabilities
(or logits: softmax does not change when a constant is added to every entry of a row),

    s_t = softmax((1 + b) * z_pos - b * z_neg)[y_t]          (b = 1 gives the paper's 2 z_pos - z_neg)

and the rejected token's weight in the DPO loss is ``1 - s_t`` (chosen tokens keep weight 1).

The functions here are library code; the technique that uses them in a trainer lives in ``token_dpo``:

    >>> pos, neg = train_contrastive_adapters(model, tok, correct_pairs, wrong_pairs)
    >>> s = critical_token_weights(model, pos, neg, input_ids, attention_mask, labels_mask)   # [B, T]
    >>> tensors, metadata = adapters_to_tensors(pos, neg)          # a recipe payload
    >>> pos, neg = adapters_from_tensors(tensors, metadata)        # validated on load
    >>> rows = score_dataset(model, tok, pos, neg, rows)           # adds a "rejected_weights" column

Design choices (and why):
- Training uses peft (``get_peft_model`` on the model in place, then ``unload()``), so the adapters are
  ordinary peft LoRA weights; the model's parameters, their ``requires_grad`` flags and its train/eval mode
  are restored afterwards.
- Scoring does not build peft wrappers: every target module gets a forward hook adding
  ``(alpha / r) * B(A(x))`` to its output (exactly peft's LoRA without dropout) for one pass, and the hooks
  are removed before the function returns. That makes scoring cheap enough to run inside a training step,
  leaves no trace on the model, and works the same on a plain model and on a ``PeftModel`` (whose own
  adapters are disabled during the two passes, because the contrastive adapters were trained on the base
  model: the same base a PEFT-trained policy uses as its DPO reference).
- Adapter module paths are relative to the transformers model (inside any PEFT wrapper), so adapters trained
  on a plain model score a PEFT-wrapped copy of it.
- Tokenisation mirrors TRL 1.16's ``DPOTrainer`` for plain-text examples (EOS appended to the completion,
  prompt and prompt + completion tokenised, the completion starting where the two diverge), so a weight
  column lines up one float per token with the rejected completion TRL trains on.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from ...arch import adapter_for, model_type, unwrap_model
from ...errors import HfpatchError

__all__ = [
    "CriticalTokensError",
    "AdapterConfig",
    "LoraState",
    "FORMAT",
    "mlp_target_modules",
    "resolve_target_modules",
    "base_model_fingerprint",
    "check_base_model",
    "encode_completion",
    "train_contrastive_adapters",
    "critical_token_weights",
    "adapters_to_tensors",
    "adapters_from_tensors",
    "score_dataset",
]

#: Version of the payload layout written by `adapters_to_tensors`; `adapters_from_tensors` refuses others.
FORMAT = "1"
#: Metadata keys of a payload (values are strings, as safetensors metadata must be).
_META_KEYS = ("critical_tokens_format", "r", "alpha", "target_modules", "base_model")
#: Values sampled from each probed weight for the base-model fingerprint.
_PROBE_VALUES = 8
#: How close the probed weights must be to call two models the same base (a bf16 copy of fp32 weights is).
_PROBE_RTOL, _PROBE_ATOL = 1e-2, 1e-3


class CriticalTokensError(HfpatchError, ValueError):
    """Critical-token adapters or their inputs are unusable; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class AdapterConfig:
    """What a pair of contrastive LoRA adapters was trained with.

    ``target_modules`` are module paths relative to the transformers model (e.g.
    ``model.layers.0.mlp.gate_proj``); ``base_model`` is `base_model_fingerprint` of the model they were
    trained on.
    """

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: dict[str, Any]

    @property
    def scale(self) -> float:
        """peft's LoRA scaling (``lora_alpha / r``; rsLoRA is not used)."""
        return self.alpha / self.r


class LoraState(dict):
    """One LoRA adapter: a state dict ``"<module path>.lora_A.weight" -> [r, in]`` and
    ``"<module path>.lora_B.weight" -> [out, r]`` (float tensors on the CPU), plus its `AdapterConfig`.

    It is a plain ``dict`` of tensors for code that only moves state dicts around; ``.config`` carries what
    is needed to apply it.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], config: AdapterConfig):
        super().__init__(tensors)
        self.config = config

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` of one target module."""
        return self[f"{module}.lora_A.weight"], self[f"{module}.lora_B.weight"]

    def __repr__(self) -> str:
        return (f"LoraState({len(self.config.target_modules)} modules, r={self.config.r}, "
                f"alpha={self.config.alpha:g})")


# --------------------------------------------------------------------------------------------------
# target modules and the base-model fingerprint


def _is_projection(module: torch.nn.Module) -> bool:
    """A module peft's LoRA can wrap and our hooks can follow: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    # transformers' Conv1D (GPT-2 family): y = x @ W + b with W [in, out], exposed as attribute nf = out.
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2


def _projection_shape(module: torch.nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a target module (Linear or Conv1D)."""
    base = getattr(module, "base_layer", module)  # a peft LoRA layer wraps the original projection
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    weight = base.weight
    return int(weight.shape[0]), int(weight.shape[1])


def _named_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules of the transformers model inside any PEFT wrapper, by path; peft's own wrapper layers are
    reported under the path of the projection they wrap (their ``base_layer`` children are skipped)."""
    inner = unwrap_model(model)
    found = {}
    for name, module in inner.named_modules():
        if ".lora_" in f".{name}" or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        found[name] = module
    return found


def mlp_target_modules(model: torch.nn.Module) -> list[str]:
    """Paths of the MLP projections of every decoder layer (the paper's LoRA targets), e.g.
    ``model.layers.3.mlp.down_proj``; raises `CriticalTokensError` when the layers have no ``mlp``."""
    adapter = adapter_for(model)
    modules = _named_modules(model)
    paths = {id(m): n for n, m in modules.items()}
    targets = []
    for index, layer in enumerate(adapter.decoder_layers()):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        if mlp is None:
            raise CriticalTokensError(
                f"decoder layer {index} of {type(unwrap_model(model)).__name__} has no 'mlp' module; pass "
                "target_modules=[...] naming the projections to adapt")
        prefix = paths.get(id(mlp))
        for name, child in mlp.named_modules():
            child = getattr(child, "base_layer", child) if name else child
            if name and ".lora_" not in f".{name}" and not name.endswith("base_layer") and _is_projection(child):
                targets.append(f"{prefix}.{name}")
    if not targets:
        raise CriticalTokensError("found no Linear projections in the decoder layers' MLPs; pass target_modules")
    return targets


def resolve_target_modules(model: torch.nn.Module, target_modules: Sequence[str] | None) -> list[str]:
    """Full module paths for ``target_modules``: ``None`` -> `mlp_target_modules`; otherwise each entry is a
    full path or a name suffix (``"gate_proj"`` matches every ``...gate_proj``), and must match at least one
    Linear/Conv1D projection."""
    if target_modules is None:
        return mlp_target_modules(model)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    modules = _named_modules(model)
    resolved: list[str] = []
    for target in target_modules:
        hits = [name for name, m in modules.items()
                if (name == target or name.endswith("." + target)) and _is_projection(getattr(m, "base_layer", m))]
        if not hits:
            raise CriticalTokensError(
                f"target module {target!r} matches no Linear/Conv1D projection of {type(unwrap_model(model)).__name__}"
                " (give a module path like 'model.layers.0.mlp.up_proj' or a name suffix like 'up_proj')")
        resolved += [h for h in hits if h not in resolved]
    return resolved


def _probe(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    # integer arithmetic: a float32 linspace over tens of millions of values rounds past the last index
    index = torch.tensor([i * (flat.numel() - 1) // (_PROBE_VALUES - 1) for i in range(_PROBE_VALUES)],
                         device=flat.device)
    return [float(v) for v in flat[index].to(torch.float32).cpu()]


def base_model_fingerprint(model: torch.nn.Module, target_modules: Sequence[str] | None = None) -> dict[str, Any]:
    """What identifies the weights adapters were trained on: model type, vocabulary, width and depth, and a
    few values of the input embeddings and of the first and last target projection.

    Values rather than a hash, so that the same weights loaded in another dtype (fp32 vs bf16) still match
    within `check_base_model`'s tolerance while a different checkpoint of the same architecture does not.
    """
    adapter = adapter_for(model)
    config = adapter.text_config()
    modules = _named_modules(model)
    targets = list(target_modules) if target_modules else mlp_target_modules(model)
    probes = {"embed": _probe(adapter.input_embeddings().weight)}
    for label, path in (("first", targets[0]), ("last", targets[-1])):
        module = modules[path]
        probes[label] = _probe(getattr(module, "base_layer", module).weight)
    return {"model_type": model_type(unwrap_model(model)), "vocab_size": int(config.vocab_size),
            "hidden_size": int(config.hidden_size), "num_layers": len(adapter.decoder_layers()), "probes": probes}


def check_base_model(adapter: LoraState, model: torch.nn.Module) -> None:
    """Raise `CriticalTokensError` unless ``model`` is the base model ``adapter`` was trained on (same
    architecture sizes, probed weights equal within a dtype's rounding)."""
    config = adapter.config
    stored = config.base_model
    try:
        actual = base_model_fingerprint(model, config.target_modules)
    except KeyError as exc:
        raise CriticalTokensError(f"the adapters target module {exc.args[0]!r}, which this model does not have; "
                                  "they were trained on another architecture") from None
    for key in ("model_type", "vocab_size", "hidden_size", "num_layers"):
        if stored.get(key) != actual[key]:
            raise CriticalTokensError(
                f"the critical-token adapters were trained on a model with {key}={stored.get(key)!r}, this model "
                f"has {actual[key]!r}; train adapters for this model (hfpatch critical-tokens --model ...)")
    for label, values in actual["probes"].items():
        expected = torch.tensor(stored.get("probes", {}).get(label, [math.nan] * _PROBE_VALUES))
        if expected.shape != (len(values),) or not torch.allclose(torch.tensor(values), expected,
                                                                   rtol=_PROBE_RTOL, atol=_PROBE_ATOL):
            raise CriticalTokensError(
                f"the critical-token adapters were trained on other weights of this architecture ({label} probe "
                f"differs); they only score tokens for the exact base model they were trained on: train adapters "
                "for this model (hfpatch critical-tokens --model ...)")


# --------------------------------------------------------------------------------------------------
# tokenisation (TRL 1.16's, for plain-text examples)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` as TRL 1.16's ``DPOTrainer`` builds them for a plain-text example:
    the EOS token text is appended to the completion unless it already ends with it, prompt and
    prompt + completion are tokenised, and the completion starts where the two token lists diverge."""
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise CriticalTokensError(
            "critical-token scoring takes plain-text prompts and completions (strings); got "
            f"{type(prompt).__name__} / {type(completion).__name__} (conversational examples: apply the chat "
            "template to the prompt first)")
    eos = tokenizer.eos_token
    if eos and not completion.endswith(eos):
        completion = completion + eos
    prompt_ids = list(tokenizer(text=prompt)["input_ids"])
    full_ids = list(tokenizer(text=prompt + completion)["input_ids"])
    cut = _common_prefix(prompt_ids, full_ids)
    return full_ids[:cut], full_ids[cut:]


def _batch(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels_mask)`` of (prompt ids, completion ids) pairs."""
    length = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.zeros((len(encoded), length), dtype=torch.bool)
    for row, (p, c) in enumerate(encoded):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[row, : len(p) + len(c)] = 1
        labels[row, len(p): len(p) + len(c)] = True
    return ids.to(device), attention.to(device), labels.to(device)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _device(model: torch.nn.Module) -> torch.device:
    return next(unwrap_model(model).parameters()).device


@contextlib.contextmanager
def _modes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit (``model.train(flag)`` would set them all alike,
    and a model can hold submodules kept in eval on purpose, e.g. a frozen tower)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------------------
# training


def _is_peft(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("peft") or hasattr(model, "peft_config")


def _fit(peft_model, tokenizer, encoded, *, lr: float, epochs: int, batch_size: int, seed: int, desc: str,
         progress: bool) -> None:
    """The training loop: AdamW on the trainable (LoRA) parameters, mean NLL of the completion tokens."""
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    device = _device(peft_model)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    bar = _progress(range(steps), total=steps, desc=desc, enabled=progress)
    batches = iter(())
    for _ in bar:
        chunk = next(batches, None)
        if chunk is None:  # next epoch: a fresh shuffle
            index = list(range(len(encoded)))
            order.shuffle(index)
            batches = iter([index[i: i + batch_size] for i in range(0, len(index), batch_size)])
            chunk = next(batches)
        ids, attention, labels = _batch([encoded[i] for i in chunk], _pad_id(tokenizer), device)
        logits = peft_model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        mask = labels[:, 1:]
        loss = (nll * mask).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")


def _train_one(model, tokenizer, pairs, targets: list[str], *, r: int, alpha: float, lr: float, epochs: int,
               batch_size: int, seed: int, desc: str, progress: bool) -> dict[str, torch.Tensor]:
    """Train one LoRA adapter on ``pairs`` (NLL of the completion tokens) and return its state dict with
    module paths relative to ``model``; the model is returned to exactly its previous state."""
    try:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    except ImportError as exc:
        raise CriticalTokensError(f"training the contrastive adapters needs peft ({exc}); install it with "
                                  "'pip install peft' (scoring with trained adapters does not)") from None

    encoded = [encode_completion(tokenizer, p, a) for p, a in pairs]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    with _modes_kept(model):
        peft_model = get_peft_model(model, config)  # injects LoRA layers into `model` in place
        try:
            _fit(peft_model, tokenizer, encoded, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, desc=desc,
                 progress=progress)
            state = get_peft_model_state_dict(peft_model)
        finally:
            peft_model.unload()  # puts the original projection modules back (same objects, same weights)
            # peft froze every base parameter; give each its own flag back
            for name, p in model.named_parameters():
                p.requires_grad_(flags.get(name, p.requires_grad))
    prefix = "base_model.model."
    return {key.removeprefix(prefix): value.detach().to("cpu", torch.float32).clone() for key, value in state.items()}


def train_contrastive_adapters(model, tokenizer, correct: Sequence[tuple[str, str]], wrong: Sequence[tuple[str, str]],
                               *, r: int = 8, alpha: float = 16, lr: float = 3e-4, epochs: int = 1,
                               target_modules: Sequence[str] | None = None, progress: bool = True,
                               batch_size: int = 8, seed: int = 0) -> tuple[LoraState, LoraState]:
    """Train the positive (on ``correct`` (prompt, answer) pairs) and negative (on ``wrong`` ones) LoRA
    adapters of cDPO with peft, one after the other on the same base ``model``, and return them.

    Defaults follow the paper: rank 8 on the MLP projections of every decoder layer, lr 3e-4, one epoch
    (AdamW, no dropout, loss = mean NLL of the answer tokens, EOS included, tokenised like TRL). The model is
    changed only while an adapter trains: its weights, ``requires_grad`` flags and train/eval mode are as
    before when this returns (or raises). A tqdm bar per adapter shows progress when ``progress``.

    Raises `CriticalTokensError` for an empty list, a model already wrapped by PEFT (train on the base model
    before wrapping it) or target modules that match nothing.
    """
    if _is_peft(model):
        raise CriticalTokensError(
            "train_contrastive_adapters needs the plain base model, not a PEFT-wrapped one: train the contrastive "
            "adapters before wrapping the model with peft (they can then score the wrapped model)")
    for name, pairs in (("correct", correct), ("wrong", wrong)):
        if not pairs:
            raise CriticalTokensError(f"no {name} answers to train the {'positive' if name == 'correct' else 'negative'}"
                                      " adapter on; sample more answers per problem")
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise CriticalTokensError(f"{name}: expected (prompt, answer) pairs, got {item!r:.80}")
    if r < 1 or alpha <= 0 or lr <= 0 or epochs < 1 or batch_size < 1:
        raise CriticalTokensError(f"need r >= 1, alpha > 0, lr > 0, epochs >= 1, batch_size >= 1; got r={r}, "
                                  f"alpha={alpha}, lr={lr}, epochs={epochs}, batch_size={batch_size}")
    targets = resolve_target_modules(model, target_modules)
    config = AdapterConfig(r=int(r), alpha=float(alpha), target_modules=tuple(targets),
                           base_model=base_model_fingerprint(model, targets))
    states = []
    for label, pairs in (("positive", correct), ("negative", wrong)):
        tensors = _train_one(model, tokenizer, list(pairs), targets, r=r, alpha=alpha, lr=lr, epochs=epochs,
                             batch_size=batch_size, seed=seed, desc=f"{label} adapter ({len(pairs)} answers)",
                             progress=progress)
        states.append(LoraState(tensors, config))
    return states[0], states[1]


# --------------------------------------------------------------------------------------------------
# scoring


def _check_adapter(adapter: Any, what: str) -> LoraState:
    if not isinstance(adapter, LoraState):
        raise CriticalTokensError(
            f"{what}: expected a LoraState from train_contrastive_adapters or adapters_from_tensors, got "
            f"{type(adapter).__name__} (a bare state dict lacks r, alpha and the target modules)")
    return adapter


@contextlib.contextmanager
def _lora_hooks(model: torch.nn.Module, adapter: LoraState) -> Iterator[None]:
    """Add ``scale * B(A(x))`` to the output of each target module while the block runs (peft's LoRA, no
    dropout); the hooks are removed on exit, whatever happens inside."""
    modules = _named_modules(model)
    handles = []
    try:
        for path in adapter.config.target_modules:
            module = modules.get(path)
            if module is None:
                raise CriticalTokensError(f"the adapters target {path!r}, which this model does not have; they were "
                                          "trained on another architecture")
            a, b = adapter.factors(path)
            fan_in, fan_out = _projection_shape(module)
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise CriticalTokensError(
                    f"adapter for {path} maps {a.shape[1]} -> {b.shape[0]} features, the model's module maps "
                    f"{fan_in} -> {fan_out}; the adapters were trained on another model")
            weight = getattr(module, "base_layer", module).weight
            a = a.to(weight.device, weight.dtype)
            b = (b * adapter.config.scale).to(weight.device, weight.dtype)

            def hook(mod, args, output, a=a, b=b):
                return output + torch.nn.functional.linear(torch.nn.functional.linear(args[0], a), b)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _base_eval(model: torch.nn.Module) -> Iterator[None]:
    """The base model in eval mode: PEFT adapters disabled (``disable_adapter()``), dropout off; both restored
    (every submodule's own train/eval flag included)."""
    disable = getattr(model, "disable_adapter", None)
    scope = disable() if callable(disable) and type(model).__module__.startswith("peft") else contextlib.nullcontext()
    with _modes_kept(model):
        model.eval()
        with scope:
            yield


def _log_probs(model, input_ids, attention_mask) -> torch.Tensor:
    """Float32 log-softmax of the next-token logits, ``[B, T - 1, V]`` (position t predicts token t + 1).
    Positions come from the attention mask, so left padding scores like no padding."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return torch.log_softmax(out.logits[:, :-1].float(), dim=-1)


def critical_token_weights(model, positive_adapter: LoraState, negative_adapter: LoraState,
                           input_ids: torch.Tensor, attention_mask: torch.Tensor, labels_mask: torch.Tensor,
                           b: float = 1.0) -> torch.Tensor:
    """cDPO's ``s_t = softmax((1 + b) log p_pos - b log p_neg)[y_t]`` for every token, ``[B, T]`` float32.

    ``input_ids``/``attention_mask``/``labels_mask`` are ``[B, T]``; ``labels_mask`` marks the completion
    tokens to score (``s`` is 0 elsewhere, and at position 0, which nothing predicts). ``s_t`` is in [0, 1];
    the rejected-token weight of cDPO is ``1 - s_t``. Two no-grad passes over the same base model, one per
    adapter; on a ``PeftModel`` its own adapters are disabled during the passes. The model's modules,
    adapter state and train/eval mode are as before when this returns.
    """
    positive_adapter = _check_adapter(positive_adapter, "positive_adapter")
    negative_adapter = _check_adapter(negative_adapter, "negative_adapter")
    if not (input_ids.shape == attention_mask.shape == labels_mask.shape) or input_ids.ndim != 2:
        raise CriticalTokensError(
            f"input_ids, attention_mask and labels_mask must all be [batch, tokens]; got {list(input_ids.shape)}, "
            f"{list(attention_mask.shape)}, {list(labels_mask.shape)}")
    if not math.isfinite(b) or b < 0:
        raise CriticalTokensError(f"b must be a finite number >= 0 (the paper uses 1), got {b}")
    device = _device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.no_grad(), _base_eval(model):
        with _lora_hooks(model, positive_adapter):
            combined = _log_probs(model, input_ids, attention_mask)
        combined.mul_(1.0 + b)
        with _lora_hooks(model, negative_adapter):
            combined.sub_(_log_probs(model, input_ids, attention_mask).mul_(b))
        scores = torch.log_softmax(combined, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1).exp()
    weights = torch.zeros(input_ids.shape, dtype=torch.float32, device=device)
    weights[:, 1:] = scores
    return weights * labels_mask.to(device).bool()


# --------------------------------------------------------------------------------------------------
# recipe payload


def adapters_to_tensors(positive: LoraState, negative: LoraState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The two adapters as a recipe payload: tensors named ``positive/<path>.lora_A.weight`` etc. and string
    metadata (format, r, alpha, target modules, base-model fingerprint). Both must share one config."""
    positive = _check_adapter(positive, "positive")
    negative = _check_adapter(negative, "negative")
    if positive.config != negative.config:
        raise CriticalTokensError("the positive and negative adapters were trained with different settings or base "
                                  "models; train them together with train_contrastive_adapters")
    config = positive.config
    tensors = {f"{side}/{key}": value.detach().to("cpu").contiguous()
               for side, state in (("positive", positive), ("negative", negative)) for key, value in state.items()}
    metadata = {"critical_tokens_format": FORMAT, "r": str(config.r), "alpha": repr(float(config.alpha)),
                "target_modules": json.dumps(list(config.target_modules)),
                "base_model": json.dumps(config.base_model, sort_keys=True)}
    return tensors, metadata


def _meta_json(metadata: dict[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(metadata[key])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, kind):
        raise CriticalTokensError(f"critical-token payload: metadata {key!r} is not a JSON {kind.__name__}; the "
                                  "payload is damaged or was not written by adapters_to_tensors")
    return value


def adapters_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[LoraState, LoraState]:
    """Rebuild ``(positive, negative)`` from `adapters_to_tensors`' payload, checking everything first:
    format version, metadata, exactly one ``lora_A [r, in]`` and ``lora_B [out, r]`` float tensor per target
    module and side, finite values, no unexpected names. Raises `CriticalTokensError` naming the problem."""
    where = "critical-token payload"
    if not isinstance(metadata, dict) or not isinstance(tensors, dict):
        raise CriticalTokensError(f"{where}: expected a dict of tensors and a dict of string metadata")
    missing = [k for k in _META_KEYS if k not in metadata]
    if missing:
        raise CriticalTokensError(f"{where}: metadata lacks {missing}; save the adapters with adapters_to_tensors "
                                  "(hfpatch critical-tokens --save-recipe)")
    if metadata["critical_tokens_format"] != FORMAT:
        raise CriticalTokensError(f"{where}: format {metadata['critical_tokens_format']!r}, this hfpatch reads "
                                  f"format {FORMAT!r}; upgrade hfpatch or retrain the adapters")
    try:
        r, alpha = int(metadata["r"]), float(metadata["alpha"])
    except ValueError:
        raise CriticalTokensError(f"{where}: r={metadata['r']!r} / alpha={metadata['alpha']!r} are not numbers") from None
    if r < 1 or not math.isfinite(alpha) or alpha <= 0:
        raise CriticalTokensError(f"{where}: need r >= 1 and a finite alpha > 0, got r={r}, alpha={alpha}")
    targets = _meta_json(metadata, "target_modules", list)
    if not targets or not all(isinstance(t, str) and t for t in targets) or len(set(targets)) != len(targets):
        raise CriticalTokensError(f"{where}: target_modules must be a non-empty list of distinct module paths")
    base = _meta_json(metadata, "base_model", dict)
    expected = {f"{side}/{t}.lora_{ab}.weight" for side in ("positive", "negative") for t in targets for ab in "AB"}
    extra, absent = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if extra or absent:
        detail = (f"unexpected tensors {extra[:3]}" if extra else "") + (" and " if extra and absent else "") + \
                 (f"missing tensors {absent[:3]}" if absent else "")
        raise CriticalTokensError(f"{where}: {detail} (of {len(expected)} expected for {len(targets)} target modules)")
    sides: dict[str, dict[str, torch.Tensor]] = {"positive": {}, "negative": {}}
    for side in sides:
        for target in targets:
            a, b = tensors[f"{side}/{target}.lora_A.weight"], tensors[f"{side}/{target}.lora_B.weight"]
            for name, t in (("lora_A", a), ("lora_B", b)):
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 2:
                    raise CriticalTokensError(f"{where}: {side}/{target}.{name}.weight must be a 2-D float tensor")
                if not torch.isfinite(t).all():
                    raise CriticalTokensError(f"{where}: {side}/{target}.{name}.weight holds NaN or infinite values")
            if a.shape[0] != r or b.shape[1] != r:
                raise CriticalTokensError(f"{where}: {side}/{target} has shapes A {list(a.shape)}, B {list(b.shape)}; "
                                          f"rank r={r} needs A [r, in] and B [out, r]")
            sides[side][f"{target}.lora_A.weight"] = a.to(torch.float32)
            sides[side][f"{target}.lora_B.weight"] = b.to(torch.float32)
    config = AdapterConfig(r=r, alpha=alpha, target_modules=tuple(targets), base_model=base)
    return LoraState(sides["positive"], config), LoraState(sides["negative"], config)


# --------------------------------------------------------------------------------------------------
# datasets


def score_dataset(model, tokenizer, positive: LoraState, negative: LoraState, rows: Iterable[dict[str, Any]], *,
                  prompt_column: str = "prompt", rejected_column: str = "rejected",
                  column: str = "rejected_weights", b: float = 1.0, batch_size: int = 8,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Copies of ``rows`` (dicts, e.g. a JSONL preference file or ``list(datasets.Dataset)``) with ``column``
    added: the cDPO weight ``1 - s_t`` of every token of the rejected completion, a list of floats, one per
    token as TRL 1.16's ``DPOTrainer`` tokenises that completion (EOS included; see `encode_completion`).

    Raises `CriticalTokensError` when a row lacks the prompt or rejected column, or the column already exists.
    """
    rows = list(rows)
    for index, row in enumerate(rows):
        for key in (prompt_column, rejected_column):
            if key not in row:
                raise CriticalTokensError(f"row {index} has no {key!r} column (columns: {sorted(row)[:8]}); name the "
                                          "prompt and rejected columns")
        if column in row:
            raise CriticalTokensError(f"row {index} already has a {column!r} column; choose another column name")
    encoded = [encode_completion(tokenizer, row[prompt_column], row[rejected_column]) for row in rows]
    device = _device(model)
    out: list[dict[str, Any]] = []
    # Sort by length so that padded batches waste little; results go back in the original order.
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    weights: dict[int, list[float]] = {}
    starts = range(0, len(order), batch_size)
    for start in _progress(starts, total=len(starts), desc="scoring rejected tokens", enabled=progress):
        chunk = order[start: start + batch_size]
        ids, attention, labels = _batch([encoded[i] for i in chunk], _pad_id(tokenizer), device)
        s = critical_token_weights(model, positive, negative, ids, attention, labels, b=b)
        for row, index in enumerate(chunk):
            prompt_len, completion_len = len(encoded[index][0]), len(encoded[index][1])
            values = (1.0 - s[row, prompt_len: prompt_len + completion_len]).tolist()
            weights[index] = [round(v, 6) for v in values]
    for index, row in enumerate(rows):
        out.append({**row, column: weights[index]})
    return out
