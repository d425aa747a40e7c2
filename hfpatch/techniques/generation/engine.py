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
import threading
from typing import Any

import torch

from ... import compat
from .emit import Emitter, accept_path
from .step_stats import StepStats, Stopwatch
from .tree import DraftTree

_MODEL_KWARGS_SERVED = frozenset({"attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                                  "logits_to_keep", "token_type_ids"})


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

    def start(self, prompt: list[int]) -> Any:
        """A new generate call begins with this prompt; returns that call's drafting state (or None)."""
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


class SpeculativeEngine:
    """Verification loop + bookkeeping for one patched model.

    Thread safety: any number of threads may call the patched `generate` at once. Everything one call
    changes as it runs (sequence, cache, tree, statistics, each drafter's and the tree policy's per-call
    state) lives in that call's `_Call`; the state shared by calls (drafter tables and estimates, the tree
    policy's timings) is only touched under one lock per drafter and one for the tree policy, taken around
    the drafting bookkeeping and never around a model forward. Each call's output is what it would be alone.
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
    def _request_problem(self, args: tuple, kwargs: dict[str, Any]) -> str | None:
        """Why a generate call cannot be served exactly (None when it can), judged before transformers runs."""
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if not self.drafters:
            return "the recipe has no drafter technique (e.g. token_recycling, ngram_lookup)"
        if "inputs_embeds" in kwargs:
            return "inputs_embeds given (the engine drafts from token ids)"
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.shape[0] > 1:
            return f"batch size {inputs.shape[0]} > 1 is not supported yet"
        for key in ("assistant_model", "custom_generate", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(key) is not None:
                return f"{key} was given"
        config = copy.deepcopy(kwargs.get("generation_config") or self.model.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
        if (config.num_beams or 1) > 1:
            return "beam search (num_beams > 1)"
        if (config.num_return_sequences or 1) > 1:
            return "num_return_sequences > 1"
        if config.prompt_lookup_num_tokens is not None:
            return "prompt_lookup_num_tokens is set in the generation config"
        attention = compat.attn_implementation(self.model.config.get_text_config())
        if not compat.accepts_tree_mask(attention):
            return f"attention backend {attention!r} cannot take a tree mask (use 'sdpa' or 'eager')"
        return None

    def generate(self, original, *args: Any, **kwargs: Any):
        """Instance-level replacement of `model.generate` (see `primitives.wrap_generate`)."""
        problem = self._request_problem(args, kwargs)
        if problem is not None:
            self.last_stats = StepStats.fallback(problem)
            return original(*args, **kwargs)
        streamer = kwargs.pop("streamer", None)

        def speculative_loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                             synced_gpus=False, **model_kwargs):
            return self._loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                              streamer, model_kwargs)

        return original(*args, custom_generate=speculative_loop, **kwargs)

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
        window = compat.sliding_window(self.model.config)
        if window is not None and generation_config.max_length + self.max_nodes >= window - 1:
            # Below the window a sliding layer keeps (and masks) like a full one, so trees stay exact there.
            return (f"sliding-window layers: prompt + max_new_tokens + tree ({generation_config.max_length} + "
                    f"{self.max_nodes}) may exceed the window ({window}) that the tree cache must stay inside")
        cache = model_kwargs.get(self._cache_kwarg)
        if cache is None or not compat.compactable_cache(cache):
            return f"cache type {type(cache).__name__} cannot be compacted to a tree path"
        if cache.get_seq_length() != 0:
            return "generation restarting from a pre-filled cache"
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
        for (drafter, _), lock in zip(self.drafters, self._drafter_locks):
            with lock:
                states.append(drafter.start(list(out.context)))
        policy_state = None
        if self.tree_policy is not None:
            with self._policy_lock:
                policy_state = self.tree_policy.start_call()
        dtype = self.model.dtype
        return _Call(out=out, cache=cache, max_length=generation_config.max_length,
                     mask_dtype=dtype if dtype.is_floating_point else torch.float32,
                     topk_wanted=max((d.topk_wanted for d, _ in self.drafters), default=0),
                     stats=StepStats(), drafter_states=states, policy_state=policy_state)

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
        output = self._forward(input_ids, positions, None, call.cache, keep_all_logits=False)
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
        mask = tree.attention_mask(root_position, call.mask_dtype, device) if tree.num_drafted else None
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
        # The shared parts of the stats (drafter tables, policy timings) are read under their locks, taken
        # in the engine's fixed order (drafters, then the policy), the only place more than one is held.
        with contextlib.ExitStack() as held:
            for lock in self._drafter_locks:
                held.enter_context(lock)
            held.enter_context(self._policy_lock)
            stats = call.stats.as_dict(call.out.new_tokens, self.drafters, self.tree_policy, call.policy_state)
        self.last_stats = stats
        return call.out.result(call.cache)
