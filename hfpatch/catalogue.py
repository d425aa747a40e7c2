"""The catalogue: technique name -> technique class.

Techniques add themselves with `@register` when their module is imported; `hfpatch/__init__` imports
`hfpatch.techniques` once, so the catalogue is full whenever any hfpatch module is in use. This module
never imports the techniques itself (that was an import circle).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .errors import RecipeError
from .technique import Technique, type_name

_CATALOGUE: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator adding a technique to the catalogue under `cls.name`."""
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    existing = _CATALOGUE.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"technique name {cls.name!r} is already registered by {existing.__qualname__}")
    _CATALOGUE[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a technique from the catalogue (used by tests that register throwaway techniques)."""
    _CATALOGUE.pop(name, None)


def technique_class(name: str) -> type[Technique]:
    """The technique class registered as `name`; a `RecipeError` naming the known ones otherwise."""
    try:
        return _CATALOGUE[name]
    except KeyError:
        known = ", ".join(sorted(_CATALOGUE)) or "(none)"
        raise RecipeError(f"unknown technique type {name!r}; known techniques: {known}") from None


def list_techniques() -> list[dict[str, Any]]:
    """Describe every registered technique: name, family, summary and parameters with defaults.

    Example:
        >>> [t["name"] for t in hfpatch.list_techniques()]
    """
    result = []
    for name in sorted(_CATALOGUE):
        cls = _CATALOGUE[name]
        hints = typing.get_type_hints(cls.Params)
        params = []
        for field in dataclasses.fields(cls.Params):
            default = field.default
            if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            params.append(
                {
                    "name": field.name,
                    "type": type_name(hints[field.name]),
                    "default": None if default is dataclasses.MISSING else default,
                    "help": field.metadata.get("help", ""),
                    **{k: field.metadata[k] for k in ("ge", "le", "gt", "choices") if field.metadata.get(k) is not None},
                }
            )
        result.append({"name": name, "family": cls.family, "summary": cls.summary, "params": params})
    return result
