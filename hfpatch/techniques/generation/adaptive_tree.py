"""Adaptive draft-tree size: verify only the drafted nodes worth their cost on this machine.

Verifying a tree costs one forward whose time grows with the number of nodes: almost nothing per node on a
GPU, while on a small CPU a forward of two tokens already costs well over one (SmolLM2-135M on the 2-core
machine of docs/results/speculative.md: about 1.6x, because matrix-matrix kernels replace matrix-vector ones) and each
further node a few percent more. A fixed tree is therefore either too small for the GPU or too large for
the CPU, and on the CPU drafting at all only pays when the drafts are likely to be accepted. With this technique in a recipe, the drafters fill a
large candidate tree, each node carrying an estimate of the probability that it is accepted (learned online
from what the target produced, see `acceptance.py`), and the engine verifies the prefix of the ranked
nodes that maximises expected tokens per second:

    (1 + sum of the kept nodes' acceptance estimates) / step cost(kept nodes)

The step cost per tree size is measured by the engine as it runs (or given as a fixed model by the recipe).
Output is unchanged: the engine is lossless whatever the tree.

    >>> handle = hfpatch.patch(model, "recycling+lookup")   # its recipe includes adaptive_tree
    >>> model.generate(**inputs, max_new_tokens=128)
    >>> handle.stats["adaptive_tree"]["mean_tree_nodes"], handle.stats["adaptive_tree"]["tree_policy"]
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ... import arch
from ...errors import RecipeError
from ...catalogue import register
from ...technique import Technique, param
from .base import shared_engine
from .tree import DraftTree


@dataclasses.dataclass
class AdaptiveTreeParams:
    max_tree_nodes: int = param(64, help="most drafted nodes verified in one forward", ge=1, le=1024)
    node_cost: float | None = param(
        None, help="fixed cost model: time of each drafted node relative to a one-token step; null: the "
                   "engine measures its step time per tree size and uses that", ge=0.0)
    first_draft_cost: float = param(
        0.3, help="extra time of verifying any draft at all, relative to a one-token step (on CPUs a batch of "
                  "two tokens already leaves the fast matrix-vector path); used by the fixed model and as "
                  "the measured model's prior", ge=0.0)
    initial_node_cost: float = param(0.03, help="per-node cost the measured model assumes for sizes not timed yet",
                                     ge=0.0)


@dataclasses.dataclass
class PolicyCall:
    """One generate call's tree-size bookkeeping (concurrent calls each have their own)."""

    steps: int = 0
    candidate_nodes: int = 0
    kept_nodes: int = 0
    #: acceptance the last `cut` predicted for its kept nodes, compared by the next `observe`
    last_prediction: float = 0.0


