"""The items to score: :class:`EvalItem` (a question, its reference answer and an optional image),
from the synthetic test split or from a JSONL file of ``{"image", "question", "answer"[, "task"]}``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import AtvSparseError
from ..textfiles import is_text, json_lines, read_user_text


@dataclasses.dataclass
class EvalItem:
    """One question: ``image`` RGB or None (text only), ``key`` identifies the item for distinct counts."""

    task: str
    question: str
    answer: str
    image: object = None
    key: str = ""


def synthetic_items(per_task: int = 500, seed: int = 0, tasks: tuple[str, ...] | None = None,
                    size: int | None = None) -> list[EvalItem]:
    """The synthetic test split as :class:`EvalItem`, images rendered ``size`` px square (None: the
    scenes' own 56 px; :func:`scene_size` gives a model's)."""
    from ..tinybench import tasks as synthetic

    tasks = tuple(tasks) if tasks else synthetic.TASKS
    unknown = [t for t in tasks if t not in synthetic.TASKS]
    if unknown:
        raise AtvSparseError(f"unknown task(s) {', '.join(unknown)}; the synthetic tasks are "
                             f"{', '.join(synthetic.TASKS)}")
    return [EvalItem(it.task, it.question, it.answer,
                     it.image() if size is None or it.scene is None else it.scene.render(it.render_seed, size=size),
                     it.key)
            for it in synthetic.test_items(per_task, seed, tasks)]


def scene_size(processor) -> int | None:
    """The side at which a model sees the synthetic scenes: an anyres (LLaVA-NeXT) processor's
    smallest square pinpoint above its crop (the tiny LLaVA-NeXT: 112 px, 5 crops), as in
    calibration; None (the scenes' own 56 px) for other processors."""
    from ..calib.samples import synthetic_image_size

    return synthetic_image_size(getattr(processor, "image_processor", None))


def read_eval_file(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The items of a JSONL file; every problem is an error naming the file and line."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    source = f"evaluation file {path}"
    items = []
    for record, line in json_lines(read_user_text(path, "evaluation file"), source, limit):
        where = f"{source}, {line}"
        if not isinstance(record, dict):
            raise AtvSparseError(f"{where}: expected a JSON object with \"question\" and \"answer\"")
        for field in ("question", "answer"):
            if field not in record:
                raise AtvSparseError(f'{where}: missing field "{field}" (each line needs "question", "answer" and '
                                     'optionally "image" and "task")')
            if not isinstance(record[field], str) or not record[field].strip():
                raise AtvSparseError(f'{where}: "{field}" must be a non-empty string')
        task = record.get("task", "data")
        if not isinstance(task, str) or not task:
            raise AtvSparseError(f'{where}: "task" must be a non-empty string')
        for field in ("question", "answer", "task"):
            if field in record and not is_text(record[field]):
                raise AtvSparseError(f'{where}: "{field}" holds an unpaired surrogate escape (\\ud800-\\udfff), '
                                     "which is not text")
        image = None
        if record.get("image") is not None:
            if not isinstance(record["image"], str):
                raise AtvSparseError(f'{where}: "image" must be a path (string) or null')
            image_path = Path(record["image"]).expanduser()
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            try:
                with Image.open(image_path) as im:
                    im.load()
                    image = im.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                raise AtvSparseError(f"{where}: cannot read image {image_path} ({type(e).__name__}: {e})") from None
        key = f"{record.get('image')}#{record['question']}"
        items.append(EvalItem(task, record["question"], record["answer"], image, key))
    if not items:
        raise AtvSparseError(f"evaluation file {path} is empty (no JSON lines)")
    return items


def limit_items(items: list[EvalItem], per_task: int | None = None, limit: int | None = None) -> list[EvalItem]:
    """At most ``per_task`` items of each task (first ones), then at most ``limit`` in total."""
    if per_task is not None:
        seen: dict[str, int] = {}
        kept = []
        for it in items:
            if seen.get(it.task, 0) < per_task:
                kept.append(it)
                seen[it.task] = seen.get(it.task, 0) + 1
        items = kept
    return items if limit is None else items[:limit]
