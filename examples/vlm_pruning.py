"""Visual-token pruning on a VLM: hfpatch.patch(vlm, "hiprune", budget=...) keeps `budget` of each image's tokens
before the language model reads them; handle.stats says how many were kept, and unpatch restores the model.

    python examples/vlm_pruning.py            # the assembled LLaVA if it is built (hfpatch assets), else a tiny one
    python examples/vlm_pruning.py --tiny     # a tiny random LLaVA built from configs: offline, seconds

The tiny LLaVA has 16 tokens per image and keeps 4; the assembled one (DINOv2 tower + SmolLM2, reads digits)
has 256 and keeps 28 (11%).
"""
import argparse

import torch
import transformers

import hfpatch
from hfpatch.apps import vision_assets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true", help="use a tiny random LLaVA even if the assembled one is built")
parser.add_argument("--budget", type=int, help="image tokens kept per image (default: 4 tiny, 28 assembled)")
args = parser.parse_args()

if not args.tiny and vision_assets.assembled_llava_cached():
    vlm, tok, preprocess = vision_assets.assembled_llava()
    inputs = preprocess(vision_assets.mnist_digits("evaluation", n=2).pixels)
    budget, show = args.budget or 28, preprocess.answer
else:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=56, patch_size=14)  # 4x4 patches
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    vlm = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=127)).eval()
    inputs = {"input_ids": torch.tensor([[1, 5, 6] + [127] * 16 + [7, 8]]), "pixel_values": torch.randn(1, 3, 56, 56)}
    budget, show = args.budget or 4, lambda new: new.tolist()


def answer():
    out = vlm.generate(**inputs, max_new_tokens=8, do_sample=False)
    return show(out[:, inputs["input_ids"].shape[1]:])


full = answer()
with hfpatch.patch(vlm, "hiprune", budget=budget) as handle:
    pruned = answer()
    stats = handle.stats["hiprune"]
print("unpruned:", full)
print(f"hiprune (budget {budget}):", pruned)
print(f"image tokens kept: {stats['tokens_after']} of {stats['tokens_before']} "
      f"(sequence {stats['sequence_length_before']} -> {stats['sequence_length_after']} tokens)")
print("after unpatch, same as unpruned:", answer() == full)
