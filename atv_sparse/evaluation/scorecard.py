"""A bundled model's test scores (``test_scores.json`` beside its weights in
``atv_sparse/assets/<name>``), which the model card reports and the tests re-score item by item."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .items import scene_size, synthetic_items
from .loading import load_model_and_processor
from .scoring import evaluate_model


def record_test_scores(model_dir: Path, per_task: int = 500, seed: int = 0) -> tuple[object, dict]:
    """Score ``model_dir`` on ``per_task`` synthetic test items per task (``seed``; scenes at the
    model's :func:`~.items.scene_size`), teacher-forced, and write ``test_scores.json`` there: per
    task the accuracy, answer NLL, item and distinct-item counts and the per-item correctness as a
    0/1 string in item order. Returns (model, scores)."""
    model, processor = load_model_and_processor(model_dir)
    size = scene_size(processor)
    items = synthetic_items(per_task, seed, size=size)
    t0 = time.time()
    result = evaluate_model(model, processor, items, progress=False)
    seconds = time.time() - t0
    tasks = {}
    for task, s in result["tasks"].items():
        correct = "".join("1" if r["correct"] else "0" for r in result["records"] if r["task"] == task)
        tasks[task] = {**s, "correct": correct}
    scores = {"per_task": per_task, "seed": seed, "scorer": "teacher-forced", "image_size": size or 56,
              "average": result["average"], "average_nll": result["average_nll"], "eval_seconds": round(seconds, 1),
              "tasks": tasks}
    (model_dir / "test_scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    return model, scores
