"""The speculative engine's steps one at a time: prefill, draft, verify + accept, cache compaction, drafter
updates, the per-call stats record, and the compat functions the loop goes through."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from transformers import (
    DynamicCache,
    EosTokenCriteria,
    GenerationConfig,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteriaList,
)

import hfpatch
from hfpatch import compat
from hfpatch.techniques.generation.emit import Emitter, accept_path
from hfpatch.techniques.generation.engine import Drafter, SpeculativeEngine
from hfpatch.techniques.generation.step_stats import StepStats, Stopwatch
from hfpatch.techniques.generation.tree import DraftTree

#: handle.stats of a served call, in this order, before the loop was split into steps
STATS_KEYS = ["fallback", "forwards", "new_tokens", "mean_accepted_tokens_per_forward", "mean_tree_nodes",
              "mean_accepted_drafts_per_step", "draft_time_s", "verify_time_s", "total_time_s", "drafters"]
PROMPT = torch.tensor([[5, 17, 33, 9, 41, 5, 17, 33]])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def greedy(model):
    """Plain greedy decoding without a cache: one full forward per token."""
    ids = PROMPT
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ids[0, PROMPT.shape[1]:].tolist()


class ListDrafter(Drafter):
    """Proposes a fixed chain below the root and records what the engine shows it."""

    name = "list"

    def __init__(self, chain=(), topk_wanted=0):
        self.chain = list(chain)
        self.topk_wanted = topk_wanted
        self.drafted = 0
        self.updates = []

    def draft(self, tree, context):
        self.drafted += 1
        tree.add_path(0, self.chain)

    def update(self, tree, topk, accepted, context):
        self.updates.append((tree.num_drafted, None if topk is None else tuple(topk.shape), list(accepted),
                             list(context)))

    def stats(self):
        return {"updates": len(self.updates)}


def _start(engine, max_new_tokens, eos=None):
    """A call as transformers would prepare it for greedy decoding of PROMPT, through the engine's start step."""
    config = GenerationConfig(do_sample=False, max_length=PROMPT.shape[1] + max_new_tokens)
    criteria = StoppingCriteriaList([MaxLengthCriteria(config.max_length)])
    if eos is not None:
        criteria.append(EosTokenCriteria(eos))
    out = Emitter(PROMPT, LogitsProcessorList(), criteria, config)
    return engine._start_call(out, config, DynamicCache(config=engine.model.config))


def _new_tokens(call):
    return call.out.context[PROMPT.shape[1]:]


def test_prefill_emits_the_first_greedy_token_and_caches_the_prompt(model, greedy):
    engine = SpeculativeEngine(model)
    call = _start(engine, max_new_tokens=5)
    with torch.no_grad():
        assert engine._prefill(call) is False
    assert _new_tokens(call) == greedy[:1]
    assert call.stats.forwards == 1 and call.stats.steps == 0
    assert call.cache.get_seq_length() == PROMPT.shape[1]


def _tree(greedy):
    """Root greedy[0]; the right path greedy[1:5] with wrong branches at the root, at depth 3 and below its end."""
    tree = DraftTree(greedy[0], max_nodes=16)
    tree.add_path(0, greedy[1:5])                       # nodes 1..4
    tree.add_path(0, [(greedy[1] + 1) % 128, 7])        # wrong first token
    tree.add_path(2, [(greedy[3] + 1) % 128])           # right for two tokens, then wrong
    tree.add_path(4, [(greedy[5] + 1) % 128, 9])        # below the last right node: the bonus token differs
    return tree


def test_verify_of_a_hand_built_tree_accepts_the_greedy_path_plus_a_bonus_token(model, greedy):
    engine = SpeculativeEngine(model)
    call = _start(engine, max_new_tokens=12)
    tree = _tree(greedy)
    with torch.no_grad():
        engine._prefill(call)
        root = call.out.length - 1
        node_logits = engine._verify(call, tree, root)
    assert node_logits.shape == (len(tree), model.config.vocab_size) and node_logits.dtype == torch.float32
    accepted, done = accept_path(call.out, tree, node_logits)
    assert accepted == [1, 2, 3, 4] == tree.path_to(4)
    assert done is False
    assert _new_tokens(call) == greedy[:6]  # prefill token, four accepted drafts, the bonus token
    assert call.stats.forwards == 2
    # The cache held every tree node; compaction keeps the prompt, the root and the accepted path.
    engine._keep_path(call, root, accepted)
    assert call.cache.get_seq_length() == call.out.length - 1
    # Decoding on from the compacted cache stays on the greedy sequence.
    with torch.no_grad():
        while not engine._step(call):
            pass
    assert _new_tokens(call) == greedy


