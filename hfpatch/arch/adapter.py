"""`ArchAdapter`: uniform access to the parts of a supported model (layers, attention, embeddings, vision)."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import UnsupportedModelError
from .specs import SPECS, ArchSpec


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a wrapper (a PEFT `PeftModel`, or a model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _get(root: torch.nn.Module, dotted: str):
    return operator.attrgetter(dotted)(root) if dotted else root


@dataclass
class ArchAdapter:
    """Finds the parts of one model instance; built by `adapter_for(model)`.

    Example:
        >>> adapter = hfpatch.arch.adapter_for(model)
        >>> adapter.attention_modules()[0]    # layer 0's attention module
    """

    model: torch.nn.Module
    spec: ArchSpec

    @property
    def model_type(self) -> str:
        return model_type(self.model)

    @property
    def is_vlm(self) -> bool:
        return self.spec.family == "vlm"

    @cached_property
    def language_model(self) -> torch.nn.Module:
        return _get(self.model, self.spec.language_model)

    def text_config(self):
        return self.model.config.get_text_config()

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(_get(self.language_model, self.spec.layers))

    def attention_modules(self) -> list[torch.nn.Module]:
        return [_get(layer, self.spec.attention) for layer in self.decoder_layers()]

    def input_embeddings(self) -> torch.nn.Module:
        return _get(self.language_model, self.spec.embed_tokens)

    def output_embeddings(self) -> torch.nn.Module:
        return _get(self.model, self.spec.lm_head)

    def input_embeddings_path(self) -> str:
        """Dotted path of the input embeddings from the top-level model (what `replace_submodule` takes)."""
        language_model = self.spec.language_model
        return f"{language_model}.{self.spec.embed_tokens}" if language_model else self.spec.embed_tokens

    def output_embeddings_path(self) -> str:
        """Dotted path of the LM head from the top-level model."""
        return self.spec.lm_head

    def text_sub_config(self) -> str | None:
        """Name of the text sub-config of a VLM config (None for a plain decoder, whose config is the text one)."""
        return self.spec.text_sub_config

    def embeddings_tied(self) -> bool:
        return self.output_embeddings().weight is self.input_embeddings().weight

    def final_norm(self) -> torch.nn.Module:
        return _get(self.language_model, self.spec.final_norm)

    def vision_tower(self) -> torch.nn.Module | None:
        return _get(self.model, self.spec.vision_tower) if self.spec.vision_tower else None

    def vision_layers(self) -> list[torch.nn.Module]:
        tower = self.vision_tower()
        return [] if tower is None else list(_get(tower, self.spec.vision_layers))

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        return [_get(layer, self.spec.vision_attention) for layer in self.vision_layers()]

    def projector(self) -> torch.nn.Module | None:
        return _get(self.model, self.spec.projector) if self.spec.projector else None


def supported_model_types(family: str | None = None) -> list[str]:
    """Model types hfpatch knows, optionally only one family ("decoder" or "vlm")."""
    return sorted(kind for kind, spec in SPECS.items() if family is None or spec.family == family)


def adapter_for(model: torch.nn.Module) -> ArchAdapter:
    """The adapter for `model` (unwrapping PEFT), or `UnsupportedModelError` naming the supported types."""
    model = unwrap_model(model)
    kind = model_type(model)
    spec = SPECS.get(kind)
    if spec is None:
        raise UnsupportedModelError(
            f"model type {kind!r} ({type(model).__name__}) is not supported by hfpatch; "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    adapter = ArchAdapter(model, spec)
    try:
        adapter.decoder_layers()
        adapter.output_embeddings()
    except AttributeError as exc:
        # A base model without an LM head (e.g. LlamaModel) has the model_type but not the layout.
        raise UnsupportedModelError(
            f"{type(model).__name__} (model type {kind!r}) does not have the expected layout "
            f"({exc}); load it with AutoModelForCausalLM / AutoModelForImageTextToText"
        ) from None
    return adapter
