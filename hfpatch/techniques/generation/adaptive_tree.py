"""Adaptive draft-tree size: verify only the drafted nodes worth their cost on this machine.

Verifying a tree costs one forward whose time grows with the number of nodes: almost nothing per node on a
GPU, about 5% of a one-token step per node for SmolLM2-135M on a 2-core CPU. A fixed tree is therefore
either too small for the GPU or too large for the CPU. With this technique in a recipe, the drafters fill a
large candidate tree, each node carrying an estimate of the probability that it is accepted (learned online
from what the target produced, see `acceptance.py`), and the engine verifies the prefix of the ranked
nodes that maximises expected tokens per second:

    (1 + sum of the kept nodes' acceptance estimates) / (1 + node_cost * kept nodes)

`node_cost` (the time of one more node relative to a one-token step) is fitted online from the step times
the engine observes, or fixed by the recipe. Output is unchanged (the engine is lossless whatever the tree).

    >>> handle = hfpatch.patch(model, "recycling+lookup")   # its recipe includes adaptive_tree
    >>> model.generate(**inputs, max_new_tokens=128)
    >>> handle.stats["adaptive_tree"]["mean_tree_nodes"], handle.stats["adaptive_tree"]["node_cost"]
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ... import arch
from ...errors import RecipeError
from ...registry import Technique, param, register
from .base import shared_engine
from .tree import DraftTree


@dataclasses.dataclass
class AdaptiveTreeParams:
    max_tree_nodes: int = param(64, help="most drafted nodes verified in one forward", ge=1, le=1024)
    node_cost: float | None = param(
        None, help="time of one more tree node relative to a one-token step; null: fitted online from the "
                   "measured step times", ge=0.0)
    initial_node_cost: float = param(0.03, help="node cost assumed until enough steps were timed", ge=0.0)


class TreeSizePolicy:
    """Chooses how much of a ranked candidate tree to verify; fits the per-node cost from step timings."""

    #: weight of past timings decays by this per step (recent steps describe the machine now)
    decay = 0.98
    #: timed steps needed (with varied tree sizes) before the fit replaces the initial cost
    min_observations = 12

    def __init__(self, max_nodes: int, node_cost: float | None, initial_node_cost: float):
        self.max_nodes = max_nodes
        self.fixed_cost = node_cost
        self.initial_cost = initial_node_cost
        self._sums = [0.0] * 5  # weight, x, y, xx, xy (x: tree nodes, y: step seconds)
        self.observations = 0
        self.kept_nodes = 0
        self.candidate_nodes = 0
        self.steps = 0

    @property
    def node_cost(self) -> float:
        if self.fixed_cost is not None:
            return self.fixed_cost
        w, sx, sy, sxx, sxy = self._sums
        if self.observations < self.min_observations or w <= 0:
            return self.initial_cost
        mean_x, mean_y = sx / w, sy / w
        var_x = sxx / w - mean_x * mean_x
        if var_x < 1.0:  # tree sizes too alike to separate per-node cost from per-step cost
            return self.initial_cost
        slope = (sxy / w - mean_x * mean_y) / var_x
        intercept = mean_y - slope * mean_x
        if intercept <= 0:
            return self.initial_cost
        return min(max(slope / intercept, 0.0), 1.0)

    def start_call(self) -> None:
        """A generate call begins: per-call counters restart (the fitted cost carries over)."""
        self.kept_nodes = self.candidate_nodes = self.steps = 0

    def observe(self, nodes: int, seconds: float) -> None:
        self._sums = [s * self.decay for s in self._sums]
        for i, value in enumerate((1.0, nodes, seconds, nodes * nodes, nodes * seconds)):
            self._sums[i] += value
        self.observations += 1

    def cut(self, tree: DraftTree) -> DraftTree:
        """The most probable nodes of `tree`, as many as maximise expected tokens per unit of time."""
        ranked = tree.ranked_nodes()[: self.max_nodes]
        cost = self.node_cost
        best_n, best_rate, expected = 0, 1.0, 1.0
        for n, (_, prob) in enumerate(ranked, 1):
            expected += prob
            rate = expected / (1.0 + cost * n)
            if rate > best_rate:
                best_n, best_rate = n, rate
        self.steps += 1
        self.candidate_nodes += tree.num_drafted
        self.kept_nodes += best_n
        if best_n == tree.num_drafted:
            return tree
        return tree.select(node for node, _ in ranked[:best_n])

    def stats(self) -> dict[str, Any]:
        steps = max(self.steps, 1)
        return {"node_cost": round(self.node_cost, 4), "mean_candidate_nodes": self.candidate_nodes / steps,
                "mean_kept_nodes": self.kept_nodes / steps}


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
    summary = "Verify only the drafted nodes worth their cost: acceptance estimates x a fitted per-node cost"
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
        self.policy = TreeSizePolicy(self.params.max_tree_nodes, self.params.node_cost, self.params.initial_node_cost)
        engine.tree_policy = self.policy
        self.engine = engine

    def stats(self) -> dict[str, Any]:
        return dict(self.engine.last_stats) if self.engine is not None else {}
