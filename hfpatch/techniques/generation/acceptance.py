"""Online acceptance statistics of drafted tokens, learned from what the target actually produced.

A drafter labels each candidate token with a class of its own choosing (Token Recycling: the template
node; n-gram lookup: match length, branch rank and position in the branch). After every verification step
the real continuation is known, so every candidate whose parent matched it can be scored, drafted into
the verified tree or not: that keeps the estimates honest for candidates an adaptive tree left out.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass
class Candidates:
    """A drafter's candidate forest for one step: parallel lists, parents before children (-1 = the root)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    classes: list[Hashable] = field(default_factory=list)
    #: length of the context whose last token was the root when these were drafted
    root_context_length: int = 0

    def add(self, token: int, parent: int, cls: Hashable) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.classes.append(cls)
        return len(self.tokens) - 1


class AcceptanceEstimates:
    """P(candidate token is right | its parent was right), per class: a running mean that starts at a prior
    worth `weight` observations and turns into an exponential average over about 1/`min_rate` recent
    observations, so the estimates follow the request at hand (copying a passage vs. free chat).

    Example:
        >>> est = AcceptanceEstimates(prior=0.5)
        >>> est.observe("rank0", True); est.observe("rank0", False)
        >>> round(est.estimate("rank0"), 3)
        0.5
    """

    def __init__(self, prior: float | dict[Hashable, float], weight: float = 4.0, min_rate: float = 0.05):
        self.prior = prior
        self.weight = weight
        self.min_rate = min_rate
        self.means: dict[Hashable, float] = {}
        self.tries: dict[Hashable, int] = {}

    def _prior(self, cls: Hashable) -> float:
        return self.prior.get(cls, 0.1) if isinstance(self.prior, dict) else self.prior

    def estimate(self, cls: Hashable) -> float:
        mean = self.means.get(cls)
        return self._prior(cls) if mean is None else mean

    def observe(self, cls: Hashable, hit: bool) -> None:
        tries = self.tries[cls] = self.tries.get(cls, 0) + 1
        mean = self.estimate(cls)
        rate = max(1.0 / (tries + self.weight), self.min_rate)
        self.means[cls] = mean + rate * (float(hit) - mean)

    def learn(self, candidates: Candidates, context: Sequence[int]) -> None:
        """Score `candidates` against the tokens the target produced after their root (now in `context`)."""
        real = context[candidates.root_context_length:]
        matched: list[bool] = []
        depth: list[int] = []
        for token, parent, cls in zip(candidates.tokens, candidates.parents, candidates.classes):
            d = 1 if parent < 0 else depth[parent] + 1
            depth.append(d)
            parent_right = parent < 0 or matched[parent]
            right = parent_right and d <= len(real) and token == real[d - 1]
            matched.append(right)
            if parent_right and d <= len(real):
                self.observe(cls, right)

    def reset(self) -> None:
        self.means.clear()
        self.tries.clear()

    @property
    def observations(self) -> int:
        return sum(self.tries.values())
