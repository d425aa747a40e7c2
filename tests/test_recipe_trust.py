"""Recipes from the Hub are untrusted data (issue 17): resource parameters need the caller's word, every size is
bounded before anything is allocated, tensor payloads are checked from their header, duplicate JSON keys and
tensors for absent techniques are refused, and a warm table's tokenizer fingerprint is checked.

Hostile recipes are uploaded raw to the local test Hub (tests/hub_server.py) with the real huggingface_hub
client, the way an attacker would publish them.
"""
from __future__ import annotations

import hashlib
import json
import struct

import probe_techniques  # noqa: F401  (registers probe_hook, a technique that declares no tensor specs)
import pytest
import safetensors
import torch
from huggingface_hub import HfApi
from safetensors.torch import save
from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hfpatch
from hfpatch.apps import cli
from hfpatch.errors import PatchError, RecipeError
from hfpatch.recipe import MAX_RECIPE_JSON_BYTES, RECIPE_FILE, TENSOR_FILE, Recipe
from hfpatch.techniques.generation import token_recycling
from hfpatch.techniques.generation.tree import DraftTree
from hfpatch.techniques.tokenizer import transplant

HOSTILE = {"hfpatch_version": "1.0", "name": "hostile", "description": "reads what it should not",
           "techniques": [{"type": "tokenizer_transplant", "tokenizer": "../../etc", "method": "mean",
                           "progress": False}]}


@pytest.fixture(autouse=True)
def _no_server_bugs(hub_server):
    before = len(hub_server.errors)
    yield
    assert hub_server.errors[before:] == [], "the test hub hit an internal error"


def _publish(hub_server, files: dict[str, bytes], prefix: str = "hostile") -> str:
    """Upload raw files as a new Hub repo (no validation on the way, as an attacker would)."""
    repo_id = hub_server.new_repo_id(prefix)
    api = HfApi()
    api.create_repo(repo_id)
    for path, data in files.items():
        api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo_id)
    return repo_id


def _with_payload(doc: dict, payload: bytes, keys: list[str]) -> dict[str, bytes]:
    doc = dict(doc, tensors={"file": TENSOR_FILE, "sha256": hashlib.sha256(payload).hexdigest(), "keys": keys})
    return {RECIPE_FILE: json.dumps(doc).encode(), TENSOR_FILE: payload}


