"""Lossless speculative generate on the bundled SmolLM2: same tokens as plain greedy, fewer forwards.

    python examples/speculative_generate.py
"""
import os

import torch

import hfpatch
from hfpatch.apps import assets

max_new_tokens = int(os.environ.get("MAX_NEW_TOKENS", "64"))
model, tok = assets.load_smollm2()
code = assets.code_documents(1, 2000)[0][:1200]
inputs = tok(code, return_tensors="pt")

plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
with hfpatch.patch(model, "recycling+lookup") as handle:
    fast = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    stats = handle.stats["token_recycling"]

print(tok.decode(fast[0, inputs.input_ids.shape[1]:]))
print("identical to plain greedy:", torch.equal(plain, fast))
print(f"tokens per forward: {stats['mean_accepted_tokens_per_forward']:.2f} ({stats['forwards']} forwards)")
