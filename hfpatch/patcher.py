"""`patch()` / `unpatch()` and `PatchHandle`: atomic application with an ordered undo stack.

Composition rule: a model may carry several patches at once. They apply in order; each technique
declares the parts of the model it takes over (`Technique.claims`), and a technique whose claim is already
held by an active patch (or by an earlier technique of the same recipe) is refused with
`PatchConflictError`, except that techniques of one recipe may share a claim both list in
`cooperative_claims` (the drafters of a speculative recipe share one engine this way). Patches come off in reverse order: `handle.unpatch()` on a handle that has newer
patches above it raises; `hfpatch.unpatch(model)` removes all of them, newest first.

Copies: `copy.deepcopy(model)` of a patched model carries an independent, working patch. The copy's state
is copied as usual, brought back to the unpatched model (each recorded undo's `on_copy`), and then every
active patch is applied to it again from `handle.to_recipe()` (parameters and learned tensors such as a warm
Token Recycling table), so `active_patches(copy)` lists the copy's own handles, it computes with its own
weights, `unpatch(copy)` restores it exactly and unpatching the original leaves it working. If applying a
patch to the copy fails, the copy is left unpatched and a `RuntimeWarning` says why. `pickle` works the
same way: the unpatched model is pickled with its recipes, which are applied again when it is loaded
(`copy.copy` goes through the same path and so also returns an independent copy).
"""
from __future__ import annotations

import json
import logging
import warnings
import weakref
from typing import Any

import torch

from . import arch, compat, primitives
from .errors import PatchConflictError, PatchError, UnsupportedModelError
from .primitives import Undo
from .recipe import Recipe, resolve_recipe

logger = logging.getLogger(__name__)

# model -> its active handles, oldest first. Weak keys: the registry never keeps a model alive.
_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, list[PatchHandle]] = weakref.WeakKeyDictionary()


class PatchContext:
    """What a technique's `apply` receives: the model's adapter and a place to record undos."""

    def __init__(self, model: torch.nn.Module, handle: PatchHandle):
        self.model = model
        # a trainer target (training techniques) has no architecture of its own: its techniques find the model
        # inside it themselves, per step (the trainer may wrap it for DDP)
        self.adapter = None if compat.is_trainer(model) else arch.adapter_for(model)
        self.handle = handle
        #: scratch space where techniques of one recipe meet (e.g. drafters sharing one speculative engine)
        self.shared: dict[str, Any] = {}
        self._undo: list[Undo] = []

    def record(self, undo: Undo) -> Undo:
        """Keep the undo of a change just made; undos run newest first."""
        if not callable(undo):
            raise TypeError(f"record() takes the undo callable a primitive returned, got {type(undo).__name__}")
        self._undo.append(undo)
        return undo

    def restore_copy(self, memo: dict) -> None:
        """Undo this patch's changes on a deep copy of the model (see `primitives.UndoStep.on_copy`)."""
        primitives.restore_copy(self._undo, memo)

    def rollback(self) -> list[BaseException]:
        errors: list[BaseException] = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except BaseException as exc:  # keep undoing the rest; report all at the end
                errors.append(exc)
        return errors


