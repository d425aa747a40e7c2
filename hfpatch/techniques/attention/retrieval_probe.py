"""Where a model retrieves: the calibration behind TidalDecode's ``selection_layers="auto"``.

The same measurement as ``benchmarks/longctx/retrieval_layers.py``, on a prompt built here from token ids
alone (no tokenizer, no dataset, no download), so that ``patch()`` can run it on any model:

- prompt: seeded random filler token ids with a random "passcode" span of ``SPAN`` tokens inserted at some
  depth, then a cue that repeats the span's first ``CUE`` tokens, then the rest of the span (teacher-forced),
  so that every query from the end of the cue on has to fetch the next passcode token from the span. Random
  tokens carry no meaning, so the only way to predict them is to look back at the span (induction/retrieval);
- per layer, over those answer queries: ``need`` = the largest attention mass any head of the layer puts on
  the span; ``cover`` = how often the span position holding the token to fetch is inside the layer's own
  top-``budget`` positions ranked as TidalDecode ranks them (attention probabilities summed over all query
  heads). (The benchmark script counts every passcode token; on random tokens a retrieving head looks at the
  one position it needs, so the probe asks about that one.)

``BATCH`` such prompts (passcodes at different depths), one forward each, through a temporary per-instance
attention function that runs transformers' sdpa for the outputs and, for the answer queries only, computes the
attention probabilities (what eager attention would return) and scores them. The forward stops inside the last
layer that can select (its attention output, its MLP and any later sliding-window layers are never needed). The
switch is undone before the function returns, success or not. Cost on SmolLM2-135M: about 7-11 s of one core's
CPU time (4 x 2048 tokens; docs/results/sparse-attention.md, with the cheaper prompts that were tried and why
they were not kept).

`choose_layers` turns the scores into selection layers (rule in its docstring); `fingerprint` names the
weights a calibration belongs to; `calibrate` caches results per fingerprint in this process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

import torch

from ... import compat, primitives

logger = logging.getLogger(__name__)

#: Version of the prompt and the rule; part of every fingerprint, so a changed method never reuses old layers.
PROBE_VERSION = 1
#: Tokens in each probe prompt (capped by the model's position limit).
LENGTH = 2048
#: Passcode span length and how many of its first tokens the cue repeats.
SPAN, CUE = 12, 4
#: Prompts in the one forward pass (passcodes at different depths; 4 keep the scores stable across seeds).
BATCH = 4
#: A retrieval layer puts at least this fraction of the strongest retrieval layer's need on the passcode.
NEED_FRACTION = 0.25
#: ... and at least this many times the span's share of the prompt (what attention spread evenly would put
#: there), so that a model with no retrieving head (e.g. random weights) gets no retrieval layer.
NEED_FLOOR = 4
#: A selection layer serves a retrieval layer at most REACH layers after it when its cover is >= COVER.
COVER, REACH = 0.75, 2
#: Models with more parameters than this print a line before the probe (it takes seconds) and after it.
SLOW_PARAMETERS = 50_000_000
#: ... and, for those, a progress line after each prompt once the probe has run this many seconds.
PROGRESS_AFTER = 5.0


@dataclasses.dataclass
class ProbeResult:
    """Per-layer scores of one probe (lists indexed by layer)."""

    need: list[float]
    cover: list[float]
    #: layers that can select (full-attention layers; sliding-window layers never run a sparse step)
    selectable: list[bool]
    length: int
    budget: int  # the top-k cut used for cover (the technique's budget, or 1/8 of the probe when smaller)
    seconds: float = 0.0


def fingerprint(model, adapter) -> str:
    """Identity of the weights a calibration belongs to: model type, a hash of the text config, and a hash of
    the bytes of a few parameters (first, middle and last; at most 64k values each), so a fine-tuned copy of
    the same architecture gets a different fingerprint while computing it costs milliseconds."""
    config = adapter.text_config()
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    params = [p for _, p in adapter.language_model.named_parameters()]
    for p in (params[0], params[len(params) // 2], params[-1]) if params else ():
        flat = p.detach().reshape(-1)[: 1 << 16].to("cpu", torch.float32)
        digest.update(str(tuple(p.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return f"{adapter.model_type}:{digest.hexdigest()[:16]}"


def _prompts(vocab: int, length: int, batch: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``ids [batch, length]`` and, per row, the positions of its passcode span (seeded, ids only)."""
    gen = torch.Generator().manual_seed(seed)
    # Skip the lowest ids (special tokens sit there in most vocabularies) when the vocabulary allows it.
    low = min(vocab // 16, 1000)
    context = length - (SPAN - 1)  # filler + span; then the span again without its last token
    rows, spans = [], []
    for b in range(batch):
        span = torch.randint(low, vocab, (SPAN,), generator=gen)
        filler = torch.randint(low, vocab, (context - SPAN,), generator=gen)
        # depths spread over the context (20%..70%), jittered
        frac = 0.2 + 0.5 * (b + torch.rand((), generator=gen).item()) / batch
        start = int(frac * (context - SPAN))
        row = torch.cat([filler[:start], span, filler[start:], span[:-1]])
        rows.append(row)
        spans.append(torch.arange(start, start + SPAN))
    return torch.stack(rows), spans


def bf16_matmuls_available(device: torch.device) -> bool:
    """True when this device multiplies bfloat16 matrices natively (CUDA; a CPU with AVX512-BF16 or AMX), where
    the probe's forward runs its matrix products in bfloat16 (about 6x less CPU time than float32 here)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _fast_matmuls(device: torch.device, precision: str):
    """The autocast context of the probe's forward: bfloat16 matrix products when ``precision`` is "auto" and the
    device has them natively, else nothing (the model's own dtype)."""
    import contextlib

    if precision == "auto" and bf16_matmuls_available(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def probe(model, adapter, *, budget: int, seed: int = 0, length: int | None = None,
          precision: str = "auto", rows_per_pass: int = 1, progress=None) -> ProbeResult:
    """Run the retrieval probe on `model` (unchanged afterwards) and return each layer's need and cover.

    ``precision="auto"`` runs the forward's matrix products in bfloat16 where the device has native bfloat16
    (the scores themselves are computed in float32; the chosen layers on SmolLM2-135M are the same as in
    float32, docs/results/sparse-attention.md); ``"model"`` keeps the model's dtype throughout.

    ``rows_per_pass`` prompts go through each forward (1: the same scores as one batch, smaller activations,
    with the early stop 25-30% less CPU time on SmolLM2-135M and Gemma 3 270M); ``progress(done, total, seconds)`` is called after each."""
    if precision not in ("auto", "model"):
        raise ValueError(f"precision must be 'auto' or 'model', not {precision!r}")
    config = adapter.text_config()
    limit = getattr(config, "max_position_embeddings", None) or LENGTH
    length = min(length or LENGTH, int(limit))
    if length < 4 * SPAN:
        raise ValueError(f"the retrieval probe needs at least {4 * SPAN} positions; this model has {length}")
    cut = max(1, min(budget, length // 8))  # a budget near the probe's length would keep everything
    ids, spans = _prompts(int(config.vocab_size), length, BATCH, seed)
    num_layers = len(adapter.decoder_layers())
    need, cover = torch.zeros(num_layers), torch.zeros(num_layers)
    selectable = [True] * num_layers
    answers = SPAN - CUE  # queries from the cue's last token on predict a passcode token
    first = length - answers

    # Which layers are scored: every layer can be, but a sliding-window layer (known from the config) never
    # selects; the forward stops after the last layer that can (its output and everything after it are unused).
    kinds = list(getattr(config, "layer_types", None) or [])
    for i, kind in enumerate(kinds[:num_layers]):
        selectable[i] = "sliding" not in str(kind)
    last = max((i for i in range(num_layers) if selectable[i]), default=num_layers - 1)
    rows: list[int] = []  # the prompts (rows of `ids`) in the current forward pass

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = getattr(module, "layer_idx", 0) or 0
        window = getattr(module, "sliding_window", None)
        if window is not None:
            selectable[layer] = False
        batch, heads, q_len, dim = query.shape
        if q_len != key.shape[2] or q_len < length:
            return compat.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
        # probabilities of the answer queries only: [B, Hq, answers, S], causal (and windowed) like eager
        # grouped per KV head (query head h reads KV head h // group), so the keys are read in place, not repeated
        kv_heads = key.shape[1]
        q = query[:, :, first:, :].float().reshape(batch, kv_heads, -1, dim)
        logits = (q @ key.float().transpose(-1, -2)).reshape(batch, heads, answers, -1)
        logits = logits * (dim ** -0.5 if scaling is None else scaling)
        if kwargs.get("softcap") is not None:
            logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
        positions = torch.arange(first, length)[:, None]
        cols = torch.arange(length)[None, :]
        allowed = cols <= positions
        if window is not None:
            allowed &= cols > positions - window
        probs = logits.masked_fill(~allowed.to(logits.device), float("-inf")).softmax(-1)
        for b, row in enumerate(rows):
            span = spans[row]
            p = probs[b].cpu()  # [Hq, answers, S]
            need[layer] += p[:, :, span].sum(-1).max(0).values.mean() / len(spans)
            top = p.sum(0).topk(cut, dim=-1).indices  # [answers, cut]
            target = span[CUE:, None]  # the passcode token each answer query has to fetch
            cover[layer] += (top == target).any(-1).float().mean() / len(spans)
        if layer >= last:
            raise _Done  # nothing after this layer is scored: skip its attention output and the layers after it
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)

    start = time.perf_counter()
    sub = adapter.text_sub_config()
    name, undo = primitives.use_attention_function(model, attention, mask_like="sdpa", label="probe",
                                                   sub_configs=(sub,) if sub else None)
    try:
        device = next(adapter.language_model.parameters()).device
        with torch.no_grad(), _fast_matmuls(device, precision):
            # Prompts in small groups (one by default): the same scores as one batch, but the activations of
            # a group stay small enough for the CPU's caches and the allocator's free lists.
            for first_row in range(0, len(spans), rows_per_pass):
                rows[:] = range(first_row, min(first_row + rows_per_pass, len(spans)))
                try:
                    adapter.language_model(input_ids=ids[rows].to(device), use_cache=False)
                except _Done:
                    pass
                if progress is not None:
                    progress(rows[-1] + 1, len(spans), time.perf_counter() - start)
    finally:
        undo()
    return ProbeResult(need=[round(float(x), 4) for x in need], cover=[round(float(x), 4) for x in cover],
                       selectable=selectable, length=length, budget=cut, seconds=time.perf_counter() - start)


class _Done(Exception):
    """Raised inside the probe's forward once the last layer it scores is done (never leaves `probe`)."""


def choose_layers(result: ProbeResult, full_layers: int) -> list[int]:
    """Selection layers from a probe. The rule, in order:

    1. ``full_layers`` (the first layer after the dense ones) always selects, as in the paper: the layers
       right after it need a position set from somewhere.
    2. Retrieval layers are the selectable layers past the dense ones whose need is at least
       ``NEED_FRACTION`` of the largest need and ``NEED_FLOOR`` times chance. Walking them in order, a retrieval layer is served when a
       selection layer at most ``REACH`` layers before it keeps the passcode (cover >= ``COVER``); one that
       is not served becomes a selection layer itself (a selection layer attends fully, so its own heads
       always see the passcode).
    3. Between two selection layers, no stretch of sparse layers runs longer than ``ceil(num_layers / 6)``:
       a longer one gets a selection layer at its middle (perplexity needs re-selection often enough). The
       layers after the last selection layer are left alone.

    Why these constants: on SmolLM2-135M (30 layers) the probe's retrieval layers are 7, 17, 18 and 20,
    layer 17 keeps the passcode for 18, and step 3 puts 12 between 7 and 17, which gives [2, 7, 12, 17, 20],
    the set hand-tuned on needles and perplexity there (docs/results/sparse-attention.md: 20 as its own
    selection layer and 12 between 7 and 17 were what held perplexity; sets with a selection layer after 20
    were not better).
    """
    layers = len(result.need)
    candidates = [i for i in range(full_layers, layers) if result.selectable[i]]
    if not candidates:
        return []
    chosen = {candidates[0]}
    top_need = max(result.need[i] for i in candidates)
    for layer in candidates:
        if layer in chosen or result.need[layer] < max(NEED_FRACTION * top_need, NEED_FLOOR * SPAN / result.length):
            continue
        served = any(layer - REACH <= s < layer and result.cover[s] >= COVER for s in chosen)
        if not served:
            chosen.add(layer)
    gap = -(-layers // 6)
    while True:
        ordered = sorted(chosen)
        wide = [(a, b) for a, b in zip(ordered, ordered[1:]) if b - a > gap]
        inside = [i for i in candidates if wide and wide[0][0] < i < wide[0][1]]
        if not inside:
            break
        a, b = wide[0]
        chosen.add(min(inside, key=lambda i: (abs(2 * i - (a + b)), i)))
    return sorted(chosen)


_CACHE: dict[str, tuple[list[int], ProbeResult]] = {}
#: How many probes ran in this process (tests count them).
probe_calls = 0


def calibrate(model, adapter, *, budget: int, full_layers: int, seed: int = 0,
              key: str | None = None) -> tuple[list[int], ProbeResult, bool]:
    """``(layers, probe result, cached)``: the selection layers for this model, probing once per
    ``key`` (the fingerprint plus the settings that change the result) in this process."""
    global probe_calls
    key = key or calibration_key(fingerprint(model, adapter), budget, full_layers, seed)
    if key in _CACHE:
        layers, result = _CACHE[key]
        return list(layers), result, True
    slow = sum(p.numel() for p in adapter.language_model.parameters()) > SLOW_PARAMETERS
    if slow:
        logger.warning("hfpatch: tidal_decode is probing which layers of this model retrieve (%d forward passes "
                       "of %d tokens; once per model in this process, and handle.to_recipe() keeps the result)",
                       BATCH, LENGTH)
    probe_calls += 1

    def progress(done, total, seconds):
        if slow and done < total and seconds > PROGRESS_AFTER:
            logger.warning("hfpatch: retrieval probe %d/%d prompts (%.0f s)", done, total, seconds)

    result = probe(model, adapter, budget=budget, seed=seed, progress=progress)
    layers = choose_layers(result, full_layers)
    if slow:
        logger.warning("hfpatch: tidal_decode selection layers %s (probe took %.1f s)", layers, result.seconds)
    _CACHE[key] = (layers, result)
    return list(layers), result, False


def calibration_key(model_fingerprint: str, budget: int, full_layers: int, seed: int = 0) -> str:
    """The string a recipe stores next to calibrated layers: the weights' fingerprint and the probe settings."""
    return f"{model_fingerprint}/budget={budget}/full_layers={full_layers}/seed={seed}/probe=v{PROBE_VERSION}"


def clear_cache() -> None:
    """Forget every calibration made in this process."""
    _CACHE.clear()
