"""(model, processor) of any checkpoint the package loads, for scoring."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AtvSparseError

# Names of the models shipped in atv_sparse/assets -> their directory there (see each model card).
BUNDLED_MODELS = {"tiny-vlm": "tiny_vlm", "tiny-next": "tiny_next"}


def model_dir_of(name_or_path: str | Path) -> Path:
    """The directory of a bundled model (a :data:`BUNDLED_MODELS` name) or ``name_or_path`` itself."""
    if str(name_or_path) in BUNDLED_MODELS:
        from importlib import resources

        return Path(str(resources.files("atv_sparse").joinpath("assets", BUNDLED_MODELS[str(name_or_path)])))
    return Path(name_or_path)


def is_multimodal(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def load_model_and_processor(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, processor) of a dense, dense-with-zeros or compressed checkpoint, through
    ``atv_sparse.load``; the processor of a text-only model is its tokenizer."""
    from ..models.adapter import read_config
    from ..nn.load import load

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = load(model_dir, device=device, dtype=dtype)
    if "vision_config" in config or "vision_config" in config.get("text_config", {}):
        from ..models.processors import load_processor

        return model, load_processor(model_dir)
    from transformers import AutoTokenizer

    try:
        return model, AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise AtvSparseError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
