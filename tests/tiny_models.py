"""Tiny random models of every architecture hfpatch supports, built from configs (no downloads)."""
from __future__ import annotations

import torch
import transformers

_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             bos_token_id=1, eos_token_id=2, pad_token_id=0,
             num_key_value_heads=2, max_position_embeddings=256)


def _text_config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**_TEXT)
    if kind == "mistral":
        return transformers.MistralConfig(**_TEXT, sliding_window=None)
    if kind == "qwen2":
        return transformers.Qwen2Config(**_TEXT)
    if kind == "qwen3":
        return transformers.Qwen3Config(**_TEXT, head_dim=8)
    if kind == "gemma3_text":
        return transformers.Gemma3TextConfig(**_TEXT, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    if kind == "phi3":
        return transformers.Phi3Config(**_TEXT)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise KeyError(kind)


TEXT_KINDS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2")
VLM_KINDS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")
ALL_KINDS = TEXT_KINDS + VLM_KINDS


def tiny_config(kind: str):
    if kind in TEXT_KINDS:
        return _text_config(kind)
    if kind == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=28, patch_size=14)
        return transformers.LlavaConfig(vision_config=vision, text_config=_text_config("llama"), image_token_id=127)
    if kind == "llava_next":
        # 3x3 patches per 42x42 crop; an image is cut into up to 2x2 crops plus the base image
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=42, patch_size=14)
        return transformers.LlavaNextConfig(vision_config=vision, text_config=_text_config("llama"), image_token_id=127,
                                            image_grid_pinpoints=[[42, 84], [84, 42], [84, 84]])
    if kind == "gemma3":
        # SigLIP tower: 4x4 patches pooled to mm_tokens_per_image=4 tokens per image; the outer model builds the
        # text model's masks from token_type_ids (bidirectional inside an image)
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=28, patch_size=7)
        return transformers.Gemma3Config(text_config=_text_config("gemma3_text"), vision_config=vision,
                                         mm_tokens_per_image=4, image_token_id=127, boi_token_id=125,
                                         eoi_token_id=126)
    if kind in ("idefics3", "smolvlm"):
        # 4x4 patches per 28x28 crop, pixel-shuffled (scale 2) into 4 tokens per crop
        vision_cls = transformers.Idefics3VisionConfig if kind == "idefics3" else transformers.SmolVLMVisionConfig
        cls = transformers.Idefics3Config if kind == "idefics3" else transformers.SmolVLMConfig
        vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=7)
        return cls(vision_config=vision, text_config=_text_config("llama"), scale_factor=2, image_token_id=127)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        cls = transformers.Qwen2VLConfig if kind == "qwen2_vl" else transformers.Qwen2_5_VLConfig
        text = dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, out_hidden_size=32, intermediate_size=64)
        if kind == "qwen2_vl":
            vision.pop("intermediate_size"); vision.pop("out_hidden_size")
            vision["mlp_ratio"] = 2
        return cls(text_config=text, vision_config=vision, image_token_id=120, video_token_id=121,
                   vision_start_token_id=122, vision_end_token_id=123)
    raise KeyError(kind)


def tiny_model(kind: str, seed: int = 0, config=None):
    """A tiny random model in eval mode, fp32, deterministic for a given seed."""
    config = config if config is not None else tiny_config(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config) if kind in TEXT_KINDS else \
        transformers.AutoModelForImageTextToText.from_config(config)
    return model.eval()


def word_level_tokenizer(vocab_size: int, words: str = "", chat_template: str | None = None):
    """A fast word-level tokenizer of exactly `vocab_size` tokens for a tiny model: special tokens, `words`
    (whitespace-separated), then filler words w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in words.split() + [f"w{i}" for i in range(vocab_size)]:
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
