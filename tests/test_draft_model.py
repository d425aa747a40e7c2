"""The draft_model drafter (chain, DySpec tree, Recursive SD siblings) on the speculative engine."""
from __future__ import annotations

import copy

import pytest
import torch
from test_speculative import _chi_square_p_value, _prompts, _sample_counts, _stats
from tiny_models import TEXT_KINDS, tiny_config, tiny_model, word_level_tokenizer

import hfpatch
from hfpatch import compat
from hfpatch.errors import PatchError, RecipeError
from hfpatch.techniques.generation.draft_model import DraftModelDrafter
from hfpatch.techniques.generation.engine import CallInfo
from hfpatch.techniques.generation.tree import DraftTree

SHAPES = {"chain": {"tree": "chain", "draft_length": 4},
          # min_probability 0: a tiny random draft spreads its probability thinly over 128 ids
          "dynamic": {"tree": "dynamic", "max_nodes": 12, "width": 4, "min_probability": 0.0}}


def _recipe(**params) -> dict:
    return {"hfpatch_version": "1.0", "name": "draft-test", "techniques": [{"type": "draft_model", **params}]}


def _target(kind: str, seed: int = 0):
    config = tiny_config(kind)
    if kind == "gemma3_text":
        config.sliding_window = 256  # inside the window: the sliding case is tests/test_sliding_window_spec.py
    return tiny_model(kind, seed=seed, config=config)


def _draft_for(target, kind: str):
    """A shallower draft (1 layer instead of 2) of the same vocabulary that shares the target's embeddings and
    first layer, so it agrees with the target often enough for drafts to be accepted."""
    config = copy.deepcopy(target.config)
    if kind == "gpt2":
        config.n_layer = 1
    else:
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:1]
    draft = tiny_model(kind, seed=1, config=config)
    own = target.state_dict()
    draft.load_state_dict({k: own[k] if k in own and own[k].shape == v.shape else v
                           for k, v in draft.state_dict().items()})
    return draft


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_greedy_token_identical_on_every_decoder_family(kind, shape):
    target = _target(kind)
    draft = _draft_for(target, kind)
    prompts = _prompts(3, seed=len(kind))
    lengths = [1, 9, 30]
    expected = [target.generate(p, max_new_tokens=n, do_sample=False) for p, n in zip(prompts, lengths)]
    with hfpatch.patch(target, _recipe(**SHAPES[shape]), draft_model=draft) as handle:
        for p, n, ref in zip(prompts, lengths, expected):
            out = target.generate(p, max_new_tokens=n, do_sample=False)
            assert torch.equal(out, ref), (kind, shape, n)
            stats = _stats(handle)
            assert stats["fallback"] is None and stats["new_tokens"] == n
        assert stats["forwards"] < n, "no draft was ever accepted: the test would not exercise the tree path"
        assert stats["drafters"]["draft_model"]["kv_kept_from_tree"] > 0
    assert "generate" not in target.__dict__


@pytest.mark.slow
def test_sampling_distribution_matches_vanilla():
    model = tiny_model("llama", seed=3)
    draft = _draft_for(model, "llama")
    prompt = torch.tensor([[5, 17, 33, 5, 17]])
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=0.7, top_k=4)
    runs = 300

    def sample_counts(seed0: int, **extra) -> dict:
        return _sample_counts(model, prompt, seed0, runs, **{**kwargs, **extra})

    vanilla = sample_counts(0)
    # Recursive SD: siblings drawn without replacement (Gumbel-top-k) from the draft's distribution
    with hfpatch.patch(model, _recipe(**SHAPES["dynamic"], siblings="auto"), draft_model=draft) as handle:
        patched = sample_counts(10_000)
        stats = _stats(handle)
        assert stats["fallback"] is None
    # one verification step per run here (3 new tokens: the prefill's, a drafted one and a bonus token)
    assert stats["drafters"]["draft_model"]["accepted_tokens"] > 0.4 * runs, "drafts were rarely accepted"
    assert _chi_square_p_value(vanilla, patched) > 1e-3
    assert _chi_square_p_value(vanilla, sample_counts(20_000, top_k=2)) < 1e-3  # the test can tell


