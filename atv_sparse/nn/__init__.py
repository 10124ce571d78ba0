"""Modules and loading: ``SparseLinear``, ``load``, and the transformers quantizer adapter."""

from .load import load
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear", "load"]
