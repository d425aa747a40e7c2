"""Per-architecture knowledge: where layers, attention, embeddings, norms and vision towers live."""
from .adapter import ArchAdapter, adapter_for, model_type, supported_model_types, unwrap_model
from .specs import SPECS, ArchSpec

__all__ = ["ArchAdapter", "ArchSpec", "SPECS", "adapter_for", "model_type", "supported_model_types", "unwrap_model"]