def _write(folder, files: dict[str, bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _word_tokenizer(prefix: str, size: int = 128) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer of `size` tokens (the tiny models' vocabulary is 128)."""
    vocab = {"<unk>": 0, **{f"{prefix}{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _untouched(model) -> bool:
    return "generate" not in model.__dict__ and not hfpatch.active_patches(model)


def _record_tokenizer_loads(monkeypatch, base: str) -> list[str]:
    """Record the tokenizers tokenizer_transplant loads: `base` gives a 128-token tokenizer (the model's),
    anything else raises once recorded (the test only needs to see which value reached the technique)."""
    seen = []

    def record(source, what):
        seen.append(source)
        if source == base:
            return _word_tokenizer("w")
        raise ValueError(f"cannot load the {what} from {source!r}: recorded by the test")

    monkeypatch.setattr(transplant, "_load_tokenizer", record)
    return seen


@pytest.fixture
def no_tokenizer_loads(monkeypatch):
    """Fail the test if tokenizer_transplant reads any tokenizer (a path or repo) at all."""
    calls = []

    def refuse(source, what):
        calls.append(source)
        raise AssertionError(f"tokenizer_transplant read {source!r}")

    monkeypatch.setattr(transplant, "_load_tokenizer", refuse)
    return calls


# ----- resource parameters --------------------------------------------------------------------------------


def test_hostile_hub_recipe_is_refused_naming_the_parameter(hub_server, no_tokenizer_loads):
    repo_id = _publish(hub_server, {RECIPE_FILE: json.dumps(HOSTILE).encode()})
    model = tiny_model("llama")
    with pytest.raises(RecipeError) as err:
        hfpatch.patch(model, repo_id)
    message = str(err.value)
    assert "tokenizer_transplant" in message and ".tokenizer = '../../etc'" in message and repo_id in message
    assert "trust_resources" in message and "tokenizer_transplant.tokenizer" in message  # how to allow it
    assert no_tokenizer_loads == [] and _untouched(model)
    # Loading it is harmless (data only) and says what it would read.
    recipe = Recipe.from_pretrained(repo_id)
    assert recipe.is_remote
    assert [(r["parameter"], r["value"], r["trusted"]) for r in recipe.resources()] == [("tokenizer", "../../etc", False)]
    with pytest.raises(RecipeError, match="tokenizer_transplant"):
        recipe.build_techniques()


@pytest.mark.parametrize("trust", [True, ["tokenizer_transplant.tokenizer"], "tokenizer_transplant.tokenizer"])
def test_trust_resources_lets_the_recipe_value_through(hub_server, trust, monkeypatch):
    repo_id = _publish(hub_server, {RECIPE_FILE: json.dumps(HOSTILE).encode()})
    model = tiny_model("llama")
    model.name_or_path = "base-tok"
    seen = _record_tokenizer_loads(monkeypatch, base="base-tok")
    # Past the trust check, the technique itself runs with the recipe's value (and fails to load it).
    with pytest.raises(PatchError, match="recorded by the test"):
        hfpatch.patch(model, repo_id, trust_resources=trust)
    assert "../../etc" in seen and _untouched(model)
    # The same opt-in on the Recipe object.
    allowed = Recipe.from_pretrained(repo_id).allow_resources(trust)
    assert all(r["trusted"] for r in allowed.resources())


def test_trust_resources_names_must_be_resource_parameters(hub_server):
    repo_id = _publish(hub_server, {RECIPE_FILE: json.dumps(HOSTILE).encode()})
    with pytest.raises(RecipeError, match=r"\['tokenizer_transplant.method'\] are not resource parameters"):
        hfpatch.patch(tiny_model("llama"), repo_id, trust_resources=["tokenizer_transplant.method"])


def test_only_the_parameters_allowed_are_trusted(hub_server, no_tokenizer_loads):
    doc = json.loads(json.dumps(HOSTILE))
    doc["techniques"][0]["donor"] = "someone/else"
    doc["techniques"][0]["method"] = "omp"
    repo_id = _publish(hub_server, {RECIPE_FILE: json.dumps(doc).encode()})
    with pytest.raises(RecipeError) as err:
        hfpatch.patch(tiny_model("llama"), repo_id, trust_resources=["tokenizer_transplant.tokenizer"])
    assert ".donor = 'someone/else'" in str(err.value) and "../../etc" not in str(err.value)


def test_caller_override_replaces_the_hub_value_and_the_transplant_runs(hub_server, tmp_path):
    repo_id = _publish(hub_server, {RECIPE_FILE: json.dumps(HOSTILE).encode()})
    old, new = _word_tokenizer("w"), _word_tokenizer("w", 140)
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    model = tiny_model("llama")
    overrides = {"tokenizer_transplant.tokenizer": str(tmp_path / "new"), "base_tokenizer": str(tmp_path / "old")}
    with hfpatch.patch(model, repo_id, **overrides) as handle:
        assert handle.technique("tokenizer_transplant").params.tokenizer == str(tmp_path / "new")
        assert model.get_input_embeddings().weight.shape[0] == 140
    assert model.get_input_embeddings().weight.shape[0] == 128


def test_local_and_builtin_recipes_are_the_users_own(tmp_path, monkeypatch):
    folder = _write(tmp_path / "mine", {RECIPE_FILE: json.dumps(HOSTILE).encode()})
    recipe = Recipe.from_pretrained(folder)
    assert not recipe.is_remote and all(r["trusted"] for r in recipe.resources())
    seen = _record_tokenizer_loads(monkeypatch, base="base")
    model = tiny_model("llama")
    model.name_or_path = "base"
    with pytest.raises(PatchError, match="recorded by the test"):
        hfpatch.patch(model, folder)
    assert seen == ["base", "../../etc"]  # no trust check stopped it: the technique ran with the recipe's value
    assert Recipe.from_pretrained("token-recycling").resources() == []


# ----- size limits, checked before anything is allocated ---------------------------------------------------


@pytest.fixture
def no_tree_allocation(monkeypatch):
    """Fail the test if an oversized template is compiled, or a drafter or draft tree is built at all."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an oversized template reached allocation")

    compile_template = token_recycling._compile_template

    def compile_small(template):
        if len(template) > token_recycling.MAX_TEMPLATE_NODES:
            forbidden()
        return compile_template(template)  # a built-in recipe's own template is compiled while it is validated

    monkeypatch.setattr(token_recycling, "_compile_template", compile_small)
    monkeypatch.setattr(token_recycling.RecyclingDrafter, "__init__", forbidden)
    monkeypatch.setattr(DraftTree, "__init__", forbidden)


def _big_template(nodes: int) -> list[list[int]]:
    return [[i // 512, (i // 64) % 8, (i // 8) % 8, i % 8] for i in range(nodes)]  # ~15 bytes a node


def test_oversized_template_from_the_hub_is_refused_by_validation(hub_server, no_tree_allocation):
    doc = {"hfpatch_version": "1.0", "techniques": [{"type": "token_recycling", "template": _big_template(5000)}]}
    repo_id = _publish(hub_server, {RECIPE_FILE: json.dumps(doc).encode()})
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match=r"token_recycling\)\.template: at most 1024 items, got 5000") as err:
        hfpatch.patch(model, repo_id)
    assert repo_id in str(err.value) and _untouched(model)
    # In code and as an override, the same limit.
    with pytest.raises(RecipeError, match="at most 1024 items, got 5000"):
        hfpatch.patch(model, "token-recycling", template=_big_template(5000))
    with pytest.raises(RecipeError, match="at most 1024 items"):
        token_recycling.TokenRecycling(template=_big_template(1025))


def test_oversized_recipe_file_is_refused_before_reading(tmp_path, monkeypatch):
    folder = tmp_path / "big"
    folder.mkdir()
    path = folder / RECIPE_FILE
    with open(path, "wb") as f:
        f.truncate(MAX_RECIPE_JSON_BYTES + 1)  # sparse: no memory or disk spent

    def forbidden(self):
        raise AssertionError("the oversized file was read")

    monkeypatch.setattr(type(path), "read_bytes", forbidden)
    monkeypatch.setattr(type(path), "read_text", forbidden)
    with pytest.raises(RecipeError, match=f"{MAX_RECIPE_JSON_BYTES + 1} bytes; a recipe may be at most"):
        Recipe.from_pretrained(folder)


@pytest.mark.parametrize("entry, words", [
    ({"type": "probe_hook", "budget": 2**63}, "must fit in 64 bits"),
    ({"type": "tokenizer_transplant", "tokenizer": "x" * 5000}, "at most 4096 characters, got 5000"),
    ({"type": "tidal_decode", "selection_layers": list(range(2000))}, "at most 1024 items, got 2000"),
])
def test_every_parameter_is_bounded(entry, words):
    with pytest.raises(RecipeError, match=words):
        Recipe([entry])


def test_too_many_techniques():
    with pytest.raises(RecipeError, match="at most 64 techniques"):
        Recipe([{"type": "probe_hook"}] * 65)


# ----- tensor payloads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.float16, torch.uint8])
def test_non_integer_tables_are_refused_not_truncated(dtype):
    table = (torch.rand(128, 8) * 100).to(dtype)
    with pytest.raises(RecipeError, match=r"'token_recycling/table' has dtype .*must be one of \['int32', 'int64'\]"):
        Recipe([{"type": "token_recycling"}], tensors={"token_recycling/table": table})


@pytest.fixture
def no_tensor_loads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor was loaded before the payload header was checked")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_table_in_a_hub_payload_is_refused_from_the_header(hub_server, dtype, no_tensor_loads):
    payload = save({"token_recycling/table": torch.ones(128, 8, dtype=dtype)})
    doc = {"hfpatch_version": "1.0", "techniques": [{"type": "token_recycling"}]}
    repo_id = _publish(hub_server, _with_payload(doc, payload, ["token_recycling/table"]))
    with pytest.raises(RecipeError, match=f"has dtype {str(dtype).removeprefix('torch.')}") as err:
        hfpatch.patch(tiny_model("llama"), repo_id)
    assert repo_id in str(err.value)


def _fake_safetensors(header: dict, data: bytes = b"") -> bytes:
    """A payload whose header claims any shape: nothing of that size exists anywhere."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("header, words", [
    ({"token_recycling/table": {"dtype": "I64", "shape": [1 << 21, 8], "data_offsets": [0, (1 << 21) * 64]}},
     "dimension 0 may be at most 1048576"),
    ({"token_recycling/table": {"dtype": "I32", "shape": [128, 8, 2], "data_offsets": [0, 8192]}},
     "must have 2 dimensions"),
    ({"token_recycling/table": {"dtype": "I32", "shape": [128, 100], "data_offsets": [0, 51200]}},
     "dimension 1 may be at most 64"),
    ({"probe_hook/big": {"dtype": "F32", "shape": [1 << 31], "data_offsets": [0, 1 << 33]}},
     "bytes; a recipe may carry at most"),
    ({"probe_hook/odd": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, "has dtype 'C64'"),
])
def test_tensor_shapes_and_sizes_are_checked_in_the_header(tmp_path, header, words, no_tensor_loads):
    doc = {"hfpatch_version": "1.0", "techniques": [{"type": "token_recycling"}, {"type": "probe_hook"}]}
    folder = _write(tmp_path / "r", _with_payload(doc, _fake_safetensors(header), sorted(header)))
    with pytest.raises(RecipeError, match=words):
        Recipe.from_pretrained(folder)


def test_duplicate_keys_in_the_payload_header_are_refused(tmp_path, no_tensor_loads):
    entry = '{"dtype": "I32", "shape": [128, 8], "data_offsets": [0, 4096]}'
    text = f'{{"token_recycling/table": {entry}, "token_recycling/table": {entry}}}'.encode()
    payload = struct.pack("<Q", len(text)) + text + bytes(4096)
    doc = {"hfpatch_version": "1.0", "techniques": [{"type": "token_recycling"}]}
    folder = _write(tmp_path / "r", _with_payload(doc, payload, ["token_recycling/table"]))
    with pytest.raises(RecipeError, match="'token_recycling/table' appears twice"):
        Recipe.from_pretrained(folder)


def test_tensors_for_an_absent_technique_are_refused(hub_server, tmp_path, monkeypatch):
    table = torch.full((128, 8), -1, dtype=torch.int32)
    with pytest.raises(RecipeError, match="tensor 'ngram_lookup/table' is for technique 'ngram_lookup', which this "
                                          "recipe does not have"):
        Recipe([{"type": "token_recycling"}], tensors={"token_recycling/table": table, "ngram_lookup/table": table})
    with pytest.raises(RecipeError, match="metadata 'ngram_lookup/note'"):
        Recipe([{"type": "token_recycling"}], tensors={"token_recycling/table": table},
               tensor_metadata={"ngram_lookup/note": "x"})
    with pytest.raises(RecipeError, match="'token_recycling/extra' is not one token_recycling reads"):
        Recipe([{"type": "token_recycling"}], tensors={"token_recycling/extra": table})
    # From the Hub: refused from the JSON's key list, before the tensor file is even downloaded.
    payload = save({"token_recycling/table": table, "ngram_lookup/table": table.clone()})
    doc = {"hfpatch_version": "1.0", "techniques": [{"type": "token_recycling"}]}
    repo_id = _publish(hub_server, _with_payload(doc, payload, ["ngram_lookup/table", "token_recycling/table"]))
    mark = hub_server.mark()
    with pytest.raises(RecipeError, match="'ngram_lookup/table' is for technique 'ngram_lookup'"):
        Recipe.from_pretrained(repo_id, cache_dir=tmp_path)
    assert not any(TENSOR_FILE in r.path for r in hub_server.since(mark))


# ----- duplicate JSON keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ('{"hfpatch_version": "1.0", "techniques": [{"type": "token_recycling", "k": 8, "k": 4}]}', "k"),
    ('{"hfpatch_version": "1.0", "name": "a", "name": "b", "techniques": [{"type": "token_recycling"}]}', "name"),
    ('{"hfpatch_version": "1.0", "techniques": [{"type": "token_recycling"}], '
     '"techniques": [{"type": "tokenizer_transplant", "tokenizer": "/etc"}]}', "techniques"),
])
def test_duplicate_json_keys_are_refused(tmp_path, hub_server, text, key):
    folder = _write(tmp_path / "r", {RECIPE_FILE: text.encode()})
    with pytest.raises(RecipeError, match=f"the key '{key}' appears twice"):
        Recipe.from_pretrained(folder)
    repo_id = _publish(hub_server, {RECIPE_FILE: text.encode()})
    with pytest.raises(RecipeError, match=f"the key '{key}' appears twice") as err:
        Recipe.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert repo_id in str(err.value)


# ----- the warm table's tokenizer fingerprint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_recipe():
    """A Token Recycling recipe whose table was warmed with tokenizer 'w' (fingerprint recorded)."""
    tok = _word_tokenizer("w")
    model = tiny_model("llama")
    with hfpatch.patch(model, "token-recycling") as handle:
        model.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=8, do_sample=False)
        recipe = handle.to_recipe(tok, name="warm")
    assert "token_recycling/tokenizer_fingerprint" in recipe.tensor_metadata
    return recipe, tok


def test_fingerprint_mismatch_is_refused(warm_recipe):
    recipe, _ = warm_recipe
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="warmed with another tokenizer"):
        hfpatch.patch(model, recipe, model_tokenizer=_word_tokenizer("other"))
    assert _untouched(model)


