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
