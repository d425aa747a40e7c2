"""Tokenizer swap with training-free embedding initialisation (OMP transplant, TokenAdapt, baselines)."""
from . import transplant  # noqa: F401  (registers the technique)
