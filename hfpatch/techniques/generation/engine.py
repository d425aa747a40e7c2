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
import inspect
import time
from typing import Any

import torch
from transformers.generation.configuration_utils import GenerationMode

from ... import compat
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


class SpeculativeEngine:
    """Verification loop + bookkeeping for one patched model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.drafters: list[tuple[Drafter, int]] = []  # (drafter, node budget)
        #: cuts each drafted tree to the part worth verifying (`adaptive_tree`); None verifies all of it
        self.tree_policy = None
        self.last_stats: dict[str, Any] = {}
        forward_params = inspect.signature(type(model).forward).parameters
        self._logits_to_keep = "logits_to_keep" in forward_params
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
            self.last_stats = {"fallback": problem}
            return original(*args, **kwargs)
        streamer = kwargs.pop("streamer", None)

        def speculative_loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                             synced_gpus=False, **model_kwargs):
            return self._loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                              streamer, model_kwargs)

        return original(*args, custom_generate=speculative_loop, **kwargs)

    # ----- the loop ---------------------------------------------------------------------------------
    def _loop_problem(self, input_ids, generation_config, model_kwargs) -> str | None:
        mode = generation_config.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            return f"generation mode {mode.value} is not greedy or sampling"
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

    def _forward(self, input_ids, position_ids, attention_mask, cache, keep_all_logits: bool):
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 0 if keep_all_logits else 1
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, **kwargs)

    def _loop(self, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
              model_kwargs):
        problem = self._loop_problem(input_ids, generation_config, model_kwargs)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if problem is not None:
            self.last_stats = {"fallback": problem}
            return type(model)._sample(model, input_ids, logits_processor=logits_processor,
                                       stopping_criteria=stopping_criteria, generation_config=generation_config,
                                       streamer=streamer, **model_kwargs)
        do_sample = generation_config.do_sample
        want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
        want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
        scores_out: list[torch.Tensor] = []
        logits_out: list[torch.Tensor] = []
        cache = model_kwargs[self._cache_kwarg]
        device = input_ids.device
        prompt_length = input_ids.shape[1]
        max_length = generation_config.max_length
        mask_dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        topk_wanted = max((d.topk_wanted for d, _ in self.drafters), default=0)
        context = input_ids[0].tolist()
        for drafter, _ in self.drafters:
            drafter.start(list(context))

        policy = self.tree_policy
        if policy is not None:
            policy.start_call()
        stats = {"forwards": 0, "draft_time_s": 0.0, "verify_time_s": 0.0, "tree_nodes": 0, "steps": 0,
                 "accepted_drafts": 0}

        def emit(token: int, scores: torch.Tensor, raw: torch.Tensor) -> bool:
            """Append one token exactly as plain decoding would; True when generation must stop."""
            nonlocal input_ids
            input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=-1)
            context.append(token)
            if want_scores:
                scores_out.append(scores)
            if want_logits:
                logits_out.append(raw)
            if streamer is not None:
                streamer.put(input_ids.new_tensor([token]).cpu())
            return bool(stopping_criteria(input_ids, tuple(scores_out) if want_scores else None).any())

        def choose(raw_logits: torch.Tensor) -> tuple[int, torch.Tensor]:
            scores = logits_processor(input_ids, raw_logits)
            if do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
            else:
                token = torch.argmax(scores, dim=-1)
            return int(token), scores

        start = time.perf_counter()
        positions = torch.arange(prompt_length, device=device)[None]
        out = self._forward(input_ids, positions, None, cache, keep_all_logits=False)
        stats["forwards"] += 1
        raw = out.logits[:, -1].to(dtype=torch.float32, copy=True)
        del out
        token, scores = choose(raw)
        done = emit(token, scores, raw)

        while not done:
            root_position = input_ids.shape[1] - 1
            remaining = max_length - input_ids.shape[1]
            t0 = time.perf_counter()
            pool = self.candidate_nodes
            tree = DraftTree(context[-1], max_nodes=pool, max_depth=max(remaining - 1, 0))
            if remaining > 1:
                for drafter, budget in self.drafters:
                    tree.max_nodes = min(pool, tree.num_drafted + budget)
                    drafter.draft(tree, context)
            if policy is not None:
                tree = policy.cut(tree)
            t1 = time.perf_counter()
            mask = tree.attention_mask(root_position, mask_dtype, device) if tree.num_drafted else None
            out = self._forward(tree.input_ids(device), tree.position_ids(root_position, device), mask, cache,
                                keep_all_logits=True)
            stats["forwards"] += 1
            node_logits = out.logits[0].to(dtype=torch.float32)
            del out
            accepted: list[int] = []
            node = 0
            while True:
                raw = node_logits[node : node + 1].clone()
                token, scores = choose(raw)
                done = emit(token, scores, raw)
                child = tree.children[node].get(token)
                if done or child is None:
                    break
                accepted.append(child)
                node = child
            keep = torch.cat([torch.arange(root_position + 1), torch.tensor(accepted, dtype=torch.long) + root_position])
            compat.keep_cache_positions(cache, keep)
            t2 = time.perf_counter()
            topk = node_logits.topk(topk_wanted, dim=-1).indices.cpu() if topk_wanted else None
            for drafter, _ in self.drafters:
                drafter.update(tree, topk, accepted, context)
            t3 = time.perf_counter()
            if policy is not None:
                policy.observe(tree.num_drafted, t3 - t0, len(accepted))
            stats["draft_time_s"] += (t1 - t0) + (t3 - t2)
            stats["verify_time_s"] += t2 - t1
            stats["tree_nodes"] += tree.num_drafted
            stats["steps"] += 1
            stats["accepted_drafts"] += len(accepted)

        for drafter, _ in self.drafters:
            drafter.finish(list(context), prompt_length)
        if streamer is not None:
            streamer.end()
        new_tokens = input_ids.shape[1] - prompt_length
        steps = max(stats["steps"], 1)
        self.last_stats = {
            "fallback": None,
            "forwards": stats["forwards"],
            "new_tokens": new_tokens,
            "mean_accepted_tokens_per_forward": new_tokens / stats["forwards"],
            "mean_tree_nodes": stats["tree_nodes"] / steps,
            "mean_accepted_drafts_per_step": stats["accepted_drafts"] / steps,
            "draft_time_s": stats["draft_time_s"],
            "verify_time_s": stats["verify_time_s"],
            "total_time_s": time.perf_counter() - start,
            "drafters": {d.name: d.stats() for d, _ in self.drafters},
        }
        if policy is not None:
            self.last_stats["tree_policy"] = policy.stats()
        if generation_config.return_dict_in_generate:
            return compat.decoder_only_generate_output(
                sequences=input_ids,
                scores=tuple(scores_out) if want_scores else None,
                logits=tuple(logits_out) if want_logits else None,
                cache=cache,
            )
        return input_ids
