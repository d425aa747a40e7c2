"""What one speculative generate call did, counted as it runs and reported as `handle.stats`.

The engine's timers live here too: a `Stopwatch` per step splits its time into drafting (building the tree
and updating the drafters) and verifying (the forward, the walk down the tree, the cache compaction).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any


class Stopwatch:
    """Laps of one step: `lap()` is the time since the previous lap (or the start), `total()` since the start."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self.started


@dataclasses.dataclass
class StepStats:
    """Counters of one served generate call (prefill included); `as_dict` is what `handle.stats` shows."""

    #: model forwards: the prefill and one per verification step
    forwards: int = 0
    #: verification steps (every forward after the prefill)
    steps: int = 0
    #: drafted nodes verified, summed over steps (the root is not counted)
    tree_nodes: int = 0
    #: drafted tokens accepted, summed over steps (bonus tokens are not counted)
    accepted_drafts: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    #: `time.perf_counter()` when the call's prefill began
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add_step(self, tree_nodes: int, accepted_drafts: int, draft_s: float, verify_s: float) -> None:
        """One verification step (its forward is counted by `forwards` separately)."""
        self.steps += 1
        self.tree_nodes += tree_nodes
        self.accepted_drafts += accepted_drafts
        self.draft_time_s += draft_s
        self.verify_time_s += verify_s

    def as_dict(self, new_tokens: int, drafters, tree_policy=None, policy_state=None) -> dict[str, Any]:
        """The statistics of the finished call; `drafters` are the engine's (drafter, budget) pairs.

        The counters above are this call's own; what drafters and the tree policy report about what they
        learned (tables, estimates, timings) is shared by every call of the patch, as it stands now.
        `policy_state`: the tree policy's state for this call (its per-call counters), when it keeps one.
        """
        steps = max(self.steps, 1)
        stats = {
            "fallback": None,
            "forwards": self.forwards,
            "new_tokens": new_tokens,
            "mean_accepted_tokens_per_forward": new_tokens / self.forwards,
            "mean_tree_nodes": self.tree_nodes / steps,
            "mean_accepted_drafts_per_step": self.accepted_drafts / steps,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
            "total_time_s": time.perf_counter() - self.started,
            "drafters": {drafter.name: drafter.stats() for drafter, _ in drafters},
        }
        if tree_policy is not None:
            stats["tree_policy"] = tree_policy.stats() if policy_state is None else tree_policy.stats(policy_state)
        return stats

    @staticmethod
    def fallback(reason: str) -> dict[str, Any]:
        """The statistics of a call the engine handed to the original path, and why."""
        return {"fallback": reason}
