"""The few ways hfpatch touches a model. Each returns an undo that restores exactly what it changed.

Techniques never change a model any other way, so one ordered stack of these undos (see `patcher`) is
enough to make every patch atomic and reversible. All changes are per instance: nothing here edits a
class, a shared config object or a module-level function.

Each undo is an `UndoStep`: calling it restores the patched model, and `undo.on_copy(memo)` makes the same
restoration on a deep copy of that model (the objects it names are found in the copy through the
`copy.deepcopy` memo). That is how a copy of a patched model is first brought back to the unpatched model
before its patches are applied again, on the copy's own weights (see `patcher`).
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
import wrapt

from . import compat

Undo = Callable[[], None]
_MISSING = object()
_attention_names = itertools.count()

#: Instance attributes through which the patcher hooks copying and pickling of a patched model; a plain copy
#: of the model's state leaves them out (see `copy_model_state`).
COPY_HOOK_NAMES = ("__deepcopy__", "__reduce_ex__")


class UndoStep:
    """The undo of one change: call it to restore the model; `on_copy(memo)` restores a deep copy.

    `on_copy` receives the memo of the `copy.deepcopy` that made the copy, so `memo[id(obj)]` is the copy of an
    object the change touched. Objects absent from the memo were not part of the copy (a trainer whose method
    was wrapped, say), so there is nothing to restore there.
    """

    def __init__(self, undo: Undo, on_copy: Callable[[dict], None] | None = None):
        self._undo = undo
        self._on_copy = on_copy

    def __call__(self) -> None:
        self._undo()

    def on_copy(self, memo: dict) -> None:
        """Undo the same change on the deep copy described by `memo` (a no-op for a change outside it)."""
        if self._on_copy is not None:
            self._on_copy(memo)


def restore_copy(undos: list[Any], memo: dict) -> None:
    """Run `on_copy(memo)` of `undos` newest first, as a rollback would run the undos themselves.

    Undos that are not `UndoStep`s only clear a technique's own state (never the model, which changes only
    through primitives), so a copy has nothing of theirs to restore.
    """
    for undo in reversed(undos):
        if isinstance(undo, UndoStep):
            undo.on_copy(memo)


def copy_model_state(model: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """What `copy.deepcopy(model, memo)` makes of a model without the instance copy hooks of `COPY_HOOK_NAMES`.

    The patcher's `__deepcopy__` calls this to copy everything else (patched parts included, which it then
    restores with `restore_copy`). It follows the model class's own reduce protocol, as `copy.deepcopy` does.
    """
    cls = type(model)
    reduced = cls.__reduce_ex__(model, 4)  # the class's, not the instance hook
    if isinstance(reduced, str) or len(reduced) > 3 and any(item is not None for item in reduced[3:]):
        raise TypeError(f"cannot copy {cls.__name__}: its reduce protocol is not the plain (callable, args, state) one")
    factory, args, state = reduced[0], reduced[1], reduced[2] if len(reduced) > 2 else None
    clone = factory(*copy.deepcopy(args, memo))
    memo[id(model)] = clone
    if state is not None:
        if isinstance(state, dict):
            state = {key: value for key, value in state.items() if key not in COPY_HOOK_NAMES}
        state = copy.deepcopy(state, memo)
        if hasattr(clone, "__setstate__"):
            clone.__setstate__(state)
        else:
            clone.__dict__.update(state)
    return clone


def _copy_of(obj: Any, memo: dict) -> Any:
    """The copy of `obj` made by the deepcopy that `memo` belongs to, or None when it was not copied."""
    return memo.get(id(obj))


def set_attribute(obj: Any, name: str, value: Any) -> Undo:
    """Set `obj.name = value` on the instance; the undo restores the previous instance value or removes it.

    On an nn.Module, a plain value is stored in the instance `__dict__`, so this shadows a class attribute or
    method for this instance only.
    """
    # Writing to __dict__ directly bypasses nn.Module.__setattr__, which would register a module value as a
    # submodule (and change state_dict keys).
    previous = obj.__dict__.get(name, _MISSING)
    obj.__dict__[name] = value

    def restore(target: Any, memo: dict | None) -> None:
        if previous is _MISSING:
            target.__dict__.pop(name, None)
        else:
            target.__dict__[name] = previous if memo is None else copy.deepcopy(previous, memo)

    def on_copy(memo: dict) -> None:
        target = _copy_of(obj, memo)
        if target is not None:
            restore(target, memo)

    return UndoStep(lambda: restore(obj, None), on_copy)


class _MethodWrapper(wrapt.FunctionWrapper):
    """A wrapt wrapper around one instance's bound method.

    wrapt keeps the wrapper transparent: `inspect.signature`, `__wrapped__`, `__name__`, `__doc__` and
    `__self__` are the original method's, so code that introspects `model.generate` (transformers itself,
    TRL, Accelerate) sees what it would see unpatched. A deep copy keeps the same wrapper object, as a
    plain function attribute would be kept (it is bound to the original instance): a copy of a patched
    model drops it when the copy is restored (`UndoStep.on_copy`) and gets a wrapper of its own when its
    patches are applied again.
    """

    def __deepcopy__(self, memo: dict) -> _MethodWrapper:
        return self

    def __copy__(self) -> _MethodWrapper:
        return self


def wrap_method(obj: Any, name: str, wrapper: Callable[..., Any]) -> Undo:
    """Route calls of `obj.name(...)` through `wrapper(original, *args, **kwargs)` for this instance only.

    `original` is the method as bound at patch time (possibly an earlier wrapper), so wrappers stack in the
    order they were applied and come off in reverse. Used for `generate`, `forward` and training-loss hooks
    (`Trainer.compute_loss` on one trainer instance). The wrapper keeps the original's signature and
    metadata (see `_MethodWrapper`).
    """
    original = getattr(obj, name)

    def call(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        return wrapper(wrapped, *args, **kwargs)

    return set_attribute(obj, name, _MethodWrapper(original, call))


def wrap_generate(model: torch.nn.Module, wrapper: Callable[..., Any]) -> Undo:
    """Instance-level `generate` wrapper: `wrapper(original_generate, *args, **kwargs)`."""
    return wrap_method(model, "generate", wrapper)


def replace_forward(module: torch.nn.Module, forward: Callable[..., Any]) -> Undo:
    """Give one module instance a different `forward` (a plain function taking the module's arguments)."""
    return set_attribute(module, "forward", forward)


def replace_module(parent: torch.nn.Module, child_name: str, new_module: torch.nn.Module) -> Undo:
    """Swap a child module; the original object is kept and put back by the undo."""
    original = parent._modules[child_name]
    parent._modules[child_name] = new_module

    def undo() -> None:
        parent._modules[child_name] = original

    def on_copy(memo: dict) -> None:
        target = _copy_of(parent, memo)
        if target is not None:
            # the memo keeps sharing (tied weights, a wrapper holding the original) as in the original model
            target._modules[child_name] = copy.deepcopy(original, memo)

    return UndoStep(undo, on_copy)


def add_forward_hook(
    module: torch.nn.Module,
    hook: Callable[..., Any],
    *,
    pre: bool = False,
    with_kwargs: bool = True,
    prepend: bool = False,
) -> Undo:
    """Register a forward (pre-)hook that sees keyword arguments; the undo removes exactly that hook."""
    if pre:
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=prepend)
    else:
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs, prepend=prepend)
    hook_id = handle.id

    def on_copy(memo: dict) -> None:
        target = _copy_of(module, memo)
        if target is None:
            return
        # a deep copy keeps the hook under the same id in the copied hook dicts
        for table in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            target.__dict__.get(table, {}).pop(hook_id, None)

    return UndoStep(handle.remove, on_copy)


