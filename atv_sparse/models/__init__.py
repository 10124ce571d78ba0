"""Model adapters: which ``transformers`` classes atv_sparse prunes and where their blocks are."""

from .adapter import SUPPORTED_ARCHITECTURES, ModelAdapter, adapter_for, read_config

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelAdapter", "adapter_for", "read_config"]