class PatchHandle:
    """An applied recipe on one model. Use it to read statistics and to take the patch off.

    Example:
        >>> handle = hfpatch.patch(model, "token-recycling")
        >>> model.generate(**inputs)
        >>> handle.stats
        >>> handle.unpatch()
        >>> with hfpatch.patch(model, recipe):   # or scoped
        ...     model.generate(**inputs)
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe, techniques: list[Any]):
        self.model = model
        self.recipe = recipe
        self.techniques = techniques
        self._context = PatchContext(model, self)
        self.active = False

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per technique name, what it did during the last call (see each technique's docs)."""
        return {technique.name: technique.stats() for technique in self.techniques}

    def technique(self, name: str):
        """The applied technique instance called `name`."""
        for technique in self.techniques:
            if technique.name == name:
                return technique
        raise KeyError(f"no technique {name!r} in this patch; it has {[t.name for t in self.techniques]}")

    @property
    def tokenizer(self):
        """The tokenizer to use with the patched model, when exactly one technique of this patch provides one
        (e.g. `tokenizer_transplant`); otherwise use `handle.technique(name).tokenizer`."""
        found = [t for t in self.techniques if getattr(t, "tokenizer", None) is not None]
        if len(found) != 1:
            names = [t.name for t in found]
            raise AttributeError(f"handle.tokenizer needs exactly one technique that provides a tokenizer; this "
                                 f"patch has {len(found)} ({names})")
        return found[0].tokenizer

    def to_recipe(self, tokenizer=None, *, name: str | None = None, description: str | None = None) -> Recipe:
        """This patch as a recipe: each technique's parameters plus the tensors it exports now (e.g. a warmed
        Token Recycling table), so another process can start where this one is.

        Example:
            >>> handle = hfpatch.patch(model, "token-recycling")
            >>> model.generate(**inputs)                          # warms the table
            >>> handle.to_recipe(tokenizer, name="warm").save_pretrained("warm/")   # or .push_to_hub(...)
        """
        entries, tensors, metadata = [], {}, {}
        for technique in self.techniques:
            entries.append({"type": technique.name, **technique.export_params()})
            own_tensors, own_metadata = technique.export_tensors(tokenizer)
            tensors.update({f"{technique.name}/{key}": value for key, value in own_tensors.items()})
            metadata.update({f"{technique.name}/{key}": value for key, value in own_metadata.items()})
        return Recipe(
            json.loads(json.dumps(entries)),  # tuples -> lists: the recipe holds plain JSON data
            name=name if name is not None else self.recipe.name,
            description=description if description is not None else self.recipe.description,
            requirements=dict(self.recipe.requirements),
            tensors=tensors,
            tensor_metadata=metadata,
        )

    def _live_overrides(self) -> dict[str, Any]:
        """Each technique's `live_overrides()` as "technique.param" overrides (see `_unpatched_copy`)."""
        overrides: dict[str, Any] = {}
        for technique in self.techniques:
            overrides.update({f"{technique.name}.{k}": v for k, v in technique.live_overrides().items()})
        return overrides

    def unpatch(self) -> None:
        """Restore the model exactly as it was before this patch."""
        if not self.active:
            return
        handles = _ACTIVE.get(self.model, [])
        if handles and handles[-1] is not self:
            newer = [h.recipe.name for h in handles[handles.index(self) + 1 :]]
            raise PatchError(
                f"patch {self.recipe.name!r} has newer patches on top of it ({newer}); unpatch those first, "
                "or call hfpatch.unpatch(model) to remove all"
            )
        errors = self._context.rollback()
        self.active = False
        if handles:
            handles.remove(self)
            if not handles:
                _ACTIVE.pop(self.model, None)
        if errors:
            raise PatchError(f"unpatching {self.recipe.name!r} hit {len(errors)} error(s): {errors!r}") from errors[0]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({self.recipe.name!r}, techniques={[t.name for t in self.techniques]}, {state})"


def active_patches(model: torch.nn.Module) -> list[PatchHandle]:
    """The patches currently applied to `model` (a PEFT wrapper is looked through), oldest first."""
    return list(_ACTIVE.get(arch.unwrap_model(model), []))


def _check_claims(model: torch.nn.Module, techniques: list[Any]) -> None:
    held: dict[str, str] = {}
    for handle in _ACTIVE.get(model, []):
        for technique in handle.techniques:
            for claim in technique.claims:
                held[claim] = f"{technique.name} (patch {handle.recipe.name!r})"
    in_recipe: dict[str, Any] = {}
    for technique in techniques:
        for claim in technique.claims:
            if claim in held:
                raise PatchConflictError(
                    f"{technique.name} needs the model's {claim!r}, which {held[claim]} already holds; "
                    "unpatch that first"
                )
            earlier = in_recipe.get(claim)
            if earlier is not None and not (claim in earlier.cooperative_claims and claim in technique.cooperative_claims):
                raise PatchConflictError(
                    f"{technique.name} needs the model's {claim!r}, which {earlier.name} (this recipe) already holds"
                )
            in_recipe.setdefault(claim, technique)


