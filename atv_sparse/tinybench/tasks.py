"""Synthetic multimodal tasks: deterministic, split-disjoint, scored by exact match.

Eleven task families, each mirroring a benchmark the ATV paper reports and each scored
separately (``TASKS``):

==================  ==========================  ============================================
task                mirrors                     example (answer)
==================  ==========================  ============================================
attribute           GQA (attributes)            What colour is the triangle? (red)
relation            GQA (relations)             Is the red square to the left or to the right
                                                of the blue circle? (left)
exist_random        POPE random                 Is there a green circle in the image? (no)
exist_adversarial   POPE adversarial            hard negatives: the colour and the shape are
                                                both in the image, on different shapes
count               MME count                   How many circles are there? (2)
ocr                 TextVQA                     What word is written in the image? (fox)
mcq                 MMBench / ScienceQA         lettered options, answer a letter (C)
compose_colour      compositional (GQA-style)   What colour is the shape left of the circle?
compose_count       compositional               Count the red shapes, then add two. ... (3)
arithmetic          text only                   What is 13 plus 6? (19)
facts               text only (knowledge)       What is the capital of Velora? (kesmot)
==================  ==========================  ============================================

Splits (``SPLITS``): ``train``, ``calibration`` and ``test`` never share an item.
- Image tasks: an image's content (:meth:`Scene.key`: background, shapes, cells, word) is
  hashed to a split (10% test, 5% calibration, 85% train); a generator keeps only the scenes
  of the split it is asked for, so the same image content never appears in two splits.
- Text tasks ask about a fixed set of items (400 entity facts, 672 sums and differences), the
  model's "world knowledge". Each item has four question templates; a hash of the item gives
  one template to test, one to calibration and two to training, so every test question is a
  wording of a known fact that training never used for that fact.

Everything is drawn from ``random.Random`` seeded with a string (stable across processes,
independent of ``PYTHONHASHSEED``): the same task, split and seed give the same items and the
same image bytes. Answers are short (a word, a number or a letter) and compared after
:func:`atv_sparse.evaluation.metrics.normalize_answer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable

from PIL import Image

from .scenes import COLOURS, GRID, IMAGE_SIZE, SHAPES, Obj, Scene, a, caption, random_scene

SPLITS = ("train", "calibration", "test")
_SALT = "atv-sparse-synthetic-v1"
WORDS = ("ANT", "BEE", "BOX", "BUS", "CAR", "CAT", "COW", "CUP", "DOG", "EGG", "FAN", "FOX", "HAT", "ICE",
         "JAM", "KEY", "MAP", "NUT", "OWL", "PEN", "PIG", "RAT", "SKY", "SUN", "TOY", "VAN", "WEB", "YAK",
         "ZIP", "GEM")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = ("zero", "one", "two", "three")
LETTERS = "ABCD"
MAX_NUMBER = 20  # arithmetic operands 0..20


@dataclasses.dataclass(frozen=True)
class Item:
    """One question with its reference answer; ``scene`` is None for a text-only question."""

    task: str
    question: str
    answer: str
    scene: Scene | None = None
    render_seed: int = 0

    @property
    def key(self) -> str:
        """What makes two items the same: the image content and the question."""
        return f"{self.scene.key() if self.scene else ''}#{self.question}"

    def image(self) -> Image.Image | None:
        return None if self.scene is None else self.scene.render(self.render_seed)


def split_of(key: str) -> str:
    """The split a piece of content belongs to (10% test, 5% calibration, 85% train)."""
    bucket = int.from_bytes(hashlib.sha256(f"{_SALT}|{key}".encode()).digest()[:8], "big") % 20
    return "test" if bucket < 2 else "calibration" if bucket == 2 else "train"


def _template_index(key: str, split: str) -> list[int]:
    """Which of an item's 4 templates ``split`` may use: test 1, calibration 1, train the other 2."""
    first = int.from_bytes(hashlib.sha256(f"{_SALT}|template|{key}".encode()).digest()[:8], "big") % 4
    if split == "test":
        return [first]
    if split == "calibration":
        return [(first + 1) % 4]
    return [(first + 2) % 4, (first + 3) % 4]


# ---------------------------------------------------------------------------------------------
# Image tasks: a scene generator and a question ("ask") that returns None when it does not apply.
# ---------------------------------------------------------------------------------------------

QA = tuple[str, str]


