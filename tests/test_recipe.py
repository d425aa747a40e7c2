"""The recipe format: round trips, versioning, every validation error, tensor payloads, built-in recipes."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import warnings

import probe_techniques  # noqa: F401  (registers the probe techniques)
import pytest
import torch
from safetensors.torch import save_file

import hfpatch
from hfpatch import recipe as recipe_module
from hfpatch.errors import RecipeError, RecipeNotFoundError
from hfpatch.recipe import FORMAT_VERSION, RECIPE_FILE, TENSOR_FILE, Recipe, resolve_recipe
from hfpatch.catalogue import register, unregister
from hfpatch.technique import Technique, param


@dataclasses.dataclass
class _ChoiceParams:
    mode: str = param("fast", help="a choice", choices=("fast", "exact"))
    ratio: float = param(0.5, help="a closed range", ge=0.0, le=1.0)
    sizes: list[int] = param(help="a list of ints", default_factory=lambda: [1, 2])
    limit: int | None = param(None, help="optional int", ge=1)


class _ChoiceProbe(Technique):
    """Parameters of every kind the validator knows; never applied."""

    name = "probe_choices"
    family = "test"
    summary = "test-only: parameters with choices, ranges, lists and optionals"
    Params = _ChoiceParams

    def apply(self, model, ctx):  # pragma: no cover - only validated, never applied
        raise AssertionError("not applied in these tests")


@pytest.fixture(autouse=True, scope="module")
def _choice_probe():
    register(_ChoiceProbe)
    yield
    unregister(_ChoiceProbe.name)


def _doc(**changes):
    """A valid recipe document, with top-level keys replaced (value None deletes the key)."""
    doc = {
        "hfpatch_version": FORMAT_VERSION,
        "name": "probe",
        "description": "a test recipe",
        "techniques": [{"type": "probe_all_primitives", "scale": 0.25}, {"type": "probe_hook"}],
        "requirements": {"transformers": ">=5", "model_types": ["llama"]},
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def _write(tmp_path, doc, name=RECIPE_FILE):
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _with_tensors():
    torch.manual_seed(0)
    return Recipe(
        [{"type": "probe_all_primitives", "budget": 4}, {"type": "probe_hook", "budget": 2}],
        name="with-tensors",
        tensors={
            "probe_all_primitives/table": torch.randint(0, 100, (7, 3)),
            "probe_all_primitives/weights": torch.randn(5, dtype=torch.float16),
            "probe_hook/bias": torch.zeros(()),
        },
        tensor_metadata={"probe_all_primitives/tokenizer": "sha256:abc", "probe_hook/note": "x"},
    )


def _assert_same_recipe(a: Recipe, b: Recipe) -> None:
    assert a.to_dict() == b.to_dict()
    assert a.tensor_metadata == b.tensor_metadata
    assert sorted(a.tensors) == sorted(b.tensors)
    for key, tensor in a.tensors.items():
        assert b.tensors[key].dtype == tensor.dtype, key
        assert torch.equal(b.tensors[key], tensor), key


# ----- round trips ------------------------------------------------------------------------------------


def test_round_trip_without_tensors(tmp_path):
    recipe = Recipe.from_dict(_doc())
    path = recipe.save_pretrained(tmp_path / "r")
    assert path == tmp_path / "r" / RECIPE_FILE
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [RECIPE_FILE]
    saved = json.loads(path.read_text())
    assert saved == _doc()  # no tensor bookkeeping, no source
    for where in (tmp_path / "r", path, str(path)):
        loaded = Recipe.from_pretrained(where)
        assert loaded == recipe
        assert loaded.source == str(path)
    assert Recipe.from_pretrained(tmp_path / "r").save_pretrained(tmp_path / "again").read_text() == path.read_text()


def test_round_trip_with_tensors_and_metadata(tmp_path):
    recipe = _with_tensors()
    recipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / RECIPE_FILE).read_text())
    digest = hashlib.sha256((tmp_path / TENSOR_FILE).read_bytes()).hexdigest()
    assert saved["tensors"] == {"file": TENSOR_FILE, "sha256": digest, "keys": sorted(recipe.tensors)}
    loaded = Recipe.from_pretrained(tmp_path)
    _assert_same_recipe(recipe, loaded)
    assert "tensors" not in loaded.to_dict()

    first, second = loaded.build_techniques()
    assert sorted(first.tensors) == ["table", "weights"]  # technique prefix stripped, only its own share
    assert first.tensor_metadata == {"tokenizer": "sha256:abc"}
    assert list(second.tensors) == ["bias"] and second.tensor_metadata == {"note": "x"}
    assert first.params.budget == 4 and second.params.budget == 2


def test_saving_replaces_files_atomically_and_leaves_no_temporaries(tmp_path):
    _with_tensors().save_pretrained(tmp_path)
    Recipe.from_dict(_doc(name="second")).save_pretrained(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # The stale tensor file is still there, but the new JSON no longer names it, so it is not loaded.
    assert Recipe.from_pretrained(tmp_path).tensors == {}


def test_to_dict_is_a_copy():
    recipe = Recipe.from_dict(_doc())
    data = recipe.to_dict()
    data["techniques"][0]["scale"] = 99
    data["requirements"]["model_types"].append("gpt2")
    assert recipe.techniques[0]["scale"] == 0.25
    assert recipe.requirements["model_types"] == ["llama"]


def test_constructor_validates():
    with pytest.raises(RecipeError, match="techniques"):
        Recipe([])
    with pytest.raises(RecipeError, match=r"techniques\[0\] \(probe_all_primitives\)\.scale"):
        Recipe([{"type": "probe_all_primitives", "scale": -1}])
    with pytest.raises(RecipeError, match="tensors"):
        Recipe([{"type": "probe_hook"}], tensors={1: torch.zeros(1)})
    with pytest.raises(RecipeError, match="tensor_metadata"):
        Recipe([{"type": "probe_hook"}], tensor_metadata={"probe_hook/a": 1})
    with pytest.raises(RecipeError, match="hfpatch_version"):
        Recipe([{"type": "probe_hook"}], hfpatch_version="one")


# ----- validation errors ---------------------------------------------------------------------------------


def _technique(**fields):
    return _doc(techniques=[fields])


INVALID = {
    "missing version": (_doc(hfpatch_version=None), ["missing 'hfpatch_version'", FORMAT_VERSION]),
    "version not a string": (_doc(hfpatch_version=1.0), ["hfpatch_version", "major.minor"]),
    "version one number": (_doc(hfpatch_version="1"), ["hfpatch_version", "major.minor"]),
    "version three numbers": (_doc(hfpatch_version="1.0.0"), ["hfpatch_version", "major.minor"]),
    "version with prefix": (_doc(hfpatch_version="v1.0"), ["hfpatch_version", "major.minor"]),
    "newer major": (_doc(hfpatch_version="2.0"), ["format version 2.0 is newer", "upgrade hfpatch"]),
    "unknown top-level key": (_doc(extra=1), ["unknown key(s) ['extra']", "allowed", "techniques"]),
    "unknown key, older minor": (_doc(hfpatch_version="1.0", colour="red"), ["unknown key(s) ['colour']"]),
    "unknown key, older major": (_doc(hfpatch_version="0.9", colour="red"), ["unknown key(s) ['colour']"]),
    "missing techniques": (_doc(techniques=None), ["missing 'techniques'"]),
    "empty techniques": (_doc(techniques=[]), [".techniques", "non-empty list"]),
    "techniques not a list": (_doc(techniques={"type": "probe_hook"}), [".techniques", "non-empty list"]),
    "technique not an object": (_doc(techniques=["probe_hook"]), ["techniques[0]", "'type'", "'probe_hook'"]),
    "technique without type": (_technique(scale=1.0), ["techniques[0]", "string 'type'"]),
    "technique type not a string": (_technique(type=3), ["techniques[0]", "string 'type'"]),
    "unknown technique": (_technique(type="no_such_technique"),
                          ["techniques[0]", "unknown technique type 'no_such_technique'", "probe_all_primitives",
                           "probe_hook"]),
    "code as a technique type": (_technique(type="os.system"), ["unknown technique type 'os.system'"]),
    "unknown parameter": (_technique(type="probe_all_primitives", colour=1),
                          ["techniques[0]", "unknown parameter(s) ['colour']", "allowed: budget, scale"]),
    "float param given a string": (_technique(type="probe_all_primitives", scale="big"),
                                   ["probe_all_primitives).scale", "expected float", "'big'"]),
    "int param given a float": (_technique(type="probe_all_primitives", budget=1.5),
                                ["probe_all_primitives).budget", "expected int", "1.5"]),
    "int param given a bool": (_technique(type="probe_all_primitives", budget=True),
                               [").budget", "expected int", "True"]),
    "float param given null": (_technique(type="probe_all_primitives", scale=None), [").scale", "expected float"]),
    "gt bound": (_technique(type="probe_all_primitives", scale=0), [").scale", "must be > 0.0", "got 0"]),
    "ge bound": (_technique(type="probe_all_primitives", budget=0), [").budget", "must be >= 1", "got 0"]),
    "le bound": (_technique(type="probe_choices", ratio=1.5), [").ratio", "must be <= 1.0", "1.5"]),
    "bad choice": (_technique(type="probe_choices", mode="slow"), [").mode", "'slow' is not one of", "'fast'", "'exact'"]),
    "choice wrong type": (_technique(type="probe_choices", mode=1), [").mode", "expected str"]),
    "list item wrong type": (_technique(type="probe_choices", sizes=[1, "x"]), [").sizes[1]", "expected int"]),
    "list given a scalar": (_technique(type="probe_choices", sizes=3), [").sizes", "expected list of int"]),
    "optional out of range": (_technique(type="probe_choices", limit=0), [").limit", "must be >= 1"]),
    "optional wrong type": (_technique(type="probe_choices", limit="x"), [").limit", "expected int or null"]),
    "second technique is named": (_doc(techniques=[{"type": "probe_hook"}, {"type": "probe_hook", "budget": -3}]),
                                  ["techniques[1] (probe_hook).budget", "must be >= 1"]),
    "name not a string": (_doc(name=5), [".name", "expected a string"]),
    "description not a string": (_doc(description=["x"]), [".description", "expected a string"]),
    "requirements not an object": (_doc(requirements=["llama"]), [".requirements", "expected an object"]),
    "unknown requirement": (_doc(requirements={"python": ">=3.10"}),
                            [".requirements", "unknown key(s) ['python']", "model_types", "transformers"]),
    "bad transformers specifier": (_doc(requirements={"transformers": "latest!"}),
                                   [".requirements.transformers", "not a version specifier", "latest!"]),
    "transformers specifier not a string": (_doc(requirements={"transformers": 5}),
                                            [".requirements.transformers", "expected a specifier string"]),
    "model_types not a list": (_doc(requirements={"model_types": "llama"}),
                               [".requirements.model_types", "list of model type strings"]),
    "model_types items not strings": (_doc(requirements={"model_types": [1]}), [".requirements.model_types"]),
}


@pytest.mark.parametrize("doc, expected", list(INVALID.values()), ids=list(INVALID))
def test_invalid_document_names_the_field(tmp_path, doc, expected):
    path = _write(tmp_path, doc)
    for load in (lambda: Recipe.from_dict(copy.deepcopy(doc)), lambda: Recipe.from_pretrained(tmp_path)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # none of these may be downgraded to a warning
            with pytest.raises(RecipeError) as info:
                load()
        message = str(info.value)
        for part in expected:
            assert part in message, (part, message)
    # The message says which file was read.
    with pytest.raises(RecipeError, match=str(path).replace("\\", "\\\\")):
        Recipe.from_pretrained(path)


def test_top_level_must_be_an_object(tmp_path):
    for doc in ([_doc()], "recipe", 3, None):
        with pytest.raises(RecipeError, match="JSON object at the top level"):
            Recipe.from_dict(doc)
        with pytest.raises(RecipeError, match="JSON object at the top level"):
            Recipe.from_file(_write(tmp_path, doc))


def test_invalid_json_and_encoding(tmp_path):
    path = tmp_path / RECIPE_FILE
    path.write_text('{"hfpatch_version": "1.0",', encoding="utf-8")
    with pytest.raises(RecipeError, match="invalid JSON"):
        Recipe.from_pretrained(tmp_path)
    path.write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(RecipeError, match="UTF-8"):
        Recipe.from_pretrained(path)


# ----- versioning --------------------------------------------------------------------------------------


def test_newer_minor_warns_and_ignores_unknown_keys(tmp_path):
    doc = _doc(hfpatch_version="1.7", colour="red")
    doc["techniques"][0]["future_knob"] = 3
    doc["requirements"]["gpu"] = "any"
    _write(tmp_path, doc)
    with pytest.warns(UserWarning) as record:
        recipe = Recipe.from_pretrained(tmp_path)
    messages = " | ".join(str(w.message) for w in record)
    assert "['colour']" in messages and "1.7" in messages
    assert "['future_knob']" in messages and "techniques[0]" in messages
    assert "['gpu']" in messages and "requirements" in messages
    assert recipe.hfpatch_version == "1.7"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building the techniques does not warn a second time
        technique = recipe.build_techniques()[0]
    assert technique.params.scale == 0.25 and not hasattr(technique.params, "future_knob")


@pytest.mark.parametrize("technique, expected", [
    ({"type": "no_such_technique"}, "unknown technique type"),
    ({"type": "probe_all_primitives", "scale": -1.0}, "must be > 0.0"),
    ({"type": "probe_all_primitives", "budget": "many"}, "expected int"),
])
def test_newer_minor_still_refuses_unknown_techniques_and_bad_values(technique, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RecipeError, match=expected):
            Recipe.from_dict(_doc(hfpatch_version="1.3", techniques=[technique]))


def test_same_version_without_extras_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Recipe.from_dict(_doc(hfpatch_version="1.0"))
        Recipe.from_dict(_doc(hfpatch_version="0.5"))


# ----- tensor payload ------------------------------------------------------------------------------------


def test_tampered_tensor_file_is_rejected(tmp_path):
    _with_tensors().save_pretrained(tmp_path)
    tensors = _with_tensors().tensors
    tensors["probe_all_primitives/table"] = tensors["probe_all_primitives/table"] + 1  # same keys, new values
    save_file(tensors, str(tmp_path / TENSOR_FILE))
    with pytest.raises(RecipeError, match=r"\.tensors: .*sha256.*modified or truncated"):
        Recipe.from_pretrained(tmp_path)


def test_truncated_tensor_file_is_rejected(tmp_path):
    _with_tensors().save_pretrained(tmp_path)
    data = (tmp_path / TENSOR_FILE).read_bytes()
    (tmp_path / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RecipeError, match="sha256"):
        Recipe.from_pretrained(tmp_path)


def _redeclare(tmp_path, **spec_changes):
    """Rewrite the JSON's tensor declaration so that its sha256 matches the file on disk again."""
    path = tmp_path / RECIPE_FILE
    doc = json.loads(path.read_text())
    doc["tensors"]["sha256"] = hashlib.sha256((tmp_path / TENSOR_FILE).read_bytes()).hexdigest()
    doc["tensors"].update(spec_changes)
    path.write_text(json.dumps(doc))


