"""Where things live inside each supported architecture (transformers 5.x module paths).

This table is the only place that knows attribute paths; everything else asks an `ArchAdapter`.
Paths are dotted attribute names from the top-level model (`...ForCausalLM` / `...ForConditionalGeneration`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    family: str  # "decoder" or "vlm"
    language_model: str  # the decoder stack (has the layers, embeddings and final norm)
    layers: str  # decoder layers, relative to language_model
    attention: str  # attention module, relative to one decoder layer
    embed_tokens: str  # relative to language_model
    final_norm: str  # relative to language_model
    lm_head: str = "lm_head"  # relative to the top-level model
    text_sub_config: str | None = None  # name of the text sub-config in a VLM config
    vision_tower: str | None = None
    vision_layers: str | None = None  # relative to vision_tower
    vision_attention: str | None = None  # relative to one vision layer
    projector: str | None = None
    vision_sub_config: str | None = None


_LLAMA_LIKE = ArchSpec(
    family="decoder", language_model="model", layers="layers", attention="self_attn",
    embed_tokens="embed_tokens", final_norm="norm",
)
_QWEN_VL = ArchSpec(
    family="vlm", language_model="model.language_model", layers="layers", attention="self_attn",
    embed_tokens="embed_tokens", final_norm="norm", text_sub_config="text_config",
    vision_tower="model.visual", vision_layers="blocks", vision_attention="attn",
    projector="model.visual.merger", vision_sub_config="vision_config",
)

_IDEFICS3 = ArchSpec(  # Idefics3 and SmolVLM: a SigLIP tower, a pixel-shuffle connector and a Llama-like text model
    family="vlm", language_model="model.text_model", layers="layers", attention="self_attn",
    embed_tokens="embed_tokens", final_norm="norm", text_sub_config="text_config",
    vision_tower="model.vision_model", vision_layers="encoder.layers", vision_attention="self_attn",
    projector="model.connector", vision_sub_config="vision_config",
)

SPECS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": ArchSpec(
        family="decoder", language_model="transformer", layers="h", attention="attn",
        embed_tokens="wte", final_norm="ln_f",
    ),
    "llava": ArchSpec(
        family="vlm", language_model="model.language_model", layers="layers", attention="self_attn",
        embed_tokens="embed_tokens", final_norm="norm", text_sub_config="text_config",
        vision_tower="model.vision_tower", vision_layers="encoder.layers", vision_attention="self_attn",
        projector="model.multi_modal_projector", vision_sub_config="vision_config",
    ),
    "llava_next": ArchSpec(
        family="vlm", language_model="model.language_model", layers="layers", attention="self_attn",
        embed_tokens="embed_tokens", final_norm="norm", text_sub_config="text_config",
        vision_tower="model.vision_tower", vision_layers="encoder.layers", vision_attention="self_attn",
        projector="model.multi_modal_projector", vision_sub_config="vision_config",
    ),
    "gemma3": ArchSpec(
        family="vlm", language_model="model.language_model", layers="layers", attention="self_attn",
        embed_tokens="embed_tokens", final_norm="norm", text_sub_config="text_config",
        vision_tower="model.vision_tower", vision_layers="encoder.layers", vision_attention="self_attn",
        projector="model.multi_modal_projector", vision_sub_config="vision_config",
    ),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
}
