"""Adapters for the supported ``transformers`` classes: text models (LLaMA / Llama-3, Qwen2) and
vision-language models (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL).

An adapter answers the questions the block driver asks of a model: which class loads it, where
the language model's decoder blocks are, and which input id marks an image position. The
driver itself never re-implements a block's forward; it runs the real modules, and the vision
tower and projector run densely inside the model's own forward.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn

from ..errors import AtvSparseError

if TYPE_CHECKING:
    from .lazy import LazyWeights


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    architecture: str
    multimodal: bool = False

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

    def image_token_id(self, config) -> int | None:
        """The input id whose positions carry image features (None for a text model)."""
        if not self.multimodal:
            return None
        token_id = config_image_token_id(config)
        if token_id is None:
            raise AtvSparseError(f"{self.architecture}: the config has no image_token_id; cannot tell image "
                                 "positions from text")
        return int(token_id)

    def load(self, model_dir: Path, dtype: str | torch.dtype = "auto") -> nn.Module:
        """The dense model on the CPU, in the checkpoint's dtype unless ``dtype`` says otherwise."""
        model = self.model_class.from_pretrained(model_dir, dtype=dtype)
        return model.eval()

    def open_lazy(self, model_dir: Path, dtype: str | torch.dtype = "auto",
                  tensors: dict | None = None) -> tuple[nn.Module, "LazyWeights"]:
        """(the skeleton, its ``LazyWeights``): weights read from the shards one module at a time, every
        shard header checked first (or ``tensors``, the ``formats.safetensors_io.checkpoint_tensors``
        the caller read). Brought whole, it equals ``load(model_dir, dtype)`` bit for bit."""
        from .lazy import open_lazy

        config, dtype = self._config(model_dir, dtype)
        return open_lazy(self.model_class, config, Path(model_dir), dtype, tensors)

    def _config(self, model_dir: Path, dtype: str | torch.dtype):
        config = transformers.AutoConfig.from_pretrained(model_dir)
        if not config.architectures:  # inferred from model_type (adapter_for): written into the output's config
            config.architectures = [self.architecture]
        if dtype == "auto":
            dtype = getattr(config, "dtype", None) or torch.float32
        return config, dtype


SUPPORTED_ARCHITECTURES = {
    **{name: ModelAdapter(name) for name in ("LlamaForCausalLM", "Qwen2ForCausalLM")},
    **{name: ModelAdapter(name, multimodal=True) for name in (
        "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration", "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration")},
}


# The class each supported ``model_type`` loads with, for a config.json whose ``architectures`` is
# null or absent (transformers' GGUF reader leaves it null).
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "llava": "LlavaForConditionalGeneration",
               "llava_next": "LlavaNextForConditionalGeneration",
               "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
GGUF_HINT = ("atv-sparse reads Hugging Face safetensors checkpoints: dequantize it into one first (with the `gguf` "
             "package, transformers' from_pretrained(folder, gguf_file=NAME) reads it; build a plain model from that "
             "config, load the state dict and save_pretrained it, as benchmarks/real_lm/smollm2.py does)")


def config_image_token_id(config) -> int | None:
    """``config.image_token_id`` (or the older ``image_token_index``); None when it has neither."""
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    return None if token_id is None else int(token_id)


def read_config(model_dir: Path) -> dict:
    """config.json of a model directory, with a clear error when it is not one."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise AtvSparseError(f"{model_dir}: no such checkpoint directory")
    if not model_dir.is_dir():
        if model_dir.suffix.lower() == ".gguf":
            raise AtvSparseError(f"{model_dir}: a GGUF file (llama.cpp's format); {GGUF_HINT}")
        raise AtvSparseError(f"{model_dir}: not a directory; give a Hugging Face model directory")
    path = model_dir / "config.json"
    if not path.is_file():
        gguf = sorted(p.name for p in model_dir.glob("*.gguf"))
        if gguf:
            raise AtvSparseError(f"{model_dir}: not a model directory (no config.json), but it holds the GGUF file "
                                 f"{gguf[0]}; {GGUF_HINT}")
        raise AtvSparseError(f"{model_dir}: not a model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AtvSparseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AtvSparseError(f"{path}: not a model config (expected a JSON object)")
    return config


def adapter_for(config: dict, model_dir: Path) -> ModelAdapter:
    """The adapter for the architecture named in ``config``, or, when ``architectures`` is null or
    absent, the one its ``model_type`` loads with (``MODEL_TYPES``); an error lists the supported ones."""
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if architectures:
        raise AtvSparseError(f"{model_dir}: unsupported architecture {', '.join(architectures)}; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return SUPPORTED_ARCHITECTURES[MODEL_TYPES[model_type]]
    raise AtvSparseError(f"{model_dir}: config.json has no `architectures` and its model_type {model_type!r} is not "
                         f"one of {', '.join(MODEL_TYPES)}; add \"architectures\": [one of "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}]")