def test_tensor_keys_must_match_the_declaration(tmp_path):
    _with_tensors().save_pretrained(tmp_path)
    save_file({"probe_hook/other": torch.ones(2)}, str(tmp_path / TENSOR_FILE))
    _redeclare(tmp_path)
    with pytest.raises(RecipeError, match=r"tensor keys \['probe_hook/other'\] differ from the declared"):
        Recipe.from_pretrained(tmp_path)


def test_missing_or_unreadable_tensor_file_is_rejected(tmp_path):
    _with_tensors().save_pretrained(tmp_path)
    (tmp_path / TENSOR_FILE).write_bytes(b"not a safetensors file at all")
    _redeclare(tmp_path)
    with pytest.raises(RecipeError, match="unreadable"):
        Recipe.from_pretrained(tmp_path)
    (tmp_path / TENSOR_FILE).unlink()
    with pytest.raises(RecipeError, match="missing"):
        Recipe.from_pretrained(tmp_path)


@pytest.mark.parametrize("spec", [
    "hfpatch_recipe.safetensors",
    {"file": "../../etc/passwd", "sha256": "0" * 64, "keys": []},
    {"file": TENSOR_FILE, "sha256": 5, "keys": []},
    {"file": TENSOR_FILE, "sha256": "0" * 64, "keys": "a"},
    {"file": TENSOR_FILE, "keys": []},
])
def test_malformed_tensor_declaration_is_rejected(tmp_path, spec):
    _write(tmp_path, _doc(tensors=spec))
    with pytest.raises(RecipeError, match=r"\.tensors: expected"):
        Recipe.from_pretrained(tmp_path)