def _check_target_kind(target: Any, techniques: list[Any], is_trainer: bool) -> None:
    """Refuse a trainer technique (class attribute `target = "trainer"`) on a model and a model technique on a
    trainer, saying which object to patch instead."""
    for technique in techniques:
        wants_trainer = getattr(technique, "target", "model") == "trainer"
        if wants_trainer and not is_trainer:
            raise UnsupportedModelError(
                f"{technique.name} patches a trainer's loss, so it needs a transformers Trainer (TRL's DPOTrainer "
                f"included), not a {type(target).__name__}: build your trainer and call hfpatch.patch(trainer, ...) "
                "before trainer.train()")
        if is_trainer and not wants_trainer:
            raise UnsupportedModelError(
                f"{technique.name} patches a model, not a trainer ({type(target).__name__}): call "
                "hfpatch.patch(trainer.model, ...) instead")


def patch(
    model: torch.nn.Module,
    recipe: str | Recipe | dict,
    *,
    revision: str | None = None,
    trust_resources: bool | str | list[str] = False,
    model_tokenizer: Any = None,
    **overrides: Any,
) -> PatchHandle:
    """Apply a recipe to `model` in place and return a handle to inspect or undo it.

    Args:
        model: a transformers model (or a PEFT `PeftModel` wrapping one); for a training technique (family
            "training", e.g. `token_dpo`), the `transformers.Trainer` (TRL's `DPOTrainer` included) whose loss it
            replaces, patched before `trainer.train()`.
        recipe: a built-in recipe name, a local `.json` file or directory, a Hub repo id, a `Recipe`, or a
            dict in the recipe format.
        revision: branch, tag or commit of a Hub recipe.
        trust_resources: let a Hub recipe's own values be used for parameters that name files or repos to read
            (e.g. `tokenizer_transplant.tokenizer`): True for all, or a list of "technique.param" names. Without
            it such a value must come from you as an override (recipes from your own disk are always trusted).
        model_tokenizer: the model's tokenizer, when you have it: tensors recorded for a vocabulary (a Token
            Recycling table's tokenizer fingerprint) are checked against it.
        **overrides: technique parameters by name, e.g. `budget=512`. A name must belong to exactly one
            technique of the recipe; use "technique.param" (via `**{"a.b": v}`) to disambiguate.

    Either every technique applies or none does: on any failure the model is restored and `PatchError`
    (or `UnsupportedModelError` / `PatchConflictError`) names the technique, the model type and the reason.

    Example:
        >>> handle = hfpatch.patch(model, "token-recycling")
        >>> model.generate(**inputs, max_new_tokens=64)
        >>> handle.unpatch()
    """
    compat.warn_if_untested()
    is_trainer = compat.is_trainer(model)
    target = model if is_trainer else arch.unwrap_model(model)
    if not is_trainer and not isinstance(target, torch.nn.Module):
        raise TypeError(f"patch() takes a torch model or a transformers Trainer, got {type(model).__name__}")
    recipe_obj = resolve_recipe(recipe, revision=revision, trust_resources=trust_resources)
    if overrides:
        recipe_obj = recipe_obj.with_overrides(overrides)
    techniques = recipe_obj.build_techniques(tokenizer=model_tokenizer)
    _check_target_kind(model, techniques, is_trainer)
    kind = arch.model_type(target)
    recipe_obj.check_requirements(kind)
    for technique in techniques:
        ok, reason = technique.supports(target)
        if not ok:
            raise UnsupportedModelError(f"{technique.name} cannot patch {kind!r}: {reason}")
    _check_claims(target, techniques)

    handle = PatchHandle(target, recipe_obj, techniques)
    if not is_trainer and not _ACTIVE.get(target):
        # The first patch on a model installs the copy hooks; its undo is the first recorded, so they go when
        # the last patch comes off. A trainer is not copied or pickled as a patched model is: it gets none.
        _install_copy_hooks(target, handle._context)
    if model is not target:  # patched through a wrapper (see _WrapperCopyHook)
        _install_wrapper_hooks(model, target, handle._context)
    for technique in techniques:
        try:
            technique.apply(target, handle._context)
        except Exception as exc:
            errors = handle._context.rollback()
            note = f" (and {len(errors)} undo error(s) while restoring: {errors!r})" if errors else ""
            raise PatchError(
                f"technique {technique.name!r} failed on model type {kind!r}: {type(exc).__name__}: {exc}; "
                f"the {'trainer' if is_trainer else 'model'} was restored{note}"
            ) from exc
    handle.active = True
    _ACTIVE.setdefault(target, []).append(handle)
    logger.info("patched %s with %s", kind, [t.name for t in techniques])
    return handle


