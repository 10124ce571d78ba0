"""Closed-choice scoring: which of a task's possible answers the model ranks first.

Teacher-forced exact match asks for the reference answer's every token as the argmax over the whole
vocabulary. A weak or heavily pruned model fails that on almost every item even where it still
prefers the right answer among the task's answers (lm-evaluation-harness scores multiple-choice
tasks by such a ranking for this reason). Closed-choice accuracy compares, at the answer's first
position, the logits of the first tokens of the task's candidate answers: one number per item from
the logits the teacher-forced pass already computes, no further forward pass.

That ranking decides between candidates only when their first tokens differ; a task whose
candidates share a first token (``"1"`` and ``"10"`` under a tokenizer that splits digits), has
fewer than 2 or more than ``max_candidates`` of them, or has no closed answer set (open-ended
answers) is left out (:func:`choice_sets` says which and why). A tie for the highest logit (bf16
logits tie) counts as wrong: the reference must be ranked strictly first.
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


def synthetic_vocabulary(tasks: tuple[str, ...]) -> dict[str, tuple[str, ...] | None]:
    """Each synthetic task's candidates: every answer its generator can give
    (:func:`atv_sparse.tinybench.tasks.closed_answers`), None for the open-ended ones."""
    from ..tinybench import tasks as synthetic

    return {t: synthetic.closed_answers(t) for t in tasks}


def first_answer_ids(processor, item: EvalItem, answers: tuple[str, ...], eos: set[int]) -> list[int]:
    """The first token id of each answer as it follows ``item``'s prompt in the chat template
    (the item without its image: the answer's tokens do not depend on it)."""
    probes = [dataclasses.replace(item, image=None, answer=a) for a in answers]
    _, targets = teacher_forced_inputs(processor, probes, eos)
    return [t[0] for _, _, t in targets]


def choice_sets(processor, items: list[EvalItem], vocabulary: dict[str, tuple[str, ...] | None], eos: set[int],
                max_candidates: int = 32) -> tuple[dict[str, ChoiceSet], dict[str, str]]:
    """(task -> :class:`ChoiceSet`, task -> why it is left out) for the tasks of ``items`` named in
    ``vocabulary`` (None: an open-ended task). Raises when an item's reference answer is not among
    its task's candidates."""
    chosen, left_out = {}, {}
    for task, answers in vocabulary.items():
        task_items = [it for it in items if it.task == task]
        if not task_items:
            continue
        if answers is None:
            left_out[task] = "open-ended answers (no closed candidate set)"
            continue
        if len(answers) > max_candidates or len(answers) < 2:
            left_out[task] = (f"{len(answers)} candidate answers (more than {max_candidates})" if len(answers) > 1
                              else f"{len(answers)} candidate answer (a choice needs 2 or more)")
            continue
        missing = sorted({it.answer for it in task_items} - set(answers))
        if missing:
            raise AtvSparseError(f"task {task!r}: reference answer(s) {', '.join(map(repr, missing))} are not among "
                                 "its candidate answers")
        ids = first_answer_ids(processor, task_items[0], answers, eos)
        shared = {i for i in ids if ids.count(i) > 1}
        if shared:
            clash = [a for a, i in zip(answers, ids, strict=True) if i in shared]
            left_out[task] = f"candidates share a first token ({', '.join(clash[:4])})"
            continue
        chosen[task] = ChoiceSet(tuple(answers), torch.tensor(ids, dtype=torch.long))
    return chosen, left_out


def choice_correct(first_logits: torch.Tensor, first_ids: torch.Tensor, gold_id: int) -> bool:
    """Whether the reference answer's first token (``gold_id``) has a higher logit than every other
    candidate's first token (a tie is wrong). ``first_logits``: (vocab,) at the answer's first position."""
    scores = first_logits[first_ids]
    gold = scores[first_ids == gold_id]
    return bool((scores[first_ids != gold_id] < gold).all())