def test_fingerprint_match_and_unchecked_are_reported(warm_recipe, tmp_path):
    recipe, tok = warm_recipe
    recipe.save_pretrained(tmp_path / "warm")
    model = tiny_model("llama")
    with hfpatch.patch(model, tmp_path / "warm", model_tokenizer=tok) as handle:
        assert handle.stats["token_recycling"]["table_tokenizer"].startswith("matched")
    with hfpatch.patch(model, tmp_path / "warm") as handle:
        assert "not checked" in handle.stats["token_recycling"]["table_tokenizer"]
        assert "model_tokenizer=" in handle.stats["token_recycling"]["table_tokenizer"]


def test_table_metadata_must_agree_with_the_table(warm_recipe):
    recipe, _ = warm_recipe
    bad = Recipe(recipe.techniques, tensors=dict(recipe.tensors),
                 tensor_metadata={**recipe.tensor_metadata, "token_recycling/vocab_size": "50000"})
    with pytest.raises(RecipeError, match="metadata says vocab_size='50000'"):
        hfpatch.patch(tiny_model("llama"), bad)
    out_of_range = torch.full((128, 8), 500, dtype=torch.int64)
    with pytest.raises(RecipeError, match="token ids outside"):
        hfpatch.patch(tiny_model("llama"), Recipe([{"type": "token_recycling"}],
                                                  tensors={"token_recycling/table": out_of_range}))