def unpatch(model: torch.nn.Module) -> int:
    """Remove every hfpatch patch from `model`, newest first. Returns how many were removed.

    Example:
        >>> hfpatch.unpatch(model)
    """
    target = arch.unwrap_model(model)
    handles = list(_ACTIVE.get(target, []))
    for handle in reversed(handles):
        handle.unpatch()
    return len(handles)


# ---------------------------------------------------------------------------------------------------------
# copies and pickles of a patched model


def _patched_model(ref: weakref.ref) -> torch.nn.Module:
    model = ref()
    if model is None:  # the hook lives in the model's own __dict__, so a call means the model is alive
        raise ReferenceError("the patched model is gone")
    return model


def _unpatched_copy(model: torch.nn.Module, memo: dict) -> tuple[torch.nn.Module, list[tuple[Recipe, dict]]]:
    """A deep copy of `model` brought back to the unpatched model, and the recipes of its active patches."""
    handles = list(_ACTIVE.get(model, []))
    # exported first: the tensors a technique exports are its state now, cloned (e.g. a warm draft table)
    # with the objects given at patch time that a recipe cannot hold (a loaded draft model), shared by the copy
    recipes = [(handle.to_recipe(), handle._live_overrides()) for handle in handles]
    clone = primitives.copy_model_state(model, memo)
    for handle in reversed(handles):
        handle._context.restore_copy(memo)
    return clone, recipes


def _apply_recipes(clone: torch.nn.Module, recipes: list, what: str) -> torch.nn.Module:
    """Apply the patches of a copied (or unpickled) model again; on failure leave it unpatched and warn."""
    recipes = [entry if isinstance(entry, tuple) else (entry, {}) for entry in recipes]  # older pickles: recipes
    for recipe, overrides in recipes:
        try:
            patch(clone, recipe, **overrides)
        except Exception as exc:
            unpatch(clone)
            warnings.warn(
                f"{what} of a model patched with {[r.name for r, _ in recipes]}: applying {recipe.name!r} to it failed "
                f"({type(exc).__name__}: {exc}), so it is the unpatched model; patch it yourself with "
                "hfpatch.patch(copy, recipe) once the cause is fixed",
                RuntimeWarning, stacklevel=3)
            break
    return clone


def _deepcopy_hook(ref: weakref.ref, memo: dict) -> torch.nn.Module:
    clone, recipes = _unpatched_copy(_patched_model(ref), memo)
    return _apply_recipes(clone, recipes, "a deep copy")


def _reduce_hook(ref: weakref.ref, protocol: int) -> tuple:
    # The unpatched model is what gets pickled (patched parts hold closures and oneDNN tensors that cannot
    # be pickled); the recipes are plain data. It costs one temporary copy of the model while pickling.
    clone, recipes = _unpatched_copy(_patched_model(ref), {})
    return _unpickle_patched, (clone, recipes)


