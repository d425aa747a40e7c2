"""The speculative engine: one tree-verification loop shared by every drafter of a patch.

It runs inside the user's own `model.generate(...)` call: an instance-level wrapper passes transformers a
`custom_generate` callable, so generation config, logits processors, stopping criteria and the cache are
prepared by transformers exactly as without the patch. Each step, the drafters add candidate paths to one
tree rooted at the last token; one forward with an additive tree mask and explicit positions scores every
node; the engine walks down the tree choosing at each node exactly the token plain decoding would choose
(argmax, or a sample from the processed distribution) and follows the child holding it; the KV cache is
compacted to the accepted path. Output is therefore the same as plain decoding (greedy: token-identical;
sampling: same distribution). Requests it cannot serve exactly run the original path, with the reason in
the stats.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import threading
from typing import Any

import torch

from ... import compat
from .emit import Emitter, accept_path
from .step_stats import StepStats, Stopwatch
from .tree import DraftTree

_MODEL_KWARGS_SERVED = frozenset({"attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                                  "logits_to_keep", "token_type_ids"})


# ----- which generate options the engine serves -----------------------------------------------------------
# Every field of `transformers.GenerationConfig` and every `generate()` argument is in exactly one of the two
# tables below (tests/test_generate_options.py checks both against the installed transformers, and checks each
# entry's behaviour). "Served" means the output is exactly plain decoding's; a fallback runs the original
# `generate` for the whole call and `handle.stats[...]["fallback"]` says why.

#: Options the engine serves, and how. Most reach it as the logits processors and stopping criteria that
#: transformers prepares from them: the engine applies them to every emitted token, drafted or not, in
#: plain decoding's order (see emit.py), so the tokens are the same.
SERVED_OPTIONS: dict[str, str] = {
    # lengths and stops: stopping criteria / processors, checked after every emitted token
    **dict.fromkeys(("max_length", "max_new_tokens", "min_length", "min_new_tokens", "max_time", "eos_token_id",
                     "pad_token_id", "bos_token_id", "forced_eos_token_id", "stopping_criteria"),
                    "stopping criterion or logits processor, applied per emitted token"),
    "stop_strings": "the wrapper builds transformers' stop-string criterion from the `tokenizer` argument "
                    "(transformers never hands that to a custom loop) and adds it to stopping_criteria",
    # decoding: argmax or one sample of the processed distribution, as plain decoding draws it
    **dict.fromkeys(("do_sample", "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff",
                     "eta_cutoff"), "sampling warper, applied per emitted token"),
    **dict.fromkeys(("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                     "renormalize_logits", "forced_bos_token_id", "remove_invalid_values",
                     "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
                     "sequence_bias", "watermarking_config", "encoder_no_repeat_ngram_size", "logits_processor",
                     "prefix_allowed_tokens_fn"), "logits processor, applied per emitted token"),
    **dict.fromkeys(("guidance_scale", "negative_prompt_ids", "negative_prompt_attention_mask"),
                    "classifier-free guidance processor: it runs its own unconditional forward per emitted token"),
    "tokenizer": "used by the wrapper for stop_strings (token_healing falls back)",
    "streamer": "the engine streams the prompt, then every emitted token, and ends the stream",
    # outputs
    **dict.fromkeys(("return_dict_in_generate", "output_scores", "output_logits"),
                    "scores and raw logits recorded per emitted token"),
    "prefill_chunk_size": "the prompt is prefilled in chunks of this size, as transformers does",
    # options that change nothing in greedy or sampling decoding of a decoder-only model
    **dict.fromkeys(("early_stopping", "length_penalty", "low_memory"),
                    "read by beam or contrastive search only, which fall back"),
    "decoder_start_token_id": "read by encoder-decoder models only (not patched)",
    **dict.fromkeys(("is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
                     "assistant_confidence_threshold", "max_matching_ngram_size", "assistant_lookbehind",
                     "target_lookbehind", "assistant_ensemble_weight", "speculation_type"),
                    "read by assisted generation only, which falls back"),
    **dict.fromkeys(("cache_config", "max_cache_len", "compile_config", "disable_compile"),
                    "read for static or quantized caches only, which fall back"),
    "continuous_batching_config": "read by continuous batching only (cache_implementation='paged' falls back)",
    "trust_remote_code": "read only to load Hub code, which the engine never runs (modes needing it fall back)",
    "generation_config": "merged by transformers as without the patch; its fields are judged one by one",
    **dict.fromkeys(("inputs", "input_ids", "attention_mask", "position_ids", "token_type_ids", "logits_to_keep"),
                    "model input the engine builds its own steps from (a padded attention_mask falls back)"),
}


def _set(value) -> bool:
    return value is not None and value is not False


#: Options on the prepared generation config that make the engine fall back: (applies to the config, reason).
_CONFIG_FALLBACKS: dict[str, tuple[Any, str]] = {
    "num_beams": (lambda c: (c.num_beams or 1) > 1, "beam search (num_beams > 1): the engine decodes one sequence"),
    "num_return_sequences": (lambda c: (c.num_return_sequences or 1) > 1, "num_return_sequences > 1"),
    "num_beam_groups": (lambda c: (c.num_beam_groups or 1) > 1, "group beam search (num_beam_groups > 1)"),
    "diversity_penalty": (lambda c: bool(c.diversity_penalty) and (c.num_beam_groups or 1) > 1,
                          "group beam search (diversity_penalty with num_beam_groups > 1)"),
    "constraints": (lambda c: c.constraints is not None, "constrained beam search (constraints)"),
    "force_words_ids": (lambda c: c.force_words_ids is not None, "constrained beam search (force_words_ids)"),
    "penalty_alpha": (lambda c: compat.generation_mode(c) == "contrastive_search",
                      "contrastive search (penalty_alpha with top_k > 1)"),
    "dola_layers": (lambda c: c.dola_layers is not None, "DoLa decoding (dola_layers)"),
    "use_mtp": (lambda c: _set(c.use_mtp), "multi-token prediction (use_mtp) is transformers' own assisted decoding"),
    "prompt_lookup_num_tokens": (lambda c: c.prompt_lookup_num_tokens is not None,
                                 "prompt_lookup_num_tokens is transformers' own assisted decoding"),
    "assistant_early_exit": (lambda c: c.assistant_early_exit is not None,
                             "assistant_early_exit is transformers' own assisted decoding"),
    "output_attentions": (lambda c: _set(c.output_attentions),
                          "output_attentions / output_hidden_states are not produced by tree verification"),
    "output_hidden_states": (lambda c: _set(c.output_hidden_states),
                             "output_attentions / output_hidden_states are not produced by tree verification"),
    "token_healing": (lambda c: bool(c.token_healing),
                      "token_healing: transformers (5.24) never hands the tokenizer that healing needs to a custom "
                      "decoding loop, and heals the prompt before the loop; the original generate heals and decodes"),
    "use_cache": (lambda c: c.use_cache is False, "use_cache=False (tree verification needs the KV cache)"),
    "cache_implementation": (lambda c: c.cache_implementation not in (None, "dynamic"),
                             "cache_implementation is not 'dynamic' (the engine compacts a DynamicCache to the "
                             "accepted path)"),
}

#: `generate()` arguments that make the engine fall back: (applies to the given value, reason).
_ARGUMENT_FALLBACKS: dict[str, tuple[Any, str]] = {
    "inputs_embeds": (lambda v: True, "inputs_embeds given (the engine drafts from token ids)"),
    "assistant_model": (lambda v: True, "assistant_model was given (transformers' own assisted decoding)"),
    "assistant_tokenizer": (lambda v: True, "assistant_tokenizer was given (transformers' own assisted decoding)"),
    "custom_generate": (lambda v: True, "custom_generate was given (another decoding loop)"),
    "synced_gpus": (lambda v: bool(v), "synced_gpus=True (decoding in lockstep with other processes)"),
}

#: Options that make the engine run the original generate, and why (the `reason`s above; conditions in code).
#: Besides these: batch size > 1, a padded attention_mask, a pre-filled cache, model inputs the engine does
#: not know, attention backends that cannot take a tree mask, a tree larger than a sliding window.
FALLBACK_OPTIONS: dict[str, str] = {name: reason for table in (_CONFIG_FALLBACKS, _ARGUMENT_FALLBACKS)
                                    for name, (_, reason) in table.items()}


class Drafter:
    """Proposes candidate continuations. One instance lives as long as its patch (state persists across calls).

    Several generate calls may run at once (threads calling `generate` on one model), and their steps
    interleave. So a drafter keeps two kinds of state apart:

    - what belongs to one call (its n-gram index, the candidates of its last step) lives in the object
      `start` returns; the engine keeps it in that call's state and passes it back as the last argument of
      `draft`, `update` and `finish` (a drafter whose `start` returns None keeps none and is called without it);
    - what is learned across calls (a recycling table, acceptance estimates, earlier outputs) lives on the
      drafter. The engine never calls into one drafter from two threads at once (it holds a lock per
      drafter around every call into it, never around a model forward), so that state stays consistent.
    """

    name = "drafter"
    #: how many top tokens per tree node `update` wants (0: none)
    topk_wanted = 0
    #: True: `start` also receives the call's `CallInfo` (its generation config and the target's cache)
    wants_call_info = False

    def start(self, prompt: list[int]) -> Any:
        """A new generate call begins with this prompt; returns that call's drafting state (or None).

        A drafter with `wants_call_info = True` is called as `start(prompt, info)` with a `CallInfo`.
        """
        return None

    def draft(self, tree: DraftTree, context: list[int], *state: Any) -> None:
        """Add candidate paths to `tree` (its root is `context[-1]`), staying within `tree.max_nodes`."""

    def update(self, tree: DraftTree, topk: torch.Tensor | None, accepted: list[int], context: list[int],
               *state: Any) -> None:
        """After verification: `topk` [nodes, k] of the target at each node, `accepted` node indices."""

    def finish(self, sequence: list[int], prompt_length: int, *state: Any) -> None:
        """The generate call ended with `sequence` (prompt included)."""

    def stats(self) -> dict[str, Any]:
        return {}


@dataclasses.dataclass
class CallInfo:
    """What a drafter asking for it (`Drafter.wants_call_info`) learns as a call starts."""

    #: the call's prepared generation config (do_sample, temperature, ...)
    generation_config: Any
    #: the target's KV cache of this call: after every step it holds exactly the accepted sequence but its
    #: last token; a drafter may read it (early exit shares its first layers), never write to it
    cache: Any


def _with_state(method, *args: Any, state: Any = None):
    """Call a drafter or tree-policy method, passing the call's state only when its `start` returned one."""
    return method(*args) if state is None else method(*args, state)


