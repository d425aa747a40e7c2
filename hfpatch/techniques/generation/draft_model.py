"""Draft-model drafting: a small model sharing the target's vocabulary proposes a chain or a dynamic tree.

The draft model keeps its own KV cache, in step with the accepted sequence: each step it first drops what the
target rejected (it keeps the cached context and the drafted nodes the target accepted, by position), feeds the
tokens it has not seen (the bonus token, at least), then grows the step's tree:

- `chain`: one path of `draft_length` tokens, the draft's argmax at each (one draft forward per token);
- `dynamic` (DySpec, Xiong et al., 2024, arXiv:2410.11744): a tree grown greedily by the draft's cumulative
  probability: the most probable candidates anywhere in the tree are added first, up to the node budget, each
  expansion round one draft forward over the nodes added in the previous round.

Children of a node are the draft's most probable tokens, or, when the call samples, tokens drawn without
replacement from the draft's distribution (Gumbel-top-k, as Recursive Speculative Decoding does, Jeon et al.,
2024, arXiv:2402.14160). Either way the engine stays exact: at every node it draws (or picks) the token plain
decoding would from the target's processed distribution and descends into the child holding it; the draft
only decides which children exist. Its private random generator leaves the global one, which the target's
samples come from, exactly as plain decoding leaves it.

Each node carries the draft's path probability as its acceptance estimate, so `adaptive_tree` can cut the
tree to the size worth verifying on this machine.

A draft with sliding-window layers (Gemma 3, Mistral with a window) keeps drafting past its window. Its cache
holds every position in every layer (`compat.new_unbounded_cache`), and the window is applied in the attention
mask: by transformers itself in the forwards without a tree mask (its sliding mask is exact on a layer that
holds every position), and in the tree mask of the sliding layers otherwise. Why not crop like the target's
engine: a sliding layer that records its past still hands attention only its last `window - 1 + new` positions,
which in a DySpec tree's second expansion round are partly earlier nodes of other branches, cutting context a
deeper node needs; holding everything is exact for any tree shape. The cost is the draft's sliding layers
keeping (and attending over, masked) the whole sequence instead of the window: small for a small draft.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import os
from typing import Any

import torch

from ... import compat
from ...catalogue import register
from ...errors import RecipeError, UnsupportedModelError
from ...technique import param, params_to_dict
from .base import DrafterTechnique
from .draft_runtime import prepare_draft
from .engine import CallInfo, Drafter
from .tree import DraftTree


# ----- the vocabulary check --------------------------------------------------------------------------------

def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _special_ids(model) -> dict[str, Any]:
    """bos / eos / pad ids of a model (config and generation config; None where unset)."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.generation_config, key, None)
        if value is None:
            value = getattr(model.config.get_text_config(), key, None)
        ids[key] = sorted(value) if isinstance(value, (list, tuple)) else value
    return ids


def check_same_vocabulary(target, draft, target_tokenizer=None, draft_tokenizer=None) -> str:
    """Raise `UnsupportedModelError` unless `draft` proposes ids of the target's vocabulary; returns how it was
    checked. With both tokenizers: their fingerprints (the whole vocabulary) must match. Otherwise the output
    vocabulary sizes and the bos/eos/pad ids must, a weaker check (two tokenizers of one size could still
    differ), which the returned text says."""
    from .token_recycling import tokenizer_fingerprint

    if target_tokenizer is not None and draft_tokenizer is not None:
        mine, theirs = tokenizer_fingerprint(target_tokenizer), tokenizer_fingerprint(draft_tokenizer)
        if mine != theirs:
            raise UnsupportedModelError(
                f"draft_model: the draft's tokenizer (fingerprint {theirs}) is not the target's ({mine}); a draft must "
                "use exactly the target's vocabulary. Pick a draft of the same model family and tokenizer")
    sizes = _vocab_size(target), _vocab_size(draft)
    if sizes[0] != sizes[1]:
        raise UnsupportedModelError(
            f"draft_model: the draft's output vocabulary has {sizes[1]} ids, the target's {sizes[0]}; a draft must "
            "share the target's tokenizer (and embedding size). Pick a draft of the same model family")
    mine, theirs = _special_ids(target), _special_ids(draft)
    differ = {k: (mine[k], theirs[k]) for k in mine if None not in (mine[k], theirs[k]) and mine[k] != theirs[k]}
    if differ:
        raise UnsupportedModelError(
            f"draft_model: the draft's special token ids differ from the target's ((target, draft): {differ}); "
            "its vocabulary is not the target's. Pick a draft with the same tokenizer")
    if target_tokenizer is not None and draft_tokenizer is not None:
        return f"tokenizer fingerprints match ({tokenizer_fingerprint(target_tokenizer)})"
    return (f"vocabulary size ({sizes[0]}) and special ids match; pass target_tokenizer= and draft_tokenizer= "
            "to check the whole vocabulary")