def test_sampling_leaves_the_global_generator_as_plain_decoding_does():
    """Gumbel siblings come from the drafter's own generator, so a seeded sampled call with a draft that is the
    target's copy (every draft accepted) returns exactly plain decoding's sample."""
    model = tiny_model("qwen2", seed=2)
    prompt = _prompts(1, seed=8)[0]
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9)
    torch.manual_seed(7)
    ref = model.generate(prompt, **kwargs)
    with hfpatch.patch(model, _recipe(**SHAPES["dynamic"], siblings="gumbel"), draft_model=copy.deepcopy(model)):
        torch.manual_seed(7)
        out = model.generate(prompt, **kwargs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_eos_and_max_new_tokens_cut_inside_accepted_runs(shape):
    model = tiny_model("llama", seed=4)
    draft = copy.deepcopy(model)  # the same weights: every drafted token is accepted, so the cuts fall inside runs
    prompt = _prompts(1, seed=3)[0]
    free_run = model.generate(prompt, max_new_tokens=30, do_sample=False)[0, prompt.shape[1]:].tolist()
    eos = free_run[6]
    cut = free_run.index(eos) + 1
    ref = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert ref.shape[1] == prompt.shape[1] + cut
    expected = {n: model.generate(prompt, max_new_tokens=n, do_sample=False) for n in (2, 3, 6, 7)}
    with hfpatch.patch(model, _recipe(**SHAPES[shape]), draft_model=draft) as handle:
        out = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out, ref)
        assert _stats(handle)["forwards"] < _stats(handle)["new_tokens"], "the EOS was not inside an accepted run"
        for n, want in expected.items():
            assert torch.equal(model.generate(prompt, max_new_tokens=n, do_sample=False), want)
            assert _stats(handle)["new_tokens"] == n


def partially_accepted_tree(draft, context: list[int]):
    """Draft a 10-node DySpec tree after `context`, then have the target accept the path to its deepest expanded
    node and a token not drafted below it. Returns (drafter, call, accepted tokens, the new context, bonus)."""
    drafter = DraftModelDrafter(draft, "dynamic", draft_length=4, branching=3, width=4, min_probability=0.0,
                                siblings="top")
    call = drafter.start([], CallInfo(draft.generation_config, None))
    tree = DraftTree(context[-1], max_nodes=10)
    drafter.draft(tree, context, call)
    assert tree.num_drafted == 10
    node = max(call.slots, key=lambda n: tree.depths[n])
    accepted = [tree.tokens[n] for n in tree.path_to(node)]
    assert len(accepted) >= 2 and call.slots[node] != len(context)  # not simply the next cache slot
    bonus = next(t for t in range(3, 100) if t not in tree.children[node])
    return drafter, call, accepted, context + accepted + [bonus], bonus


def test_draft_cache_rolls_back_to_the_accepted_path():
    """After a partial acceptance the draft's cache holds exactly the KV of the accepted sequence (the cached
    context and the accepted drafted nodes, moved from their tree slots), as a fresh prefill would."""
    target = tiny_model("llama")
    draft = _draft_for(target, "llama")
    drafter, call, accepted, new_context, bonus = partially_accepted_tree(draft, _prompts(1, seed=6)[0][0].tolist())
    drafter.draft(DraftTree(bonus, max_nodes=0), new_context, call)  # a zero budget drafts nothing
    drafter.draft(DraftTree(bonus, max_nodes=1), new_context, call)
    assert drafter.kept_from_tree == len(accepted)
    fresh = compat.new_dynamic_cache(draft.config)
    with torch.no_grad():
        draft(torch.tensor([new_context]), **{compat.cache_kwarg(draft): fresh, "use_cache": True})
    n = len(new_context)
    for mine, theirs in zip(call.cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys[..., :n, :], theirs.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.values[..., :n, :], theirs.values, rtol=1e-4, atol=1e-5)