def _config_pairs(old: Any, new: Any) -> list[tuple[Any, Any]]:
    """(old, new) pairs of a config and its copy, sub-configs included, at every depth."""
    pairs = [(old, new)]
    for name in compat.sub_config_names(old):
        pairs.extend(_config_pairs(getattr(old, name), getattr(new, name)))
    return pairs


def unshare_config(model: torch.nn.Module) -> Undo:
    """Give this model private copies of its config objects.

    Two models built from one config object share it, and the attention implementation is read from the
    config at every forward, so changing it in place would patch both. Every submodule that points at the
    original config (or one of its sub-configs) is re-pointed at the copy; the undo points them back, which
    also restores every config field changed while patched.
    """
    new_config = copy.deepcopy(model.config)
    replacements = {id(old): (old, new) for old, new in _config_pairs(model.config, new_config)}
    changed: list[tuple[torch.nn.Module, Any]] = []
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in replacements:
            old, new = replacements[id(config)]
            module.__dict__["config"] = new
            changed.append((module, old))

    def undo() -> None:
        for module, old in changed:
            module.__dict__["config"] = old

    def on_copy(memo: dict) -> None:
        for module, old in changed:
            target = _copy_of(module, memo)
            if target is not None:
                target.__dict__["config"] = copy.deepcopy(old, memo)

    return UndoStep(undo, on_copy)


def set_config_field(model: torch.nn.Module, field: str, value: Any, *, sub_config: str | None = None) -> Undo:
    """Set a config field (optionally on a sub-config such as "text_config") for this model only."""
    undo_unshare = unshare_config(model)
    target = model.config if sub_config is None else getattr(model.config, sub_config)
    setattr(target, field, value)
    return undo_unshare


def use_attention_function(
    model: torch.nn.Module,
    attention_fn: Callable[..., Any],
    *,
    mask_like: str = "sdpa",
    sub_configs: tuple[str, ...] | None = None,
    label: str = "custom",
    accepts_tree_mask: bool = False,
) -> tuple[str, Undo]:
    """Register `attention_fn` under a fresh name and select it for this model only.

    The function has transformers' attention signature `(module, query, key, value, attention_mask,
    scaling, dropout, **kwargs)`. It is registered with the mask builder of `mask_like` (so padding masks
    keep working). `sub_configs` limits the change to those nested configs (e.g. `("text_config",)` in a
    VLM); by default the whole model switches. `accepts_tree_mask` declares that multi-token steps honour an
    additive 4D mask exactly (as sdpa does), so speculative tree verification can run through it. Returns the
    registered name and the undo.
    """
    name = f"hfpatch_{label}_{next(_attention_names)}"
    compat.register_attention(name, attention_fn, mask_like, accepts_tree_mask=accepts_tree_mask)
    undo_unshare = unshare_config(model)
    try:
        if sub_configs is None:
            model.set_attn_implementation(name)
        else:
            model.set_attn_implementation({key: name for key in sub_configs})
    except Exception:
        undo_unshare()
        compat.unregister_attention(name)
        raise

    def undo() -> None:
        undo_unshare()
        compat.unregister_attention(name)

    # a copy points back at its own copies of the original configs; the name stays registered for the original
    return name, UndoStep(undo, undo_unshare.on_copy)


def replace_submodule(root: torch.nn.Module, path: str, new_module: torch.nn.Module) -> Undo:
    """Swap the module at dotted `path` under `root` (e.g. "model.embed_tokens", "lm_head").

    The original module object is kept and put back by the undo, so its parameters (and any weight tying it
    had) come back untouched. Used to give a model new input/output embeddings of another vocabulary size.
    """
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if name not in parent._modules:
        raise AttributeError(f"{type(parent).__name__} has no submodule {name!r} (path {path!r})")
    return replace_module(parent, name, new_module)
