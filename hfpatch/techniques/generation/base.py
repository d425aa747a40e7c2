"""Glue between drafter techniques and the shared speculative engine."""
from __future__ import annotations

from typing import Any, ClassVar

from ... import arch, primitives
from ...technique import Technique
from .engine import Drafter, SpeculativeEngine

_ENGINE_KEY = "speculative_engine"


def shared_engine(model, ctx) -> SpeculativeEngine:
    """The patch's speculative engine: the first generation technique of a recipe installs it (one
    instance-level `generate` wrapper), later ones join it."""
    engine = ctx.shared.get(_ENGINE_KEY)
    if engine is None:
        engine = SpeculativeEngine(model)
        ctx.shared[_ENGINE_KEY] = engine
        ctx.record(primitives.wrap_generate(model, engine.generate))
    return engine


class DrafterTechnique(Technique):
    """A technique that contributes one drafter to the patch's speculative engine.

    The first drafter of a recipe installs the engine (one instance-level `generate` wrapper); later ones
    join it, so `recycling+lookup` verifies the merged tree of both in one forward.
    """

    family = "generation"
    claims: ClassVar[frozenset[str]] = frozenset({"generate-loop"})
    cooperative_claims: ClassVar[frozenset[str]] = frozenset({"generate-loop"})
    model_types: ClassVar[frozenset[str]] = frozenset(arch.supported_model_types("decoder"))

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.engine: SpeculativeEngine | None = None
        self.drafter: Drafter | None = None

    def make_drafter(self, model) -> Drafter:  # pragma: no cover - abstract
        raise NotImplementedError

    def node_budget(self) -> int:
        """How many tree nodes this drafter may add per step."""
        return self.params.max_nodes

    def apply(self, model, ctx) -> None:
        engine = shared_engine(model, ctx)
        self.drafter = self.make_drafter(model)
        engine.add_drafter(self.drafter, self.node_budget())
        self.engine = engine

    def stats(self) -> dict[str, Any]:
        """The engine's statistics of the generate call that ended last (shared by the recipe's drafters).

        With several threads generating at once they are one whole call's, whichever finished last; the
        drafter entries (tables, estimates, memory) describe what all calls have taught the drafters so far.
        """
        return dict(self.engine.last_stats) if self.engine is not None else {}
