"""Image-only processors for the families whose ``transformers`` processor needs torchvision.

LlavaOnevisionProcessor, Qwen2VLProcessor and Qwen2_5_VLProcessor own a video processor, and
video processors have no PIL fallback: without torchvision they can be neither built nor loaded
(huggingface/transformers#43986, #48556). Calibration only uses images, so each gets a subclass
without the video processor. Their ``__init__`` lists the base's parameters explicitly (minus
``video_processor``): ``ProcessorMixin`` reads the attributes from ``inspect.signature`` and
the saved settings from ``__init__.__code__.co_varnames``, so a ``*args`` wrapper would
silently drop ``chat_template`` or ``num_image_tokens``.

:func:`load_processor` is the one way atv_sparse loads a checkpoint's processor.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import (
    AutoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)

from ..errors import AtvSparseError


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token, video_token=video_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


# config.json model_type -> (config class, image-only processor)
IMAGE_ONLY_PROCESSORS = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLImageOnlyProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionImageOnlyProcessor),
}

_registered = False


def register_image_only_processors() -> None:
    """Make AutoProcessor build the image-only classes for these three configs (idempotent)."""
    global _registered
    if _registered:
        return
    for config_class, processor_class in IMAGE_ONLY_PROCESSORS.values():
        AutoProcessor.register(config_class, processor_class, exist_ok=True)
    _registered = True


def _model_type(model_dir: Path) -> str | None:
    """The family of ``model_dir``: config.json's model_type, else (a directory holding only a saved
    processor) the family whose original or image-only class processor_config.json names; older
    transformers (5.17) do not resolve a registered class from that name and fall back to the tokenizer."""
    try:
        return json.loads((model_dir / "config.json").read_text())["model_type"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    try:
        named = json.loads((model_dir / "processor_config.json").read_text())["processor_class"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    for model_type, (_, image_only) in IMAGE_ONLY_PROCESSORS.items():
        if named in (image_only.__name__, image_only.__mro__[1].__name__):
            return model_type
    return None


def load_processor(model_dir: str | Path) -> ProcessorMixin:
    """The checkpoint's processor (tokenizer + image processor + chat template).

    For Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision this is the image-only subclass, also when
    ``processor_config.json`` names the original class (as real checkpoints do).
    """
    register_image_only_processors()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AtvSparseError(f"{model_dir}: no such checkpoint directory")
    image_only = IMAGE_ONLY_PROCESSORS.get(_model_type(model_dir))
    processor, error = None, None
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure is reported below, naming the directory
        error = e
    if not isinstance(processor, ProcessorMixin) and image_only is not None:
        # The saved processor_class names the original class (which needs a video processor),
        # or AutoProcessor silently fell back to the bare tokenizer.
        try:
            processor, error = image_only[1].from_pretrained(model_dir), None
        except Exception as e:  # noqa: BLE001
            error = e
    if error is not None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AtvSparseError(f"{model_dir}: cannot load the processor ({type(error).__name__}: {reason})") from error
    if not isinstance(processor, ProcessorMixin):
        raise AtvSparseError(f"{model_dir}: no multimodal processor found (AutoProcessor gave "
                             f"{type(processor).__name__}); the directory needs processor_config.json or "
                             "preprocessor_config.json with the tokenizer files")
    return processor
