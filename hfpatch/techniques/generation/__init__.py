"""Lossless speculative generation: drafters propose token trees, one engine verifies them in one forward."""
from . import adaptive_tree, draft_model, early_exit, ngram, token_recycling  # noqa: F401  (registers the techniques)
