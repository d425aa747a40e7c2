"""Token Recycling (Luo et al., 2024, arXiv:2408.08696): recycle the target's own top-k candidates as drafts.

A `[vocab, k]` table holds, for each token, the k most likely next tokens the target model produced the
last time that token was in a verified tree. Each step a fixed tree template is filled level by level from
the table, starting at the last accepted token; after the verification forward every tree token's row is
replaced by that position's top-k. The table persists across generate calls (hot start) and can be shared
through a recipe's tensor payload.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from ...errors import RecipeError
from ...catalogue import register
from ...technique import TensorSpec, param
from .acceptance import AcceptanceEstimates, Candidates
from .base import DrafterTechnique
from .engine import Drafter
from .tree import DraftTree

# The paper's tree: 80 nodes over 6 levels (widths 8/21/25/15/8/3). Each entry is a path of ranks: [0, 2]
# is the 3rd-best successor of the best successor of the root token.
_PAPER_LEVELS = [
    "0 1 2 3 4 5 6 7",
    "00 01 02 03 04 05 06 07 10 11 12 13 20 21 22 30 31 40 50 60 70",
    "000 001 002 003 004 005 006 007 010 011 012 020 021 030 040 050 060 070 100 101 110 200 300 400 500",
    "0000 0001 0002 0003 0004 0010 0011 0020 0030 0040 0100 0200 1000 2000 3000",
    "00000 00001 00002 00010 00020 00100 01000 10000",
    "000000 000001 000100",
]
PAPER_TEMPLATE: list[list[int]] = [[int(c) for c in code] for level in _PAPER_LEVELS for code in level.split()]


def _subtemplate(max_rank_sum: int, max_depth: int) -> list[list[int]]:
    """The paper's nodes whose ranks add up to at most `max_rank_sum`: the most likely part of its tree."""
    return [path for path in PAPER_TEMPLATE if sum(path) <= max_rank_sum and len(path) <= max_depth]


# Smaller trees for CPUs, where verifying a node costs compute rather than being free as on a GPU.
TEMPLATES: dict[str, list[list[int]]] = {
    "paper-80": PAPER_TEMPLATE,
    "cpu-40": _subtemplate(2, 6),
    "cpu-23": _subtemplate(1, 6),
    "cpu-14": _subtemplate(1, 4),
    "chain-6": [[0] * depth for depth in range(1, 7)],
}


# Before any step is observed: how often the r-th recycled successor is the target's next token (roughly
# what SmolLM2 shows on the bench prompts); measured rates replace these within a few calls.
_RANK_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)


def _compile_template(template: list[list[int]]) -> list[tuple[int, int]]:
    """(parent template index, rank) per node in breadth-first order; index 0 is the root."""
    paths = sorted({tuple(p) for p in template}, key=lambda p: (len(p), p))
    index = {(): 0}
    compiled = []
    for path in paths:
        if path[:-1] not in index:
            raise RecipeError(f"token_recycling.template: node {list(path)} has no parent {list(path[:-1])} in the template")
        index[path] = len(compiled) + 1
        compiled.append((index[path[:-1]], path[-1]))
    return compiled


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary, stored with a warm table so it is not used with another one."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


# Most nodes a template may have. The engine verifies the whole tree in one forward whose attention mask is
# nodes x (context + nodes) per layer, and builds the tree node by node in Python each step, so the cost grows
# faster than linearly (a 4,680-node template took 2.1 s and 665 MiB for 12 tokens of a 32-dim model); the
# paper's tree has 80 nodes, the speculative engine's adaptive tree stops at 1024 (`max_tree_nodes`), and so
# does this.
MAX_TEMPLATE_NODES = 1024


@dataclasses.dataclass
class TokenRecyclingParams:
    k: int = param(8, help="successors kept per token (the table is [vocab, k])", ge=1, le=64)
    template: str | list[list[int]] = param(
        "cpu-14", help=f"tree template: one of {sorted(TEMPLATES)} or a list of rank paths like [[0], [1], [0, 0]] "
                       f"(at most {MAX_TEMPLATE_NODES} nodes)", max_items=MAX_TEMPLATE_NODES)
    reset_each_call: bool = param(False, help="clear the table at every generate call (cold start, as an ablation)")

    def __post_init__(self):
        if isinstance(self.template, str) and self.template not in TEMPLATES:
            raise ValueError(f"template {self.template!r} is not one of {sorted(TEMPLATES)}")
        for path in self.template_paths():
            if not path or any(not 0 <= r < self.k for r in path):
                raise ValueError(f"template path {path} must be non-empty with ranks in [0, k={self.k})")
        _compile_template(self.template_paths())

    def template_paths(self) -> list[list[int]]:
        return TEMPLATES[self.template] if isinstance(self.template, str) else [list(p) for p in self.template]


