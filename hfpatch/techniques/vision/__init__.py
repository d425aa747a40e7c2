"""Visual-token pruning inside VLMs (family "vision"): HiPrune, DivPrune and the random / pooling baselines.

`base.py` holds the shared machinery (the instance-level forward wrapper, the common budget parameters, the
statistics); `families.py` the per-model-type glue (LLaVA, LLaVA-NeXT, ...). Importing this package registers
the techniques.
"""
from . import random_prune  # noqa: F401
from . import hiprune  # noqa: F401
from . import fastv  # noqa: F401
from . import todre  # noqa: F401
from . import divprune  # noqa: F401
from . import pool_prune  # noqa: F401
