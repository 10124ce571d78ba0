"""Closed-choice scoring (atv_sparse.evaluation.choices): the candidates' first tokens, the tasks
left out, and each item's verdict against an independent reference that runs the plain model on
every candidate's own conversation."""

from __future__ import annotations

import copy

import pytest
import torch

from atv_sparse.errors import AtvSparseError
from atv_sparse.evaluation.choices import choice_sets, synthetic_vocabulary
from atv_sparse.evaluation.items import synthetic_items
from atv_sparse.evaluation.loading import load_model_and_processor
from atv_sparse.evaluation.metrics import summarize
from atv_sparse.evaluation.prompts import chat_messages, end_of_turn_ids, tokenizer_of
from atv_sparse.evaluation.scoring import cache_decoder_inputs, evaluate_model, prepare_items
from atv_sparse.tinybench import model as tiny_vlm
from atv_sparse.tinybench import tasks as synthetic


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """An untrained tiny VLM (the bundled model's architecture, random weights) and its processor."""
    return load_model_and_processor(tiny_vlm.write_untrained(tmp_path_factory.mktemp("vlm") / "untrained", seed=3))


def _reference_choice(model, processor, item, answers) -> bool:
    """Independent of the scorer: each candidate's whole conversation tokenized on its own, the
    plain model's logits at the first position where the candidates' ids differ from the prompt."""
    def ids(answer=None):
        msgs = chat_messages(item, answer is not None)
        if answer is not None:
            msgs[-1]["content"][0]["text"] = answer
        text = processor.apply_chat_template(msgs, add_generation_prompt=answer is None, tokenize=False)
        kwargs = {"images": [item.image]} if item.image is not None else {}
        return processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)

    prompt = ids()
    n = prompt["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**prompt).logits[0, -1].float()
    first = [int(ids(a)["input_ids"][0, n]) for a in answers]
    gold = float(logits[first[answers.index(item.answer)]])
    return all(float(logits[f]) < gold for a, f in zip(answers, first, strict=True) if a != item.answer)


def test_closed_choice_matches_an_independent_reference(vlm):
    model, processor = vlm
    model = copy.deepcopy(model)
    with torch.no_grad():  # a sharper output distribution than the untrained init: verdicts differ per item
        model.get_output_embeddings().weight.mul_(8)
    items = synthetic_items(3, seed=11)
    vocabulary = synthetic_vocabulary(synthetic.TASKS)
    prepared = prepare_items(model, processor, items, batch_size=8, vocabulary=vocabulary)
    assert set(prepared.choices) == {"attribute", "relation", "exist_random", "exist_adversarial", "count", "ocr",
                                     "mcq", "compose_colour", "compose_count"}
    assert set(prepared.choices_left_out) == {"arithmetic", "facts"}
    assert prepared.choices["compose_count"].answers == tuple(str(n) for n in range(1, 10))
    records = evaluate_model(model, processor, prepared, progress=False)["records"]
    cached = evaluate_model(model, processor, cache_decoder_inputs(model, prepared), progress=False)["records"]
    assert cached == records
    verdicts = []
    for it, rec in zip(items, records, strict=True):
        if it.task in prepared.choices:
            want = _reference_choice(model, processor, it, prepared.choices[it.task].answers)
            assert rec["choice_correct"] == want, (it.task, it.key)
            verdicts.append(want)
        else:
            assert "choice_correct" not in rec
    assert 0 < sum(verdicts) < len(verdicts)  # the comparison was not vacuous
    summary = evaluate_model(model, processor, prepared, progress=False)
    assert summary["average_choice"] == pytest.approx(sum(verdicts) / len(verdicts))  # 3 items in every task


def test_tasks_with_clashing_or_too_many_candidates_are_left_out(vlm):
    model, processor = vlm
    items = synthetic_items(2, seed=2, tasks=("relation", "count", "facts"))
    eos = end_of_turn_ids(model, tokenizer_of(processor))
    vocabulary = {"relation": ("above", "above below", "below", "left", "right"), "count": tuple(map(str, range(7))),
                  "facts": synthetic_vocabulary(("facts",))["facts"]}
    chosen, left_out = choice_sets(processor, items, vocabulary, eos)
    assert list(chosen) == ["count"] and chosen["count"].first_ids.unique().numel() == 7
    assert "share a first token (above, above below)" in left_out["relation"]
    assert "open-ended" in left_out["facts"]
    many = tuple(f"w{k}" for k in range(40))
    _, left_out = choice_sets(processor, items, {"count": many, "relation": ("left",)}, eos)
    assert "more than 32" in left_out["count"] and "needs 2 or more" in left_out["relation"]
    with pytest.raises(AtvSparseError, match="task 'relation'.*not among its candidate answers"):
        choice_sets(processor, items, {"relation": ("left", "right")}, eos)


def test_closed_answers_hold_every_answer_the_generators_give():
    """The declared candidate sets contain every answer drawn from the test and train splits, and
    each declared answer is drawn (no candidate a task cannot produce, no answer left out)."""
    for task in synthetic.TASKS:
        answers = synthetic.closed_answers(task)
        if answers is None:
            assert task in synthetic.TEXT_TASKS
            continue
        drawn = {it.answer for split in ("test", "train") for seed in (0, 1, 2)
                 for it in synthetic.generate(task, split, 1500, seed)}
        assert drawn <= set(answers), (task, drawn - set(answers))
        # compose_count's 8 and 9 need 5-6 shapes of one colour: rare, but the generator allows them.
        assert set(answers) - drawn <= ({"8", "9"} if task == "compose_count" else set()), task


def test_ties_are_wrong():
    from atv_sparse.evaluation.choices import choice_correct

    logits = torch.zeros(10)
    ids = torch.tensor([2, 5, 7])
    logits[5], logits[7] = 1.0, 1.0
    assert not choice_correct(logits, ids, 5) and not choice_correct(logits, ids, 7)
    logits[7] = 0.5
    assert choice_correct(logits, ids, 5) and not choice_correct(logits, ids, 2)


def test_summarize_averages_closed_choice_over_the_tasks_that_have_it():
    records = [{"task": "a", "key": "1", "correct": False, "nll": 1.0, "choice_correct": True},
               {"task": "a", "key": "2", "correct": False, "nll": 1.0, "choice_correct": False},
               {"task": "b", "key": "3", "correct": True, "nll": 1.0, "choice_correct": True},
               {"task": "c", "key": "4", "correct": True, "nll": 1.0}]
    s = summarize(records)
    assert s["tasks"]["a"]["choice_accuracy"] == 0.5 and s["tasks"]["b"]["choice_accuracy"] == 1.0
    assert "choice_accuracy" not in s["tasks"]["c"]
    assert s["average_choice"] == pytest.approx(0.75)
    assert "average_choice" not in summarize([records[-1]])


def test_evaluate_cli_reports_closed_choice(tmp_path, capsys):
    """``evaluate --choices``: a choice column for the closed tasks, the left-out ones named, the
    JSON's per-item verdicts summing to the task's choice accuracy; refused with ``--scorer generate``."""
    from atv_sparse.evaluate import main

    model_dir = tiny_vlm.write_untrained(tmp_path / "untrained", seed=4)
    out = tmp_path / "scores.json"
    assert main([str(model_dir), "--tasks", "count", "relation", "facts", "--per-task", "3", "--choices", "--quiet",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "choice" in printed.splitlines()[0] and "closed choice: facts left out (open-ended" in printed
    import json

    report = json.loads(out.read_text())
    for task in ("count", "relation"):
        verdicts = [r["choice_correct"] for r in report["records"] if r["task"] == task]
        assert len(verdicts) == 3 and report["tasks"][task]["choice_accuracy"] == pytest.approx(sum(verdicts) / 3)
    assert "choice_accuracy" not in report["tasks"]["facts"] and report["choices_left_out"].keys() == {"facts"}
    assert main([str(model_dir), "--choices", "--scorer", "generate"]) == 2
    assert "cannot be combined with --scorer generate" in capsys.readouterr().err
