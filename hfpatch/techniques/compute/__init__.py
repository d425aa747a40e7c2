"""How layers compute, not what: kernel and layout choices that keep a model's function (up to float rounding)."""
from . import onednn_linear  # noqa: F401  (registers the technique)