class TreeSizePolicy:
    """Chooses how much of a ranked candidate tree to verify, from a cost per tree size.

    The timings and the calibration are shared by every generate call of the patch (the engine calls the
    policy under one lock); the per-call counters live in the `PolicyCall` that `start_call` returns and
    the engine passes back. Called without one (a single caller, as in the tests), the policy uses its own.

    The measured cost model keeps a running mean of the engine's step time for every tree size it has run.
    Sizes not timed yet take the prior's shape (1 + first_draft_cost [n > 0] + initial_node_cost * n),
    scaled to the nearest timed sizes. A table rather than a line, because CPU matrix kernels are not linear
    in the batch: on the 2-core machine of docs/results/speculative.md three tokens took longer than four.
    """

    #: timings of one size needed before they replace the prior there
    min_timings = 3
    #: the running mean of a size becomes an exponential average over about 1/rate recent steps
    rate = 0.1
    #: until a plain step (no drafts) has been timed, every this many steps runs one, so the jump from
    #: plain to verified steps is measured and not only assumed (drafting at every step would never time it)
    plain_step_every = 16

    def __init__(self, max_nodes: int, node_cost: float | None, first_draft_cost: float = 0.3,
                 initial_node_cost: float = 0.03):
        self.max_nodes = max_nodes
        self.fixed_cost = node_cost
        self.first_draft_cost = first_draft_cost
        self.initial_cost = initial_node_cost
        self.mean_seconds: dict[int, float] = {}
        self.timings: dict[int, int] = {}
        # Running sums of accepted drafts and of what the kept nodes' estimates predicted. Keeping the
        # most probable nodes favours over-estimated ones, so their estimates run high (measured: up to 3x
        # on question answering); their ratio rescales the estimates when sizing the tree.
        self._accepted = 0.0
        self._predicted = 0.0
        self._decisions = 0
        #: the per-call state used when a caller passes none
        self._solo = PolicyCall()

    def _shape(self, n: int, per_node: float) -> float:
        return 1.0 + (self.first_draft_cost if n else 0.0) + per_node * n

    def step_costs(self, largest: int) -> list[float]:
        """Cost of a step verifying n = 0..largest drafted nodes (any unit: only ratios matter)."""
        if self.fixed_cost is not None:
            return [self._shape(n, self.fixed_cost) for n in range(largest + 1)]
        prior = [self._shape(n, self.initial_cost) for n in range(largest + 1)]
        timed = sorted(n for n, count in self.timings.items() if count >= self.min_timings and n <= largest)
        if not timed:
            return prior
        # Measured / prior at the timed sizes, interpolated in between and held constant beyond.
        ratio = {n: self.mean_seconds[n] / prior[n] for n in timed}
        costs, j = [], 0
        for n in range(largest + 1):
            while j + 1 < len(timed) and timed[j + 1] <= n:
                j += 1
            lo = timed[j]
            if n <= lo or j + 1 == len(timed):
                r = ratio[lo] if n >= lo else ratio[timed[0]]
            else:
                hi = timed[j + 1]
                r = ratio[lo] + (ratio[hi] - ratio[lo]) * (n - lo) / (hi - lo)
            costs.append(r * prior[n])
        return costs

    def start_call(self) -> PolicyCall:
        """A generate call begins: its counters start at zero (the timings carry over)."""
        return PolicyCall()

    #: the calibration starts at 1 as if this many drafts had been predicted and accepted; as recent
    #: predictions fade after steps without drafts it drifts back there, so drafting is tried again
    calibration_prior = 2.0

    @property
    def calibration(self) -> float:
        """Accepted drafts per predicted accepted draft over recent steps."""
        prior = self.calibration_prior
        return min((self._accepted + prior) / (self._predicted + prior), 1.0)

    def observe(self, nodes: int, seconds: float, accepted: int, call: PolicyCall | None = None) -> None:
        """One verification step: its tree size, its time and how many drafted tokens it accepted."""
        call = self._solo if call is None else call
        count = self.timings[nodes] = self.timings.get(nodes, 0) + 1
        mean = self.mean_seconds.get(nodes, seconds)
        self.mean_seconds[nodes] = mean + max(1.0 / count, self.rate) * (seconds - mean)
        keep = 1.0 - self.rate
        self._accepted = keep * self._accepted + accepted
        self._predicted = keep * self._predicted + call.last_prediction

    def cut(self, tree: DraftTree, call: PolicyCall | None = None) -> DraftTree:
        """The most probable nodes of `tree`, as many as maximise expected tokens per unit of time."""
        call = self._solo if call is None else call
        ranked = tree.ranked_nodes()[: self.max_nodes]
        costs = self.step_costs(len(ranked))
        scale = self.calibration
        best_n, best_rate, expected = 0, 1.0 / costs[0], 1.0
        for n, (_, prob) in enumerate(ranked, 1):
            expected += prob * scale
            rate = expected / costs[n]
            if rate > best_rate:
                best_n, best_rate = n, rate
        self._decisions += 1
        if (self.fixed_cost is None and self.timings.get(0, 0) < self.min_timings
                and self._decisions % self.plain_step_every == 0):
            best_n = 0
        call.last_prediction = sum(prob for _, prob in ranked[:best_n])
        call.steps += 1
        call.candidate_nodes += tree.num_drafted
        call.kept_nodes += best_n
        if best_n == tree.num_drafted:
            return tree
        return tree.select(node for node, _ in ranked[:best_n])

    def stats(self, call: PolicyCall | None = None) -> dict[str, Any]:
        """Shared cost model and calibration, and `call`'s mean tree sizes (the policy's own when None)."""
        call = self._solo if call is None else call
        steps = max(call.steps, 1)
        costs = self.step_costs(16)
        return {"relative_step_cost": {n: round(costs[n] / costs[0], 3) for n in (1, 2, 4, 8, 16)},
                "calibration": round(self.calibration, 3),
                "timed_sizes": len(self.timings),
                "mean_candidate_nodes": call.candidate_nodes / steps, "mean_kept_nodes": call.kept_nodes / steps}


@register
class AdaptiveTree(Technique):
    """Sizes the speculative engine's tree per step to what pays off on this machine (lossless).

    Example:
        >>> recipe = hfpatch.Recipe([{"type": "ngram_lookup", "branches": 4, "max_nodes": 40},
        ...                          {"type": "token_recycling", "template": "paper-80"},
        ...                          {"type": "adaptive_tree"}])
        >>> handle = hfpatch.patch(model, recipe)
    """

    name = "adaptive_tree"
    family = "generation"
    summary = "Verify only the drafted nodes worth their cost: learned acceptance estimates vs measured step cost per tree size"
    Params = AdaptiveTreeParams
    claims: ClassVar[frozenset[str]] = frozenset({"generate-loop"})
    cooperative_claims: ClassVar[frozenset[str]] = frozenset({"generate-loop"})
    model_types: ClassVar[frozenset[str]] = frozenset(arch.supported_model_types("decoder"))

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.engine = None
        self.policy: TreeSizePolicy | None = None

    def apply(self, model, ctx) -> None:
        engine = shared_engine(model, ctx)
        if engine.tree_policy is not None:
            raise RecipeError("adaptive_tree: a recipe may hold it once")
        self.policy = TreeSizePolicy(self.params.max_tree_nodes, self.params.node_cost,
                                     self.params.first_draft_cost, self.params.initial_node_cost)
        engine.tree_policy = self.policy
        self.engine = engine

    def stats(self) -> dict[str, Any]:
        """The engine's statistics of the generate call that ended last (see `DrafterTechnique.stats`)."""
        return dict(self.engine.last_stats) if self.engine is not None else {}