@dataclasses.dataclass
class RecyclingCall:
    """One generate call's recycling state: what its last `draft` proposed, scored by the next `update`."""

    candidates: Candidates = dataclasses.field(default_factory=Candidates)


class RecyclingDrafter(Drafter):
    """Drafts from the recycled top-k table. Shared by every call of the patch (the engine serialises calls
    into the drafter): the table and the acceptance estimates; per call (`RecyclingCall`): the candidates."""

    name = "token_recycling"

    def __init__(self, vocab_size: int, k: int, template: list[list[int]], table: torch.Tensor | None = None,
                 reset_each_call: bool = False):
        self.k = k
        self.topk_wanted = k
        self.vocab_size = vocab_size
        self.template = _compile_template(template)
        self.table = table if table is not None else torch.full((vocab_size, k), -1, dtype=torch.int32)
        self.reset_each_call = reset_each_call
        self.rows_written = 0
        # Class of a candidate: its template node. Conditional on the parent being right, the chance that
        # this rank is the target's next token differs by rank and by depth, which the template encodes.
        self.acceptance = AcceptanceEstimates(
            {i: _RANK_PRIOR[min(rank, len(_RANK_PRIOR) - 1)] for i, (_, rank) in enumerate(self.template)})

    def reset(self) -> None:
        self.table.fill_(-1)
        self.acceptance.reset()

    def start(self, prompt: list[int]) -> RecyclingCall:
        if self.reset_each_call:
            self.reset()
        return RecyclingCall()

    def draft(self, tree: DraftTree, context: list[int], call: RecyclingCall) -> None:
        # Per template index: the candidate's token, its index in the candidate list, its tree node (None when
        # the tree is full) and its path probability estimate. Candidates are recorded even when they do not
        # fit the tree, so their acceptance is still learned.
        candidates = call.candidates = Candidates(root_context_length=len(context))
        tokens, cand_index, nodes, probs = [context[-1]], [-1], [0], [1.0]
        rows: dict[int, list[int]] = {}
        for i, (parent_index, rank) in enumerate(self.template):
            parent_token = tokens[parent_index]
            token = -1
            if parent_token >= 0:
                row = rows.get(parent_token)
                if row is None:
                    row = rows[parent_token] = self.table[parent_token].tolist()
                token = row[rank]
            tokens.append(token)
            if token < 0:
                cand_index.append(-1)
                nodes.append(None)
                probs.append(0.0)
                continue
            cand_index.append(candidates.add(token, cand_index[parent_index], i))
            prob = probs[parent_index] * self.acceptance.estimate(i)
            probs.append(prob)
            parent = nodes[parent_index]
            nodes.append(None if parent is None else tree.add_child(parent, token, prob, self.name))

    def update(self, tree: DraftTree, topk: torch.Tensor | None, accepted: list[int], context: list[int],
               call: RecyclingCall) -> None:
        self.acceptance.learn(call.candidates, context)
        # One row per distinct token; a node on the accepted path (real context) wins over a speculative one.
        source_of: dict[int, int] = {}
        for node, token in enumerate(tree.tokens):
            source_of.setdefault(token, node)
        for node in [0, *accepted]:
            source_of[tree.tokens[node]] = node
        tokens = torch.tensor(list(source_of.keys()), dtype=torch.long)
        self.table[tokens] = topk[list(source_of.values()), : self.k].to(torch.int32)
        self.rows_written += len(source_of)

    def stats(self) -> dict[str, Any]:
        filled = int((self.table[:, 0] >= 0).sum())
        return {"table_rows_filled": filled, "table_bytes": self.table.numel() * self.table.element_size(),
                "acceptance_observations": self.acceptance.observations}


