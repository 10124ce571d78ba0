"""Calibration samples: the model inputs a pruning run feeds its statistics, built in one place.

A text model gets ``nsamples`` windows of ``seqlen`` tokens (``text.text_windows``). A vision-
language model gets one sample per conversation (a multimodal file, or the default conversations
its caller passes in: ``convert`` passes the synthetic tasks' calibration split), rendered with the
checkpoint's own chat template and processor (``multimodal.build_sample``), together with which
positions are visual or text; calibrated on a ``.txt`` file instead, its windows are all text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import AtvSparseError
from .calibration_set import CalibrationSet, SampleTokens
from .multimodal import Conversation, build_sample, read_multimodal_file
from .text import (DEFAULT_CALIBRATION, check_calibration_size, default_calibration_text, read_calibration_text,
                   text_windows)

DEFAULT_MULTIMODAL_CALIBRATION = "<synthetic tasks, calibration split>"


def is_text_file(path: str | Path | None) -> bool:
    """A ``.txt`` calibration file: plain text, so a vision-language model calibrates without images."""
    return path is not None and str(path).endswith(".txt")


# (nsamples, seed, image side or None) -> conversations: the default of a vision-language model.
DefaultConversations = Callable[..., "list[Conversation]"]


def load_calibration(ckpt: Path, adapter, *, path: str | Path | None = None, nsamples: int, seqlen: int,
                     seed: int = 0, processor=None,
                     default_conversations: DefaultConversations | None = None) -> CalibrationSet:
    """The calibration set of checkpoint ``ckpt`` (its ``models.adapter_for`` adapter) from ``path``
    (None: the embedded default).

    Text (a text-only model, or any model with a ``.txt`` file): ``nsamples`` windows of
    ``seqlen`` tokens from seeded offsets, tokenized with the checkpoint's tokenizer. Vision-
    language models otherwise: the first ``nsamples`` conversations of ``path`` (fewer if it holds
    fewer) or ``default_conversations(nsamples, seed=seed, size=side)`` (``side``:
    ``synthetic_image_size`` of the processor; convert passes
    ``tinybench.tasks.calibration_conversations``), through the checkpoint's ``processor``
    (``convert.preflight.check_processor``)."""
    check_calibration_size(nsamples, seqlen)
    if adapter.multimodal and not is_text_file(path):
        image_token_id = _image_token_id(ckpt, adapter, processor)
        if path is not None:
            conversations = read_multimodal_file(path, limit=nsamples)
        elif default_conversations is None:
            raise AtvSparseError(f"{ckpt} is a vision-language model: give a calibration file (`calib`) or "
                                 "`default_conversations`")
        else:
            size = synthetic_image_size(getattr(processor, "image_processor", None))
            conversations = default_conversations(nsamples, seed=seed, size=size)
        return conversation_calibration(processor, conversations, image_token_id,
                                        str(path) if path is not None else DEFAULT_MULTIMODAL_CALIBRATION)
    from transformers import AutoTokenizer

    text = read_calibration_text(path) if path is not None else default_calibration_text()
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError) as e:
        raise AtvSparseError(f"{ckpt}: cannot load its tokenizer ({str(e).splitlines()[0]}); copy the tokenizer "
                             "files into the checkpoint directory") from None
    source = str(path) if path is not None else DEFAULT_CALIBRATION
    samples = [{"input_ids": ids} for ids in text_windows(tokenizer, text, nsamples, seqlen, seed, source)]
    tokens = [SampleTokens.from_inputs(s["input_ids"], None, None) for s in samples] if adapter.multimodal else None
    return CalibrationSet(samples, tokens, source)


def synthetic_image_size(image_processor) -> int | None:
    """Side of the embedded calibration scenes for an anyres (LLaVA-NeXT-style) image processor: its
    smallest square grid pinpoint above the crop size, so a scene tiles into a base view plus 2 x 2
    crops as a photo does on LLaVA-NeXT (5 crops: 2,880 image tokens at 336 px / 576 per crop);
    None for other processors (the tasks' own 56 px scenes)."""
    pins = getattr(image_processor, "image_grid_pinpoints", None)
    if not pins:
        return None
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    side = crop["height"] if crop.get("height") else crop.get("shortest_edge")
    squares = sorted(h for h, w in pins if h == w and side and h > side)
    return squares[0] if squares else None


def conversation_calibration(processor, conversations: list[Conversation], image_token_id: int,
                             source: str = DEFAULT_MULTIMODAL_CALIBRATION) -> CalibrationSet:
    """One sample per conversation through ``processor`` and its chat template, and its positions
    (``image_token_id`` marks the visual ones; padding is neither)."""
    samples = [build_sample(processor, conv, image_token_id) for conv in conversations]
    tokens = [SampleTokens.from_inputs(s["input_ids"], s.get("attention_mask"), image_token_id) for s in samples]
    return CalibrationSet(samples, tokens, source)


def _image_token_id(ckpt: Path, adapter, processor) -> int:
    """The model's image token id, checked to be its processor's image token too."""
    from transformers import AutoConfig

    image_token_id = adapter.image_token_id(AutoConfig.from_pretrained(ckpt))
    token = getattr(processor, "image_token", None)
    processor_id = getattr(processor, "image_token_id", None)
    if processor_id is None and token is not None:
        processor_id = processor.tokenizer.convert_tokens_to_ids(token)
    if processor_id is not None and processor_id != image_token_id:
        raise AtvSparseError(f"{Path(ckpt) / 'config.json'}: image token id {image_token_id} is not the processor's "
                             f"image token {token!r} (id {processor_id}); set image_token_id in config.json")
    return image_token_id


__all__ = ["CalibrationSet", "DEFAULT_MULTIMODAL_CALIBRATION", "conversation_calibration", "is_text_file",
           "load_calibration"]
