"""hfpatch.Recipe against the local test Hub (tests/hub_server.py) with the real huggingface_hub client:
push, pull by branch / tag / commit, cache hits offline, and tampered or invalid remote recipes refused.

The technique in these recipes is a throwaway one registered by the test: recipe Hub I/O must not depend on
which built-in techniques exist.
"""
import dataclasses
import hashlib
import json
import warnings

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import save

import hfpatch
from hfpatch.recipe import RecipeError, RecipeNotFoundError
from hfpatch.catalogue import register, unregister
from hfpatch.technique import Technique, param

RECIPE_JSON = "hfpatch_recipe.json"
TENSOR_FILE = "hfpatch_recipe.safetensors"
MARKER = "hub_test_marker"


@dataclasses.dataclass
class _MarkerParams:
    level: int = param(1, help="any number", ge=0)
    label: str = param("x", help="any text")


class _MarkerTechnique(Technique):
    name = MARKER
    family = "generation"
    summary = "does nothing; exists so recipes have a valid technique"
    Params = _MarkerParams

    def apply(self, model, ctx):  # pragma: no cover - never applied here
        pass


@pytest.fixture(autouse=True)
def marker_technique():
    register(_MarkerTechnique)
    yield MARKER
    unregister(MARKER)


@pytest.fixture(autouse=True)
def _no_server_bugs(hub_server):
    before = len(hub_server.errors)
    yield
    assert hub_server.errors[before:] == [], "the test hub hit an internal error"


@pytest.fixture
def api(hub_server):
    return HfApi()


def make_recipe(level=1, *, tensors=True, name="hub-test"):
    return hfpatch.Recipe(
        techniques=[{"type": MARKER, "level": level, "label": f"v{level}"}],
        name=name,
        description=f"level {level}",
        tensors={f"{MARKER}/table": torch.arange(64, dtype=torch.int64).reshape(8, 8) * level} if tensors else {},
        tensor_metadata={f"{MARKER}/tokenizer": f"fingerprint-{level}"} if tensors else {},
    )


def assert_same_recipe(loaded, expected):
    assert loaded.techniques == expected.techniques
    assert (loaded.name, loaded.description) == (expected.name, expected.description)
    assert loaded.tensors.keys() == expected.tensors.keys()
    for key, value in expected.tensors.items():
        assert torch.equal(loaded.tensors[key], value), key
    assert loaded.tensor_metadata == expected.tensor_metadata


def test_push_commits_the_recipe_files(hub_server):
    repo_id = hub_server.new_repo_id("recipe")
    recipe = make_recipe()
    mark = hub_server.mark()
    sha = recipe.push_to_hub(repo_id)
    assert sha == hub_server.resolve(repo_id, "main")
    # A repo made on the fly, one commit; the safetensors file went through as a regular file (no LFS calls).
    assert hub_server.routes_since(mark) == ["create_repo", "preupload", "commit"]
    files = HfApi().list_repo_files(repo_id)
    assert sorted(files) == [".gitattributes", RECIPE_JSON, TENSOR_FILE]
    document = json.loads(hub_server.read_file(repo_id, RECIPE_JSON))
    served_tensors = hub_server.read_file(repo_id, TENSOR_FILE)
    assert document["tensors"]["sha256"] == hashlib.sha256(served_tensors).hexdigest()
    assert document["techniques"] == recipe.techniques


def test_push_without_tensors_has_no_tensor_file(hub_server):
    repo_id = hub_server.new_repo_id("recipe")
    make_recipe(tensors=False).push_to_hub(repo_id)
    assert TENSOR_FILE not in HfApi().list_repo_files(repo_id)
    loaded = hfpatch.Recipe.from_pretrained(repo_id)
    assert loaded.tensors == {} and loaded.techniques == make_recipe(tensors=False).techniques


def test_pull_round_trips_and_records_the_commit(hub_server, tmp_path):
    repo_id = hub_server.new_repo_id("recipe")
    recipe = make_recipe()
    sha = recipe.push_to_hub(repo_id, commit_message="first recipe")
    loaded = hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path)
    assert_same_recipe(loaded, recipe)
    assert loaded.source == f"hub:{repo_id}@{sha}"
    assert HfApi().list_repo_commits(repo_id)[0].title == "first recipe"


