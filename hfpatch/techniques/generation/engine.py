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

import copy
import dataclasses
from typing import Any

import torch

from ... import compat
from .emit import Emitter, accept_path
from .step_stats import StepStats, Stopwatch
from .tree import DraftTree

_MODEL_KWARGS_SERVED = frozenset({"attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                                  "logits_to_keep", "token_type_ids"})


class Drafter:
    """Proposes candidate continuations. One instance lives as long as its patch (state persists across calls)."""

    name = "drafter"
    #: how many top tokens per tree node `update` wants (0: none)
    topk_wanted = 0

    def start(self, prompt: list[int]) -> None:
        """A new generate call begins with this prompt."""

    def draft(self, tree: DraftTree, context: list[int]) -> None:
        """Add candidate paths to `tree` (its root is `context[-1]`), staying within `tree.max_nodes`."""

    def update(self, tree: DraftTree, topk: torch.Tensor | None, accepted: list[int], context: list[int]) -> None:
        """After verification: `topk` [nodes, k] of the target at each node, `accepted` node indices."""

    def finish(self, sequence: list[int], prompt_length: int) -> None:
        """The generate call ended with `sequence` (prompt included)."""

    def stats(self) -> dict[str, Any]:
        return {}


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


class SpeculativeEngine:
    """Verification loop + bookkeeping for one patched model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.drafters: list[tuple[Drafter, int]] = []  # (drafter, node budget)
        #: cuts each drafted tree to the part worth verifying (`adaptive_tree`); None verifies all of it
        self.tree_policy = None
        self.last_stats: dict[str, Any] = {}
        self._logits_to_keep = compat.forward_accepts(model, "logits_to_keep")
        self._cache_kwarg = compat.cache_kwarg(model)

    def add_drafter(self, drafter: Drafter, max_nodes: int) -> None:
        self.drafters.append((drafter, max_nodes))

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
        """Tell the drafters and the tree policy that a call begins; the call's clock starts last."""
        for drafter, _ in self.drafters:
            drafter.start(list(out.context))
        if self.tree_policy is not None:
            self.tree_policy.start_call()
        dtype = self.model.dtype
        return _Call(out=out, cache=cache, max_length=generation_config.max_length,
                     mask_dtype=dtype if dtype.is_floating_point else torch.float32,
                     topk_wanted=max((d.topk_wanted for d, _ in self.drafters), default=0),
                     stats=StepStats())

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
            self.tree_policy.observe(tree.num_drafted, watch.total(), len(accepted))
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
            for drafter, budget in self.drafters:
                tree.max_nodes = min(pool, tree.num_drafted + budget)
                drafter.draft(tree, context)
        if self.tree_policy is not None:
            tree = self.tree_policy.cut(tree)
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
        for drafter, _ in self.drafters:
            drafter.update(tree, topk, accepted, call.out.context)

    def _finish(self, call: _Call):
        """End the call: drafters see the whole sequence, the streamer ends, `last_stats` is set."""
        for drafter, _ in self.drafters:
            drafter.finish(list(call.out.context), call.out.prompt_length)
        call.out.close()
        self.last_stats = call.stats.as_dict(call.out.new_tokens, self.drafters, self.tree_policy)
        return call.out.result(call.cache)
