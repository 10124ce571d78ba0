"""``AtvSparseVllmConfig``: vLLM's view of config.json's ``quantization_config`` (docs/design.md 6).

vLLM builds it from the block (``text_config``'s for a vision-language model) whose
``quant_method`` is ``atv_sparse``, then asks it for every layer's method:
- a linear whose weight the checkpoint stores as bitmask + values: ``AtvSparseLinearMethod``;
- any other linear (ignored, skipped, lm_head, vision tower): vLLM's ``UnquantizedLinearMethod``;
- anything else (embeddings, attention, norms): ``None``, i.e. vLLM's own.

Which linears are sparse: for a local directory (``vllm serve OUT_DIR``) the safetensors headers
say exactly (a module with ``weight_bitmask``); for a hub id, whose files are not there yet when
vLLM asks, the block's ``targets`` / ``ignore``. The model's ``hf_to_vllm_mapper`` renames
between the two namings (a VLM's ``model.language_model.`` is vLLM's ``language_model.model.``):
checkpoint names are mapped forward; for targets / ignore, vLLM's name is also matched in the
checkpoint names its prefix rules can come from. A fused vLLM linear (``qkv_proj``) is sparse
when all its checkpoint parts (``q_proj``, ``k_proj``, ``v_proj``) are.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..formats.bitmask import BITMASK_SUFFIX
from ..formats.spec import QUANT_METHOD, QuantizationBlock
from .checks import layer_is_sparse, pruned_modules_in_checkpoint, selected_by_config
from .linear import AtvSparseLinearMethod


class AtvSparseVllmConfig(QuantizationConfig):
    """vLLM's adapter for the block: holds the one validated type (``formats.spec.QuantizationBlock``)
    and decides which of the checkpoint's linears are sparse."""

    def __init__(self, block: dict[str, Any], where: str = "config.json"):
        super().__init__()
        self.block = QuantizationBlock.parse(block, where)
        self.pattern = self.block.pattern
        self.targets = list(self.block.targets or ())
        self.ignore = list(self.block.ignore or ())
        self.checkpoint_pruned: set[str] | None = None  # checkpoint names, from the safetensors headers
        self.mapper = None  # the model's hf_to_vllm rename mapper, once vLLM gives it
        self._pruned_cache: set[str] | None = None

    def __repr__(self) -> str:
        return f"AtvSparseVllmConfig(pattern={self.pattern}, targets={self.targets}, ignore={self.ignore})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Volta, the oldest GPU Triton supports: the dispatcher picks a kernel per call and falls back to
        # the reference path where none applies, so no capability is needed beyond what vLLM needs.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the block lives in config.json, which vLLM reads itself

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AtvSparseVllmConfig":
        return cls(config, "config.json (atv_sparse vLLM plugin)")

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        self.checkpoint_pruned = pruned_modules_in_checkpoint(model_name)
        self._pruned_cache = None

    def apply_vllm_mapper(self, hf_to_vllm_mapper):
        self.mapper = hf_to_vllm_mapper
        self._pruned_cache = None

    def _to_vllm(self, names: list[str]) -> list[str]:
        return names if self.mapper is None else self.mapper.apply_list(names)

    def _checkpoint_names(self, name: str) -> list[str]:
        """``name`` (vLLM's) and the checkpoint names the mapper's prefix rules turn into it."""
        prefixes = getattr(self.mapper, "orig_to_new_prefix", None) or {}
        return [name] + [old + name[len(new):] for old, new in prefixes.items() if new and name.startswith(new)]

    def _pruned_names(self) -> set[str] | None:
        """The checkpoint's pruned modules in vLLM's naming (None: decide from targets / ignore)."""
        if self.checkpoint_pruned is None:
            return None
        if self._pruned_cache is None:
            # map tensor names, not module names: a mapper's suffix rules are written for tensors
            tensors = self._to_vllm(sorted(n + BITMASK_SUFFIX for n in self.checkpoint_pruned))
            self._pruned_cache = {t[: -len(BITMASK_SUFFIX)] for t in tensors if t.endswith(BITMASK_SUFFIX)}
        return self._pruned_cache

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        pruned = self._pruned_names()
        if pruned is not None:
            def is_pruned(name):
                return name in pruned
        else:
            def is_pruned(name):
                return selected_by_config(self._checkpoint_names(name), self.targets, self.ignore)
        parts = self.packed_modules_mapping.get(prefix.rpartition(".")[2], [])
        if layer_is_sparse(prefix, list(parts), is_pruned):
            return AtvSparseLinearMethod(self.pattern, prefix)
        return UnquantizedLinearMethod()