# ----- recipe show says what a recipe would read -------------------------------------------------------------


def test_recipe_show_lists_resources_and_tensor_sizes(hub_server, capsys):
    payload = save({"token_recycling/table": torch.full((128, 8), -1, dtype=torch.int32)})
    doc = {**HOSTILE, "techniques": HOSTILE["techniques"] + [{"type": "token_recycling"}]}
    repo_id = _publish(hub_server, _with_payload(doc, payload, ["token_recycling/table"]))
    assert cli.main(["recipe", "show", repo_id]) == 0
    out = capsys.readouterr().out
    assert "# resources (1)" in out
    line = next(line for line in out.splitlines() if "tokenizer_transplant.tokenizer" in line)
    assert "../../etc" in line and "no: give it yourself or pass trust_resources" in line
    assert "token_recycling/table" in out and "128x8" in out and "4.0 KiB" in out

    assert cli.main(["recipe", "show", repo_id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["remote"] is True and shown["tensor_bytes"] == {"token_recycling/table": 4096}
    assert [(r["technique"], r["parameter"], r["value"], r["trusted"]) for r in shown["resources"]] == [
        ("tokenizer_transplant", "tokenizer", "../../etc", False)]


def test_recipe_show_of_a_recipe_without_resources(capsys):
    assert cli.main(["recipe", "show", "token-recycling"]) == 0
    assert "# resources: none" in capsys.readouterr().out


def test_recipe_pull_names_the_resources_of_what_it_pulled(hub_server, tmp_path, capsys):
    # The pulled folder is local (trusted from then on), so pull says what it will read.
    repo_id = _publish(hub_server, {RECIPE_FILE: json.dumps(HOSTILE).encode()})
    assert cli.main(["recipe", "pull", repo_id, "--out", str(tmp_path / "pulled")]) == 0
    out = capsys.readouterr().out
    assert "note: it names a file or repo to read, tokenizer_transplant.tokenizer = '../../etc'" in out
    assert Recipe.from_pretrained(tmp_path / "pulled").resources()[0]["trusted"] is True
