"""Adapters for the text models (LLaMA / Llama-3, Qwen2) through their ``transformers`` classes.

An adapter answers the questions the block driver asks of a model: which class loads it, where
its decoder blocks are and what they are called. The driver itself never re-implements a
block's forward; it runs the real modules.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import transformers
from torch import nn

from ..errors import AtvSparseError


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    architecture: str

    @property
    def model_class(self) -> type:
        return getattr(transformers, self.architecture)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return model.get_decoder().layers

    def layers_prefix(self, model: nn.Module) -> str:
        """Module name of the blocks' ModuleList, e.g. ``model.layers``."""
        layers = self.decoder_layers(model)
        for name, module in model.named_modules():
            if module is layers:
                return name
        raise AssertionError("decoder layers are not a submodule of the model")

    def load(self, model_dir: Path, dtype: str | torch.dtype = "auto") -> nn.Module:
        """The dense model on the CPU, in the checkpoint's dtype unless ``dtype`` says otherwise."""
        model = self.model_class.from_pretrained(model_dir, dtype=dtype)
        return model.eval()

    def build_meta(self, model_dir: Path, dtype: str | torch.dtype = "auto") -> nn.Module:
        """The model's skeleton on the meta device (no weights read): for dry runs."""
        config = transformers.AutoConfig.from_pretrained(model_dir)
        if dtype == "auto":
            dtype = getattr(config, "dtype", None) or torch.float32
        with torch.device("meta"):
            return self.model_class._from_config(config, dtype=dtype)


SUPPORTED_ARCHITECTURES = {name: ModelAdapter(name) for name in ("LlamaForCausalLM", "Qwen2ForCausalLM")}


def read_config(model_dir: Path) -> dict:
    """config.json of a model directory, with a clear error when it is not one."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise AtvSparseError(f"{model_dir}: no such checkpoint directory")
    if not model_dir.is_dir():
        raise AtvSparseError(f"{model_dir}: not a directory; give a Hugging Face model directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise AtvSparseError(f"{model_dir}: not a model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AtvSparseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AtvSparseError(f"{path}: not a model config (expected a JSON object)")
    return config


def adapter_for(config: dict, model_dir: Path) -> ModelAdapter:
    """The adapter for the architecture named in ``config``; an error lists the supported ones."""
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    found = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
    raise AtvSparseError(f"{model_dir}: unsupported architecture {found}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
