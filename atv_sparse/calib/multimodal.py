"""Multimodal calibration: image-text conversations -> one processed model input per sample.

Two file formats, one sample per record:

- ShareGPT4V / LLaVA style, a ``.json`` list or ``.jsonl`` lines of
  ``{"image": "img/1.png", "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
  {"from": "gpt", "value": "..."}]}``;
- simple JSONL ``{"image": "img/1.png", "text": "..."}``: one user turn, no answer.

``image`` may be absent or null (a text-only sample); relative paths resolve against the file's
directory and must stay inside it (``../../etc/passwd`` is refused: a downloaded data set must not
send the reader elsewhere; an absolute path is the file author's explicit choice and is kept).
Images are PNG, JPEG, WebP, GIF, BMP or TIFF of at most ``MAX_IMAGE_PIXELS`` pixels, checked from
the header before any pixel is decoded. Every problem with the file or a record, whatever JSON
or PIL raise for it, is an ``AtvSparseError`` naming the file and the sample.

The literal ``<image>`` placeholder is removed from the text (the image travels separately);
:func:`build_sample` renders the conversation with the checkpoint's own chat template, which puts
the family's placeholder back, and the processor expands it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import AtvSparseError
from ..textfiles import is_text, json_lines, json_problem, read_user_text

if TYPE_CHECKING:
    from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
# Far above what any processor feeds a model (they resize to about 1-4 Mpx) and below PIL's own
# bomb warning (89 Mpx), so a decompression bomb is refused from its header, never decoded.
MAX_IMAGE_PIXELS = 64 * 2**20
# Formats whose decoders are built into PIL; EPS for one would run Ghostscript.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass
class Conversation:
    """One calibration sample: an optional image and the turns that talk about it."""

    image: Image.Image | None  # RGB, or None for a text-only sample
    turns: list[tuple[str, str]]  # (role, text), role "user" or "assistant"; the image goes with the first user turn
    source: str  # where it came from, for error messages, e.g. "data.json sample 3"


def read_multimodal_file(path: str | Path, limit: int | None = None) -> list[Conversation]:
    """The conversations in a ShareGPT4V-style ``.json`` / ``.jsonl`` file or a simple ``.jsonl`` file.

    Images are opened eagerly, so every problem shows up here. ``limit`` reads only the first
    ``limit`` samples (a big file's other records are neither checked nor their images opened).
    """
    path = Path(path)
    raw = read_user_text(path, "multimodal calibration file", allow_empty=False)
    records = _read_records(path, raw, limit)
    if not records:
        raise AtvSparseError(f"multimodal calibration file {path} has no samples")
    return [_conversation(path, i, record, where) for i, (record, where) in enumerate(records)]


def _read_records(path: Path, raw: str, limit: int | None) -> list[tuple[object, str]]:
    """(record, where) pairs; ``where`` locates the record in the file for error messages."""
    if path.suffix != ".jsonl":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after a first object: JSON lines in a .json file
                raise AtvSparseError(f"multimodal calibration file {path} is not valid JSON "
                                     f"(line {e.lineno}, column {e.colno}: {e.msg})") from None
        except (ValueError, RecursionError) as e:  # an integer past 4300 digits, nesting past the stack
            raise AtvSparseError(f"multimodal calibration file {path} is not valid JSON ({json_problem(e)})") from None
        else:
            if not isinstance(data, list):
                raise AtvSparseError(f"multimodal calibration file {path}: expected a JSON list of samples, "
                                     f"got a JSON {type(data).__name__}")
            return [(record, f"sample {i}") for i, record in enumerate(data[:limit])]
    return json_lines(raw, f"multimodal calibration file {path}", limit,
                      lambda index, lineno: f"sample {index} (line {lineno})")


def _conversation(path: Path, index: int, record: object, where: str) -> Conversation:
    def fail(message: str) -> AtvSparseError:
        return AtvSparseError(f"multimodal calibration file {path}, {where}: {message}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    image_field = record.get("image")
    if isinstance(image_field, list) and len(image_field) <= 1:
        image_field = image_field[0] if image_field else None
    if image_field is not None and (not isinstance(image_field, str) or not is_text(image_field)):
        raise fail(f'"image" must be one image path, got {ascii(image_field)[:80]}')

    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise fail('"conversations" must be a non-empty list of {"from": ..., "value": ...} turns')
        parsed = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or not is_text(turn["value"]):
                raise fail(f'turn {k} is not a {{"from": ..., "value": "<text>"}} object')
            role = ROLES.get(turn["from"]) if isinstance(turn.get("from"), str) else None
            if role is None:
                raise fail(f'turn {k} is from {turn.get("from")!r}; expected "human"/"user" or "gpt"/"assistant"')
            parsed.append((role, turn["value"]))
        placeholders = [k for k, (_, text) in enumerate(parsed) if IMAGE_PLACEHOLDER in text]
        count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in parsed)
        if count != (image_field is not None):
            raise fail(f"image-token count in the text does not match the images ({count} {IMAGE_PLACEHOLDER} "
                       f"placeholder(s), {int(image_field is not None)} image); give one image and one "
                       f"{IMAGE_PLACEHOLDER} in the first user turn, or neither")
        first_user = next((k for k, (role, _) in enumerate(parsed) if role == "user"), None)
        if first_user is None:
            raise fail("no user (human) turn")
        if placeholders and placeholders[0] != first_user:
            raise fail(f"the {IMAGE_PLACEHOLDER} placeholder is in turn {placeholders[0]}; "
                       f"it must be in the first user turn (turn {first_user})")
        turns = [(role, _strip_placeholder(text)) for role, text in parsed]
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not is_text(text):
            raise fail('"text" must be a string')
        count = text.count(IMAGE_PLACEHOLDER)
        if count > int(image_field is not None):
            raise fail(f"image-token count in the text does not match the images ({count} {IMAGE_PLACEHOLDER} "
                       f"placeholder(s), {int(image_field is not None)} image)")
        text = _strip_placeholder(text)
        if not text.strip() and image_field is None:
            raise fail('empty "text" and no image')
        turns = [("user", text)]
    else:
        raise fail('no "conversations" or "text" field')

    image = None if image_field is None else _load_image(path, image_field, fail)
    return Conversation(image=image, turns=turns, source=f"{path} {where.split(' (')[0]}")


def _strip_placeholder(text: str) -> str:
    """``text`` without its ``<image>`` placeholder and one newline next to it."""
    for form in (IMAGE_PLACEHOLDER + "\n", "\n" + IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER):
        if form in text:
            return text.replace(form, "", 1).strip()
    return text


def _load_image(path: Path, name: str, fail) -> Image.Image:
    from PIL import Image

    try:
        image_path = Path(name).expanduser()
    except RuntimeError:  # "~someone/..." for a user this machine does not know (found by fuzzing)
        raise fail(f"image {name[:200]!r} starts with a ~user this machine has no home directory for") from None
    if not image_path.is_absolute():
        # lexical, not resolved: a symlink the user placed inside the directory is theirs to follow
        base = os.path.abspath(path.parent)
        if os.path.commonpath([os.path.normpath(os.path.join(base, image_path)), base]) != base:
            raise fail(f"image {name[:200]!r} points outside {path.parent}; relative image paths must stay "
                       "inside the calibration file's directory")
        image_path = path.parent / image_path
    try:
        is_file = image_path.is_file()
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system
        raise fail(f"image {name[:200]!r} is not a usable path ({e})") from None
    if not is_file:
        raise fail(f"image {image_path} does not exist")
    limit = (f"a calibration image may have at most {MAX_IMAGE_PIXELS} pixels (this is a decompression bomb, "
             "or an image to downscale first)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            with Image.open(image_path, formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise fail(f"image {image_path} is {width} x {height} pixels; {limit}")
                image.load()
                return image.convert("RGB")
    except AtvSparseError:
        raise
    except Image.DecompressionBombError as e:  # past twice PIL's own limit, open() refuses before our check
        raise fail(f"image {image_path}: {str(e).split(',')[0]}; {limit}") from None
    # PIL's decoders raise whatever their parser trips on in a damaged file (OSError, SyntaxError,
    # struct.error, IndexError, ...): each means this file is not an image.
    except Exception as e:
        raise fail(f"cannot read image {image_path} ({type(e).__name__}: {str(e)[:200]}); give a PNG, JPEG, WebP, "
                   "GIF, BMP or TIFF file") from None


def conversation_messages(conv: Conversation) -> list[dict]:
    """``conv`` in the ``transformers`` chat format, the image first in the first user turn."""
    messages, image_pending = [], conv.image is not None
    for role, text in conv.turns:
        content = [{"type": "text", "text": text}]
        if image_pending and role == "user":
            content.insert(0, {"type": "image"})
            image_pending = False
        messages.append({"role": role, "content": content})
    return messages


def _fallback_prompt(processor, conv: Conversation) -> str:
    """No chat template: the image placeholder, then the turns one per line."""
    texts = [text for _, text in conv.turns]
    if conv.image is not None:
        texts[0] = f"{processor.image_token}\n{texts[0]}"
    return "\n".join(texts)


def build_sample(processor, conv: Conversation, image_token_id: int) -> dict[str, torch.Tensor]:
    """The model inputs (batch 1) for one conversation, ready for ``model(**sample)``.

    The whole conversation (question and answer) is rendered with the checkpoint's chat template
    and processed by its processor: ``input_ids`` (1, T), ``attention_mask`` and the family's
    image inputs (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``, ...).
    """
    from jinja2 import TemplateError

    images = [conv.image] if conv.image is not None else None
    if conv.image is not None and min(conv.image.size) < 1:
        # anyres processors divide by the image's sides while tiling
        raise AtvSparseError(f"calibration {conv.source}: the image is {conv.image.size[0]} x {conv.image.size[1]} px; "
                             "it has no pixels to tile")
    try:
        if getattr(processor, "chat_template", None):
            prompt = processor.apply_chat_template(conversation_messages(conv), tokenize=False)
        else:
            prompt = _fallback_prompt(processor, conv)
        kwargs = {}
        bos = getattr(processor.tokenizer, "bos_token", None)
        if bos is not None and prompt.startswith(bos):
            kwargs["add_special_tokens"] = False  # the template already wrote BOS (as apply_chat_template does)
        batch = processor(images=images, text=[prompt], return_tensors="pt", **kwargs)
    except (ValueError, TemplateError) as e:
        raise AtvSparseError(f"calibration {conv.source}: the processor cannot build the model inputs "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                             ) from None
    sample = {key: value for key, value in batch.items() if value is not None}
    n_image_tokens = int((sample["input_ids"] == image_token_id).sum())
    if conv.image is not None and n_image_tokens == 0:
        raise AtvSparseError(f"calibration {conv.source}: the processed text has no image token (id "
                             f"{image_token_id}); the chat template or processor did not insert the image placeholder")
    if conv.image is None and n_image_tokens:
        raise AtvSparseError(f"calibration {conv.source}: a text-only sample has {n_image_tokens} image "
                             f"token(s) (id {image_token_id}); remove the image placeholder from its text")
    return sample