def test_a_wrong_first_draft_accepts_nothing_and_emits_the_models_token(model, greedy):
    engine = SpeculativeEngine(model)
    call = _start(engine, max_new_tokens=12)
    tree = DraftTree(greedy[0], max_nodes=4)
    tree.add_path(0, [(greedy[1] + 1) % 128, greedy[2]])
    with torch.no_grad():
        engine._prefill(call)
        accepted, done = accept_path(call.out, tree, engine._verify(call, tree, call.out.length - 1))
    assert accepted == [] and done is False
    assert _new_tokens(call) == greedy[:2]


@pytest.mark.parametrize("stop", ["max_new_tokens", "eos"])
def test_a_stop_inside_the_accepted_run_cuts_exactly_there(model, greedy, stop):
    engine = SpeculativeEngine(model)
    if stop == "max_new_tokens":
        call = _start(engine, max_new_tokens=3)
    else:
        assert greedy[2] not in greedy[:2]
        call = _start(engine, max_new_tokens=12, eos=greedy[2])
    tree = DraftTree(greedy[0], max_nodes=8)
    tree.add_path(0, greedy[1:6])
    with torch.no_grad():
        engine._prefill(call)
        accepted, done = accept_path(call.out, tree, engine._verify(call, tree, call.out.length - 1))
    assert done is True
    assert accepted == [1]  # greedy[1] accepted; greedy[2] chosen at its node ends generation
    assert _new_tokens(call) == greedy[:3]


def test_draft_gives_each_drafter_its_budget_and_leaves_room_for_the_bonus_token(model):
    engine = SpeculativeEngine(model)
    first, second = ListDrafter([10, 11, 12, 13, 14]), ListDrafter([20, 21, 22, 23, 24])
    engine.add_drafter(first, 3)
    engine.add_drafter(second, 2)
    tree = engine._draft(_start(engine, max_new_tokens=12))
    assert tree.tokens == [PROMPT[0, -1].item(), 10, 11, 12, 20, 21]
    # three tokens left before max_length: drafts reach depth 2, the bonus token takes the third
    tree = engine._draft(_start(engine, max_new_tokens=3))
    assert max(tree.depths) == 2 and tree.num_drafted == 4
    # one token left: nothing is drafted, the drafters are not asked
    asked = first.drafted
    tree = engine._draft(_start(engine, max_new_tokens=1))
    assert tree.num_drafted == 0 and first.drafted == asked


def test_draft_lets_the_tree_policy_cut_the_tree(model):
    class KeepOne:
        max_nodes = 64

        def start_call(self):
            pass

        def cut(self, tree):
            return tree.select([1])

    engine = SpeculativeEngine(model)
    engine.add_drafter(ListDrafter([10, 11, 12]), 8)
    engine.tree_policy = KeepOne()
    tree = engine._draft(_start(engine, max_new_tokens=12))
    assert tree.tokens[1:] == [10]


def test_a_step_updates_the_drafters_and_the_stats_record(model, greedy):
    engine = SpeculativeEngine(model)
    drafter = ListDrafter(greedy[1:4] + [3], topk_wanted=4)
    engine.add_drafter(drafter, 8)
    call = _start(engine, max_new_tokens=12)
    with torch.no_grad():
        engine._prefill(call)
        assert engine._step(call) is False
    nodes, topk_shape, accepted, context = drafter.updates[-1]
    assert (nodes, topk_shape, accepted) == (4, (5, 4), [1, 2, 3])
    assert context == call.out.context and _new_tokens(call) == greedy[:5]
    stats = call.stats
    assert (stats.forwards, stats.steps, stats.tree_nodes, stats.accepted_drafts) == (2, 1, 4, 3)
    assert stats.draft_time_s > 0 and stats.verify_time_s > 0


