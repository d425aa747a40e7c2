"""Property tests of the recipe parser.

Whatever a recipe file holds, loading it either gives a valid, usable `Recipe` or raises `RecipeError`; no
other exception type may escape (a user must be able to catch one error type, and a Hub recipe is untrusted
input). Valid recipes round-trip through save_pretrained/from_pretrained unchanged, tensors included.

CI (CI=true) runs a fixed set of examples so a red run is reproducible; a local run explores new ones.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import probe_techniques  # noqa: F401  (registers the probe techniques)
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hfpatch
from hfpatch.errors import RecipeError
from hfpatch.recipe import RECIPE_FILE, TENSOR_FILE, Recipe, builtin_recipes_dir

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ folder left behind
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TECHNIQUES = {t["name"]: [p["name"] for p in t["params"]] for t in hfpatch.list_techniques()}
DEFAULTS = {t["name"]: {p["name"]: p["default"] for p in t["params"]} for t in hfpatch.list_techniques()}
PARAM_NAMES = sorted({p for params in TECHNIQUES.values() for p in params})

# Integers far beyond the float range: they once crashed the float coercion (see the end of the file).
INT_RANGE = dict(min_value=-(10**400), max_value=10**400)


# ----- strategies -------------------------------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers(**INT_RANGE) | st.floats() | st.text(max_size=8)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Values near the edges of the declared ranges and choices, where validators tend to slip. Copied on every
# draw: the mutations below edit documents in place and must never edit this list's items.
edge_values = st.sampled_from([0, 1, -1, 2, 8, 16, 64, 65, 512, 10**9, 0.0, -0.0, 0.5, 1.5, 1e-300, 1e300,
                               math.inf, -math.inf, math.nan, "", "cpu-14", "paper-80", "fast", True, False,
                               None, [], [[0]], [[0, 0], [1]], [[-1]], {}]).map(copy.deepcopy)
param_values = edge_values | json_values
versions = st.sampled_from(["1.0", "1.1", "1.99", "0.9", "0.0", "2.0", "10.0", "1", "1.0.0", "v1.0", "", " 1.0",
                            "1.0\n", "01.00"]) | json_values
type_names = st.sampled_from(sorted(TECHNIQUES) + ["no_such_technique", "", "os.system", "Token_Recycling"]) \
    | st.text(max_size=10)
spec_values = st.sampled_from([">=5", "<4", ">=5.23,<6", "", "garbage", "==5.*", "~=5.0"]) | st.text(max_size=6) \
    | json_values


@st.composite
def technique_entries(draw):
    shape = draw(st.sampled_from(["known", "known", "known", "odd type", "not an object"]))
    if shape == "not an object":
        return draw(json_values)
    if shape == "odd type":
        entry = {} if draw(st.booleans()) else {"type": draw(type_names | st.integers(**INT_RANGE) | st.none())}
        for name in draw(st.lists(st.sampled_from(PARAM_NAMES) | st.text(max_size=6), max_size=3, unique=True)):
            if name != "type":
                entry[name] = draw(param_values)
        return entry
    kind = draw(st.sampled_from(sorted(TECHNIQUES)))
    entry = {"type": kind}
    names = draw(st.lists(st.sampled_from(TECHNIQUES[kind]), max_size=len(TECHNIQUES[kind]), unique=True)) \
        if TECHNIQUES[kind] else []
    if draw(st.integers(0, 4)) == 0:
        names.append(draw(st.text(max_size=6)))  # unknown parameter
    for name in names:
        if name == "type":
            continue
        how = draw(st.sampled_from(["default", "edge", "any"]))
        default = DEFAULTS[kind].get(name)
        entry[name] = copy.deepcopy(default) if how == "default" and name in DEFAULTS[kind] else \
            draw(edge_values if how != "any" else param_values)
    return entry


requirements = st.fixed_dictionaries({}, optional={
    "transformers": spec_values,
    "model_types": st.lists(st.text(max_size=6), max_size=3) | json_values,
    "python": json_values,
}) | json_values

_document_fields = {
    "hfpatch_version": versions,
    "name": st.text(max_size=10) | json_values,
    "description": st.text(max_size=10) | json_values,
    "techniques": st.lists(technique_entries(), max_size=3) | json_values,
    "requirements": requirements,
    "tensors": json_values,
    "extra": json_values,
}
_main_documents = st.fixed_dictionaries(
    {"hfpatch_version": st.sampled_from(["1.0", "1.2", "0.9"]),
     "techniques": st.lists(technique_entries(), min_size=1, max_size=3)},
    optional={k: v for k, v in _document_fields.items() if k not in ("hfpatch_version", "techniques")},
)


@st.composite
def documents(draw):
    # Mostly documents that get past the version and "missing key" checks, so that parameter validation
    # is reached too; the rest may lack anything or not be an object at all.
    kind = draw(st.sampled_from(["main", "main", "main", "loose", "any json"]))
    if kind == "main":
        return draw(_main_documents)
    if kind == "loose":
        return draw(st.fixed_dictionaries({}, optional=_document_fields))
    return draw(json_values)


def _valid_documents() -> list[dict]:
    docs = [
        {"hfpatch_version": "1.0", "name": "probe", "description": "d",
         "techniques": [{"type": "probe_all_primitives", "scale": 0.25, "budget": 4}, {"type": "probe_hook"}],
         "requirements": {"transformers": ">=5", "model_types": ["llama", "qwen2"]}},
    ]
    for path in sorted(builtin_recipes_dir().glob("*.json")):
        docs.append(json.loads(path.read_text(encoding="utf-8")))
    return docs


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON document, the root included."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _replace(doc, path, new):
    if not path:
        return new
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return doc


def _delete(doc, path):
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return doc


@st.composite
def mutated_documents(draw):
    """A valid recipe with a few random edits: a value replaced or removed, a key added."""
    doc = copy.deepcopy(draw(st.sampled_from(_valid_documents())))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path, value = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add_key", "wrap"]))
        if action == "replace":
            doc = _replace(doc, path, draw(param_values | versions | type_names))
        elif action == "delete" and path:
            doc = _delete(doc, path)
        elif action == "add_key" and isinstance(value, dict):
            value[draw(st.sampled_from(PARAM_NAMES + ["type", "extra"]) | st.text(max_size=6))] = draw(param_values)
        elif action == "wrap":
            doc = _replace(doc, path, [value])
    return doc


# ----- the property -----------------------------------------------------------------------------------


def _canonical(recipe: Recipe) -> str:
    # json text, not ==: NaN parameters are legal JSON (Python writes and reads them) but NaN != NaN.
    return json.dumps(recipe.to_dict(), sort_keys=True)


def _load_or_recipe_error(load):
    """Run a loader; return the recipe or None when it raised RecipeError. Anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer-minor recipes warn; that is tested in test_recipe.py
        try:
            return load()
        except RecipeError:
            return None