# ----- the drafter -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class DraftCall:
    """One generate call's draft state: the draft's KV cache and which tokens its positions hold."""

    cache: Any
    #: tokens of the sequence whose KV is in `cache`, in order (positions 0..len-1)
    cached: list[int] = dataclasses.field(default_factory=list)
    #: the last step's tree (other drafters may have added nodes to it too) and the cache slot of each drafted
    #: node whose KV was computed
    tree: DraftTree | None = None
    slots: dict[int, int] = dataclasses.field(default_factory=dict)
    sampling: bool = False
    #: the call's temperature and top_k, applied to the draft's logits when sampling so that its siblings are
    #: drawn from a distribution shaped like the target's processed one
    temperature: float = 1.0
    top_k: int = 0
    #: the position of the last drafted tree's root (-1 before the first)
    root_position: int = -1


class DraftModelDrafter(Drafter):
    """Drafts with a small model; its cache is per call (`DraftCall`), its statistics shared by calls.

    The draft's forwards run inside `draft`, which the engine calls under this drafter's lock: concurrent
    generate calls on one patched model draft one at a time (their target forwards still overlap).
    """

    name = "draft_model"
    wants_call_info = True

    def __init__(self, draft, shape: str, draft_length: int, branching: int, width: int, min_probability: float,
                 siblings: str, seed: int = 0):
        self.draft_model = draft
        self.shape = shape
        self.draft_length = draft_length
        self.branching = 1 if shape == "chain" else branching
        self.width = 1 if shape == "chain" else width
        self.min_probability = 0.0 if shape == "chain" else min_probability
        self.siblings = siblings
        self.generator = torch.Generator().manual_seed(seed)
        self._cache_kwarg = compat.cache_kwarg(draft)
        self._logits_to_keep = compat.forward_accepts(draft, "logits_to_keep")
        windows = compat.sliding_windows(compat.new_dynamic_cache(draft.config))
        distinct = sorted({w for w in windows if w is not None})
        if len(distinct) > 1:
            raise UnsupportedModelError(
                f"draft_model: the draft's sliding-window layers use different windows {distinct}; its tree mask "
                "takes one window. Pick a draft whose sliding layers share one window")
        #: the draft's sliding window (None: it has no sliding layers), applied in its tree masks
        self._window = distinct[0] if distinct else None
        #: whether some draft layers attend to everything (then its tree mask goes per layer type)
        self._has_full_layers = any(w is None for w in windows)
        dtype = next(draft.parameters()).dtype
        self._mask_dtype = dtype if dtype.is_floating_point else torch.float32
        self.device = next(draft.parameters()).device
        # shared statistics
        self.draft_forwards = 0
        self.drafted = 0
        self.accepted = 0
        self.steps = 0
        self.kept_from_tree = 0
        # drafting steps whose root lies at or past the draft's window, and their drafted / accepted tokens
        self.steps_past_window = 0
        self.drafted_past_window = 0
        self.accepted_past_window = 0

    # -- per call
    def start(self, prompt: list[int], info: CallInfo) -> DraftCall:
        config = info.generation_config
        sampling = bool(getattr(config, "do_sample", False))
        temperature = float(getattr(config, "temperature", None) or 1.0) if sampling else 1.0
        top_k = int(getattr(config, "top_k", None) or 0) if sampling else 0
        return DraftCall(cache=self._new_cache(), sampling=sampling, temperature=temperature, top_k=top_k)

    def _new_cache(self):
        """An empty draft cache: every layer keeps every position (sliding ones too; see the module docstring)."""
        return compat.new_unbounded_cache(self.draft_model.config)

    def _forward(self, call: DraftCall, tokens: list[int], positions: list[int], mask) -> torch.Tensor:
        """One draft forward over `tokens` (cached afterwards): fp32 log-probabilities [len(tokens), vocab]."""
        kwargs = {self._cache_kwarg: call.cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 0
        with torch.no_grad():
            out = self.draft_model(input_ids=torch.tensor([tokens], device=self.device),
                                   position_ids=torch.tensor([positions], device=self.device),
                                   attention_mask=mask, **kwargs)
        self.draft_forwards += 1
        logits = out.logits[0].float()
        if call.sampling and call.temperature != 1.0:
            logits = logits / call.temperature
        if call.sampling and 0 < call.top_k < logits.shape[-1]:
            floor = logits.topk(call.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < floor, float("-inf"))
        return torch.log_softmax(logits, dim=-1).cpu()

    def _sync(self, call: DraftCall, context: list[int]) -> torch.Tensor:
        """Bring the draft's cache to `context`, rolling back what the target rejected; returns the draft's
        log-probabilities after the last token (the tree's root).

        Kept: the longest cached prefix of the context, then the last tree's drafted nodes that the target
        accepted (their KV was computed while drafting, at other cache slots). Everything else is dropped and
        the remaining tokens (at least the bonus token) are fed in one forward.
        """
        kept = 0
        limit = min(len(call.cached), len(context) - 1)
        while kept < limit and call.cached[kept] == context[kept]:
            kept += 1
        slots = list(range(kept))
        if call.tree is not None and kept == len(call.cached):
            node = 0
            while kept < len(context) - 1:
                child = call.tree.children[node].get(context[kept])
                if child is None or child not in call.slots:
                    break
                slots.append(call.slots[child])
                node, kept = child, kept + 1
                self.kept_from_tree += 1
        if not slots:
            call.cache = self._new_cache()
        elif slots != list(range(call.cache.get_seq_length())):
            compat.keep_cache_positions(call.cache, torch.tensor(slots, dtype=torch.long))
        call.tree, call.slots = None, {}
        logprobs = self._forward(call, context[kept:], list(range(kept, len(context))), None)
        call.cached = list(context)
        return logprobs[-1]

    def _children(self, call: DraftCall, logprobs: torch.Tensor, count: int) -> list[tuple[int, float]]:
        """(token, log-probability) of up to `count` children of a node with these draft log-probabilities."""
        gumbel = self.siblings == "gumbel" or (self.siblings == "auto" and call.sampling)
        if gumbel:
            # Gumbel-top-k: the top k of logq + Gumbel noise are k draws without replacement from q.
            noise = -torch.log(-torch.log(torch.rand(logprobs.shape, generator=self.generator).clamp_min(1e-20)))
            tokens = torch.topk(logprobs + noise, count).indices
        else:
            tokens = torch.topk(logprobs, count).indices
        # tokens outside the draft's top_k (log-probability -inf) are never drafted
        return [(int(t), float(logprobs[t])) for t in tokens if logprobs[t] > float("-inf")]

    def draft(self, tree: DraftTree, context: list[int], call: DraftCall) -> None:
        budget = tree.max_nodes - tree.num_drafted
        root_position = len(context) - 1
        call.root_position = root_position
        if budget <= 0:
            return
        self.steps += 1
        drafted_before = tree.num_drafted
        root_logprobs = self._sync(call, context)
        # Per tree node of this step: its slot in the draft cache (the root's is the last context position).
        slots: dict[int, int] = {0: root_position}
        # Candidates: (-log path probability, order, parent node, token). A child is never more probable than
        # its parent, so popping the best candidate grows the tree in DySpec's greedy order.
        heap: list[tuple[float, int, int, int]] = []
        order = 0
        log_floor = math.log(self.min_probability) if self.min_probability > 0 else float("-inf")

        def push(parent: int, parent_logp: float, logprobs: torch.Tensor) -> None:
            nonlocal order
            for token, logq in self._children(call, logprobs, self.branching):
                score = parent_logp + logq
                if score >= log_floor:
                    heapq.heappush(heap, (-score, order, parent, token))
                    order += 1

        push(0, 0.0, root_logprobs)
        path_logp = {0: 0.0}
        depth_limit = self.draft_length
        cache_length = len(context)
        while heap and not tree.full:
            batch = []
            while heap and len(batch) < self.width and not tree.full:
                neg_score, _, parent, token = heapq.heappop(heap)
                if tree.depths[parent] + 1 > depth_limit:
                    continue
                node = tree.add_child(parent, token, math.exp(-neg_score), self.name)
                if node is None or node in path_logp:
                    continue
                path_logp[node] = -neg_score
                batch.append(node)
            expandable = [n for n in batch if tree.depths[n] < depth_limit
                          and (tree.max_depth is None or tree.depths[n] < tree.max_depth)]
            if not expandable or tree.full:
                break
            # One draft forward over the new nodes: each sees the context and its own ancestors.
            mask = self._tree_mask(tree, expandable, slots, cache_length, root_position)
            logprobs = self._forward(call, [tree.tokens[n] for n in expandable],
                                     [root_position + tree.depths[n] for n in expandable], mask)
            for i, node in enumerate(expandable):
                slots[node] = cache_length + i
                push(node, path_logp[node], logprobs[i])
            cache_length += len(expandable)
        # only the nodes this drafter added (another drafter of the patch may have drafted into the tree first)
        mine = tree.num_drafted - drafted_before
        self.drafted += mine
        if self._past_window(root_position):
            self.steps_past_window += 1
            self.drafted_past_window += mine
        call.tree = tree
        call.slots = {node: slot for node, slot in slots.items() if node}

    def _past_window(self, root_position: int) -> bool:
        """Whether a tree rooted here reaches past the draft's window (its sliding layers then mask old context)."""
        return self._window is not None and root_position + 1 >= self._window

    def _tree_mask(self, tree: DraftTree, nodes: list[int], slots: dict[int, int], cache_length: int,
                   root_position: int):
        """Additive mask (1, 1, len(nodes), cache_length + len(nodes)): context, ancestors' slots, itself.

        With sliding layers, their mask also hides every column whose position lies `window` or more before the
        node's own (context and ancestors alike); a model with full layers too gets one mask per layer type.
        """
        allowed = torch.zeros(len(nodes), cache_length + len(nodes), dtype=torch.bool)
        context_length = slots[0] + 1
        allowed[:, :context_length] = True
        for i, node in enumerate(nodes):
            allowed[i, cache_length + i] = True
            parent = tree.parents[node]
            while parent > 0:
                allowed[i, slots[parent]] = True
                parent = tree.parents[parent]
        if self._window is None:
            return self._additive(allowed)
        # positions of the columns: the context's own, then each drafted node's (root + depth) at its slot
        column = torch.arange(cache_length + len(nodes))
        for node, slot in slots.items():
            if node:
                column[slot] = root_position + tree.depths[node]
        for i, node in enumerate(nodes):
            column[cache_length + i] = root_position + tree.depths[node]
        row = torch.tensor([root_position + tree.depths[n] for n in nodes])[:, None]
        sliding = self._additive(allowed & (column[None, :] > row - self._window))
        if not self._has_full_layers:
            return sliding
        return {"sliding_attention": sliding, "full_attention": self._additive(allowed)}

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A float mask (0 / dtype min) of shape (1, 1, rows, columns) on the draft's device."""
        mask = torch.zeros(allowed.shape, dtype=self._mask_dtype)
        mask.masked_fill_(~allowed, torch.finfo(self._mask_dtype).min)
        return mask[None, None].to(self.device)

    def update(self, tree: DraftTree, topk, accepted: list[int], context: list[int], call: DraftCall) -> None:
        # only accepted nodes this drafter proposed (in RASD the n-gram branches share the tree)
        mine = sum(1 for node in accepted if self.name in tree.estimates[node])
        self.accepted += mine
        if self._past_window(call.root_position):
            self.accepted_past_window += mine

    def stats(self) -> dict[str, Any]:
        stats = {"shape": self.shape, "draft_forwards": self.draft_forwards,
                 "draft_forwards_per_step": self.draft_forwards / max(self.steps, 1),
                 "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                 "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                 "kv_kept_from_tree": self.kept_from_tree}
        if self._window is not None:
            stats.update(window=self._window, steps_past_window=self.steps_past_window,
                         drafted_past_window=self.drafted_past_window,
                         accepted_past_window=self.accepted_past_window)
        return stats


# ----- the technique ---------------------------------------------------------------------------------------

def _is_tokenizer(value: Any) -> bool:
    return value is None or callable(getattr(value, "get_vocab", None))


@dataclasses.dataclass
class DraftModelParams:
    draft_model: Any = param(
        None, resource=True,
        help="the draft model: a loaded model passed at patch time (hfpatch.patch(model, 'draft-model', "
             "draft_model=small); never saved in a recipe) or a Hub repo id loaded with from_pretrained (no "
             "remote code)")
    draft_revision: str | None = param(None, help="branch, tag or commit of a Hub draft (pin a commit when sharing)")
    tree: str = param("chain", choices=("chain", "dynamic"),
                      help="chain: one path of draft_length tokens; dynamic: DySpec's tree grown by the draft's "
                           "cumulative probability up to max_nodes")
    draft_length: int = param(5, help="chain: tokens drafted per step; dynamic: deepest tree level", ge=1, le=64)
    max_nodes: int = param(24, help="dynamic: tree nodes drafted per step", ge=1, le=512)
    branching: int = param(4, help="dynamic: children considered per expanded node", ge=1, le=32)
    width: int = param(8, help="dynamic: nodes expanded per draft forward", ge=1, le=64)
    min_probability: float = param(0.01, help="dynamic: candidates whose path probability under the draft is "
                                              "below this are not drafted", ge=0.0, le=1.0)
    siblings: str = param("auto", choices=("auto", "top", "gumbel"),
                          help="children of a node: the draft's most probable tokens (top), or draws without "
                               "replacement from its distribution (gumbel, Recursive SD); auto: gumbel when the "
                               "call samples")
    seed: int = param(0, help="seed of the drafter's own random generator (gumbel siblings)", ge=0)
    draft_dtype: str | None = param(None, choices=(None, "bfloat16", "float32"),
                                    help="draft with a private copy in this dtype (None: the draft's own). The "
                                         "target alone decides the output, so this changes speed, never tokens")
    draft_kernels: str = param("default", choices=("default", "onednn"),
                               help="onednn: a private copy of the draft with packed oneDNN linear layers (CPU; "
                                    "wide DySpec rounds cost about one token)")
    target_tokenizer: Any = param(None, help="patch-time only: the target's tokenizer, to check the draft's "
                                             "vocabulary by fingerprint (never saved)")
    draft_tokenizer: Any = param(None, help="patch-time only: the draft's tokenizer (never saved)")

    def __post_init__(self):
        if not (self.draft_model is None or isinstance(self.draft_model, (str, torch.nn.Module))):
            raise ValueError(f"draft_model must be a loaded model or a Hub repo id, got {type(self.draft_model).__name__}")
        if not (_is_tokenizer(self.target_tokenizer) and _is_tokenizer(self.draft_tokenizer)):
            raise ValueError("target_tokenizer / draft_tokenizer must be tokenizer objects (patch-time overrides)")


def _hub_reference(draft) -> tuple[str | None, str | None]:
    """(repo id, commit) a loaded draft came from, when it was loaded from the Hub; (None, None) otherwise."""
    name = getattr(draft.config, "_name_or_path", "") or ""
    if not name or os.path.exists(name) or name.count("/") != 1:
        return None, None
    return name, getattr(draft.config, "_commit_hash", None)


@register
class DraftModel(DrafterTechnique):
    """Lossless speculative `generate` drafting with a small model of the same vocabulary.

    Example:
        >>> small = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-Coder-0.5B-Instruct")
        >>> handle = hfpatch.patch(model, "dyspec", draft_model=small)     # or "draft-model" (a chain)
        >>> model.generate(**inputs, max_new_tokens=128)                    # same tokens, fewer target forwards
        >>> handle.stats["draft_model"]["drafters"]["draft_model"]["acceptance_rate"]
    """

    name = "draft_model"
    summary = "A small draft model of the same vocabulary proposes a chain or a DySpec tree (lossless)"
    Params = DraftModelParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.draft: torch.nn.Module | None = None
        #: how the draft's vocabulary was checked against the target's
        self.vocabulary_check: str | None = None
        #: how the draft runs (as given, or a private copy: dtype, kernels)
        self.draft_runtime: dict[str, Any] | None = None

    def _load_draft(self, model) -> torch.nn.Module:
        given = self.params.draft_model
        if given is None:
            raise RecipeError(
                f"{self.name}: no draft model: pass one at patch time (hfpatch.patch(model, recipe, draft_model="
                "small_model)) or name a Hub repo id (draft_model='org/name', draft_revision='<commit>')")
        if isinstance(given, torch.nn.Module):
            if given is model:
                raise RecipeError(f"{self.name}: the draft model is the target itself; use early_exit to draft "
                                  "with the target's own first layers")
            return given
        dtype = next(model.parameters()).dtype
        try:
            return compat.load_causal_lm(given, self.params.draft_revision, dtype)
        except ValueError as err:
            if "trust_remote_code" not in str(err):
                raise
            # transformers refused to run the repository's code and suggests trust_remote_code=True, which a
            # recipe can never turn on: say what the user can do instead.
            raise UnsupportedModelError(
                f"{self.name}: the draft {given!r} (revision {self.params.draft_revision!r}) needs its repository's "
                "own Python code to load (auto_map), and hfpatch never runs a repository's code. Pick a draft whose "
                "architecture transformers ships, or load it yourself after reading its code and pass it at patch "
                "time (hfpatch.patch(model, recipe, draft_model=loaded))") from err

    def node_budget(self) -> int:
        return self.params.draft_length if self.params.tree == "chain" else self.params.max_nodes

    def make_drafter(self, model) -> DraftModelDrafter:
        draft = self._load_draft(model)
        self.vocabulary_check = check_same_vocabulary(model, draft, self.params.target_tokenizer,
                                                      self.params.draft_tokenizer)
        attention = compat.attn_implementation(draft.config.get_text_config())
        if not compat.accepts_tree_mask(attention):
            raise UnsupportedModelError(f"{self.name}: the draft's attention backend {attention!r} cannot take a tree "
                                        "mask; load the draft with attn_implementation='sdpa' or 'eager'")
        self.draft = draft
        p = self.params
        runner, self.draft_runtime = prepare_draft(draft, p.draft_dtype, p.draft_kernels)
        return DraftModelDrafter(runner, p.tree, p.draft_length, p.branching, p.width, p.min_probability,
                                 p.siblings, p.seed)

    def apply(self, model, ctx) -> None:
        super().apply(model, ctx)
        # a private copy of the draft (draft_dtype / draft_kernels) goes when the patch comes off, even while the
        # user keeps the handle to read its stats
        ctx.record(self._drop_private_draft)

    def _drop_private_draft(self) -> None:
        if self.drafter is not None and self.drafter.draft_model is not self.draft:
            self.drafter.draft_model = None

    def export_params(self) -> dict[str, Any]:
        """The parameters a recipe keeps: a loaded draft becomes its Hub id and commit when it came from the Hub
        (else nothing: the recipe then needs draft_model= again), tokenizers are never saved."""
        params = params_to_dict(self.params)
        params["target_tokenizer"] = params["draft_tokenizer"] = None
        given = params["draft_model"]
        if isinstance(given, torch.nn.Module):
            repo, commit = _hub_reference(given)
            params["draft_model"] = repo
            params["draft_revision"] = self.params.draft_revision or commit if repo else None
        return params

    def live_overrides(self) -> dict[str, Any]:
        """A loaded draft (and tokenizers) given at patch time: a copy of the patched model drafts with the same
        draft object (it is not part of the target, like a tokenizer; a pickled copy carries its own)."""
        given = {name: getattr(self.params, name) for name in ("draft_model", "target_tokenizer", "draft_tokenizer")}
        return {name: value for name, value in given.items()
                if value is not None and not isinstance(value, str)}

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        if self.vocabulary_check is not None:
            stats["vocabulary_check"] = self.vocabulary_check
        if self.draft_runtime is not None:
            stats["draft_runtime"] = self.draft_runtime
        return stats