def test_vocabulary_mismatch_is_refused():
    target = tiny_model("llama")
    bigger = tiny_model("llama", seed=1)
    bigger.resize_token_embeddings(130)
    with pytest.raises(PatchError, match="output vocabulary has 130 ids, the target's 128"):
        hfpatch.patch(target, "draft-model", draft_model=bigger)
    other_eos = tiny_model("llama", seed=1)
    other_eos.generation_config.eos_token_id = 5
    with pytest.raises(PatchError, match="special token ids differ"):
        hfpatch.patch(target, "draft-model", draft_model=other_eos)
    same = tiny_model("llama", seed=1)
    tok_a, tok_b = word_level_tokenizer(128, "apple pear"), word_level_tokenizer(128, "pear apple")
    with pytest.raises(PatchError, match="draft's tokenizer .* is not the target's"):
        hfpatch.patch(target, "draft-model", draft_model=same, target_tokenizer=tok_a, draft_tokenizer=tok_b)
    with hfpatch.patch(target, "draft-model", draft_model=same, target_tokenizer=tok_a,
                       draft_tokenizer=word_level_tokenizer(128, "apple pear")) as handle:
        assert "fingerprints match" in handle.stats["draft_model"]["vocabulary_check"]
    assert "generate" not in target.__dict__


def test_no_draft_is_a_clear_error():
    with pytest.raises(PatchError, match="no draft model: pass one at patch time"):
        hfpatch.patch(tiny_model("llama"), "dyspec")
    with pytest.raises(RecipeError, match="draft_model must be a loaded model or a Hub repo id"):
        hfpatch.patch(tiny_model("llama"), "dyspec", draft_model=3.5)


def test_unpatch_second_instance_and_batch_fallback():
    a, b = tiny_model("llama"), tiny_model("llama")
    draft = _draft_for(a, "llama")
    prompt = _prompts(1)[0]
    expected_b = b.generate(prompt, max_new_tokens=6, do_sample=False)
    batch = torch.cat([prompt, prompt])
    ref_batch = a.generate(batch, max_new_tokens=6, do_sample=False)
    original = type(a).generate
    with hfpatch.patch(a, "dyspec", draft_model=draft) as handle:
        assert "generate" not in b.__dict__
        assert torch.equal(b.generate(prompt, max_new_tokens=6, do_sample=False), expected_b)
        assert "fallback" not in _stats(handle)  # b's call never reached a's engine
        assert torch.equal(a.generate(batch, max_new_tokens=6, do_sample=False), ref_batch)
        assert "batch size 2" in _stats(handle)["fallback"]
    assert "generate" not in a.__dict__ and a.generate.__func__ is original


def test_to_recipe_exports_a_hub_reference_never_the_model():
    target = tiny_model("llama")
    draft = _draft_for(target, "llama")
    with hfpatch.patch(target, "dyspec", draft_model=draft) as handle:
        entry = handle.to_recipe().techniques[0]
    assert entry["draft_model"] is None and entry["target_tokenizer"] is None
    draft.config._name_or_path = "someone/tiny-draft"
    draft.config._commit_hash = "a" * 40
    with hfpatch.patch(target, "dyspec", draft_model=draft) as handle:
        recipe = handle.to_recipe()
    entry = recipe.techniques[0]
    assert (entry["draft_model"], entry["draft_revision"]) == ("someone/tiny-draft", "a" * 40)
    assert recipe.to_dict()["techniques"][0]["tree"] == "dynamic"


def test_draft_named_by_hub_id_and_revision(hub_server, tmp_path):
    target = tiny_model("llama")
    draft = _draft_for(target, "llama")
    repo = hub_server.new_repo_id("tiny-draft")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    draft.save_pretrained(tmp_path / "draft")
    commit = api.upload_folder(repo_id=repo, folder_path=str(tmp_path / "draft")).oid
    prompt = _prompts(1, seed=2)[0]
    ref = target.generate(prompt, max_new_tokens=10, do_sample=False)
    with hfpatch.patch(target, "dyspec", draft_model=repo, draft_revision=commit) as handle:
        assert torch.equal(target.generate(prompt, max_new_tokens=10, do_sample=False), ref)
        entry = handle.to_recipe().techniques[0]
    assert (entry["draft_model"], entry["draft_revision"]) == (repo, commit)


