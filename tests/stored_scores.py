"""Re-scoring a bundled model's first test items against the per-item results it ships with
(``test_scores.json``, written by ``atv_sparse.evaluation.scorecard.record_test_scores``)."""

import json
from pathlib import Path

import pytest

from atv_sparse.evaluation.items import scene_size, synthetic_items
from atv_sparse.evaluation.loading import load_model_and_processor
from atv_sparse.evaluation.scoring import evaluate_model


def rescore_first_items(model_dir: Path, per_task: int):
    """Score the first ``per_task`` items of every task again (seed 0, scenes at the model's size):
    (stored scores, number of items whose correctness differs from the stored one, model, processor).
    Also checks that every stored accuracy is the share of its stored per-item results."""
    scores = json.loads((model_dir / "test_scores.json").read_text())
    assert scores["per_task"] == 500 and scores["seed"] == 0
    model, proc = load_model_and_processor(model_dir)
    items = synthetic_items(per_task, seed=0, size=scene_size(proc))
    result = evaluate_model(model, proc, items, progress=False)
    stored = [scores["tasks"][it.task]["correct"][k % per_task] == "1" for k, it in enumerate(items)]
    got = [r["correct"] for r in result["records"]]
    for s in scores["tasks"].values():
        assert s["accuracy"] == pytest.approx(s["correct"].count("1") / len(s["correct"]))
    return scores, sum(a != b for a, b in zip(got, stored, strict=True)), model, proc
