"""The technique base class and its parameter validation.

A technique is a class with a `name`, a dataclass of parameters (`Params`) and an `apply` method that
changes a model only through `hfpatch.primitives`, recording an undo for every change. This module sits
below every technique and imports nothing above it (the name -> class catalogue is `hfpatch.catalogue`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar

from .errors import RecipeError, UnsupportedModelError

_MISSING = dataclasses.MISSING


#: Limits every parameter value is held to, whatever its declaration says, because a recipe from the Hub is
#: untrusted input: the engine and the techniques size buffers from these values, so they are bounded while the
#: recipe is validated, before anything is allocated. A declaration may set tighter ones (`le=`, `max_items=`).
MAX_LIST_ITEMS = 1024  # items of any list, at any nesting level
MAX_STRING_LENGTH = 4096  # characters of any string (a path or repo id fits easily)
INT_LIMIT = 2**63  # integers must fit in int64: every integer parameter ends up in a torch tensor or a size


def param(
    default: Any = _MISSING,
    *,
    help: str,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    choices: tuple | None = None,
    default_factory: Any = _MISSING,
    resource: bool = False,
    max_items: int | None = None,
    max_length: int | None = None,
) -> Any:
    """Declare a technique parameter: a dataclass field with help text and range/choice constraints.

    `resource=True` marks a parameter that names a file, folder or Hub repository the technique reads or
    downloads (a tokenizer, a donor model). A recipe from a remote source (the Hub) cannot set such a
    parameter on its own: the caller gives it (an override to `hfpatch.patch`) or allows it
    (`trust_resources=`); see `hfpatch.recipe`. `max_items` bounds the length of a list value (default
    `MAX_LIST_ITEMS`) and `max_length` the length of a string value (default `MAX_STRING_LENGTH`).

    Example:
        @dataclasses.dataclass
        class Params:
            k: int = param(8, help="successors kept per token", ge=1, le=64)
            tokenizer: str = param(help="a local folder or Hub repo id", resource=True)
    """
    metadata = {"help": help, "ge": ge, "le": le, "gt": gt, "choices": choices, "resource": resource,
                "max_items": max_items, "max_length": max_length}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class NoParams:
    """Parameters of a technique that takes none."""


def type_name(tp: Any) -> str:
    """A parameter annotation as a reader would say it ("int or null", "list of int")."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    """A value for an error message, cut short: a hostile recipe's values can be megabytes long."""
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"


def _coerce(value: Any, tp: Any, where: str, meta: dict | None = None) -> Any:
    """Check `value` against a parameter annotation and the size limits; return it (ints are accepted where
    floats are). Sizes are checked before the items are looked at, so an oversized list costs nothing."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where, meta)
            except RecipeError as exc:
                errors.append(exc)
        # A value of the right kind but over a limit: say so, rather than "expected X or Y".
        limit_errors = [e for e in errors if getattr(e, "limit", False)]
        if limit_errors:
            raise limit_errors[0]
        raise RecipeError(f"{where}: expected {type_name(tp)}, got {_short(value)}")
    if tp is type(None):
        if value is None:
            return None
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            limit = meta.get("max_items") or MAX_LIST_ITEMS
            if len(value) > limit:
                raise _limit_error(f"{where}: at most {limit} items, got {len(value)}")
            (item_tp, *_) = typing.get_args(tp) or (Any,)
            items = [_coerce(v, item_tp, f"{where}[{i}]", meta) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT <= value < INT_LIMIT:
                raise _limit_error(f"{where}: must fit in 64 bits (|value| < 2**63), got {_short(value)}")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise RecipeError(f"{where}: {value!r} is too large for a float") from None
            if not math.isfinite(number):
                raise RecipeError(f"{where}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            limit = meta.get("max_length") or MAX_STRING_LENGTH
            if len(value) > limit:
                raise _limit_error(f"{where}: at most {limit} characters, got {len(value)}")
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise RecipeError(f"{where}: expected {type_name(tp)}, got {_short(value)} ({type(value).__name__})")


def _limit_error(message: str) -> RecipeError:
    """A RecipeError for a value over a size limit (preferred over "wrong type" when a union is tried)."""
    error = RecipeError(message)
    error.limit = True
    return error


def _check_range(value: Any, meta: dict, where: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise RecipeError(f"{where}: {value!r} is not one of {list(choices)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta.get("ge") is not None and value < meta["ge"]:
        raise RecipeError(f"{where}: must be >= {meta['ge']}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise RecipeError(f"{where}: must be > {meta['gt']}, got {value!r}")
    if meta.get("le") is not None and value > meta["le"]:
        raise RecipeError(f"{where}: must be <= {meta['le']}, got {value!r}")


def parameter_fields(params_cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a Params dataclass by name."""
    return {f.name: f for f in dataclasses.fields(params_cls)}


