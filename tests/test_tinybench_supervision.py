"""The training-only labels of atv_sparse.tinybench.supervision agree with the tasks' answers and the pixels."""

import random

import numpy
import pytest
import torch
from atv_sparse.tinybench import supervision
from atv_sparse.tinybench import tasks as synthetic


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
            refs = supervision.referents(scene, question)
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
    scene, turns = next(s for s in _turns(seed=3) if any(supervision.referents(s[0], q) for q, _ in s[1]))
    labels = supervision.referent_labels(scene, turns)
    assert labels.shape == (len(turns), supervision.REF_SLOTS * len(supervision.REF_CLASSES))
    for t, (question, _) in enumerate(turns):
        refs = supervision.referents(scene, question)[:supervision.REF_SLOTS]
        expected = torch.zeros(supervision.REF_SLOTS * 4, dtype=torch.long)
        for k, obj in enumerate(refs):
            expected[4 * k:4 * k + 4] = torch.tensor([obj.row + 1, obj.col + 1,
                                                       supervision.COLOURS.index(obj.colour) + 1,
                                                       supervision.SHAPES.index(obj.shape) + 1])
        assert torch.equal(labels[t], expected)
        assert (labels[t] < torch.tensor(supervision.REF_CLASSES * supervision.REF_SLOTS)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_anyres_patch_labels_follow_the_pixels(seed):
    """Every crop's patch labels (base view, then the 2 x 2 tiles of the 112 px image) name the
    colour drawn in that patch of that crop: checked against the rendered pixels."""
    from atv_sparse.tinybench.scenes import COLOURS as RGB

    items = synthetic.generate("count", "train", 6, seed=seed)
    for item in items:
        labels = supervision.anyres_patch_labels(item, 112)
        assert labels.shape == (5, 64, len(supervision.PATCH_CLASSES))
        assert torch.equal(labels[0], supervision.patch_labels(item))
        full = numpy.asarray(item.scene.render(item.render_seed, size=112))
        base = numpy.asarray(item.scene.render(item.render_seed))
        crops = [base] + [full[r:r + 56, c:c + 56] for r in (0, 56) for c in (0, 56)]
        coloured = 0
        for crop, crop_labels in zip(crops, labels, strict=True):
            for k, (colour, *_rest) in enumerate(crop_labels.tolist()):
                if colour:
                    patch = crop[7 * (k // 8):7 * (k // 8) + 7, 7 * (k % 8):7 * (k % 8) + 7].reshape(-1, 3)
                    rgb = RGB[supervision.COLOURS[colour - 1]]
                    assert (patch == numpy.array(rgb)).all(1).sum() >= 6, (item.question, k)
                    coloured += 1
        assert coloured > 0
