"""Warm a Token Recycling table on your prompts, save it as a recipe, and start another process hot.

    python examples/share_warm_table.py ./warm_recipe      # then: recipe.push_to_hub("me/warm-table")
"""
import sys

import hfpatch
from hfpatch.apps import assets

out_dir = sys.argv[1] if len(sys.argv) > 1 else "warm_recipe"
model, tok = assets.load_smollm2()
with hfpatch.patch(model, "token-recycling") as handle:
    for doc in assets.prose_documents(2, 1000):
        inputs = tok(doc[:600], return_tensors="pt")
        model.generate(**inputs, max_new_tokens=32, do_sample=False)
    recipe = handle.to_recipe(tok, name="token-recycling-warm")
recipe.save_pretrained(out_dir)  # hfpatch_recipe.json + hfpatch_recipe.safetensors (table + tokenizer fingerprint)

warm = hfpatch.Recipe.from_pretrained(out_dir)
with hfpatch.patch(model, warm) as handle:
    rows = handle.technique("token_recycling").drafter.stats()["table_rows_filled"]
print(f"saved to {out_dir}; the reloaded table starts with {rows} filled rows")
