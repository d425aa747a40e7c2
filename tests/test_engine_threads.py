"""Several threads calling `generate` on one speculatively patched model: each call returns what it would
alone (greedy, fp32: token-identical to the unpatched model), and the shared learned state stays consistent."""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from tiny_models import tiny_model

import hfpatch
from hfpatch.techniques.generation.adaptive_tree import PolicyCall, TreeSizePolicy
from hfpatch.techniques.generation.engine import SpeculativeEngine

RECIPES = ("token-recycling", "ngram-lookup", "recycling+lookup", "recycling+lookup-cpu")
THREADS, CALLS = 3, 8


def _prompt(seed: int) -> torch.Tensor:
    """A prompt with internal repetition (n-gram lookup finds matches), its length depending on the seed."""
    g = torch.Generator().manual_seed(seed)
    part = torch.randint(3, 120, (1, 3 + seed % 9), generator=g)
    return torch.cat([part, part, part[:, : 1 + seed % 3]], dim=1)


def _jobs():
    """(prompt, max_new_tokens) per call of each thread: different prompts and lengths in every thread."""
    return [[(_prompt(t * CALLS + i), 4 + (7 * t + 5 * i) % 21) for i in range(CALLS)] for t in range(THREADS)]


def _run_in_threads(fn, jobs):
    """Run fn(*job) for each thread's jobs in its own thread, all starting together; results and errors."""
    results = [[None] * len(row) for row in jobs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def worker(t):
        barrier.wait()
        try:
            for i, job in enumerate(jobs[t]):
                results[t][i] = fn(*job)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results, errors


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def expected(model):
    """Unpatched greedy output of every job."""
    return [[model.generate(p, max_new_tokens=n, do_sample=False) for p, n in row] for row in _jobs()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_concurrent_calls_return_what_unpatched_greedy_returns(model, expected, recipe):
    jobs = _jobs()
    with hfpatch.patch(model, recipe) as handle:
        results, errors = _run_in_threads(lambda p, n: model.generate(p, max_new_tokens=n, do_sample=False), jobs)
        stats = handle.stats["ngram_lookup" if "lookup" in recipe else "token_recycling"]
        assert not errors, f"{recipe}: {len(errors)} threads raised, first: {errors[0]!r}"
        for t, row in enumerate(jobs):
            for i, _ in enumerate(row):
                assert torch.equal(results[t][i], expected[t][i]), (recipe, t, i)
        # the stats are one finished call's, whole: served, with its own new-token count among the jobs'
        assert stats["fallback"] is None
        assert stats["new_tokens"] in {n for row in jobs for _, n in row}
        assert stats["forwards"] <= stats["new_tokens"]
        # the drafters learned from the concurrent calls (the shared state was updated, not lost)
        drafter_stats = stats["drafters"]
        if "token_recycling" in drafter_stats:
            assert drafter_stats["token_recycling"]["table_rows_filled"] > 0
        if "ngram_lookup" in drafter_stats:
            assert drafter_stats["ngram_lookup"]["memory_tokens"] > 0


def test_each_call_keeps_its_own_drafting_state(model):
    """Two calls started before either drafts: the second one's start must not replace the first one's
    n-gram index or candidates (the old cause of `IndexError` in ngram.py under threads)."""
    with hfpatch.patch(model, "ngram-lookup") as handle:
        drafter = handle.technique("ngram_lookup").drafter
        long_call, short_call = drafter.start(list(range(3, 40))), drafter.start([5, 6, 5])
        assert long_call is not short_call and long_call.current is not short_call.current
        assert len(long_call.current.tokens) == 37 and len(short_call.current.tokens) == 3


def test_tree_policy_counts_per_call_and_learns_shared():
    policy = TreeSizePolicy(64, node_cost=0.0, first_draft_cost=0.0)
    first, second = policy.start_call(), policy.start_call()
    assert isinstance(first, PolicyCall) and first is not second
    from hfpatch.techniques.generation.tree import DraftTree

    tree = DraftTree(0, max_nodes=2)
    tree.add_child(0, 1, 0.9, "t")
    tree.add_child(0, 2, 0.8, "t")
    policy.cut(tree, first)
    policy.observe(2, 0.01, accepted=1, call=first)
    assert (first.steps, first.candidate_nodes, second.steps) == (1, 2, 0)
    assert policy.stats(first)["mean_candidate_nodes"] == 2 and policy.stats(second)["mean_candidate_nodes"] == 0
    assert policy.timings == {2: 1}  # timings are shared by every call


def test_engine_copies_and_pickles_with_fresh_locks(model):
    engine = SpeculativeEngine(tiny_model("llama"))
    clone = copy.deepcopy(engine)
    assert clone._policy_lock is not engine._policy_lock and clone._drafter_locks == []
    assert isinstance(pickle.loads(pickle.dumps(engine))._policy_lock, type(threading.Lock()))


def test_fallback_and_served_calls_at_once(model):
    """Beam search (a fallback to the original generate) in one thread while others are served."""
    prompts = [_prompt(40 + i) for i in range(3)]
    kwargs = [dict(max_new_tokens=9, do_sample=False, num_beams=2), dict(max_new_tokens=11, do_sample=False),
              dict(max_new_tokens=7, do_sample=False)]
    expected = [model.generate(p, **kw) for p, kw in zip(prompts, kwargs)]
    with hfpatch.patch(model, "recycling+lookup") as handle:
        jobs = [[(prompts[t], kwargs[t])] * 3 for t in range(3)]
        results, errors = _run_in_threads(lambda p, kw: model.generate(p, **kw), jobs)
        stats = handle.stats["ngram_lookup"]
    assert not errors, errors
    for t in range(3):
        assert all(torch.equal(out, expected[t]) for out in results[t]), t
    assert stats["fallback"] is None or "num_beams" in stats["fallback"]