def test_step_stats_make_the_same_dict_as_before():
    class Policy:
        def stats(self):
            return {"calibration": 1.0}

    drafter = ListDrafter()
    record = StepStats(forwards=3)
    record.add_step(tree_nodes=6, accepted_drafts=3, draft_s=0.25, verify_s=0.5)
    record.add_step(tree_nodes=2, accepted_drafts=0, draft_s=0.25, verify_s=0.5)
    stats = record.as_dict(new_tokens=6, drafters=[(drafter, 8)])
    assert list(stats) == STATS_KEYS
    assert stats["fallback"] is None and stats["forwards"] == 3 and stats["new_tokens"] == 6
    assert stats["mean_accepted_tokens_per_forward"] == 2.0
    assert stats["mean_tree_nodes"] == 4.0 and stats["mean_accepted_drafts_per_step"] == 1.5
    assert stats["draft_time_s"] == 0.5 and stats["verify_time_s"] == 1.0 and stats["total_time_s"] >= 0
    assert stats["drafters"] == {"list": {"updates": 0}}
    with_policy = record.as_dict(new_tokens=6, drafters=[(drafter, 8)], tree_policy=Policy())
    assert list(with_policy) == STATS_KEYS + ["tree_policy"] and with_policy["tree_policy"] == {"calibration": 1.0}
    # a call that stopped at the prefill: no step, means over one step
    only_prefill = StepStats(forwards=1).as_dict(new_tokens=1, drafters=[])
    assert only_prefill["mean_tree_nodes"] == 0.0 and only_prefill["mean_accepted_tokens_per_forward"] == 1.0
    assert StepStats.fallback("why") == {"fallback": "why"}


def test_stopwatch_laps_add_up_to_the_total():
    watch = Stopwatch()
    laps = [watch.lap() for _ in range(3)]
    assert all(lap >= 0 for lap in laps) and sum(laps) <= watch.total()


def test_recycling_lookup_stats_keep_their_keys_and_order(model):
    with hfpatch.patch(model, "recycling+lookup", node_cost=0.03) as handle:
        model.generate(PROMPT, max_new_tokens=9, do_sample=False)
        stats = handle.stats
    assert list(stats) == ["ngram_lookup", "token_recycling", "adaptive_tree"]
    for technique_stats in stats.values():
        assert list(technique_stats) == STATS_KEYS + ["tree_policy"]
        assert list(technique_stats["drafters"]) == ["ngram_lookup", "token_recycling"]
        assert technique_stats["new_tokens"] == 9 and technique_stats["fallback"] is None


def test_generation_mode_names_what_transformers_will_run():
    from transformers.generation import GenerationMode

    assert compat.GREEDY_SEARCH == GenerationMode.GREEDY_SEARCH.value
    assert compat.SAMPLE == GenerationMode.SAMPLE.value
    assert compat.generation_mode(GenerationConfig(do_sample=False)) == compat.GREEDY_SEARCH
    assert compat.generation_mode(GenerationConfig(do_sample=True)) == compat.SAMPLE
    assert compat.generation_mode(GenerationConfig(num_beams=2)) == "beam_search"


def test_a_mode_other_than_greedy_or_sampling_is_a_fallback_with_its_name(model):
    engine = SpeculativeEngine(model)
    problem = engine._loop_problem(PROMPT, GenerationConfig(num_beams=2, max_length=20), {})
    assert problem == "generation mode beam_search is not greedy or sampling"


def test_sample_loop_is_the_class_loop_bound_to_the_model(model):
    loop = compat.sample_loop(model)
    assert loop.__self__ is model and loop.__func__ is type(model)._sample
    model._sample = lambda *a, **k: None  # an instance-level override does not intercept the fallback
    try:
        assert compat.sample_loop(model).__func__ is type(model)._sample
    finally:
        del model._sample


def test_forward_accepts_reads_the_forward_signature(model):
    assert compat.forward_accepts(model, "logits_to_keep")
    assert not compat.forward_accepts(model, "no_such_keyword")
