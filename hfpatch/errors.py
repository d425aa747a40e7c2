"""Exception types. Every error hfpatch raises on purpose derives from `HfpatchError`."""


class HfpatchError(Exception):
    """Base class of the errors hfpatch raises on purpose."""


class UnsupportedModelError(HfpatchError, ValueError):
    """The model's architecture (or a setting of it) is not one a technique can patch."""


class PatchError(HfpatchError, RuntimeError):
    """Applying or removing a patch failed; the model was restored to its previous state."""


class PatchConflictError(PatchError):
    """Two techniques want the same part of a model (for example both replace its attention)."""


class RecipeError(HfpatchError, ValueError):
    """A recipe (or a technique parameter) is invalid; the message names the field and the allowed values."""


class RecipeNotFoundError(RecipeError, FileNotFoundError):
    """No local file, built-in recipe or Hub repository matches the name."""