def test_pushing_an_unchanged_recipe_makes_no_commit(hub_server):
    repo_id = hub_server.new_repo_id("recipe")
    sha = make_recipe().push_to_hub(repo_id)
    mark = hub_server.mark()
    assert make_recipe().push_to_hub(repo_id) == sha
    assert "commit" not in hub_server.routes_since(mark)


def test_push_to_a_new_branch_starts_it_from_main(hub_server, tmp_path):
    repo_id = hub_server.new_repo_id("recipe")
    main_sha = make_recipe(1).push_to_hub(repo_id)
    dev_sha = make_recipe(2).push_to_hub(repo_id, revision="dev")
    assert hub_server.resolve(repo_id, "main") == main_sha  # main untouched
    assert hub_server.resolve(repo_id, "dev") == dev_sha
    assert hub_server.commit_parents(repo_id, dev_sha) == [main_sha]
    # A second push to the now existing branch moves only that branch.
    dev_sha2 = make_recipe(3).push_to_hub(repo_id, revision="dev")
    assert hub_server.commit_parents(repo_id, dev_sha2) == [dev_sha]
    assert_same_recipe(hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path), make_recipe(1))
    assert_same_recipe(hfpatch.Recipe.from_pretrained(repo_id, "dev", cache_dir=tmp_path), make_recipe(3))


def test_pull_by_branch_tag_and_commit(hub_server, api, tmp_path):
    repo_id = hub_server.new_repo_id("recipe")
    sha1 = make_recipe(1).push_to_hub(repo_id)
    api.create_tag(repo_id, tag="v1")
    sha2 = make_recipe(2).push_to_hub(repo_id)
    sha3 = make_recipe(3).push_to_hub(repo_id, revision="exp")
    cases = {None: (2, sha2), "main": (2, sha2), "v1": (1, sha1), sha1: (1, sha1), "exp": (3, sha3), sha3: (3, sha3)}
    for revision, (level, sha) in cases.items():
        loaded = hfpatch.Recipe.from_pretrained(repo_id, revision, cache_dir=tmp_path)
        assert_same_recipe(loaded, make_recipe(level))
        assert loaded.source == f"hub:{repo_id}@{sha}", revision


def test_cached_recipe_loads_offline(hub_server, tmp_path, monkeypatch):
    repo_id = hub_server.new_repo_id("recipe")
    never_pulled = hub_server.new_repo_id("recipe")
    make_recipe(1).push_to_hub(repo_id)
    make_recipe(1).push_to_hub(never_pulled)
    online = hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path)

    mark = hub_server.mark()
    assert_same_recipe(hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path, local_files_only=True), online)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path)
    assert_same_recipe(offline, online)
    assert offline.source == online.source
    with pytest.raises(RecipeNotFoundError, match=never_pulled):
        hfpatch.Recipe.from_pretrained(never_pulled, cache_dir=tmp_path)
    assert hub_server.since(mark) == []  # everything above came from the cache


def test_private_recipe_needs_the_token(hub_server, tmp_path):
    repo_id = hub_server.new_repo_id("private-recipe")
    make_recipe().push_to_hub(repo_id, private=True)
    assert HfApi().model_info(repo_id).private is True
    with pytest.raises(RecipeNotFoundError, match=repo_id):
        hfpatch.Recipe.from_pretrained(repo_id, token=False, cache_dir=tmp_path / "anonymous")
    assert_same_recipe(hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path / "auth"), make_recipe())


def test_missing_repo_revision_or_recipe_file(hub_server, api, tmp_path):
    absent = hub_server.new_repo_id("absent")
    with pytest.raises(RecipeNotFoundError, match=absent):
        hfpatch.Recipe.from_pretrained(absent, cache_dir=tmp_path)
    repo_id = hub_server.new_repo_id("recipe")
    make_recipe().push_to_hub(repo_id)
    with pytest.raises(RecipeNotFoundError, match=repo_id):
        hfpatch.Recipe.from_pretrained(repo_id, "no-such-branch", cache_dir=tmp_path)
    not_a_recipe = hub_server.new_repo_id("model")
    api.create_repo(not_a_recipe)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=not_a_recipe)
    with pytest.raises(RecipeNotFoundError, match=not_a_recipe):
        hfpatch.Recipe.from_pretrained(not_a_recipe, cache_dir=tmp_path)


