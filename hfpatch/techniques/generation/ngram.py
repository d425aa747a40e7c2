"""N-gram lookup drafting: prompt lookup (PLD) and lookahead-style retrieval from earlier outputs.

The longest recent suffix of the sequence (n = max_ngram down to min_ngram) is looked up among the n-grams
of this request's prompt + output, and of earlier outputs kept in a bounded memory; the tokens that
followed each occurrence become branches of the draft tree. Branches are ranked by how often their first
token follows the suffix (an ADED-style frequency signal), then by recency.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from ...catalogue import register
from ...technique import param
from .acceptance import AcceptanceEstimates, Candidates
from .base import DrafterTechnique
from .engine import Drafter
from .tree import DraftTree


class NgramIndex:
    """Positions that follow every n-gram (n <= max_n) of a growing token sequence."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.follow: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        seq = self.tokens
        for token in tokens:
            seq.append(token)
            end = len(seq)
            for n in range(1, min(self.max_n, end) + 1):
                self.follow.setdefault(tuple(seq[end - n : end]), []).append(end)

    def continuations(self, key: tuple[int, ...], length: int, limit: int) -> list[list[int]]:
        """Up to `limit` continuations of `key`, most recent occurrence first."""
        found = []
        for start in reversed(self.follow.get(key, ())):
            if start < len(self.tokens):
                found.append(self.tokens[start : start + length])
                if len(found) >= limit:
                    break
        return found


@dataclasses.dataclass
class NgramParams:
    max_ngram: int = param(4, help="longest suffix matched", ge=1, le=16)
    min_ngram: int = param(1, help="shortest suffix matched", ge=1, le=16)
    draft_length: int = param(10, help="tokens drafted per branch", ge=1, le=64)
    branches: int = param(4, help="continuations kept per step", ge=1, le=32)
    max_nodes: int = param(24, help="tree nodes this drafter may add per step", ge=1, le=512)
    memory_tokens: int = param(20000, help="tokens of earlier outputs kept for lookup (0: prompt/output only)", ge=0)

    def __post_init__(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")


@dataclasses.dataclass
class NgramCall:
    """One generate call's n-gram drafting state (concurrent calls each have their own)."""

    #: n-grams of this call's prompt and output so far
    current: NgramIndex
    #: what the last `draft` proposed, scored by the next `update`
    candidates: Candidates = dataclasses.field(default_factory=Candidates)
    #: the last step's best branch had its first token right
    last_step_right: bool = False


class NgramDrafter(Drafter):
    """Drafts from n-gram matches. Per call (`NgramCall`): the request's own index and last candidates;
    shared by calls: the memory of earlier outputs, acceptance estimates and the hit counters."""

    name = "ngram_lookup"

    def __init__(self, params: NgramParams):
        self.params = params
        self.memory = NgramIndex(params.max_ngram)
        self.hits = 0
        self.lookups = 0
        # Class of a candidate: (matched suffix length, found in this request or in earlier outputs, branch
        # rank, position in the branch, last step's best branch was right). A longer match in the request
        # itself and a top-ranked branch predict the continuation better, and copying comes in stretches.
        self.acceptance = AcceptanceEstimates(prior=0.4)

    def start(self, prompt: list[int]) -> NgramCall:
        call = NgramCall(NgramIndex(self.params.max_ngram))
        call.current.extend(prompt)
        return call

    def draft(self, tree: DraftTree, context: list[int], call: NgramCall) -> None:
        p = self.params
        call.current.extend(context[len(call.current.tokens) :])
        self.lookups += 1
        call.candidates = record = Candidates(root_context_length=len(context))
        # (class prefix: matched suffix length and whether it came from this request, continuation)
        candidates: list[tuple[tuple[int, bool], list[int]]] = []
        for n in range(min(p.max_ngram, len(context)), p.min_ngram - 1, -1):
            key = tuple(context[-n:])
            candidates += [((n, True), c) for c in call.current.continuations(key, p.draft_length, p.branches)]
            candidates += [((n, False), c) for c in self.memory.continuations(key, p.draft_length, p.branches)]
            if len(candidates) >= p.branches:
                break
        if not candidates:
            return
        self.hits += 1
        votes = Counter(c[0] for _, c in candidates)
        first_seen = {}
        for rank, (_, c) in enumerate(candidates):
            first_seen.setdefault(c[0], rank)
        candidates.sort(key=lambda item: (-votes[item[1][0]], first_seen[item[1][0]]))
        for rank, (origin, branch) in enumerate(candidates[: p.branches]):
            node, parent, prob = 0, -1, 1.0
            for position, token in enumerate(branch, 1):
                cls = (*origin, rank, position, call.last_step_right)
                parent = record.add(token, parent, cls)
                prob *= self.acceptance.estimate(cls)
                node = None if node is None else tree.add_child(node, token, prob, self.name)

    def update(self, tree: DraftTree, topk, accepted: list[int], context: list[int], call: NgramCall) -> None:
        record = call.candidates
        self.acceptance.learn(record, context)
        call.last_step_right = bool(record.tokens) and record.tokens[0] == context[record.root_context_length]

    def finish(self, sequence: list[int], prompt_length: int, call: NgramCall) -> None:
        limit = self.params.memory_tokens
        if limit == 0:
            return
        output = sequence[prompt_length:]
        if len(self.memory.tokens) + len(output) > limit:
            kept = (self.memory.tokens + output)[-(limit // 2) :]
            self.memory = NgramIndex(self.params.max_ngram)
            self.memory.extend(kept)
        else:
            self.memory.extend(output)

    def stats(self) -> dict[str, Any]:
        return {"lookup_hit_rate": self.hits / self.lookups if self.lookups else 0.0,
                "memory_tokens": len(self.memory.tokens), "acceptance_observations": self.acceptance.observations}


@register
class NgramLookup(DrafterTechnique):
    """Lossless speculative `generate` drafting from n-gram matches in the prompt, output and earlier outputs.

    Example:
        >>> handle = hfpatch.patch(model, "ngram-lookup")
        >>> model.generate(**inputs, max_new_tokens=128)
    """

    name = "ngram_lookup"
    summary = "Prompt/output n-gram lookup with multi-branch trie drafts (lossless)"
    Params = NgramParams

    def make_drafter(self, model) -> NgramDrafter:
        return NgramDrafter(self.params)