def _check_usable(recipe: Recipe, folder: Path) -> None:
    """A recipe that loaded is valid, buildable and survives a save/load round trip unchanged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe.validate()
        techniques = recipe.build_techniques()
        assert [t.name for t in techniques] == [e["type"] for e in recipe.techniques]
        for model_type in ("llama", "gpt2"):
            try:
                recipe.check_requirements(model_type)
            except RecipeError:
                pass
        recipe.save_pretrained(folder)
        again = Recipe.from_pretrained(folder)
    assert _canonical(again) == _canonical(recipe)


def _check_document(doc) -> None:
    with tempfile.TemporaryDirectory(prefix="hfpatch-fuzz-") as tmp:
        folder = Path(tmp)
        from_dict = _load_or_recipe_error(lambda: Recipe.from_dict(copy.deepcopy(doc)))
        path = folder / "in" / RECIPE_FILE
        path.parent.mkdir()
        path.write_text(json.dumps(doc), encoding="utf-8")
        from_file = _load_or_recipe_error(lambda: Recipe.from_pretrained(path.parent))
        if isinstance(doc, dict) and "tensors" in doc:
            # The file declares a tensor payload that is not there: only the dict path may accept it.
            assert from_file is None
        else:
            assert (from_dict is None) == (from_file is None)
        event("loaded" if from_dict is not None else "RecipeError")
        if from_dict is not None:
            _check_usable(from_dict, folder / "out")


@FUZZ
@given(documents())
def test_arbitrary_documents_load_or_raise_recipe_error(doc):
    _check_document(doc)


@FUZZ
@given(mutated_documents())
def test_mutated_recipes_load_or_raise_recipe_error(doc):
    _check_document(doc)


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
       | st.builds(lambda doc, cut: json.dumps(doc).encode()[:cut], documents(), st.integers(0, 200)))
def test_arbitrary_file_contents_load_or_raise_recipe_error(data):
    with tempfile.TemporaryDirectory(prefix="hfpatch-fuzz-") as tmp:
        path = Path(tmp) / RECIPE_FILE
        path.write_bytes(data)
        recipe = _load_or_recipe_error(lambda: Recipe.from_pretrained(path))
        event("loaded" if recipe is not None else "RecipeError")
        if recipe is not None:
            _check_usable(recipe, Path(tmp) / "out")


# ----- valid recipes round-trip unchanged --------------------------------------------------------------

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
_key_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)


@st.composite
def tensors_for(draw, types):
    tensors, metadata = {}, {}
    for _ in range(draw(st.integers(0, 3))):
        key = f"{draw(st.sampled_from(types))}/{draw(_key_names)}"
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(_DTYPES))
        torch.manual_seed(draw(st.integers(0, 2**16)))
        tensors[key] = (torch.randn(shape) * 100).to(dtype)
    # Metadata without tensors is a known loss, see the end of the file.
    for _ in range(draw(st.integers(0, 2)) if tensors else 0):
        metadata[f"{draw(st.sampled_from(types))}/{draw(_key_names)}"] = draw(st.text(max_size=12))
    return tensors, metadata


@st.composite
def valid_recipes(draw):
    techniques = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["probe_all_primitives", "probe_hook", "probe_failing"]))
        entry = {"type": kind}
        if draw(st.booleans()):
            entry["budget"] = draw(st.integers(1, 2**40))
        if kind != "probe_hook" and draw(st.booleans()):
            entry["scale"] = draw(st.floats(min_value=1e-6, max_value=1e6) | st.integers(1, 1000))
        techniques.append(entry)
    reqs = draw(st.fixed_dictionaries({}, optional={
        "transformers": st.sampled_from([">=5", ">=5.23,<6", "<4", "==5.*"]),
        "model_types": st.lists(st.sampled_from(["llama", "qwen2", "gpt2", "llava"]), max_size=3),
    }))
    tensors, metadata = draw(tensors_for([t["type"] for t in techniques]))
    return Recipe(techniques, name=draw(st.text(max_size=20)), description=draw(st.text(max_size=40)),
                  requirements=reqs, tensors=tensors, tensor_metadata=metadata,
                  hfpatch_version=draw(st.sampled_from(["1.0", "0.1"])))


@FUZZ
@given(valid_recipes())
def test_valid_recipes_round_trip_unchanged(recipe):
    with tempfile.TemporaryDirectory(prefix="hfpatch-fuzz-") as tmp:
        recipe.save_pretrained(tmp)
        assert (Path(tmp) / TENSOR_FILE).exists() == bool(recipe.tensors)
        loaded = Recipe.from_pretrained(tmp)
    assert loaded.to_dict() == recipe.to_dict()
    assert loaded.tensor_metadata == recipe.tensor_metadata
    assert sorted(loaded.tensors) == sorted(recipe.tensors)
    for key, tensor in recipe.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype and loaded.tensors[key].shape == tensor.shape
        assert torch.equal(loaded.tensors[key], tensor), key
    assert loaded.build_techniques()


# ----- inputs that once crashed the parser with something other than RecipeError (found by the properties above)


def test_huge_int_for_a_float_parameter_is_a_recipe_error():
    with pytest.raises(RecipeError, match="scale"):
        Recipe.from_dict({"hfpatch_version": "1.0", "techniques": [{"type": "probe_all_primitives", "scale": 10**400}]})


@pytest.mark.parametrize("text", ['{"hfpatch_version": "1.0", "name": ' + "1" * 5000 + "}", "[" * 100_000],
                         ids=["int-over-4300-digits", "deep-nesting"])
def test_json_the_decoder_refuses_is_a_recipe_error(tmp_path, text):
    (tmp_path / RECIPE_FILE).write_text(text)
    with pytest.raises(RecipeError, match="invalid JSON"):
        Recipe.from_pretrained(tmp_path)


@pytest.mark.parametrize("spec", [[">=5"], {"a": 1}])
def test_non_string_transformers_requirement_is_a_recipe_error(spec):
    doc = {"hfpatch_version": "1.0", "techniques": [{"type": "probe_hook"}], "requirements": {"transformers": spec}}
    with pytest.raises(RecipeError, match="requirements.transformers"):
        Recipe.from_dict(doc).check_requirements("llama")


def test_tensor_metadata_without_tensors_is_refused():
    # The metadata lives in the tensor file's header: without tensors it would be silently dropped on save.
    with pytest.raises(RecipeError, match="tensor_metadata.*no tensors"):
        Recipe([{"type": "probe_hook"}], tensor_metadata={"probe_hook/tokenizer": "sha256:abc"})