def _scene_any(rng: random.Random) -> Scene:
    return random_scene(rng, rng.randint(1, 5))


def _scene_many(rng: random.Random) -> Scene:
    return random_scene(rng, rng.randint(2, 5))


def _ask_attribute(scene: Scene, rng: random.Random) -> QA | None:
    unique_shape = [o for o in scene.objects if len(scene.with_shape(o.shape)) == 1]
    unique_colour = [o for o in scene.objects if len(scene.with_colour(o.colour)) == 1]
    options = [("colour", o) for o in unique_shape] + [("shape", o) for o in unique_colour]
    if not options:
        return None
    kind, obj = rng.choice(options)
    if kind == "colour":
        return f"What colour is the {obj.shape}?", obj.colour
    return f"What shape is the {obj.colour} object?", obj.shape


def _ask_relation(scene: Scene, rng: random.Random) -> QA | None:
    unique = scene.unique_by_name()
    pairs = [(p, q, axis) for p in unique for q in unique if p is not q
             for axis in ("col", "row") if getattr(p, axis) != getattr(q, axis)]
    if not pairs:
        return None
    p, q, axis = rng.choice(pairs)
    if axis == "col":
        answer = "left" if p.col < q.col else "right"
        return f"Is the {p.name} to the left or to the right of the {q.name}?", answer
    answer = "above" if p.row < q.row else "below"
    return f"Is the {p.name} above or below the {q.name}?", answer


def _exist_question(colour: str, shape: str) -> str:
    return f"Is there {a(colour)} {shape} in the image?"


def _ask_exist_random(scene: Scene, rng: random.Random) -> QA | None:
    if rng.random() < 0.5:
        obj = rng.choice(scene.objects)
        return _exist_question(obj.colour, obj.shape), "yes"
    absent = [(c, s) for c in COLOURS for s in SHAPES if not scene.has(c, s)]
    colour, shape = rng.choice(absent)
    return _exist_question(colour, shape), "no"


