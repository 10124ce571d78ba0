"""Synthetic tasks: deterministic from a seed, disjoint splits, balanced answers, correct answers."""

import random
import re
from collections import Counter

import pytest

from atv_sparse.calib.multimodal import Conversation
from atv_sparse.tinybench import tasks as synthetic
from atv_sparse.tinybench.scenes import COLOURS, GRID, IMAGE_SIZE, Obj, Scene, caption
from atv_sparse.tinybench.tasks import (ARITHMETIC_TEMPLATES, FACT_TEMPLATES, IMAGE_TASKS, SPLITS, TASKS, TEXT_TASKS,
                                        arithmetic_items, calibration_conversations, generate, knowledge_base,
                                        split_of)

N_SPLIT = 150  # items per split in the disjointness checks


def _fingerprint(items):
    return [(it.task, it.question, it.answer, it.key, None if it.scene is None else it.image().tobytes())
            for it in items]


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_bytes(task):
    a, b = generate(task, "test", 25, seed=7), generate(task, "test", 25, seed=7)
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(a) != _fingerprint(generate(task, "test", 25, seed=8))


def test_calibration_conversations_deterministic():
    a, b = calibration_conversations(12, seed=3), calibration_conversations(12, seed=3)
    assert all(isinstance(c, Conversation) for c in a)
    assert [(c.turns, c.image.tobytes()) for c in a] == [(c.turns, c.image.tobytes()) for c in b]
    other = calibration_conversations(12, seed=4)
    assert [c.turns for c in a] != [c.turns for c in other]
    assert any(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, other, strict=True))
    for c in a:
        assert c.image.mode == "RGB" and c.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert [role for role, _ in c.turns] == ["user", "assistant"] * (len(c.turns) // 2)
        assert all(text.strip() for _, text in c.turns)
    bigger = calibration_conversations(12, seed=3, size=96)
    assert [c.turns for c in bigger] == [c.turns for c in a] and bigger[0].image.size == (96, 96)
    assert any(text == "Describe the image." for c in a for _, text in c.turns)  # captions are in the mix


def test_calibration_images_come_from_the_calibration_split():
    rng = random.Random(0)
    for _ in range(40):
        item = synthetic.draw_item(rng.choice(list(IMAGE_TASKS)), "calibration", rng)
        assert split_of(item.scene.key()) == "calibration"


@pytest.mark.parametrize("task", list(IMAGE_TASKS))
def test_image_splits_never_share_an_image(task):
    keys = {split: {it.scene.key() for it in generate(task, split, N_SPLIT, seed=i)}
            for i, split in enumerate(SPLITS)}
    for split, ks in keys.items():
        assert all(split_of(k) == split for k in ks)
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["calibration"]
    assert not keys["calibration"] & keys["test"]


def test_split_fractions():
    rng = random.Random(1)
    counts = Counter(split_of(f"scene {rng.random()}") for _ in range(20000))
    assert abs(counts["test"] / 20000 - 0.10) < 0.01
    assert abs(counts["calibration"] / 20000 - 0.05) < 0.01


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_text_splits_use_disjoint_wordings_of_known_items(task):
    """Every item has 4 templates: test 1, calibration 1, train 2; a test question is a wording
    that training never uses for that item (training teaches the fact in the other wordings)."""
    if task == "facts":
        units = [(f"{e}|{r}", [t.format(e=e) for t in FACT_TEMPLATES[r]]) for e, r, _ in knowledge_base()]
    else:
        units = [(f"{a}|{op}|{b}", [t.format(a=a, b=b) for t in ARITHMETIC_TEMPLATES[op]])
                 for a, op, b, _ in arithmetic_items()]
    for key, wordings in units[:: max(1, len(units) // 60)]:
        allowed = {split: {wordings[i] for i in synthetic._template_index(key, split)} for split in SPLITS}
        assert len(allowed["train"]) == 2 and len(allowed["test"]) == 1 and len(allowed["calibration"]) == 1
        assert not allowed["train"] & allowed["test"] and not allowed["calibration"] & allowed["test"]
    questions = {split: {it.question for it in generate(task, split, 400, seed=5)} for split in SPLITS}
    assert not questions["train"] & questions["test"]
    assert not questions["calibration"] & questions["test"]


def test_text_test_items_are_distinct_up_to_the_item_count():
    assert len({it.key for it in generate("facts", "test", 400)}) == 400
    assert len({it.key for it in generate("arithmetic", "test", 500)}) == 500


def test_knowledge_base_has_hundreds_of_distinct_facts():
    facts = knowledge_base()
    assert len(facts) == 400 and len({(e, r) for e, r, _ in facts}) == 400
    capitals = [v for _, r, v in facts if r == "capital"]
    assert len(set(capitals)) == len(capitals) == 200
    for it in generate("facts", "test", 50):
        entity = next(e for e, _, _ in facts if e in it.question)
        relation = "capital" if "capital" in it.question else "animal"
        assert (entity, relation, it.answer) in facts


def _fraction(items, answer):
    return sum(it.answer == answer for it in items) / len(items)


@pytest.mark.parametrize("task", ["exist_random", "exist_adversarial"])
def test_existence_is_balanced(task):
    items = generate(task, "test", 600, seed=2)
    # 600 fair coin flips: standard error 0.02; 4 SE.
    assert abs(_fraction(items, "yes") - 0.5) < 0.08
    assert set(Counter(it.answer for it in items)) == {"yes", "no"}


def test_adversarial_negatives_are_hard():
    """A "no" names a colour and a shape that are both in the image, never together."""
    for it in generate("exist_adversarial", "test", 300, seed=3):
        colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", it.question).groups()
        assert it.scene.has(colour, shape) == (it.answer == "yes")
        if it.answer == "no":
            assert it.scene.with_colour(colour) and it.scene.with_shape(shape)


def test_mcq_letters_and_relations_are_balanced():
    letters = Counter(it.answer for it in generate("mcq", "test", 800, seed=4))
    assert set(letters) == set("ABCD")
    assert all(abs(n / 800 - 0.25) < 0.07 for n in letters.values())  # SE 0.015, > 4 SE
    relation = Counter(it.answer for it in generate("relation", "test", 800, seed=4))
    assert set(relation) == {"left", "right", "above", "below"}
    assert abs(relation["left"] - relation["right"]) < 0.25 * (relation["left"] + relation["right"])
    assert abs(relation["above"] - relation["below"]) < 0.25 * (relation["above"] + relation["below"])


def test_mcq_options_hold_the_answer_once():
    for it in generate("mcq", "test", 100, seed=6):
        lines = it.question.split("\n")
        options = {line[0]: line[3:] for line in lines[1:5]}
        assert sorted(options) == list("ABCD") and len(set(options.values())) == 4
        if lines[0].startswith("What colour is the "):
            shape = lines[0].removeprefix("What colour is the ").rstrip("?")
            assert options[it.answer] == it.scene.with_shape(shape)[0].colour
        else:
            assert options[it.answer] == str(len(it.scene.objects))


# A hand-built scene (4 x 4 grid, last column and row empty):
#     red square | .              | blue circle | .
#     .          | green triangle | .           | .
#     .          | yellow square  | .           | .
SCENE = Scene("white", (Obj("red", "square", 0), Obj("blue", "circle", 2), Obj("green", "triangle", 5),
                        Obj("yellow", "square", 9)))


def _answers(task, scene=SCENE, draws=200):
    rng = random.Random(0)
    return {IMAGE_TASKS[task].ask(scene, rng) for _ in range(draws)} - {None}


def test_answers_on_a_known_scene():
    assert _answers("relation") >= {
        ("Is the red square to the left or to the right of the blue circle?", "left"),
        ("Is the blue circle to the left or to the right of the red square?", "right"),
        ("Is the yellow square above or below the green triangle?", "below"),
        ("Is the green triangle above or below the yellow square?", "above")}
    assert ("Is the red square above or below the blue circle?", "above") not in _answers("relation")  # same row
    assert _answers("attribute") == {("What colour is the circle?", "blue"), ("What colour is the triangle?", "green"),
                                     ("What shape is the red object?", "square"),
                                     ("What shape is the blue object?", "circle"),
                                     ("What shape is the green object?", "triangle"),
                                     ("What shape is the yellow object?", "square")}
    counts = dict(_answers("count"))
    assert counts == {"How many shapes are there?": "4", "How many squares are there?": "2",
                      "How many circles are there?": "1", "How many triangles are there?": "1"}
    # Unique reference shapes: the circle (one shape left of it in its row: the red square, two
    # cells away) and the triangle (one shape below it in its column); "the square" is ambiguous.
    assert _answers("compose_colour") == {("What colour is the shape left of the circle?", "red"),
                                          ("What colour is the shape below the triangle?", "yellow")}
    for question, answer in _answers("compose_count"):
        colour = question.split()[2]
        k = ["one", "two", "three"].index(question.split("add ")[1].split(".")[0]) + 1
        assert int(answer) == len(SCENE.with_colour(colour)) + k


def test_rendering_puts_shapes_and_words_where_the_scene_says():
    scene = Scene("grey", (Obj("red", "square", 0), Obj("blue", "circle", 11)), word="FOX", word_row=1)
    image = scene.render(seed=5)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    cell = IMAGE_SIZE / GRID
    for obj in scene.objects:  # the middle of each shape's cell
        assert image.getpixel((int((obj.col + 0.5) * cell), int((obj.row + 0.5) * cell))) == COLOURS[obj.colour]
    labels = scene.label_map(seed=5)  # the label map has the pixels' geometry
    assert all((labels.getpixel((x, y)) == 0) == (image.getpixel((x, y)) == (205, 205, 205))
               for x in range(IMAGE_SIZE) for y in range(IMAGE_SIZE))
    middle = [image.getpixel((x, y)) for x in range(IMAGE_SIZE) for y in range(int(cell), int(2 * cell))]
    assert sum(p == (15, 15, 15) for p in middle) > 60  # 3 glyphs at scale 2
    top = [image.getpixel((x, y)) for x in range(IMAGE_SIZE) for y in range(int(cell) - 1)]
    assert (15, 15, 15) not in top
    assert scene.render(seed=5).tobytes() == image.tobytes() != scene.render(seed=6).tobytes()


def test_ocr_scenes_keep_shapes_out_of_the_word_row():
    for it in generate("ocr", "test", 100, seed=1):
        assert it.answer == it.scene.word.lower()
        assert all(o.row != it.scene.word_row for o in it.scene.objects)


def test_caption_names_every_shape():
    text = caption(SCENE)
    assert text.startswith("A red square at top left, a blue circle at top centre-right, a green triangle at upper")
    assert "on a white background" in text


def test_bad_task_or_split():
    with pytest.raises(ValueError, match="unknown task"):
        generate("colour", "test", 1)
    with pytest.raises(ValueError, match="unknown split"):
        generate("count", "validation", 1)