def test_local_folder_wins_over_a_hub_repo_of_the_same_name(hub_server, tmp_path, monkeypatch):
    repo_id = hub_server.new_repo_id("recipe")
    make_recipe(1).push_to_hub(repo_id)
    monkeypatch.chdir(tmp_path)
    make_recipe(2).save_pretrained(tmp_path / repo_id)
    mark = hub_server.mark()
    assert_same_recipe(hfpatch.Recipe.from_pretrained(repo_id), make_recipe(2))
    assert hub_server.since(mark) == []


def _tampered_json(document):
    return json.dumps(document).encode()


def _other_tensors():
    return save({f"{MARKER}/table": torch.zeros(8, 8, dtype=torch.int64)}, metadata={f"{MARKER}/tokenizer": "x"})


TAMPERING = {
    # name: (what to upload on the branch: {path: bytes or a function of the pushed JSON document}, expected words)
    "json_not_json": ({RECIPE_JSON: b'{"hfpatch_version": "1.0", "techniques": ['}, "JSON"),
    "json_not_utf8": ({RECIPE_JSON: b"\xff\xfe\x00garbage"}, "JSON"),
    "tensor_file_swapped": ({TENSOR_FILE: _other_tensors()}, "sha256"),
    "tensor_file_truncated": ({TENSOR_FILE: lambda doc, tensors: tensors[:-16]}, "sha256"),
    "recorded_sha256_wrong": ({RECIPE_JSON: lambda doc, _: _tampered_json(
        {**doc, "tensors": {**doc["tensors"], "sha256": "0" * 64}})}, "sha256"),
    "unknown_technique": ({RECIPE_JSON: lambda doc, _: _tampered_json(
        {**doc, "techniques": [{"type": "definitely_not_a_technique"}]})}, "definitely_not_a_technique"),
    "bad_parameter": ({RECIPE_JSON: lambda doc, _: _tampered_json(
        {**doc, "techniques": [{"type": MARKER, "level": -5}]})}, "level"),
    "newer_major_version": ({RECIPE_JSON: lambda doc, _: _tampered_json({**doc, "hfpatch_version": "2.0"})}, "2.0"),
    "not_an_object": ({RECIPE_JSON: b"[1, 2, 3]"}, "object"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_or_invalid_remote_recipe_is_refused(case, hub_server, api, tmp_path):
    repo_id = hub_server.new_repo_id(f"tampered-{case.replace('_', '-')}")
    recipe = make_recipe()
    recipe.push_to_hub(repo_id)
    api.create_branch(repo_id, branch="tampered")
    document = json.loads(hub_server.read_file(repo_id, RECIPE_JSON))
    tensors = hub_server.read_file(repo_id, TENSOR_FILE)
    uploads, expected_words = TAMPERING[case]
    for path, content in uploads.items():
        data = content(document, tensors) if callable(content) else content
        api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo_id, revision="tampered")

    with pytest.raises(RecipeError) as err:
        hfpatch.Recipe.from_pretrained(repo_id, "tampered", cache_dir=tmp_path)
    # Refused as invalid, not reported as missing; and the message says which repo and what is wrong.
    assert not isinstance(err.value, RecipeNotFoundError)
    message = str(err.value)
    assert repo_id in message, message
    assert expected_words in message, message
    # The untouched branch still loads.
    assert_same_recipe(hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path), recipe)


def test_declared_tensor_file_deleted_on_the_hub(hub_server, api, tmp_path):
    repo_id = hub_server.new_repo_id("recipe")
    make_recipe().push_to_hub(repo_id)
    api.delete_file(TENSOR_FILE, repo_id=repo_id)
    with pytest.raises(RecipeError, match=repo_id) as err:
        hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path)
    assert not isinstance(err.value, RecipeNotFoundError)


def test_newer_minor_version_loads_with_a_warning(hub_server, api, tmp_path):
    repo_id = hub_server.new_repo_id("recipe")
    make_recipe(tensors=False).push_to_hub(repo_id)
    document = json.loads(hub_server.read_file(repo_id, RECIPE_JSON))
    document.update({"hfpatch_version": "1.99", "future_field": {"x": 1}})
    document["techniques"][0]["future_param"] = 3
    api.upload_file(path_or_fileobj=_tampered_json(document), path_in_repo=RECIPE_JSON, repo_id=repo_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = hfpatch.Recipe.from_pretrained(repo_id, cache_dir=tmp_path)
        assert loaded.build_techniques()[0].params.level == 1
    text = " ".join(str(w.message) for w in caught)
    assert "future_field" in text and "future_param" in text and repo_id in text