# ----- resolution: local, built-in, not found -------------------------------------------------------------


def test_unknown_name_is_not_found(tmp_path):
    with pytest.raises(RecipeNotFoundError, match="no recipe called 'no-such-recipe-anywhere'") as info:
        Recipe.from_pretrained("no-such-recipe-anywhere")
    assert isinstance(info.value, RecipeError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(RecipeNotFoundError, match=f"has no {RECIPE_FILE}"):
        Recipe.from_pretrained(tmp_path)  # a folder, but not a recipe folder
    with pytest.raises(RecipeNotFoundError):
        hfpatch.patch(torch.nn.Linear(1, 1), "no-such-recipe-anywhere")


def test_offline_cache_miss_says_so(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeNotFoundError, match="not in the local Hub cache"):
        Recipe.from_pretrained("someone/never-cached-recipe")


BUILTIN_FILES = sorted(recipe_module.builtin_recipes_dir().glob("*.json"))


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=[p.stem for p in BUILTIN_FILES])
def test_builtin_recipe_loads_by_name_and_round_trips(tmp_path, path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a built-in recipe must not need the newer-minor leniency
        recipe = Recipe.from_pretrained(path.stem)
    assert recipe.source == f"builtin:{path.stem}"
    assert recipe.name == path.stem  # users refer to it by the file name; the two must agree
    assert recipe.description
    assert recipe.build_techniques()
    listed = {r["name"]: r for r in hfpatch.list_recipes()}[path.stem]
    assert listed["techniques"] == [t["type"] for t in recipe.techniques]
    recipe.save_pretrained(tmp_path)
    _assert_same_recipe(recipe, Recipe.from_pretrained(tmp_path))


def test_builtin_resolution(tmp_path, monkeypatch):
    builtins = tmp_path / "builtins"
    builtins.mkdir()
    (builtins / "fast-probe.json").write_text(json.dumps(_doc(name="fast-probe", description="probe it")))
    (builtins / "hook-only.json").write_text(json.dumps(_doc(name="hook-only", techniques=[{"type": "probe_hook"}])))
    monkeypatch.setattr(recipe_module, "builtin_recipes_dir", lambda: builtins)

    assert hfpatch.list_recipes() == [
        {"name": "fast-probe", "description": "probe it", "techniques": ["probe_all_primitives", "probe_hook"]},
        {"name": "hook-only", "description": "a test recipe", "techniques": ["probe_hook"]},
    ]
    recipe = Recipe.from_pretrained("fast-probe")
    assert recipe.source == "builtin:fast-probe" and recipe.name == "fast-probe"
    assert resolve_recipe("hook-only").techniques == [{"type": "probe_hook"}]

    # A revision means a Hub recipe: a built-in name (no "org/") is then not found at all.
    with pytest.raises(RecipeNotFoundError, match="fast-probe"):
        Recipe.from_pretrained("fast-probe", revision="main")
    # Names are file stems, never paths into other folders.
    assert recipe_module.builtin_recipe_path("../builtins/fast-probe") is None
    with pytest.raises(RecipeNotFoundError, match="not a built-in recipe \\(fast-probe, hook-only\\)"):
        Recipe.from_pretrained("slow-probe")

    # An existing local path wins over a built-in of the same name.
    work = tmp_path / "work"
    Recipe.from_dict(_doc(name="local")).save_pretrained(work / "fast-probe")
    monkeypatch.chdir(work)
    assert Recipe.from_pretrained("fast-probe").name == "local"


def test_resolve_recipe_accepts_every_form(tmp_path):
    recipe = Recipe.from_dict(_doc())
    assert resolve_recipe(recipe) is recipe
    assert resolve_recipe(_doc()) == recipe and resolve_recipe(_doc()).source == "dict"
    recipe.save_pretrained(tmp_path)
    assert resolve_recipe(tmp_path) == recipe and resolve_recipe(str(tmp_path / RECIPE_FILE)) == recipe
    with pytest.raises(TypeError, match="revision"):
        resolve_recipe(recipe, revision="main")
    with pytest.raises(TypeError, match="recipe must be"):
        resolve_recipe(42)


def test_check_requirements():
    recipe = Recipe.from_dict(_doc())
    recipe.check_requirements("llama")
    with pytest.raises(RecipeError, match=r"is for model types \['llama'\], not 'gpt2'"):
        recipe.check_requirements("gpt2")
    old = Recipe.from_dict(_doc(requirements={"transformers": "<4"}))
    with pytest.raises(RecipeError, match="needs transformers<4; installed"):
        old.check_requirements("llama")
    Recipe.from_dict(_doc(requirements=None)).check_requirements("anything")


# ----- overrides ---------------------------------------------------------------------------------------


def test_with_overrides():
    recipe = _with_tensors()
    changed = recipe.with_overrides({"scale": 2.0, "probe_hook.budget": 9})
    assert changed.techniques == [{"type": "probe_all_primitives", "budget": 4, "scale": 2.0},
                                  {"type": "probe_hook", "budget": 9}]
    assert recipe.techniques[0] == {"type": "probe_all_primitives", "budget": 4}  # original untouched
    assert changed.name == recipe.name and changed.tensor_metadata == recipe.tensor_metadata
    assert sorted(changed.tensors) == sorted(recipe.tensors)
    assert changed.build_techniques()[0].params.scale == 2.0

    with pytest.raises(RecipeError, match="override 'budget' is ambiguous.*probe_all_primitives.*probe_hook"):
        recipe.with_overrides({"budget": 3})
    with pytest.raises(RecipeError, match="override 'nope' matches no technique"):
        recipe.with_overrides({"nope": 3})
    with pytest.raises(RecipeError, match="override 'probe_choices.mode' matches no technique"):
        recipe.with_overrides({"probe_choices.mode": "fast"})
    with pytest.raises(RecipeError, match="budget.*must be >= 1"):
        recipe.with_overrides({"probe_hook.budget": 0})
    with pytest.raises(RecipeError, match="unknown parameter"):
        recipe.with_overrides({"probe_hook.colour": 1})