@register
class TokenRecycling(DrafterTechnique):
    """Lossless speculative `generate` drafting from a table of recycled top-k candidates.

    Example:
        >>> handle = hfpatch.patch(model, "token-recycling")
        >>> model.generate(**inputs, max_new_tokens=128)     # same tokens as before, fewer forwards
        >>> handle.stats["token_recycling"]["mean_accepted_tokens_per_forward"]
        >>> handle.to_recipe(tokenizer, name="warm-table").push_to_hub("me/warm-table")   # the warm table travels
    """

    name = "token_recycling"
    summary = "Token Recycling: tree drafts from a table of the model's own recent top-k successors (lossless)"
    Params = TokenRecyclingParams
    # Token ids only: a float or bool table would be truncated into other ids, so it is refused instead.
    tensor_specs = {"table": TensorSpec(dtypes=("int32", "int64"), ndim=2, max_shape=(1 << 20, 64),
                                        help="a [vocab, k] table of token ids, -1 for an empty slot")}
    #: What was checked about a loaded table's tokenizer (reported in handle.stats); None without a table.
    table_tokenizer: str | None = None

    def load_tensors(self, tensors: dict[str, Any], metadata: dict[str, str], *, tokenizer=None) -> None:
        """Check a recipe's warm table (integer ids, [vocab, k] with this k, ids in range, the metadata it
        records) and, when the model's tokenizer is given, its tokenizer fingerprint."""
        super().load_tensors(tensors, metadata)
        table = self.tensors.get("table")
        if table is None:
            return
        where = "token_recycling: the recipe's table"
        self.check_tensor("table", str(table.dtype).removeprefix("torch."), tuple(table.shape), where)
        if table.shape[1] != self.params.k:
            raise RecipeError(f"{where} has {table.shape[1]} successors per token, but k={self.params.k}; set k to "
                              f"{table.shape[1]} or use a table warmed with k={self.params.k}")
        for key, size in (("vocab_size", table.shape[0]), ("k", table.shape[1])):
            if key in metadata and metadata[key] != str(size):
                raise RecipeError(f"{where} has shape {tuple(table.shape)}, but its metadata says {key}="
                                  f"{metadata[key]!r}; the payload is inconsistent")
        if table.numel() and (int(table.min()) < -1 or int(table.max()) >= table.shape[0]):
            raise RecipeError(f"{where} holds token ids outside [-1, {table.shape[0]}) (-1 marks an empty slot)")
        stored = metadata.get("tokenizer_fingerprint")
        if stored is None:
            self.table_tokenizer = ("not checked: the table records no tokenizer fingerprint (it was saved with "
                                    "handle.to_recipe() without a tokenizer)")
        elif tokenizer is None:
            self.table_tokenizer = (f"not checked: the table was warmed with tokenizer {stored}; pass "
                                    "model_tokenizer= to hfpatch.patch to check it")
        else:
            actual = tokenizer_fingerprint(tokenizer)
            if actual != stored:
                raise RecipeError(
                    f"{where} was warmed with another tokenizer (fingerprint {stored}; model_tokenizer has {actual}): "
                    "its rows would hold another vocabulary's ids. Warm a table with this tokenizer, or use the "
                    "recipe without its table")
            self.table_tokenizer = f"matched: the table was warmed with this tokenizer ({stored})"

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        if self.table_tokenizer is not None:
            stats["table_tokenizer"] = self.table_tokenizer
        return stats

    def node_budget(self) -> int:
        return len(self.params.template_paths())

    def make_drafter(self, model) -> RecyclingDrafter:
        vocab_size = model.get_output_embeddings().weight.shape[0]
        table = self.tensors.get("table")
        if table is not None:
            if table.dim() != 2 or table.shape[0] != vocab_size or table.shape[1] != self.params.k:
                raise RecipeError(
                    f"token_recycling: the recipe's table has shape {tuple(table.shape)}, but this model needs "
                    f"({vocab_size}, {self.params.k}) (vocabulary size, k); it was warmed on another tokenizer or k"
                )
            if int(table.max()) >= vocab_size or int(table.min()) < -1:
                raise RecipeError("token_recycling: the recipe's table holds token ids outside the vocabulary")
            table = table.to(torch.int32).clone()
        return RecyclingDrafter(vocab_size, self.params.k, self.params.template_paths(), table,
                                self.params.reset_each_call)

    def reset(self) -> None:
        """Forget every recycled successor (the next call starts cold)."""
        if self.drafter is not None:
            with self.engine.exclusive(self.drafter):  # not while a running generate call reads the table
                self.drafter.reset()

    def export_tensors(self, tokenizer=None) -> tuple[dict[str, Any], dict[str, str]]:
        """The warmed table (and the tokenizer's fingerprint when given), for `handle.to_recipe()`."""
        if self.drafter is None:
            return super().export_tensors(tokenizer)
        metadata = {"vocab_size": str(self.drafter.vocab_size), "k": str(self.params.k)}
        if tokenizer is not None:
            metadata["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        with self.engine.exclusive(self.drafter):  # a consistent table, not one half-written by a running call
            table = self.drafter.table.clone()
        return {"table": table}, metadata