def _unpickle_patched(model: torch.nn.Module, recipes: list) -> torch.nn.Module:
    """Rebuild a pickled patched model: the unpickled unpatched model with its recipes applied again."""
    return _apply_recipes(model, recipes, "an unpickled copy")


class _WrapperCopyHook:
    """`__deepcopy__` of a module that holds a patched model and forwards unknown attributes to it.

    A PEFT wrapper (and the tuner model inside it) forwards unknown attributes to the model it holds, so
    `copy.deepcopy(wrapper)` would find the patched model's own `__deepcopy__` and return a copy of that
    model alone. This hook copies its module as usual instead, which reaches the patched model's hook through
    the memo. It is an object rather than a closure so that the wrapper's pickled state can hold it.
    """

    def __init__(self, owner: torch.nn.Module, target: torch.nn.Module):
        self._owner = weakref.ref(owner)
        self._target = weakref.ref(target)

    def __call__(self, memo: dict) -> torch.nn.Module:
        target = _patched_model(self._target)
        clone = primitives.copy_model_state(_patched_model(self._owner), memo)
        # the patched model inside was copied and patched again through the memo: its holder needs a hook too
        target_clone = memo.get(id(target))
        handles = _ACTIVE.get(target_clone) if target_clone is not None else None
        if handles:
            _install_wrapper_hooks(clone, target_clone, handles[0]._context)
        return clone

    def __reduce__(self) -> tuple:
        return _unpickle_wrapper_hook, (_patched_model(self._owner), _patched_model(self._target))


def _unpickle_wrapper_hook(owner: torch.nn.Module, target: torch.nn.Module) -> _WrapperCopyHook:
    """The hook of an unpickled wrapper (which pickle puts back into its `__dict__`); the patch applied again
    to the unpickled model inside takes it off with its first undo stack."""
    hook = _WrapperCopyHook(owner, target)
    handles = _ACTIVE.get(target)
    if handles:
        ref = weakref.ref(owner)

        def undo() -> None:
            owner_now = ref()
            if owner_now is not None:
                owner_now.__dict__.pop("__deepcopy__", None)

        def on_copy(memo: dict) -> None:
            copied = memo.get(id(ref()))
            if copied is not None:
                copied.__dict__.pop("__deepcopy__", None)

        handles[0]._context.record(primitives.UndoStep(undo, on_copy))
    return hook


def _install_wrapper_hooks(wrapper: torch.nn.Module, target: torch.nn.Module, ctx: PatchContext) -> None:
    """A `_WrapperCopyHook` on every module on the way from `wrapper` down to the patched `target`."""
    path = next((name for name, module in wrapper.named_modules() if module is target), None)
    if not path:
        return
    owners = [wrapper]
    for part in path.split(".")[:-1]:
        owners.append(owners[-1]._modules[part])
    for owner in owners:
        if "__deepcopy__" not in owner.__dict__:
            ctx.record(primitives.set_attribute(owner, "__deepcopy__", _WrapperCopyHook(owner, target)))


def _install_copy_hooks(target: torch.nn.Module, ctx: PatchContext) -> None:
    """Instance-level `__deepcopy__` and `__reduce_ex__` on the patched model (`copy.deepcopy` and `pickle`
    look both up on the instance). They are neither modules nor tensors, so `state_dict` does not see them."""
    ref = weakref.ref(target)
    ctx.record(primitives.set_attribute(target, "__deepcopy__", lambda memo: _deepcopy_hook(ref, memo)))
    ctx.record(primitives.set_attribute(target, "__reduce_ex__", lambda protocol: _reduce_hook(ref, protocol)))


__all__ = ["PatchContext", "PatchHandle", "active_patches", "patch", "unpatch"]
