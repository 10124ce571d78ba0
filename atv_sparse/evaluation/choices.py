"""Closed-choice scoring: which of a task's possible answers the model ranks first.

Teacher-forced exact match asks for the reference answer's every token as the argmax over the whole
vocabulary. A weak or heavily pruned model fails that on almost every item even where it still
prefers the right answer among the task's answers (lm-evaluation-harness scores multiple-choice
tasks by such a ranking for this reason). Closed-choice accuracy compares, at the answer's first
position, the logits of the first tokens of the task's candidate answers: one number per item from
the logits the teacher-forced pass already computes, no further forward pass.

That ranking decides between candidates only when their first tokens differ; a task whose
candidates share a first token (``"1"`` and ``"10"`` under a tokenizer that splits digits) or has
more than ``max_candidates`` of them is left out (:func:`choice_sets` says which and why).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import AtvSparseError
from .items import EvalItem
from .prompts import teacher_forced_inputs


@dataclasses.dataclass
class ChoiceSet:
    """One task's candidate answers and the id of each one's first answer token (distinct)."""

    answers: tuple[str, ...]
    first_ids: torch.Tensor  # (len(answers),) int64


def synthetic_vocabulary(tasks: tuple[str, ...], draws: int = 400, seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Every answer among ``draws`` items of each synthetic task's test split (sorted): the
    candidates of closed-choice scoring. 400 draws find every answer of the closed tasks
    (at most 9 of them)."""
    from ..tinybench import tasks as synthetic

    return {t: tuple(sorted({it.answer for it in synthetic.generate(t, "test", draws, seed)})) for t in tasks}


def first_answer_ids(processor, item: EvalItem, answers: tuple[str, ...], eos: set[int]) -> list[int]:
    """The first token id of each answer as it follows ``item``'s prompt in the chat template
    (the item without its image: the answer's tokens do not depend on it)."""
    probes = [dataclasses.replace(item, image=None, answer=a) for a in answers]
    _, targets = teacher_forced_inputs(processor, probes, eos)
    return [t[0] for _, _, t in targets]


def choice_sets(processor, items: list[EvalItem], vocabulary: dict[str, tuple[str, ...]], eos: set[int],
                max_candidates: int = 32) -> tuple[dict[str, ChoiceSet], dict[str, str]]:
    """(task -> :class:`ChoiceSet`, task -> why it is left out) for the tasks of ``items`` named in
    ``vocabulary``. Raises when an item's reference answer is not among its task's candidates."""
    chosen, left_out = {}, {}
    for task, answers in vocabulary.items():
        task_items = [it for it in items if it.task == task]
        if not task_items:
            continue
        missing = sorted({it.answer for it in task_items} - set(answers))
        if missing:
            raise AtvSparseError(f"task {task!r}: reference answer(s) {', '.join(map(repr, missing))} are not among "
                                 "its candidate answers")
        if len(answers) > max_candidates:
            left_out[task] = f"{len(answers)} candidate answers (more than {max_candidates})"
            continue
        ids = first_answer_ids(processor, task_items[0], answers, eos)
        shared = {i for i in ids if ids.count(i) > 1}
        if shared:
            clash = [a for a, i in zip(answers, ids, strict=True) if i in shared]
            left_out[task] = f"candidates share a first token ({', '.join(clash[:4])})"
            continue
        chosen[task] = ChoiceSet(tuple(answers), torch.tensor(ids, dtype=torch.long))
    return chosen, left_out


def choice_correct(first_logits: torch.Tensor, first_ids: torch.Tensor, gold_id: int) -> bool:
    """Whether the reference answer's first token (``gold_id``) has the highest logit among the
    candidates' first tokens. ``first_logits``: (vocab,) at the answer's first position."""
    return int(first_ids[first_logits[first_ids].argmax()]) == gold_id