def resource_parameters(params_cls: type) -> list[str]:
    """Names of the parameters declared with `resource=True` (they name files, folders or Hub repos)."""
    return [f.name for f in dataclasses.fields(params_cls) if f.metadata.get("resource")]


#: Bytes per element of the tensor dtypes a recipe payload may hold (safetensors' own names are mapped to
#: these by `hfpatch.recipe`).
DTYPE_SIZES = {"bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8,
               "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What one tensor of a technique's payload may be, checked from the payload header before any tensor is
    read (and again on tensors built in memory).

    Example:
        tensor_specs = {"table": TensorSpec(dtypes=("int32", "int64"), ndim=2, max_shape=(1 << 20, 64))}
    """

    dtypes: tuple[str, ...]
    ndim: int
    #: the largest size of each dimension
    max_shape: tuple[int, ...]
    help: str = ""

    def check(self, key: str, dtype: str, shape: list[int] | tuple[int, ...], where: str) -> None:
        """Raise `RecipeError` when a tensor of this dtype and shape does not fit the spec."""
        if dtype not in self.dtypes:
            raise RecipeError(f"{where}: tensor {key!r} has dtype {dtype}; it must be one of {list(self.dtypes)}"
                              + (f" ({self.help})" if self.help else ""))
        if len(shape) != self.ndim:
            raise RecipeError(f"{where}: tensor {key!r} has shape {list(shape)}; it must have {self.ndim} "
                              "dimensions" + (f" ({self.help})" if self.help else ""))
        for axis, (size, most) in enumerate(zip(shape, self.max_shape)):
            if size > most:
                raise RecipeError(f"{where}: tensor {key!r} has shape {list(shape)}; dimension {axis} may be at "
                                  f"most {most}" + (f" ({self.help})" if self.help else ""))


def build_params(params_cls: type, raw: dict[str, Any], *, where: str, ignore_unknown: bool = False) -> Any:
    """Validate a plain dict against a Params dataclass and build it.

    Unknown keys raise (naming the allowed ones) unless `ignore_unknown`, which a recipe from a newer minor
    format version sets after warning about them.
    """
    fields = parameter_fields(params_cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown and not ignore_unknown:
        allowed = ", ".join(sorted(fields)) or "(none)"
        raise RecipeError(f"{where}: unknown parameter(s) {unknown}; allowed: {allowed}")
    hints = typing.get_type_hints(params_cls)
    values = {}
    for name, field in fields.items():
        if name not in raw:
            if field.default is _MISSING and field.default_factory is _MISSING:
                raise RecipeError(f"{where}.{name}: required parameter is missing")
            continue
        value = _coerce(raw[name], hints[name], f"{where}.{name}", field.metadata)
        _check_range(value, field.metadata, f"{where}.{name}")
        values[name] = value
    try:
        return params_cls(**values)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def params_to_dict(params: Any) -> dict[str, Any]:
    """A Params object as the plain dict a recipe stores."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


class Technique:
    """Base class of every technique.

    Subclasses set `name`, `family`, `summary`, `Params` and implement `apply(model, ctx)`, where every change
    to the model goes through a primitive whose undo is recorded with `ctx.record(...)`.

    Example:
        @hfpatch.catalogue.register
        class MyTechnique(Technique):
            name = "my_technique"
            family = "generation"
            summary = "what it does in one line"
            Params = MyParams

            def apply(self, model, ctx):
                ctx.record(primitives.add_forward_hook(model, my_hook))
    """

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: Parts of a model this technique takes over exclusively (e.g. "attention", "generate-loop").
    claims: ClassVar[frozenset[str]] = frozenset()
    #: Claims that several techniques of one recipe may hold together (they cooperate through `ctx.shared`).
    cooperative_claims: ClassVar[frozenset[str]] = frozenset()
    #: Model types (config.model_type) this technique accepts; None means every type hfpatch's arch/ knows.
    model_types: ClassVar[frozenset[str] | None] = None
    #: The tensors a recipe may carry for this technique, by name (without the "<technique>/" prefix). A
    #: technique that reads tensors declares them, and then any other name, dtype or shape is refused before
    #: the payload is loaded; None accepts any tensor within the recipe's overall size limits.
    tensor_specs: ClassVar[dict[str, TensorSpec] | None] = None

    def __init__(self, params: Any = None, **kwargs: Any):
        if params is not None and kwargs:
            raise TypeError("pass either a Params object or keyword parameters, not both")
        if params is None:
            params = build_params(self.Params, kwargs, where=self.name)
        elif not isinstance(params, self.Params):
            raise TypeError(f"{self.name}: params must be {self.Params.__name__}, got {type(params).__name__}")
        self.params = params
        self.tensors: dict[str, Any] = {}
        self.tensor_metadata: dict[str, str] = {}

    def supports(self, model) -> tuple[bool, str]:
        """Whether this technique can patch `model`, and why not when it cannot."""
        from . import arch

        try:
            adapter = arch.adapter_for(model)
        except UnsupportedModelError as exc:
            return False, str(exc)
        if self.model_types is not None and adapter.model_type not in self.model_types:
            return False, (
                f"{self.name} supports model types {sorted(self.model_types)}, not {adapter.model_type!r}"
            )
        return True, ""

    def apply(self, model, ctx) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """What the technique did during the last call (empty when it keeps no statistics)."""
        return {}

    @classmethod
    def check_tensor(cls, key: str, dtype: str, shape: list[int] | tuple[int, ...], where: str) -> None:
        """Raise `RecipeError` when a payload tensor `key` (without the technique prefix) of this dtype and shape
        is not one this technique reads; called on the payload header, before any tensor is loaded."""
        if cls.tensor_specs is None:
            return
        spec = cls.tensor_specs.get(key)
        if spec is None:
            reads = ", ".join(repr(f"{cls.name}/{name}") for name in sorted(cls.tensor_specs)) or "none"
            raise RecipeError(f"{where}: tensor {cls.name + '/' + key!r} is not one {cls.name} reads "
                              f"(it reads: {reads})")
        spec.check(f"{cls.name}/{key}", dtype, shape, where)

    def load_tensors(self, tensors: dict[str, Any], metadata: dict[str, str], *, tokenizer=None) -> None:
        """Receive this technique's share of a recipe's tensor payload (keys without the technique prefix).

        `tokenizer`, when the caller gave one (`hfpatch.patch(..., model_tokenizer=tok)`), is the model's
        tokenizer, so that tensors recorded for a vocabulary can be checked against it. Raise `RecipeError`
        when the tensors cannot serve this technique.
        """
        self.tensors = dict(tensors)
        self.tensor_metadata = dict(metadata)

    def export_params(self) -> dict[str, Any]:
        """The parameters `handle.to_recipe()` stores (plain JSON data). A technique given a non-data override
        at patch time (a loaded draft model) exports a reference to it, or nothing, instead."""
        return params_to_dict(self.params)

    def live_overrides(self) -> dict[str, Any]:
        """Parameters given at patch time that `export_params` cannot write into a recipe (a loaded model), by
        name: a copy of the patched model is patched again from `handle.to_recipe()` plus these."""
        return {}

    def export_tensors(self, tokenizer=None) -> tuple[dict[str, Any], dict[str, str]]:
        """Tensors (and string metadata) to store in a recipe's payload, e.g. a warmed draft table.

        `tokenizer`, when given, lets a technique record which vocabulary its tensors belong to.
        """
        return dict(self.tensors), dict(self.tensor_metadata)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"
