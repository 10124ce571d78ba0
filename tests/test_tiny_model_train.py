"""The training-only labels of benchmarks/tiny_model/train.py agree with the tasks' answers."""

import random

import pytest
import torch
from script_modules import load_script

from atv_sparse.tinybench import tasks as synthetic

train = load_script("benchmarks/tiny_model/train.py")


def _turns(seed: int, per_task: int = 40):
    rng = random.Random(seed)
    extra = {t: 1.0 for t in synthetic.IMAGE_TASKS} | {"caption": 0.2}
    for task in synthetic.IMAGE_TASKS:
        for _ in range(per_task):
            first, turns = synthetic.training_turns(rng, task, 6, extra, min_turns=4)
            yield first.scene, turns


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_referents_answer_the_question(seed):
    """Answering from the referents alone gives the task's answer: the head is taught the objects
    the answer really depends on, in the order it needs them."""
    seen = set()
    for scene, turns in _turns(seed=seed):
        for question, answer in turns:
            refs = train.referents(scene, question)
            line = question.split("\n")[0]
            assert all(obj in scene.objects for obj in refs), question
            if "to the left or to the right" in line:
                kind, expected = "relation", "left" if refs[0].col < refs[1].col else "right"
            elif "above or below" in line:
                kind, expected = "relation", "above" if refs[0].row < refs[1].row else "below"
            elif line.startswith("What colour is the shape"):
                kind, expected = "compose", refs[1].colour
                assert len(refs) == 2 and refs[0] is not refs[1]
            elif line.startswith("What colour is the"):
                kind = "colour"
                assert len(refs) == 1
                expected = refs[0].colour
                if "\n" in question:  # multiple choice: the answer is the letter of that colour
                    options = dict(opt.split(". ") for opt in question.split("\n")[1:-1])
                    expected = next(letter for letter, text in options.items() if text == expected)
            elif line.startswith("What shape is the"):
                kind, expected = "shape", refs[0].shape
                assert len(refs) == 1
            elif line.startswith("Is there"):
                kind, expected = "exist", "yes" if refs else "no"
            else:
                kind, expected = "none", answer
                assert refs == [], question
            assert expected == answer, (question, answer, refs)
            seen.add(kind)
    assert seen == {"relation", "compose", "colour", "shape", "exist", "none"}


def test_referent_labels_encode_cell_colour_shape():
    scene, turns = next(s for s in _turns(seed=3) if any(train.referents(s[0], q) for q, _ in s[1]))
    labels = train.referent_labels(scene, turns)
    assert labels.shape == (len(turns), train.REF_SLOTS * len(train.REF_CLASSES))
    for t, (question, _) in enumerate(turns):
        refs = train.referents(scene, question)[:train.REF_SLOTS]
        expected = torch.zeros(train.REF_SLOTS * 4, dtype=torch.long)
        for k, obj in enumerate(refs):
            expected[4 * k:4 * k + 4] = torch.tensor([obj.row + 1, obj.col + 1,
                                                       train.COLOURS.index(obj.colour) + 1,
                                                       train.SHAPES.index(obj.shape) + 1])
        assert torch.equal(labels[t], expected)
        assert (labels[t] < torch.tensor(train.REF_CLASSES * train.REF_SLOTS)).all()