def builtin_recipe_overrides(recipe: str, model) -> dict:
    """Patch-time arguments a built-in recipe needs on a tiny model of tests/tiny_models.py: recipes with a
    draft_model technique need a draft (a shallower model of the same vocabulary)."""
    types = {t["type"] for t in hfpatch.recipe.resolve_recipe(recipe).techniques}
    if "draft_model" not in types:
        return {}
    kind = model.config.model_type
    return {"draft_model": _draft_for(model, kind)}


def test_copies_draft_with_the_loaded_draft():
    """A loaded draft cannot be written into a recipe; a deep copy of the patched model is patched again with
    the same draft object, a pickled one with its own copy of it."""
    import pickle

    model = tiny_model("llama")
    draft = _draft_for(model, "llama")
    prompt = _prompts(1)[0]
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    hfpatch.patch(model, "draft-model", draft_model=draft)
    clone = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    for other in (clone, loaded):
        (handle,) = hfpatch.active_patches(other)
        assert torch.equal(other.generate(prompt, max_new_tokens=12, do_sample=False), expected)
        assert _stats(handle)["fallback"] is None and _stats(handle)["forwards"] < 12
        assert handle.to_recipe().techniques[0]["draft_model"] is None  # never written into the recipe
    assert hfpatch.active_patches(clone)[0].technique("draft_model").draft is draft
    assert hfpatch.active_patches(loaded)[0].technique("draft_model").draft is not draft
    hfpatch.unpatch(model)


def test_rasd_merges_draft_tree_and_retrieval_branches_losslessly():
    """RASD: the draft model's tree and the n-gram branches share one trie (a common prefix is one node) and
    are verified in one forward; output is plain greedy's."""
    target = tiny_model("qwen2")
    draft = _draft_for(target, "qwen2")
    prompt = _prompts(1, seed=12)[0]
    ref = target.generate(prompt, max_new_tokens=30, do_sample=False)
    with hfpatch.patch(target, "rasd", draft_model=draft, node_cost=0.03) as handle:
        target.generate(prompt, max_new_tokens=30, do_sample=False)  # the retrieval memory learns this text
        out = target.generate(prompt, max_new_tokens=30, do_sample=False)
        stats = _stats(handle)
    assert torch.equal(out, ref)
    assert stats["fallback"] is None and stats["forwards"] < 30
    assert stats["drafters"]["draft_model"]["drafted_tokens"] > 0
    assert stats["drafters"]["ngram_lookup"]["lookup_hit_rate"] > 0


# ----- a draft named in a recipe (Hub id + revision): from_pretrained, never the repository's code ----------

def _upload(api, repo: str, model, folder) -> str:
    model.save_pretrained(folder)
    return api.upload_folder(repo_id=repo, folder_path=str(folder)).oid