@dataclasses.dataclass
class _Call:
    """The state of one served generate call, shared by the steps of the loop."""

    out: Emitter
    cache: Any
    max_length: int
    #: dtype of the additive tree mask (the model's float dtype)
    mask_dtype: torch.dtype
    #: top tokens per tree node the drafters' `update` wants (0: none)
    topk_wanted: int
    stats: StepStats
    #: per drafter (in the engine's order): the state its `start` returned for this call
    drafter_states: list[Any] = dataclasses.field(default_factory=list)
    #: the state the tree policy's `start_call` returned for this call
    policy_state: Any = None
    #: prefill the prompt in chunks of this many tokens (`GenerationConfig.prefill_chunk_size`); None: at once
    prefill_chunk_size: int | None = None
    #: the sliding window of the model's sliding-window layers (None: it has none)
    window: int | None = None
    #: whether some layers attend to everything (then the tree mask goes per layer type)
    has_full_layers: bool = True


class SpeculativeEngine:
    """Verification loop + bookkeeping for one patched model.

    Thread safety: any number of threads may call the patched `generate` at once. Everything one call
    changes as it runs (sequence, cache, tree, statistics, each drafter's and the tree policy's per-call
    state) lives in that call's `_Call`; the state shared by calls (drafter tables and estimates, the tree
    policy's timings) is only touched under one lock per drafter and one for the tree policy, taken around
    the drafting bookkeeping and never around a model forward. Each call's output is what it would be alone
    (sampling draws from torch's global random generator, which concurrent calls share, as they do unpatched).
    `last_stats` (what `handle.stats` shows) are those of the call that ended last.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.drafters: list[tuple[Drafter, int]] = []  # (drafter, node budget)
        #: cuts each drafted tree to the part worth verifying (`adaptive_tree`); None verifies all of it
        self.tree_policy = None
        #: statistics of the generate call that ended last (served or fallen back); with concurrent calls,
        #: whichever finished last. Replaced as a whole, never updated in place, so a reader sees one call's.
        self.last_stats: dict[str, Any] = {}
        self._logits_to_keep = compat.forward_accepts(model, "logits_to_keep")
        self._cache_kwarg = compat.cache_kwarg(model)
        self._new_locks()

    def _new_locks(self) -> None:
        self._drafter_locks = [threading.Lock() for _ in self.drafters]
        self._policy_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Locks cannot be copied or pickled; a copy of the engine gets fresh ones (see `__setstate__`).
        state = dict(self.__dict__)
        state.pop("_drafter_locks", None)
        state.pop("_policy_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._new_locks()

    def add_drafter(self, drafter: Drafter, max_nodes: int) -> None:
        self.drafters.append((drafter, max_nodes))
        self._drafter_locks.append(threading.Lock())

    def exclusive(self, drafter: Drafter):
        """The lock that keeps running generate calls out of `drafter` (for resetting or exporting its state)."""
        return next(lock for (d, _), lock in zip(self.drafters, self._drafter_locks) if d is drafter)

    @property
    def candidate_nodes(self) -> int:
        """Nodes the drafters may propose per step."""
        return sum(budget for _, budget in self.drafters)

    @property
    def max_nodes(self) -> int:
        """Nodes one verification forward may hold."""
        if self.tree_policy is not None:
            return min(self.candidate_nodes, self.tree_policy.max_nodes)
        return self.candidate_nodes

    # ----- the generate wrapper -----------------------------------------------------------------------
    def _request_problem(self, request: dict[str, Any]) -> tuple[str | None, Any]:
        """Why a generate call cannot be served exactly (None when it can), judged before transformers runs,
        and the generation config transformers will decode it with.

        `request`: the call's arguments by name. Decided here rather than in the loop wherever possible,
        because only here can the call still go to the original `generate` as a whole; inside the loop the
        only way back is transformers' greedy/sampling loop.
        """
        if not self.drafters:
            return "the recipe has no drafter technique (e.g. token_recycling, ngram_lookup)", None
        for name, (applies, reason) in _ARGUMENT_FALLBACKS.items():
            if request.get(name) is not None and applies(request[name]):
                return reason, None
        inputs = request.get("inputs", request.get("input_ids"))
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.shape[0] > 1:
            return f"batch size {inputs.shape[0]} > 1 is not supported yet", None
        try:
            config = compat.prepared_generation_config(
                self.model, request.get("generation_config"),
                **{k: v for k, v in request.items() if k not in compat.GENERATE_ARGUMENTS})
        except Exception as exc:  # noqa: BLE001 - the original generate raises it again, for the user to see
            return f"transformers rejected the generation config ({type(exc).__name__}: {exc})", None
        for name, (applies, reason) in _CONFIG_FALLBACKS.items():
            if applies(config):
                return reason, config
        mode = compat.generation_mode(config)
        if mode not in (compat.GREEDY_SEARCH, compat.SAMPLE):
            return f"generation mode {mode} is not greedy or sampling", config
        attention = compat.attn_implementation(self.model.config.get_text_config())
        if not compat.accepts_tree_mask(attention):
            return f"attention backend {attention!r} cannot take a tree mask (use 'sdpa' or 'eager')", config
        return None, config

    def _stop_strings_as_criteria(self, request: dict[str, Any], config) -> None:
        """Serve `stop_strings` although the loop never sees the tokenizer (see `compat.stop_string_criteria`):
        build transformers' own stop-string criterion here and pass the call on without `stop_strings`.

        A criterion the caller passed in `stopping_criteria` of the same type wins, as in transformers.
        Without a tokenizer nothing changes, so transformers raises its own clear error.
        """
        tokenizer = request.get("tokenizer")
        if config is None or config.stop_strings is None or tokenizer is None:
            return
        custom = list(request.get("stopping_criteria") or [])
        criterion = compat.stop_string_criteria(tokenizer, config.stop_strings)
        if not any(type(c) is type(criterion) for c in custom):
            custom.append(criterion)
        request["stopping_criteria"] = compat.stopping_criteria_list(custom)
        given = request.get("generation_config")
        if given is not None and "stop_strings" not in request and self.model.generation_config.stop_strings is None:
            # They came from the caller's config object: unset them on a copy (a keyword next to a config
            # object makes transformers warn); a model default would fill them in again, so then the keyword.
            request["generation_config"] = given = copy.deepcopy(given)
            given.stop_strings = None
        else:
            request["stop_strings"] = None

    def generate(self, original, *args: Any, **kwargs: Any):
        """Instance-level replacement of `model.generate` (see `primitives.wrap_generate`).

        A request the engine cannot serve exactly (see `FALLBACK_OPTIONS`) runs the original `generate`
        unchanged; `last_stats` then says why, once that call has ended (so a generate call nested inside
        it, such as an assistant's, does not overwrite the reason).
        """
        try:
            bound = inspect.signature(original).bind_partial(*args, **kwargs)
        except TypeError:  # transformers raises the same for the user
            bound = None
        request: dict[str, Any] = {}
        if bound is not None:
            for name, value in bound.arguments.items():
                if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    request.update(value)
                else:
                    request[name] = value
        problem, config = ("generate's arguments do not match its signature", None) if bound is None else \
            self._request_problem(request)
        if problem is not None:
            try:
                return original(*args, **kwargs)
            finally:
                self.last_stats = StepStats.fallback(problem)
        # transformers hands a callable `custom_generate` neither the streamer nor the tokenizer: the streamer
        # reaches the loop through this closure (transformers must not also see it, or it would stream the
        # prompt twice); what needs the tokenizer is done here (stop strings) or falls back (token healing).
        streamer = request.pop("streamer", None)
        self._stop_strings_as_criteria(request, config)

        def speculative_loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                             synced_gpus=False, **model_kwargs):
            return self._loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                              streamer, model_kwargs)

        return original(**request, custom_generate=speculative_loop)

    # ----- the loop ---------------------------------------------------------------------------------
    def _loop_problem(self, input_ids, generation_config, model_kwargs) -> str | None:
        mode = compat.generation_mode(generation_config)
        if mode not in (compat.GREEDY_SEARCH, compat.SAMPLE):
            return f"generation mode {mode} is not greedy or sampling"
        if generation_config.output_attentions or generation_config.output_hidden_states:
            return "output_attentions / output_hidden_states are not produced by tree verification"
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return "padded input (attention_mask has zeros)"
        unexpected = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _MODEL_KWARGS_SERVED)
        if unexpected:
            return f"model inputs {unexpected} are not served by the engine"
        cache = model_kwargs.get(self._cache_kwarg)
        if cache is None or not compat.compactable_cache(cache):
            return f"cache type {type(cache).__name__} cannot be compacted to a tree path"
        if cache.get_seq_length() != 0:
            return "generation restarting from a pre-filled cache"
        windows = {w for w in compat.sliding_windows(cache) if w is not None}
        if len(windows) > 1:
            return f"sliding-window layers with different windows {sorted(windows)}"
        if windows and self.max_nodes + 1 >= min(windows):
            # Tree masks of sliding layers assume every node's ancestors lie inside its window.
            return (f"sliding-window layers: a tree of up to {self.max_nodes} drafted nodes does not fit the "
                    f"window ({min(windows)}); use a smaller tree (max_nodes / template / max_tree_nodes)")
        return None

    def _loop(self, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
              model_kwargs):
        """The `custom_generate` loop: prefill, then draft -> verify -> accept steps until a stop."""
        problem = self._loop_problem(input_ids, generation_config, model_kwargs)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if problem is not None:
            self.last_stats = StepStats.fallback(problem)
            return compat.sample_loop(model)(input_ids, logits_processor=logits_processor,
                                             stopping_criteria=stopping_criteria,
                                             generation_config=generation_config, streamer=streamer,
                                             **model_kwargs)
        out = Emitter(input_ids, logits_processor, stopping_criteria, generation_config, streamer)
        call = self._start_call(out, generation_config, model_kwargs[self._cache_kwarg])
        done = self._prefill(call)
        while not done:
            done = self._step(call)
        return self._finish(call)

    def _start_call(self, out: Emitter, generation_config, cache) -> _Call:
        """Tell the drafters and the tree policy that a call begins, keeping the per-call state each returns
        in the new call's state; the call's clock starts last."""
        states = []
        info = CallInfo(generation_config, cache)
        for (drafter, _), lock in zip(self.drafters, self._drafter_locks):
            with lock:
                states.append(drafter.start(list(out.context), info) if drafter.wants_call_info
                              else drafter.start(list(out.context)))
        policy_state = None
        if self.tree_policy is not None:
            with self._policy_lock:
                policy_state = self.tree_policy.start_call()
        dtype = self.model.dtype
        windows = compat.sliding_windows(cache)
        window = next((w for w in windows if w is not None), None)
        if window is not None:
            # Sliding layers keep the positions a tree pushes out of their window until the tree is compacted
            # to its accepted path (`_keep_path`), which cuts them back to the window; `_finish` turns it off.
            compat.record_sliding_past(cache, True)
        return _Call(out=out, cache=cache, max_length=generation_config.max_length, window=window,
                     has_full_layers=any(w is None for w in windows),
                     mask_dtype=dtype if dtype.is_floating_point else torch.float32,
                     topk_wanted=max((d.topk_wanted for d, _ in self.drafters), default=0),
                     stats=StepStats(), drafter_states=states, policy_state=policy_state,
                     prefill_chunk_size=getattr(generation_config, "prefill_chunk_size", None))

    def _drafters_with_state(self, call: _Call):
        """(drafter, node budget, its lock, its state in `call`) for every drafter, in order."""
        states = call.drafter_states or [None] * len(self.drafters)
        return [(d, budget, lock, state)
                for (d, budget), lock, state in zip(self.drafters, self._drafter_locks, states)]

    def _forward(self, input_ids, position_ids, attention_mask, cache, keep_all_logits: bool):
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 0 if keep_all_logits else 1
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, **kwargs)

    def _prefill(self, call: _Call) -> bool:
        """One forward over the prompt, emitting the first new token; True when generation must stop."""
        input_ids = call.out.input_ids
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        # Chunks bound the prefill's activation memory on long prompts, as `prefill_chunk_size` asks; each
        # chunk attends to the cached ones, so only the last chunk's last logits are needed.
        size = call.prefill_chunk_size or input_ids.shape[1]
        for start in range(0, input_ids.shape[1], size):
            chunk = slice(start, start + size)
            output = self._forward(input_ids[:, chunk], positions[:, chunk], None, call.cache, keep_all_logits=False)
        call.stats.forwards += 1
        raw = output.logits[:, -1].to(dtype=torch.float32, copy=True)
        del output
        return call.out.next_token(raw)[1]

    def _step(self, call: _Call) -> bool:
        """Draft a tree, verify it in one forward, accept its longest right path + one bonus token, keep
        that path in the cache, let the drafters learn. True when generation must stop."""
        watch = Stopwatch()
        tree = self._draft(call)
        draft_s = watch.lap()
        root_position = call.out.length - 1
        node_logits = self._verify(call, tree, root_position)
        accepted, done = accept_path(call.out, tree, node_logits)
        self._keep_path(call, root_position, accepted)
        verify_s = watch.lap()
        self._update_drafters(call, tree, node_logits, accepted)
        draft_s += watch.lap()
        if self.tree_policy is not None:
            with self._policy_lock:
                _with_state(self.tree_policy.observe, tree.num_drafted, watch.total(), len(accepted),
                            state=call.policy_state)
        call.stats.add_step(tree.num_drafted, len(accepted), draft_s, verify_s)
        return done

    def _draft(self, call: _Call) -> DraftTree:
        """The tree to verify: each drafter adds paths within its node budget, then the policy cuts it.

        The root is the last token; depth stays below the tokens left before max_length (the bonus token
        takes the last one), so nothing is drafted when one token is left.
        """
        context = call.out.context
        remaining = call.max_length - call.out.length
        pool = self.candidate_nodes
        tree = DraftTree(context[-1], max_nodes=pool, max_depth=max(remaining - 1, 0))
        if remaining > 1:
            for drafter, budget, lock, state in self._drafters_with_state(call):
                tree.max_nodes = min(pool, tree.num_drafted + budget)
                with lock:
                    _with_state(drafter.draft, tree, context, state=state)
        if self.tree_policy is not None:
            with self._policy_lock:
                tree = _with_state(self.tree_policy.cut, tree, state=call.policy_state)
        return tree

    def _verify(self, call: _Call, tree: DraftTree, root_position: int) -> torch.Tensor:
        """One forward over every node of `tree` (tree mask, positions by depth): raw fp32 logits [nodes, vocab]."""
        device = call.out.input_ids.device
        mask = None
        if tree.num_drafted and call.window is None:
            mask = tree.attention_mask(root_position, call.mask_dtype, device)
        elif tree.num_drafted:
            # A sliding layer sees the positions before the root that it still holds (at most window - 1) and
            # masks each node's own window; models with both kinds of layer take one mask per layer type.
            visible = min(root_position, call.window - 1)
            mask = tree.attention_mask(visible, call.mask_dtype, device, window=call.window)
            if call.has_full_layers:
                mask = {"sliding_attention": mask,
                        "full_attention": tree.attention_mask(root_position, call.mask_dtype, device)}
        output = self._forward(tree.input_ids(device), tree.position_ids(root_position, device), mask, call.cache,
                               keep_all_logits=True)
        call.stats.forwards += 1
        node_logits = output.logits[0].to(dtype=torch.float32)
        del output
        return node_logits

    @staticmethod
    def _keep_path(call: _Call, root_position: int, accepted: list[int]) -> None:
        """Compact the cache to the prefix, the root and the accepted nodes (the bonus token is not cached)."""
        path = torch.tensor(accepted, dtype=torch.long) + root_position
        compat.keep_cache_positions(call.cache, torch.cat([torch.arange(root_position + 1), path]))

    def _update_drafters(self, call: _Call, tree: DraftTree, node_logits: torch.Tensor, accepted: list[int]) -> None:
        """Show every drafter the verified tree, the target's top tokens per node and the accepted path."""
        k = call.topk_wanted
        topk = node_logits.topk(k, dim=-1).indices.cpu() if k else None
        for drafter, _, lock, state in self._drafters_with_state(call):
            with lock:
                _with_state(drafter.update, tree, topk, accepted, call.out.context, state=state)

    def _finish(self, call: _Call):
        """End the call: drafters see the whole sequence, the streamer ends, `last_stats` is set."""
        for drafter, _, lock, state in self._drafters_with_state(call):
            with lock:
                _with_state(drafter.finish, list(call.out.context), call.out.prompt_length, state=state)
        call.out.close()
        if call.window is not None:
            compat.record_sliding_past(call.cache, False)
        # The shared parts of the stats (drafter tables, policy timings) are read under their locks, taken
        # in the engine's fixed order (drafters, then the policy), the only place more than one is held.
        with contextlib.ExitStack() as held:
            for lock in self._drafter_locks:
                held.enter_context(lock)
            held.enter_context(self._policy_lock)
            stats = call.stats.as_dict(call.out.new_tokens, self.drafters, self.tree_policy, call.policy_state)
        self.last_stats = stats
        return call.out.result(call.cache)
