"""Shared test setup.

Environment variables that libraries read at import time are set here, before any test module imports
them: Triton's CPU interpreter and the Hub endpoint of the local test server.
"""
import os

# Triton reads this once, when it is imported; with it set, @triton.jit kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from hub_server import configure_hub_env, hub_server  # noqa: E402,F401
configure_hub_env()

import pytest  # noqa: E402

from hfpatch.apps.assets import AssetMissingError, load_smollm2  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct (converted once per cache, then ~0.5 s per load).

    Outside CI a missing asset package skips the test; in CI (CI=true) it fails it, so a missing install step
    cannot hide.
    """
    try:
        return load_smollm2()
    except AssetMissingError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
