"""Scores of short-answer items: answer normalisation, exact match, per-task summaries, retention
against a dense baseline and paired differences. Pure functions of the per-item records
(``{task, key, correct, nll}`` dicts, see :mod:`atv_sparse.evaluation.scoring`)."""

from __future__ import annotations

import math
import re

from ..errors import AtvSparseError

_ARTICLES = re.compile(r"^(a|an|the)\s+")
_PUNCT_EDGES = re.compile(r"^[\s\"'.,;:!?()\[\]]+|[\s\"'.,;:!?()\[\]]+$")


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and quotes and a leading article
    dropped: ``" The Red."`` -> ``"red"``."""
    text = " ".join(text.lower().split())
    text = _PUNCT_EDGES.sub("", text)
    return _ARTICLES.sub("", text)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def summarize(records: list[dict]) -> dict:
    """Per-task and average scores of per-item ``records`` ({task, key, correct, nll[, choice_correct]}).

    Returns ``{"tasks": {task: {n, distinct, accuracy, nll[, choice_accuracy]}}, "average": mean
    accuracy over tasks, "average_nll": mean of the task NLLs[, "average_choice": mean closed-choice
    accuracy over the tasks that have one]}``; tasks in order of first appearance. A task has a
    ``choice_accuracy`` when every one of its records has ``choice_correct``.
    """
    if not records:
        raise AtvSparseError("nothing to score: the evaluation set is empty")
    tasks: dict[str, list[dict]] = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r)
    out = {}
    for task, rs in tasks.items():
        out[task] = {"n": len(rs), "distinct": len({r["key"] for r in rs}),
                     "accuracy": sum(bool(r["correct"]) for r in rs) / len(rs),
                     "nll": sum(r["nll"] for r in rs) / len(rs)}
        if all("choice_correct" in r for r in rs):
            out[task]["choice_accuracy"] = sum(bool(r["choice_correct"]) for r in rs) / len(rs)
    summary = {"tasks": out, "average": sum(t["accuracy"] for t in out.values()) / len(out),
               "average_nll": sum(t["nll"] for t in out.values()) / len(out)}
    chosen = [t["choice_accuracy"] for t in out.values() if "choice_accuracy" in t]
    if chosen:
        summary["average_choice"] = sum(chosen) / len(chosen)
    return summary


def retention(accuracy: float, baseline_accuracy: float) -> float | None:
    """100 * accuracy / baseline_accuracy (percent of the dense score); None when the baseline is 0."""
    return None if baseline_accuracy == 0 else 100.0 * accuracy / baseline_accuracy


def paired_difference(correct: list[bool], baseline_correct: list[bool]) -> tuple[float, float]:
    """(mean of correct - baseline_correct, its standard error) over the same items, in points (x100)."""
    if len(correct) != len(baseline_correct) or not correct:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    diffs = [float(a) - float(b) for a, b in zip(correct, baseline_correct, strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return 100.0 * mean, 100.0 * math.sqrt(var / len(diffs))


def compare(result: dict, baseline: dict) -> dict:
    """Retention and paired differences of ``result`` against ``baseline`` (both from
    :func:`atv_sparse.evaluation.scoring.evaluate_model` on the same items). Adds per task ``baseline_accuracy``,
    ``retention`` (%), ``delta`` and ``delta_se`` (points), and ``average_retention``."""
    keys = [(r["task"], r["key"]) for r in result["records"]]
    if keys != [(r["task"], r["key"]) for r in baseline["records"]]:
        raise AtvSparseError("the baseline was scored on different items; evaluate both on the same set")
    tasks = {}
    for task, scores in result["tasks"].items():
        base = baseline["tasks"][task]["accuracy"]
        ours = [r["correct"] for r in result["records"] if r["task"] == task]
        theirs = [r["correct"] for r in baseline["records"] if r["task"] == task]
        delta, se = paired_difference(ours, theirs)
        tasks[task] = {**scores, "baseline_accuracy": base, "retention": retention(scores["accuracy"], base),
                       "delta": delta, "delta_se": se}
    kept = [t["retention"] for t in tasks.values() if t["retention"] is not None]
    return {**result, "tasks": tasks, "baseline_average": baseline["average"],
            "average_retention": sum(kept) / len(kept) if kept else None}

