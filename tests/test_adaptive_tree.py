"""Adaptive draft trees: acceptance estimates learned from the real continuation, the size rule, the cost fit,
and losslessness of recipes that use them."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import hfpatch
from hfpatch.errors import PatchError
from hfpatch.techniques.generation.acceptance import AcceptanceEstimates, Candidates
from hfpatch.techniques.generation.adaptive_tree import TreeSizePolicy
from hfpatch.techniques.generation.tree import DraftTree


def test_candidates_are_scored_only_where_their_parent_matched_the_real_continuation():
    est = AcceptanceEstimates(prior=0.5, weight=1.0, min_rate=0.0)
    cands = Candidates(root_context_length=3)
    a = cands.add(10, -1, "first")   # right
    cands.add(11, a, "second")       # wrong (real: 12)
    c = cands.add(20, -1, "first")   # wrong
    cands.add(21, c, "second")       # parent wrong: not scored
    e = cands.add(12, a, "second")   # right
    cands.add(13, e, "third")        # deeper than the known continuation: not scored
    est.learn(cands, [1, 2, 3, 10, 12])
    assert est.tries == {"first": 2, "second": 2}
    # running mean from a prior worth one observation: first 0.5 -> (hit) 0.75 -> (miss) 0.5
    assert est.estimate("first") == pytest.approx(0.5) and est.estimate("second") == pytest.approx(0.5)
    assert est.estimate("third") == 0.5  # the prior: never observed


def test_estimates_follow_a_change_of_regime():
    est = AcceptanceEstimates(prior=0.5, min_rate=0.05)
    for _ in range(200):
        est.observe("x", True)
    assert est.estimate("x") > 0.95
    for _ in range(60):  # ~3 / min_rate observations of the new regime
        est.observe("x", False)
    assert est.estimate("x") < 0.1


def test_tree_keeps_the_best_estimate_per_node_and_selects_with_ancestors():
    tree = DraftTree(root_token=1, max_nodes=10)
    a = tree.add_child(0, 5, 0.6, "ngram")
    assert tree.add_child(0, 5, 0.3, "recycling") == a  # shared node: the higher estimate counts
    b = tree.add_child(a, 6, 0.4, "ngram")
    c = tree.add_child(0, 7, 0.2, "recycling")
    tree.add_child(c, 8, 0.1, "recycling")
    assert tree.acceptance(a) == 0.6
    assert [node for node, _ in tree.ranked_nodes()] == [a, b, c, 4]
    small = tree.select([a, b])
    assert small.tokens == [1, 5, 6] and small.parents == [-1, 0, 1]
    assert small.acceptance(2) == 0.4
    with pytest.raises(ValueError, match="without its parent"):
        tree.select([b])


def _tree_with(estimates):
    tree = DraftTree(root_token=0, max_nodes=len(estimates))
    for i, p in enumerate(estimates):
        tree.add_child(0, i + 1, p, "test")
    return tree


@pytest.mark.parametrize("cost, kept", [(0.1, 2), (0.0, 3), (10.0, 0)])
def test_cut_maximises_expected_tokens_per_unit_of_time(cost, kept):
    # cost 0.1: n=1 -> 1.9/1.1, n=2 -> 2.4/1.2 (best), n=3 -> 2.45/1.3
    policy = TreeSizePolicy(max_nodes=64, node_cost=cost, first_draft_cost=0.0)
    cut = policy.cut(_tree_with([0.9, 0.5, 0.05]))
    assert cut.num_drafted == kept
    assert cut.tokens[1:] == [1, 2, 3][:kept]


def test_cut_respects_the_node_cap():
    policy = TreeSizePolicy(max_nodes=2, node_cost=0.0, first_draft_cost=0.0)
    assert policy.cut(_tree_with([0.9, 0.8, 0.7, 0.6])).num_drafted == 2


def test_over_estimated_acceptance_is_scaled_down():
    policy = TreeSizePolicy(64, node_cost=0.0, first_draft_cost=0.3)
    assert policy.cut(_tree_with([0.5])).num_drafted == 1 and policy.calibration == 1.0
    drafted = []
    for _ in range(60):  # every draft predicted 0.5 accepted tokens; none was accepted
        tree = policy.cut(_tree_with([0.5]))
        policy.observe(tree.num_drafted, 0.05, accepted=0)
        drafted.append(tree.num_drafted)
    assert policy.calibration < 0.7
    # drafting continues only now and then, to find out whether the drafts got better
    assert 0 < sum(drafted[-30:]) < 10


def test_plain_steps_are_timed_even_when_drafting_always_pays():
    policy = TreeSizePolicy(64, node_cost=None)
    sizes = []
    for _ in range(64):
        tree = policy.cut(_tree_with([0.99, 0.98, 0.97]))
        policy.observe(tree.num_drafted, 0.05, accepted=tree.num_drafted)
        sizes.append(tree.num_drafted)
    assert sizes.count(0) == policy.min_timings and policy.timings[0] == policy.min_timings


def test_a_first_draft_cost_keeps_weak_drafts_out():
    # expected 1.2 tokens for a step costing 1.3: worse than plain decoding
    assert TreeSizePolicy(64, node_cost=0.0, first_draft_cost=0.3).cut(_tree_with([0.2])).num_drafted == 0
    assert TreeSizePolicy(64, node_cost=0.0, first_draft_cost=0.3).cut(_tree_with([0.4])).num_drafted == 1


def test_step_costs_come_from_measured_times_per_tree_size():
    policy = TreeSizePolicy(max_nodes=64, node_cost=None, first_draft_cost=0.5, initial_node_cost=0.1)
    assert policy.step_costs(2) == pytest.approx([1.0, 1.6, 1.7])  # the prior until sizes are timed
    measured = {0: 0.040, 3: 0.080, 4: 0.070, 8: 0.090}  # three tokens slower than four, as MKL does here
    for _ in range(3):
        for nodes, seconds in measured.items():
            policy.observe(nodes, seconds, accepted=0)
    costs = policy.step_costs(10)
    for nodes, seconds in measured.items():
        assert costs[nodes] == pytest.approx(seconds)
    prior = [1.0 + (0.5 if n else 0) + 0.1 * n for n in range(11)]
    # between two timed sizes the measured/prior ratio is interpolated; beyond the last it is held
    assert costs[6] / prior[6] == pytest.approx((0.070 / prior[4] + 0.090 / prior[8]) / 2)
    assert costs[10] / prior[10] == pytest.approx(0.090 / prior[8])
    assert costs[1] / prior[1] == pytest.approx((0.040 / prior[0] * 2 + 0.080 / prior[3]) / 3)
    # with these costs a tree of four strong nodes beats three
    assert policy.cut(_tree_with([0.9, 0.9, 0.9, 0.9, 0.01])).num_drafted == 4


def _prompt(seed=0):
    g = torch.Generator().manual_seed(seed)
    part = torch.randint(3, 120, (1, 9), generator=g)
    return torch.cat([part, part, part[:, :2]], dim=1)


@pytest.mark.parametrize("node_cost", [0.0, 0.05, 100.0])
def test_adaptive_recipes_stay_token_identical(node_cost):
    model = tiny_model("llama")
    twin = type(model)(model.config).eval()
    prompts = [_prompt(s) for s in range(3)]
    expected = [model.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    with hfpatch.patch(model, "recycling+lookup", node_cost=node_cost) as handle:  # first_draft_cost 0.3
        for p, ref in zip(prompts, expected):
            assert torch.equal(model.generate(p, max_new_tokens=24, do_sample=False), ref)
        stats = handle.stats["adaptive_tree"]
        assert "generate" not in twin.__dict__ and not hfpatch.active_patches(twin)
    assert "generate" not in model.__dict__ and not hfpatch.active_patches(model)
    assert stats["fallback"] is None
    assert stats["tree_policy"]["relative_step_cost"][4] == pytest.approx(1 + (0.3 + 4 * node_cost) if node_cost else 1.3)
    if node_cost == 100.0:
        assert stats["mean_tree_nodes"] == 0 and stats["forwards"] == 24  # nothing worth verifying
    else:
        assert stats["forwards"] < 24


def test_adaptive_tree_without_a_drafter_runs_plain_generate():
    model = tiny_model("llama")
    prompt = _prompt()
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False)
    with hfpatch.patch(model, hfpatch.Recipe([{"type": "adaptive_tree"}])) as handle:
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), ref)
        assert "no drafter" in handle.stats["adaptive_tree"]["fallback"]


def test_adaptive_tree_twice_is_refused_and_leaves_the_model_unpatched():
    model = tiny_model("llama")
    recipe = hfpatch.Recipe([{"type": "ngram_lookup"}, {"type": "adaptive_tree"}, {"type": "adaptive_tree"}])
    with pytest.raises(PatchError, match="may hold it once"):
        hfpatch.patch(model, recipe)
    assert "generate" not in model.__dict__ and not hfpatch.active_patches(model)
