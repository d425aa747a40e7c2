"""Sparse decode attention: Recycled Attention, TidalDecode and the sink+window and Quest baselines."""
from . import quest, recycled, sink_window, tidal  # noqa: F401  (registers the techniques)
