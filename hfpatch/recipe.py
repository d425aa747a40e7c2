"""Recipes: which techniques, with which parameters, plus optional tensors. Plain data, never code.

On disk (a folder, locally or in a Hub repo):
    hfpatch_recipe.json         {"hfpatch_version": "1.0", "name": ..., "description": ...,
                                 "techniques": [{"type": "token_recycling", "k": 8}, ...],
                                 "requirements": {"transformers": ">=5.23", "model_types": ["llama"]},
                                 "tensors": {"file": "hfpatch_recipe.safetensors", "sha256": ..., "keys": [...]}}
    hfpatch_recipe.safetensors  optional tensor payload; keys are "<technique type>/<name>"

`hfpatch_version` is the version of this recipe format (major.minor). A newer major version is refused; a
newer minor version is read, with unknown keys warned about and ignored; in a recipe of this version or
older, an unknown key is an error.

Trust. A recipe is data, and a recipe from the Hub is untrusted data:
- Parameters that name a file, folder or repository to read (declared `param(..., resource=True)`, e.g.
  `tokenizer_transplant.tokenizer` / `donor` / `base_tokenizer`) are taken from a remote recipe (source
  "hub:...") only when the caller gives them (an override to `hfpatch.patch`) or allows them
  (`hfpatch.patch(..., trust_resources=True)` or a list of "technique.param" names, or
  `Recipe.allow_resources`); otherwise `build_techniques()` raises `RecipeError` naming each one. Recipes the
  user points at on their own machine (a local file or folder, a built-in name, a dict, a `Recipe` built in
  code) are the user's own and trusted; so is a folder written by `recipe pull` (it prints what it carries).
- Sizes are bounded before anything is allocated: the JSON file (`MAX_RECIPE_JSON_BYTES`), the number of
  techniques, every parameter (`hfpatch.technique`: list lengths, string lengths, 64-bit integers, each
  technique's own ranges), the tensor file (`MAX_PAYLOAD_BYTES`) and each tensor's dtype and shape, read from
  the safetensors header before any tensor is loaded and checked against the technique's `tensor_specs`.
- Duplicate keys in a JSON object are refused (the last one would silently win), and so are tensors or
  tensor metadata for a technique the recipe does not have.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.resources
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError, RecipeNotFoundError
from .catalogue import technique_class
from .technique import DTYPE_SIZES, build_params, parameter_fields, resource_parameters

FORMAT_VERSION = "1.0"
RECIPE_FILE = "hfpatch_recipe.json"
TENSOR_FILE = "hfpatch_recipe.safetensors"
_TOP_LEVEL_KEYS = {"hfpatch_version", "name", "description", "techniques", "requirements", "tensors"}
_REQUIREMENT_KEYS = {"transformers", "model_types"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: what a Hub repo id looks like ("org/name")
REPO_ID = _REPO_ID

# Size limits on what a recipe can carry, checked before reading or allocating (see the module docstring).
#: hfpatch_recipe.json: a recipe is a short list of parameters (the largest built-in is under 2 KB).
MAX_RECIPE_JSON_BYTES = 1 << 20
MAX_TECHNIQUES = 64
#: hfpatch_recipe.safetensors: a Token Recycling table of a 262k vocabulary at k=64 in int64 is 128 MiB.
MAX_PAYLOAD_BYTES = 1 << 30
MAX_TENSORS = 1024
MAX_HEADER_BYTES = 1 << 20
# safetensors' dtype names -> torch's.
_SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
                       "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16",
                       "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: Where a recipe is untrusted data: its source starts with one of these.
REMOTE_SOURCES = ("hub:",)


def _shown(value: Any) -> str:
    """A recipe value for an error message, cut short (a hostile value may be thousands of characters)."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:160]}... ({len(text)} characters)"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice would silently keep the last value; refuse it instead."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _parse_json(text: str | bytes, where: str, what: str = "JSON") -> Any:
    """Parse JSON, refusing duplicate keys; every failure is a `RecipeError` naming `where`."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise RecipeError(f"{where}: invalid {what}: the key {exc.key!r} appears twice in one object; "
                          "keep one") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers, nesting
        raise RecipeError(f"{where}: invalid {what} ({type(exc).__name__}: {exc})") from None


def _read_document(path: Path, source: str) -> Any:
    """Read and parse a recipe JSON file, refusing an oversized one before reading it."""
    size = path.stat().st_size
    if size > MAX_RECIPE_JSON_BYTES:
        raise RecipeError(f"recipe from {source}: {RECIPE_FILE} is {size} bytes; a recipe may be at most "
                          f"{MAX_RECIPE_JSON_BYTES} bytes (it is a list of parameters, not data)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe from {source}: not a UTF-8 text file (invalid JSON)") from None
    return _parse_json(text, f"recipe from {source}")


def _is_newer_minor(version: Any, where: str) -> bool:
    """Whether a recipe's format version is a newer minor of ours; raise on a malformed or newer major one."""
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
        raise RecipeError(f"{where}.hfpatch_version: expected a 'major.minor' string such as {FORMAT_VERSION!r}, got {version!r}")
    major, minor = (int(part) for part in version.split("."))
    our_major, our_minor = (int(part) for part in FORMAT_VERSION.split("."))
    if major > our_major:
        raise RecipeError(
            f"{where}: format version {version} is newer than this hfpatch reads ({FORMAT_VERSION}); "
            "upgrade hfpatch (pip install -U hfpatch)"
        )
    return major == our_major and minor > our_minor


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Recipe:
    """A named list of techniques with parameters, and optional tensors (e.g. a warmed draft table).

    Example:
        >>> recipe = hfpatch.Recipe([{"type": "token_recycling", "k": 8}], name="my-recipe")
        >>> recipe.save_pretrained("my_recipe/")
        >>> recipe.push_to_hub("me/my-recipe")
        >>> recipe = hfpatch.Recipe.from_pretrained("me/my-recipe", revision="v1")
        >>> handle = hfpatch.patch(model, recipe)
    """

    techniques: list[dict[str, Any]]
    name: str = "custom"
    description: str = ""
    requirements: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    tensor_metadata: dict[str, str] = field(default_factory=dict)
    hfpatch_version: str = FORMAT_VERSION
    #: where the recipe was read from (a path, "builtin:<name>" or "hub:<repo>@<commit>"); not saved.
    source: str | None = field(default=None, compare=False)
    #: resource parameters ("technique.param", or "*" for all) a remote recipe may set: given by the caller as
    #: overrides, or allowed with `allow_resources` / `trust_resources=`; not saved.
    allowed_resources: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.techniques, list):
            self.techniques = [dict(t) if isinstance(t, dict) else t for t in self.techniques]
        self.validate()

    # ----- validation -------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"recipe {self.name!r}" + (f" from {self.source}" if self.source else "")

    def validate(self) -> None:
        """Check the recipe against the format and every technique's parameters; raise `RecipeError`."""
        where = self._where()
        newer_minor = _is_newer_minor(self.hfpatch_version, where)
        for key, expected in (("name", str), ("description", str)):
            if not isinstance(getattr(self, key), expected):
                raise RecipeError(f"{where}.{key}: expected a string, got {getattr(self, key)!r}")
        if not isinstance(self.techniques, list) or not self.techniques:
            raise RecipeError(f"{where}.techniques: expected a non-empty list of {{'type': ..., params...}} objects")
        if len(self.techniques) > MAX_TECHNIQUES:
            raise RecipeError(f"{where}.techniques: at most {MAX_TECHNIQUES} techniques, got {len(self.techniques)}")
        for index, entry in enumerate(self.techniques):
            self._build_params(index, entry, newer_minor)
        self._validate_requirements(where, newer_minor)
        self._validate_tensors(where)

    def _validate_tensors(self, where: str) -> None:
        """Tensors and their metadata: string keys under the prefix of a technique of this recipe, each tensor
        a dtype and shape that technique reads, all within the payload limits."""
        import torch

        if not isinstance(self.tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                         for k, v in self.tensors.items()):
            raise RecipeError(f"{where}.tensors: expected a dict of name -> torch.Tensor")
        if not isinstance(self.tensor_metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.tensor_metadata.items()):
            raise RecipeError(f"{where}.tensor_metadata: keys and values must be strings")
        if self.tensor_metadata and not self.tensors:
            # The metadata is stored in the tensor file's header; without tensors there is nowhere to keep it.
            raise RecipeError(f"{where}.tensor_metadata: describes the tensor payload, but the recipe has no tensors")
        if len(self.tensors) > MAX_TENSORS:
            raise RecipeError(f"{where}.tensors: at most {MAX_TENSORS} tensors, got {len(self.tensors)}")
        total = 0
        for key, tensor in self.tensors.items():
            dtype = str(tensor.dtype).removeprefix("torch.")
            total += self._check_tensor_entry(key, dtype, list(tensor.shape), f"{where}.tensors")
        if total > MAX_PAYLOAD_BYTES:
            raise RecipeError(f"{where}.tensors: {total} bytes in all; a recipe may carry at most {MAX_PAYLOAD_BYTES}")
        for key in self.tensor_metadata:
            self._technique_of(key, f"{where}.tensor_metadata", "metadata")

    def _technique_of(self, key: str, where: str, what: str = "tensor") -> type:
        """The class of the recipe technique a payload key belongs to ("<technique type>/<name>")."""
        types_ = [t.get("type") for t in self.techniques if isinstance(t, dict)]
        kind, sep, _ = key.partition("/")
        if not sep or kind not in types_:
            raise RecipeError(
                f"{where}: {what} {key!r} is for technique {kind!r}, which this recipe does not have "
                f"(techniques: {types_}); keys are '<technique type>/<name>'" if sep else
                f"{where}: {what} key {key!r} names no technique; keys are '<technique type>/<name>'")
        return technique_class(kind)

    def _check_tensor_entry(self, key: str, dtype: str, shape: list[int], where: str) -> int:
        """Check one payload tensor (from the file header or in memory) and return its size in bytes."""
        cls = self._technique_of(key, where)
        if dtype not in DTYPE_SIZES:
            raise RecipeError(f"{where}: tensor {key!r} has dtype {dtype}; a recipe may carry {sorted(DTYPE_SIZES)}")
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * DTYPE_SIZES[dtype]
        if nbytes > MAX_PAYLOAD_BYTES:
            raise RecipeError(f"{where}: tensor {key!r} of shape {shape} is {nbytes} bytes; a recipe may carry at "
                              f"most {MAX_PAYLOAD_BYTES}")
        cls.check_tensor(key.partition("/")[2], dtype, shape, where)
        return nbytes

    def _build_params(self, index: int, entry: Any, newer_minor: bool, *, warn: bool = True):
        where = f"{self._where()}.techniques[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise RecipeError(f"{where}: expected an object with a string 'type', got {entry!r}")
        try:
            cls = technique_class(entry["type"])
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        raw = {k: v for k, v in entry.items() if k != "type"}
        unknown = sorted(set(raw) - set(parameter_fields(cls.Params)))
        if unknown and newer_minor:
            if warn:
                warnings.warn(f"{where} ({cls.name}): ignoring parameters {unknown} from a newer recipe format",
                              stacklevel=4)
            raw = {k: v for k, v in raw.items() if k not in unknown}
        return cls, build_params(cls.Params, raw, where=f"{where} ({cls.name})")

    def _validate_requirements(self, where: str, newer_minor: bool) -> None:
        if not isinstance(self.requirements, dict):
            raise RecipeError(f"{where}.requirements: expected an object, got {self.requirements!r}")
        unknown = sorted(set(self.requirements) - _REQUIREMENT_KEYS)
        if unknown:
            if not newer_minor:
                raise RecipeError(f"{where}.requirements: unknown key(s) {unknown}; allowed: {sorted(_REQUIREMENT_KEYS)}")
            warnings.warn(f"{where}.requirements: ignoring keys {unknown} from a newer recipe format", stacklevel=4)
        spec = self.requirements.get("transformers")
        if spec is not None:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet

            if not isinstance(spec, str):
                raise RecipeError(f"{where}.requirements.transformers: expected a specifier string like '>=5.23', got {spec!r}")
            try:
                SpecifierSet(spec)
            except (InvalidSpecifier, TypeError):
                raise RecipeError(f"{where}.requirements.transformers: not a version specifier: {spec!r}") from None
        types_ = self.requirements.get("model_types")
        if types_ is not None and (not isinstance(types_, list) or not all(isinstance(t, str) for t in types_)):
            raise RecipeError(f"{where}.requirements.model_types: expected a list of model type strings")

    def check_requirements(self, model_type: str) -> None:
        """Raise `RecipeError` when the installed transformers or the model type is not what the recipe needs."""
        from packaging.specifiers import SpecifierSet

        from .compat import TRANSFORMERS_VERSION

        spec = self.requirements.get("transformers")
        if spec and TRANSFORMERS_VERSION not in SpecifierSet(spec):
            raise RecipeError(f"{self._where()} needs transformers{spec}; installed: {TRANSFORMERS_VERSION}")
        types_ = self.requirements.get("model_types")
        if types_ and model_type not in types_:
            raise RecipeError(f"{self._where()} is for model types {types_}, not {model_type!r}")

    # ----- trust ------------------------------------------------------------------------------------
    @property
    def is_remote(self) -> bool:
        """Whether the recipe was read from a remote source (the Hub), whose resource parameters are untrusted."""
        return self.source is not None and self.source.startswith(REMOTE_SOURCES)

    def resources(self) -> list[dict[str, Any]]:
        """The files, folders and repositories this recipe would make hfpatch read or download: every resource
        parameter (`param(..., resource=True)`) that is set, with whether it may be used as it is.

        Each item: `technique`, `index` (in `techniques`), `parameter`, `value`, `trusted` (bool) and `why`.

        Example:
            >>> for r in hfpatch.Recipe.from_pretrained("org/transplant").resources():
            ...     print(r["technique"], r["parameter"], r["value"], r["trusted"])
        """
        found = []
        for index, entry in enumerate(self.techniques):
            cls = technique_class(entry["type"])
            for name in resource_parameters(cls.Params):
                value = entry.get(name)
                if value is None:
                    continue
                key = f"{cls.name}.{name}"
                if not self.is_remote:
                    trusted, why = True, "the recipe is local (yours)"
                elif key in self.allowed_resources or "*" in self.allowed_resources:
                    trusted, why = True, "given by the caller or allowed with trust_resources"
                else:
                    trusted, why = False, "set by a remote recipe; needs a caller override or trust_resources"
                found.append({"technique": cls.name, "index": index, "parameter": name, "value": value,
                              "trusted": trusted, "why": why})
        return found

    def check_resources(self) -> None:
        """Raise `RecipeError` when a remote recipe sets a resource parameter the caller neither gave nor allowed."""
        refused = [r for r in self.resources() if not r["trusted"]]
        if not refused:
            return
        lines = [f"techniques[{r['index']}] ({r['technique']}).{r['parameter']} = {_shown(r['value'])}" for r in refused]
        names = [f"{r['technique']}.{r['parameter']}" for r in refused]
        raise RecipeError(
            f"{self._where()} sets {'; '.join(lines)}: "
            + ("a parameter that names a file or repository" if len(lines) == 1 else "parameters that name files or "
               "repositories") + " to read, which a recipe from the Hub may not choose on its own. Give "
            + ("it" if len(lines) == 1 else "them") + " yourself, e.g. hfpatch.patch(model, recipe, "
            f"**{{{names[0]!r}: <your path or repo id>}}), or allow the recipe's value(s) after checking them "
            f"('hfpatch recipe show' lists them): hfpatch.patch(model, recipe, trust_resources={names!r}) "
            "(trust_resources=True allows every one)"
        )

    def allow_resources(self, which: bool | str | Any = True) -> Recipe:
        """A copy whose resource parameters ("technique.param" names, or all with True) may be taken from this
        recipe even when it is remote. Raises `RecipeError` for a name that is not a resource parameter of a
        technique in the recipe.

        Example:
            >>> recipe = hfpatch.Recipe.from_pretrained("org/transplant").allow_resources(["tokenizer_transplant.tokenizer"])
        """
        if which is True:
            names = {"*"}
        elif which is False or which is None:
            names = set()
        else:
            names = {which} if isinstance(which, str) else set(which)
            known = {f"{t['type']}.{name}" for t in self.techniques
                     for name in resource_parameters(technique_class(t["type"]).Params)}
            unknown = sorted(n for n in names if n not in known)
            if unknown:
                raise RecipeError(f"trust_resources: {unknown} are not resource parameters of {self._where()}; "
                                  f"its resource parameters are {sorted(known) or 'none'}")
        allowed = copy.copy(self)
        allowed.techniques = copy.deepcopy(self.techniques)
        allowed.allowed_resources = frozenset(self.allowed_resources | names)
        return allowed

    # ----- techniques -------------------------------------------------------------------------------
    def build_techniques(self, tokenizer=None) -> list[Any]:
        """Instantiate the recipe's techniques with validated parameters and their share of the tensors.

        Raises `RecipeError` when a remote recipe sets a resource parameter nobody allowed (`check_resources`).
        `tokenizer`, the model's tokenizer when the caller knows it, lets techniques check tensors recorded for
        a vocabulary (the Token Recycling table's tokenizer fingerprint).
        """
        self.check_resources()
        newer_minor = _is_newer_minor(self.hfpatch_version, self._where())
        instances = []
        for index, entry in enumerate(self.techniques):
            cls, params = self._build_params(index, entry, newer_minor, warn=False)
            technique = cls(params)
            prefix = f"{cls.name}/"
            tensors = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
            metadata = {k[len(prefix):]: v for k, v in self.tensor_metadata.items() if k.startswith(prefix)}
            if tensors or metadata:
                if tokenizer is None:  # the two-argument form keeps techniques written before tokenizer= working
                    technique.load_tensors(tensors, metadata)
                else:
                    technique.load_tensors(tensors, metadata, tokenizer=tokenizer)
            instances.append(technique)
        return instances

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """A copy with technique parameters replaced by name ("budget") or by "technique.param".

        Raises `RecipeError` when a name matches no technique or more than one.
        """
        techniques = copy.deepcopy(self.techniques)
        given = set()
        for key, value in overrides.items():
            if "." in key:
                type_name, param_name = key.split(".", 1)
                targets = [t for t in techniques if t["type"] == type_name]
            else:
                param_name = key
                targets = [t for t in techniques if param_name in parameter_fields(technique_class(t["type"]).Params)]
            if len(targets) != 1:
                names = [t["type"] for t in techniques]
                problem = "matches no technique" if not targets else "is ambiguous"
                raise RecipeError(
                    f"override {key!r} {problem} in recipe {self.name!r} (techniques: {names}); "
                    "use 'technique.param' to pick one"
                )
            targets[0][param_name] = value
            given.add(f"{targets[0]['type']}.{param_name}")  # the caller's own value: trusted even in a remote recipe
        return Recipe(
            techniques, name=self.name, description=self.description, requirements=dict(self.requirements),
            tensors=dict(self.tensors), tensor_metadata=dict(self.tensor_metadata),
            hfpatch_version=self.hfpatch_version, source=self.source,
            allowed_resources=frozenset(self.allowed_resources | given),
        )

    # ----- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (without tensor bookkeeping, which `save_pretrained` adds)."""
        data: dict[str, Any] = {
            "hfpatch_version": self.hfpatch_version,
            "name": self.name,
            "description": self.description,
            "techniques": copy.deepcopy(self.techniques),
        }
        if self.requirements:
            data["requirements"] = copy.deepcopy(self.requirements)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None, tensors: dict | None = None,
                  tensor_metadata: dict | None = None) -> Recipe:
        """Validate a parsed `hfpatch_recipe.json` document and build the recipe."""
        where = f"recipe from {source}" if source else "recipe"
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a JSON object at the top level, got {type(data).__name__}")
        if "hfpatch_version" not in data:
            raise RecipeError(f"{where}: missing 'hfpatch_version' (this format is {FORMAT_VERSION!r})")
        newer_minor = _is_newer_minor(data["hfpatch_version"], where)
        unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
        if unknown:
            if not newer_minor:
                raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TOP_LEVEL_KEYS)}")
            warnings.warn(f"{where}: ignoring keys {unknown} from newer recipe format {data['hfpatch_version']}", stacklevel=3)
        if "techniques" not in data:
            raise RecipeError(f"{where}: missing 'techniques'")
        return cls(
            techniques=data["techniques"],
            name=data.get("name", "custom"),
            description=data.get("description", ""),
            requirements=data.get("requirements", {}),
            tensors=tensors or {},
            tensor_metadata=tensor_metadata or {},
            hfpatch_version=data["hfpatch_version"],
            source=source,
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `hfpatch_recipe.json` (and `hfpatch_recipe.safetensors` when there are tensors) to a folder.

        Each file is written under an unpredictable temporary name beside it and renamed over the old one
        (`hfpatch.files.atomic_write`): a reader sees the old file or the new one, never a part, and a link
        planted in the folder cannot redirect the write.
        """
        from safetensors.torch import save_file

        from .files import atomic_write, atomic_write_text

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if self.tensors:
            # Tensors first, the JSON that names their sha256 last: an interrupted save is caught on loading.
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
            tensor_path = atomic_write(directory / TENSOR_FILE, lambda tmp: save_file(
                tensors, str(tmp), metadata=dict(self.tensor_metadata)))
            data["tensors"] = {"file": TENSOR_FILE, "sha256": _sha256(tensor_path), "keys": sorted(self.tensors)}
        return atomic_write_text(directory / RECIPE_FILE, json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, source: str | None = None) -> Recipe:
        """Read a recipe JSON file (and the tensor file it names, from the same folder)."""
        path = Path(path)
        source = source or str(path)
        data = _read_document(path, source)
        return cls._with_payload(data, source, lambda: path.parent / TENSOR_FILE)

    @classmethod
    def _with_payload(cls, data: Any, source: str, tensor_path) -> Recipe:
        """Build a recipe from its parsed JSON document, then load the tensor payload it declares.

        The document is validated first, so the payload header is checked against the recipe's techniques
        (names, dtypes, shapes, sizes) before any tensor is read; `tensor_path()` gives the file (it may
        download it).
        """
        recipe = cls.from_dict(data, source=source)
        if "tensors" in data:
            recipe.tensors, recipe.tensor_metadata = _load_tensor_payload(data["tensors"], tensor_path, source, recipe)
            recipe._validate_tensors(recipe._where())
        return recipe

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        *,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> Recipe:
        """Load a recipe from a local file or folder, a built-in recipe name, or a Hub repo id.

        Resolution order: an existing local path, then a built-in name (`hfpatch recipes` lists them), then
        a Hub repository (`revision` = branch, tag or commit; honours `HF_HUB_OFFLINE` and the Hub cache).

        Example:
            >>> recipe = hfpatch.Recipe.from_pretrained("token-recycling")
            >>> recipe = hfpatch.Recipe.from_pretrained("org/my-recipe", revision="v1")
        """
        text = os.fspath(name_or_path)
        path = Path(text).expanduser()
        if path.is_file():
            return cls.from_file(path)
        if path.is_dir():
            if not (path / RECIPE_FILE).is_file():
                raise RecipeNotFoundError(f"folder {text!r} has no {RECIPE_FILE}")
            return cls.from_file(path / RECIPE_FILE)
        builtin = builtin_recipe_path(text)
        if builtin is not None and revision is None:
            return cls.from_file(builtin, source=f"builtin:{text}")
        if _REPO_ID.match(text):
            return _from_hub(cls, text, revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        raise RecipeNotFoundError(
            f"no recipe called {text!r}: it is not a local file or folder, not a built-in recipe "
            f"({', '.join(r['name'] for r in list_recipes()) or 'none'}), and not a Hub repo id like 'org/name'"
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Upload the recipe to a Hub model repo (created if needed); returns the commit sha.

        `revision` names a branch, created from the default branch when missing.

        Example:
            >>> recipe.push_to_hub("me/my-recipe", revision="v1")
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hfpatch-recipe-") as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message or f"Upload hfpatch recipe {self.name}",
                # A tensor file left from an earlier push would otherwise linger beside a JSON that no longer names it.
                delete_patterns=None if self.tensors else [TENSOR_FILE],
            )
        return info.oid

    @classmethod
    def download(
        cls,
        repo_id: str,
        local_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> Recipe:
        """Download a Hub recipe into ``local_dir`` and return it, validated.

        The files are copied as published (through the Hub cache, pinned to the resolved commit, so
        ``HF_HUB_OFFLINE=1`` works for cached revisions): a recipe of a newer format minor version keeps the
        keys this version ignores. Recipe files already in ``local_dir`` are replaced; a tensor file left from
        an earlier download is removed when the new recipe has none. Raises ``RecipeError`` when ``repo_id``
        resolves to a local path or a built-in recipe instead of a Hub repository.

        Example:
            >>> recipe = hfpatch.Recipe.download("org/my-recipe", "my_recipe/", revision="v1")
        """
        import shutil

        from huggingface_hub import hf_hub_download

        from .files import atomic_write

        out = Path(local_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise RecipeError(f"{os.fspath(local_dir)}: exists and is not a folder")
        recipe = cls.from_pretrained(repo_id, revision=revision, token=token, cache_dir=cache_dir)
        source = recipe.source or ""
        if not source.startswith("hub:"):
            raise RecipeError(f"{repo_id!r} is not a Hub repo id (it resolved to {source})")
        commit = source.rsplit("@", 1)[1]
        out.mkdir(parents=True, exist_ok=True)
        # Tensors first, the JSON that names their sha256 last: an interrupted pull is caught on loading.
        for name in ([TENSOR_FILE] if recipe.tensors else []) + [RECIPE_FILE]:
            cached = hf_hub_download(repo_id, name, revision=commit, token=token, cache_dir=cache_dir)
            atomic_write(out / name, lambda tmp, cached=cached: shutil.copyfile(cached, tmp))
        if not recipe.tensors and (out / TENSOR_FILE).exists():
            (out / TENSOR_FILE).unlink()  # would contradict the new JSON
        return recipe


def _read_header(path: Path, size: int, where: str) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """The safetensors header: {key: (torch dtype name, shape)} and the metadata, read without loading a tensor."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise RecipeError(f"{where}: unreadable {TENSOR_FILE} (its header length {length} is not between 1 and "
                              f"{min(MAX_HEADER_BYTES, max(size - 8, 0))} bytes)")
        header = _parse_json(f.read(length), where, f"{TENSOR_FILE} header")
    if not isinstance(header, dict):
        raise RecipeError(f"{where}: unreadable {TENSOR_FILE} (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RecipeError(f"{where}: {TENSOR_FILE} metadata must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise RecipeError(f"{where}: {TENSOR_FILE} holds {len(header)} tensors; a recipe may carry at most {MAX_TENSORS}")
    entries = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if dtype is None:
            raise RecipeError(f"{where}: tensor {key!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; "
                              f"a recipe may carry {sorted(_SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            raise RecipeError(f"{where}: tensor {key!r} has no valid shape in the {TENSOR_FILE} header ({shape!r})")
        entries[key] = (dtype, shape)
    return entries, metadata


def _load_tensor_payload(spec: Any, tensor_path, source: str, recipe: Recipe) -> tuple[dict, dict]:
    """Load and verify the tensor file a recipe declares: its size, sha256 and key list must match, and every
    tensor's name, dtype and shape (read from the header) must be one the recipe's techniques read, all
    checked before any tensor is loaded."""
    from safetensors import SafetensorError, safe_open

    where = f"recipe from {source}.tensors"
    if not isinstance(spec, dict) or spec.get("file") != TENSOR_FILE or not isinstance(spec.get("sha256"), str) \
            or not isinstance(spec.get("keys"), list) or not all(isinstance(k, str) for k in spec["keys"]):
        raise RecipeError(f"{where}: expected {{'file': {TENSOR_FILE!r}, 'sha256': <hex>, 'keys': [...]}}, got {spec!r}")
    for key in spec["keys"]:  # before downloading anything: the keys must belong to the recipe's techniques
        recipe._technique_of(key, where)
    path = tensor_path()
    if not path.is_file():
        raise RecipeError(f"{where}: the recipe declares {TENSOR_FILE} but it is missing")
    size = path.stat().st_size
    if size > MAX_PAYLOAD_BYTES + MAX_HEADER_BYTES + 8:
        raise RecipeError(f"{where}: {TENSOR_FILE} is {size} bytes; a recipe may carry at most {MAX_PAYLOAD_BYTES} "
                          "bytes of tensors")
    actual = _sha256(path)
    if actual != spec["sha256"]:
        raise RecipeError(
            f"{where}: {TENSOR_FILE} does not match the recipe (sha256 {actual[:12]}..., recipe says "
            f"{spec['sha256'][:12]}...); the file was modified or truncated"
        )
    entries, header_metadata = _read_header(path, size, where)
    if sorted(entries) != sorted(spec["keys"]):
        raise RecipeError(f"{where}: tensor keys {sorted(entries)} differ from the declared {sorted(spec['keys'])}")
    total = sum(recipe._check_tensor_entry(key, dtype, shape, where) for key, (dtype, shape) in entries.items())
    if total > MAX_PAYLOAD_BYTES:
        raise RecipeError(f"{where}: {total} bytes of tensors; a recipe may carry at most {MAX_PAYLOAD_BYTES}")
    for key in header_metadata:
        if key != "format":  # safetensors' own entry
            recipe._technique_of(key, where, "metadata")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except SafetensorError as exc:
        raise RecipeError(f"{where}: unreadable {TENSOR_FILE} ({exc})") from None
    if sorted(tensors) != sorted(spec["keys"]):
        raise RecipeError(f"{where}: tensor keys {sorted(tensors)} differ from the declared {sorted(spec['keys'])}")
    metadata.pop("format", None)
    return tensors, metadata


def _from_hub(cls, repo_id: str, revision: str | None, *, token, cache_dir, local_files_only: bool) -> Recipe:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def download(filename: str, rev: str | None) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=rev, token=token, cache_dir=cache_dir,
                                    local_files_only=local_files_only))

    at = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        json_path = download(RECIPE_FILE, revision)
    except RepositoryNotFoundError:
        raise RecipeNotFoundError(f"Hub repo {repo_id!r} not found (or you lack access)") from None
    except RevisionNotFoundError:
        raise RecipeNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: must be caught first
        raise RecipeNotFoundError(
            f"recipe {at} is not in the local Hub cache and the Hub could not be reached "
            "(HF_HUB_OFFLINE, local_files_only or a network error)"
        ) from None
    except EntryNotFoundError:
        raise RecipeNotFoundError(f"Hub repo {at} has no {RECIPE_FILE}; is it an hfpatch recipe?") from None
    # The cache stores files under snapshots/<commit>/; pin the tensor file to that same commit.
    commit = json_path.parent.name
    source = f"hub:{repo_id}@{commit}"
    data = _read_document(json_path, source)

    def tensor_path() -> Path:
        # Downloaded only once the JSON document is valid and its tensor keys belong to its techniques.
        try:
            return download(TENSOR_FILE, commit if re.fullmatch(r"[0-9a-f]{40}", commit) else revision)
        except LocalEntryNotFoundError:
            raise RecipeNotFoundError(
                f"recipe from {source}: {TENSOR_FILE} is not in the local Hub cache and the Hub could not be reached"
            ) from None
        except EntryNotFoundError:
            raise RecipeError(f"recipe from {source}: declares {TENSOR_FILE} but the repo does not have it") from None

    return cls._with_payload(data, source, tensor_path)


def builtin_recipes_dir() -> Path:
    """Folder of the built-in recipes: inside the installed wheel, or `recipes/` of a source checkout."""
    packaged = Path(str(importlib.resources.files("hfpatch"))) / "_builtin_recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipe_path(name: str) -> Path | None:
    if not re.fullmatch(r"[\w.+-]+", name):
        return None
    path = builtin_recipes_dir() / f"{name}.json"
    return path if path.is_file() else None


def list_recipes() -> list[dict[str, Any]]:
    """The built-in recipes: name, description and technique types.

    Example:
        >>> [r["name"] for r in hfpatch.list_recipes()]
    """
    folder = builtin_recipes_dir()
    result = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stem) if folder.is_dir() else []:
        data = json.loads(path.read_text(encoding="utf-8"))
        result.append({
            "name": path.stem,
            "description": data.get("description", ""),
            "techniques": [t.get("type") for t in data.get("techniques", [])],
        })
    return result


def resolve_recipe(recipe: str | os.PathLike | Recipe | dict, *, revision: str | None = None,
                   trust_resources: bool | str | Any = False) -> Recipe:
    """Turn any accepted recipe argument (name, path, repo id, dict or Recipe) into a `Recipe`.

    `trust_resources` (True, or "technique.param" names) lets a remote recipe's resource parameters be used
    as the recipe sets them (`Recipe.allow_resources`).
    """
    if isinstance(recipe, Recipe):
        if revision is not None:
            raise TypeError("revision= only applies when the recipe is named by a Hub repo id")
        resolved = recipe
    elif isinstance(recipe, dict):
        resolved = Recipe.from_dict(recipe, source="dict")
    elif isinstance(recipe, (str, os.PathLike)):
        resolved = Recipe.from_pretrained(recipe, revision=revision)
    else:
        raise TypeError(f"recipe must be a name, path, Hub repo id, dict or hfpatch.Recipe, got {type(recipe).__name__}")
    return resolved.allow_resources(trust_resources) if trust_resources else resolved