def test_recipe_file_names_the_draft_by_id_and_revision(hub_server, tmp_path, monkeypatch):
    """A local recipe file naming the draft by repo id and commit loads that commit (not the branch head) with
    from_pretrained and trust_remote_code=False; a Hub-published recipe naming a draft needs the caller's trust."""
    import json

    import transformers
    from huggingface_hub import HfApi

    from hfpatch.recipe import RECIPE_FILE

    target = tiny_model("llama")
    pinned = _draft_for(target, "llama")
    newer = copy.deepcopy(pinned)
    with torch.no_grad():
        newer.lm_head.weight.mul_(-1.0)  # a later commit with other weights on the same branch
    api = HfApi()
    repo = hub_server.new_repo_id("recipe-draft")
    api.create_repo(repo)
    commit = _upload(api, repo, pinned, tmp_path / "v1")
    assert _upload(api, repo, newer, tmp_path / "v2") != commit
    doc = _recipe(tree="dynamic", max_nodes=8, width=4, min_probability=0.0, draft_model=repo, draft_revision=commit)
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / RECIPE_FILE).write_text(json.dumps(doc))

    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def record(cls, *args, **kwargs):
        loads.append((args, kwargs))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(record))
    prompt = _prompts(1, seed=5)[0]
    ref = target.generate(prompt, max_new_tokens=12, do_sample=False)
    with hfpatch.patch(target, str(tmp_path / "recipe")) as handle:
        assert torch.equal(target.generate(prompt, max_new_tokens=12, do_sample=False), ref)
        assert _stats(handle)["forwards"] < 12  # the pinned draft agrees with the target: drafts were accepted
        loaded = handle.technique("draft_model").draft
    assert [(a, k["revision"], k["trust_remote_code"]) for a, k in loads] == [((repo,), commit, False)]
    torch.testing.assert_close(loaded.lm_head.weight, pinned.lm_head.weight)  # the pinned commit's weights

    published = hub_server.new_repo_id("recipe-naming-a-draft")
    api.create_repo(published)
    api.upload_file(path_or_fileobj=json.dumps(doc).encode(), path_in_repo=RECIPE_FILE, repo_id=published)
    with pytest.raises(RecipeError, match=r"draft_model\.draft_model"):
        hfpatch.patch(target, published)
    assert len(loads) == 1 and "generate" not in target.__dict__  # refused before anything was loaded
    with hfpatch.patch(target, published, trust_resources=["draft_model.draft_model"]):
        assert torch.equal(target.generate(prompt, max_new_tokens=12, do_sample=False), ref)
    assert len(loads) == 2


def test_a_draft_needing_its_repositorys_code_is_refused_without_running_it(hub_server, tmp_path):
    import json

    from huggingface_hub import HfApi

    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "hfpatch_test_custom_draft", "vocab_size": 128,
        "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    api = HfApi()
    repo = hub_server.new_repo_id("custom-code-draft")
    api.create_repo(repo)
    commit = api.upload_folder(repo_id=repo, folder_path=str(folder)).oid
    target = tiny_model("llama")
    for source, revision in ((repo, commit), (str(folder), None)):
        with pytest.raises(PatchError, match="never runs a repository's code") as err:
            hfpatch.patch(target, "draft-model", draft_model=source, draft_revision=revision)
        assert "pass it at patch time" in str(err.value) and source in str(err.value)
    assert not marker.exists() and "generate" not in target.__dict__
    # and no recipe can ask for the repository's code to be run
    with pytest.raises(RecipeError, match="trust_remote_code"):
        hfpatch.patch(target, _recipe(draft_model=repo, draft_revision=commit, trust_remote_code=True))


def test_drafted_and_accepted_count_only_this_drafters_nodes():
    """In a tree shared with another drafter (RASD), the draft model's statistics count its own nodes only, so its
    acceptance rate is a rate (before, the other drafter's accepted nodes were counted too)."""
    target = tiny_model("llama")
    drafter = DraftModelDrafter(_draft_for(target, "llama"), "chain", draft_length=3, branching=1, width=1,
                                min_probability=0.0, siblings="top")
    call = drafter.start([], CallInfo(target.generation_config, None))
    context = _prompts(1, seed=4)[0][0].tolist()
    tree = DraftTree(context[-1], max_nodes=4)
    other = tree.add_child(0, 126, 0.9, "ngram_lookup")  # a retrieval branch drafted first
    drafter.draft(tree, context, call)
    assert "draft_model" not in tree.estimates[other] and tree.num_drafted == 4
    drafter.update(tree, None, [other], context + [126, 5], call)
    first = tree.children[0][next(t for t in tree.children[0] if t != 126)]
    drafter.update(tree, None, [first], context + [tree.tokens[first], 5], call)
    stats = drafter.stats()
    assert (stats["drafted_tokens"], stats["accepted_tokens"]) == (3, 1)
