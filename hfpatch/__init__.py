"""hfpatch: one-line, reversible patches that add research techniques to Hugging Face transformers models.

Example:
    >>> import hfpatch
    >>> handle = hfpatch.patch(model, "token-recycling")
    >>> model.generate(**inputs, max_new_tokens=64)   # same call; greedy output identical
    >>> handle.stats
    >>> handle.unpatch()
"""
from . import techniques as _techniques  # noqa: F401  (fills the catalogue, once)
from .catalogue import list_techniques
from .patcher import PatchHandle, active_patches, patch, unpatch
from .recipe import Recipe, list_recipes

__version__ = "0.1.0"
__all__ = ["PatchHandle", "Recipe", "active_patches", "list_recipes", "list_techniques", "patch", "unpatch"]
