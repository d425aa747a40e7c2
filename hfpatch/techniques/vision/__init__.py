"""Visual-token pruning inside VLMs (family "vision"): HiPrune, DivPrune, the random / pooling baselines (before
the language model), FastV and ToDRE (inside it).

`base.py` holds the machinery of pruning before the language model (the instance-level forward and feature
wrappers, the common budget / keep_ratio parameters, sequence slicing, decode mask compaction, statistics);
`in_llm.py` that of pruning at a decoder layer; `families.py` the per-model-type glue both use (LLaVA,
LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, Gemma 3, Idefics3 / SmolVLM). Importing this package registers the techniques.
"""
from . import random_prune  # noqa: F401
from . import hiprune  # noqa: F401
from . import fastv  # noqa: F401
from . import todre  # noqa: F401
from . import divprune  # noqa: F401
from . import pool_prune  # noqa: F401