def _hard_negatives(scene: Scene) -> list[tuple[str, str]]:
    colours = {o.colour for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    return [(c, s) for c in sorted(colours) for s in SHAPES if s in shapes and not scene.has(c, s)]


def _ask_exist_adversarial(scene: Scene, rng: random.Random) -> QA | None:
    negatives = _hard_negatives(scene)
    if not negatives:
        return None
    if rng.random() < 0.5:
        obj = rng.choice(scene.objects)
        return _exist_question(obj.colour, obj.shape), "yes"
    colour, shape = rng.choice(negatives)
    return _exist_question(colour, shape), "no"


def _scene_count(rng: random.Random) -> Scene:
    return random_scene(rng, rng.randint(1, 6))



def _ask_count(scene: Scene, rng: random.Random) -> QA | None:
    if rng.random() < 0.5:
        return "How many shapes are there?", str(len(scene.objects))
    shape = rng.choice(SHAPES)
    return f"How many {PLURALS[shape]} are there?", str(len(scene.with_shape(shape)))


def _scene_ocr(rng: random.Random) -> Scene:
    return random_scene(rng, rng.randint(1, 3), word=rng.choice(WORDS))


def _ask_ocr(scene: Scene, rng: random.Random) -> QA | None:
    if not scene.word:
        return None
    return "What word is written in the image?", scene.word.lower()


def _ask_mcq(scene: Scene, rng: random.Random) -> QA | None:
    kinds = []
    unique_shape = [o for o in scene.objects if len(scene.with_shape(o.shape)) == 1]
    if unique_shape:
        kinds.append("colour")
    if scene.objects:
        kinds.append("count")
    if not kinds:
        return None
    kind = rng.choice(kinds)
    if kind == "colour":
        obj = rng.choice(unique_shape)
        question, correct, pool = f"What colour is the {obj.shape}?", obj.colour, list(COLOURS)
    else:
        question, correct, pool = "How many shapes are there?", str(len(scene.objects)), [str(n) for n in range(1, 7)]
    letter = rng.randrange(len(LETTERS))  # the correct letter is uniform over A-D
    wrong = rng.sample([x for x in pool if x != correct], len(LETTERS) - 1)
    options = wrong[:letter] + [correct] + wrong[letter:]
    lines = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    return f"{question}\n{lines}\nAnswer with the option's letter.", LETTERS[letter]


_DIRECTIONS = {  # phrase -> (axis compared, sign: the target's coordinate minus the reference's)
    "left of": ("col", -1), "right of": ("col", 1), "above": ("row", -1), "below": ("row", 1)}


def shapes_beside(scene: Scene, ref: Obj, phrase: str) -> list[Obj]:
    """The shapes of ``scene`` on the ``phrase`` side of ``ref`` ("left of", "right of", "above",
    "below"), in the same row (left / right) or column (above / below)."""
    axis, sign = _DIRECTIONS[phrase]
    other = "row" if axis == "col" else "col"
    return [o for o in scene.objects if getattr(o, other) == getattr(ref, other)
            and (getattr(o, axis) - getattr(ref, axis)) * sign > 0]


def _ask_compose_colour(scene: Scene, rng: random.Random) -> QA | None:
    options = []
    for ref in scene.objects:
        if len(scene.with_shape(ref.shape)) != 1:
            continue  # "the circle" must name one shape
        for phrase in _DIRECTIONS:
            side = shapes_beside(scene, ref, phrase)
            if len(side) == 1:  # exactly one shape on that side, in the same row / column
                options.append((ref, phrase, side[0]))
    if not options:
        return None
    ref, phrase, target = rng.choice(options)
    return f"What colour is the shape {phrase} the {ref.shape}?", target.colour


def _scene_compose_colour(rng: random.Random) -> Scene:
    return random_scene(rng, rng.randint(3, 6))


def _scene_compose_count(rng: random.Random) -> Scene:
    n = rng.randint(2, 6)
    # A 3-colour palette makes counts of one colour spread over 0-4 instead of mostly 0-1.
    return random_scene(rng, n, colours=tuple(rng.sample(sorted(COLOURS), 3)))


def _ask_compose_count(scene: Scene, rng: random.Random) -> QA | None:
    colour = rng.choice(sorted({o.colour for o in scene.objects} | {rng.choice(sorted(COLOURS))}))
    k = rng.randint(1, 3)
    return (f"Count the {colour} shapes, then add {NUMBER_WORDS[k]}. What number do you get?",
            str(len(scene.with_colour(colour)) + k))


@dataclasses.dataclass(frozen=True)
class ImageTask:
    name: str
    mirrors: str
    scene: Callable[[random.Random], Scene]
    ask: Callable[[Scene, random.Random], QA | None]


IMAGE_TASKS = {t.name: t for t in (
    ImageTask("attribute", "GQA attributes", _scene_any, _ask_attribute),
    ImageTask("relation", "GQA relations", _scene_many, _ask_relation),
    ImageTask("exist_random", "POPE random", _scene_any, _ask_exist_random),
    ImageTask("exist_adversarial", "POPE adversarial", _scene_many, _ask_exist_adversarial),
    ImageTask("count", "MME count", _scene_count, _ask_count),
    ImageTask("ocr", "TextVQA", _scene_ocr, _ask_ocr),
    ImageTask("mcq", "MMBench / ScienceQA", _scene_any, _ask_mcq),
    ImageTask("compose_colour", "compositional relation", _scene_compose_colour, _ask_compose_colour),
    ImageTask("compose_count", "compositional counting", _scene_compose_count, _ask_compose_count),
)}


# ---------------------------------------------------------------------------------------------
# Text tasks: a fixed item set, four templates per item.
# ---------------------------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "m", "th")
ANIMALS = ("lion", "owl", "whale", "tiger", "horse", "eagle", "wolf", "bear", "camel", "otter", "snake", "goat",
           "crane", "moose", "seal", "deer")
N_COUNTRIES = 200
FACT_TEMPLATES = {
    "capital": ("What is the capital of {e}?", "Which city is the capital of {e}?",
                "Name the capital city of {e}.", "The capital of {e} is which city?"),
    "animal": ("Which animal lives in {e}?", "What animal is found in {e}?",
               "Name the animal of {e}.", "In {e}, which animal is common?"),
}
ARITHMETIC_TEMPLATES = {
    "plus": ("What is {a} plus {b}?", "Compute {a} plus {b}.", "How much is {a} plus {b}?", "Add {a} and {b}."),
    "minus": ("What is {a} minus {b}?", "Compute {a} minus {b}.", "How much is {a} minus {b}?",
              "Subtract {b} from {a}."),
}


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def knowledge_base() -> list[tuple[str, str, str]]:
    """The 400 facts ``(entity, relation, answer)``: 200 invented countries, each with a capital
    (a unique invented city) and an animal; fixed for every seed and split."""
    rng = random.Random(f"{_SALT}|knowledge")
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            name = _name(rng, syllables)
            if name not in used:
                used.add(name)
                return name

    facts = []
    for _ in range(N_COUNTRIES):
        country = fresh(rng.choice((2, 3))).capitalize()
        facts.append((country, "capital", fresh(2)))
        facts.append((country, "animal", rng.choice(ANIMALS)))
    return facts


def arithmetic_items() -> list[tuple[int, str, int, int]]:
    """The 672 ``(a, op, b, result)`` items: a + b and a - b (a >= b) for a, b in 0..20."""
    items = []
    for x in range(MAX_NUMBER + 1):
        for y in range(MAX_NUMBER + 1):
            items.append((x, "plus", y, x + y))
            if x >= y:
                items.append((x, "minus", y, x - y))
    return items


_KNOWLEDGE = knowledge_base()
_ARITHMETIC = arithmetic_items()


def _facts_item(rng: random.Random, split: str, fact: tuple[str, str, str] | None = None) -> Item:
    entity, relation, answer = fact or rng.choice(_KNOWLEDGE)
    template = FACT_TEMPLATES[relation][rng.choice(_template_index(f"{entity}|{relation}", split))]
    return Item("facts", template.format(e=entity), answer)


def _arithmetic_item(rng: random.Random, split: str, item: tuple[int, str, int, int] | None = None) -> Item:
    x, op, y, result = item or rng.choice(_ARITHMETIC)
    template = ARITHMETIC_TEMPLATES[op][rng.choice(_template_index(f"{x}|{op}|{y}", split))]
    return Item("arithmetic", template.format(a=x, b=y), str(result))


TEXT_TASKS: dict[str, tuple[str, Callable[..., Item]]] = {
    "arithmetic": ("text-only arithmetic", _arithmetic_item),
    "facts": ("text-only knowledge", _facts_item),
}
TASKS = (*IMAGE_TASKS, *TEXT_TASKS)


def closed_answers(task: str) -> tuple[str, ...] | None:
    """Every answer ``task`` can have (sorted), read off its generator above; None for the
    open-ended text tasks (arithmetic sums, invented facts). Kept beside the generators: a change
    to a scene's object count or a question's range changes these."""
    colours, shapes = tuple(COLOURS), tuple(SHAPES)
    sets = {"attribute": colours + shapes, "relation": ("above", "below", "left", "right"),
            "exist_random": ("no", "yes"), "exist_adversarial": ("no", "yes"),
            "count": tuple(str(n) for n in range(0, 7)),  # _scene_count: 1-6 shapes; one shape: 0-6
            "ocr": tuple(w.lower() for w in WORDS), "mcq": tuple(LETTERS), "compose_colour": colours,
            # _scene_compose_count: 0-6 shapes of the colour asked, plus k = 1-3
            "compose_count": tuple(str(n) for n in range(1, 10))}
    _check(task, "test")
    return tuple(sorted(sets[task])) if task in sets else None


def describe_tasks() -> dict[str, str]:
    """task -> the benchmark it mirrors."""
    return {**{n: t.mirrors for n, t in IMAGE_TASKS.items()}, **{n: m for n, (m, _) in TEXT_TASKS.items()}}


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------

def _check(task: str, split: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def draw_item(task: str, split: str, rng: random.Random) -> Item:
    """One item of ``task`` from ``split``, drawn with ``rng``."""
    _check(task, split)
    if task in TEXT_TASKS:
        return TEXT_TASKS[task][1](rng, split)
    spec = IMAGE_TASKS[task]
    while True:
        scene = spec.scene(rng)
        if split_of(scene.key()) != split:
            continue
        qa = spec.ask(scene, rng)
        if qa is not None:
            return Item(task, qa[0], qa[1], scene, rng.getrandbits(32))


def generate(task: str, split: str, n: int, seed: int = 0) -> list[Item]:
    """``n`` items of ``task`` from ``split``; the same arguments give the same items.

    Text tasks go through their fixed item set in a seeded order (each item once before any
    repeats), so ``n`` up to the set's size gives ``n`` distinct items.
    """
    _check(task, split)
    rng = random.Random(f"{_SALT}|{task}|{split}|{seed}")
    if task in TEXT_TASKS:
        pool = _KNOWLEDGE if task == "facts" else _ARITHMETIC
        order = rng.sample(range(len(pool)), len(pool))
        return [TEXT_TASKS[task][1](rng, split, pool[order[i % len(pool)]]) for i in range(n)]
    return [draw_item(task, split, rng) for _ in range(n)]


def test_items(per_task: int = 500, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[Item]:
    """The evaluation set: ``per_task`` test-split items of every task in ``tasks``, task by task."""
    return [item for task in tasks for item in generate(task, "test", per_task, seed)]


def extra_turn(scene: Scene, rng: random.Random, tasks: list[str], weights: list[float]) -> QA | None:
    """Another question about ``scene`` from a task drawn with ``weights`` (None if it does not apply)."""
    task = rng.choices(tasks, weights)[0]
    if task == "caption":
        return "Describe the image.", caption(scene)
    return IMAGE_TASKS[task].ask(scene, rng)


def training_turns(rng: random.Random, task: str, max_turns: int, extra_tasks: dict[str, float],
                   min_turns: int = 1) -> tuple[Item, list[QA]]:
    """A multi-turn training conversation whose first turn is a ``task`` item of the train split.

    Image tasks: ``min_turns - 1`` to ``max_turns - 1`` more questions about the same image, from
    ``extra_tasks`` (image task names or "caption" -> weight); text tasks: more independent text
    questions. The first turn has exactly the single-turn evaluation format.
    """
    first = draw_item(task, "train", rng)
    turns, seen = [(first.question, first.answer)], {first.question}
    n_turns = rng.randint(min(min_turns, max_turns), max_turns)
    names, weights = list(extra_tasks), list(extra_tasks.values())
    for _ in range(4 * max_turns):
        if len(turns) >= n_turns:
            break
        if first.scene is None:
            other = draw_item(rng.choice(tuple(TEXT_TASKS)), "train", rng)
            qa = (other.question, other.answer)
        else:
            qa = extra_turn(first.scene, rng, names, weights)
        if qa is not None and qa[0] not in seen:
            turns.append(qa)
            seen.add(qa[0])
    return first, turns


def calibration_conversations(n: int, seed: int = 0, size: int | None = None):
    """``n`` ShareGPT4V-style calibration samples from the calibration split, as
    :class:`atv_sparse.calib.multimodal.Conversation`: a ``size`` x ``size`` RGB image and either a
    caption request with its detailed description (40%) or one to three question / answer turns
    about the image. ``size`` changes the pixels only (None: the scenes' own 56 px; the tests give
    other families larger images), never the texts."""
    from ..calib.multimodal import Conversation

    rng = random.Random(f"{_SALT}|calibration-conversations|{seed}")
    image_tasks = list(IMAGE_TASKS)
    out = []
    for i in range(n):
        task = rng.choice(image_tasks)
        item = draw_item(task, "calibration", rng)
        if rng.random() < 0.4:
            turns = [("user", "Describe the image."), ("assistant", caption(item.scene))]
        else:
            turns = [("user", item.question), ("assistant", item.answer)]
            for _ in range(rng.randint(0, 2)):
                qa = extra_turn(item.scene, rng, image_tasks, [1.0] * len(image_tasks))
                if qa is not None:
                    turns += [("user", qa[0]), ("assistant", qa[1])]
        out.append(Conversation(image=item.scene.render(item.render_seed, size or IMAGE_SIZE), turns=turns,
                                source=f"synthetic calibration sample {i}"))
    return out


def tokenizer_corpus() -> str:
    """Text covering every word the tasks use (for training the tiny model's BPE), paragraphs
    separated by blank lines."""
    rng = random.Random(f"{_SALT}|tokenizer")
    texts = []
    for task in TASKS:
        for _ in range(300):
            item = draw_item(task, "train", rng)
            texts.append(f"{item.question} {item.answer}")
            if item.scene is not None:
                texts.append(caption(item.scene))
    texts += [f"What is the capital of {e}? {v}" for e, r, v in _KNOWLEDGE if r == "capital"]
    texts += ["USER: ASSISTANT: " + " ".join(str(i) for i in range(2 * MAX_NUMBER + 1))]
    return "\n\n".join(texts)


__all__ = ["GRID", "IMAGE_TASKS", "Item", "Obj", "SPLITS", "TASKS", "TEXT_TASKS",
           "calibration_conversations", "closed_answers", "describe_tasks", "draw_item", "generate", "knowledge_base",
           "split_of", "test_items", "tokenizer_corpus", "training_turns"]
