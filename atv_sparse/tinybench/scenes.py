"""Scenes of coloured shapes on a 4 x 4 grid, optionally with a word, drawn with PIL.

A :class:`Scene` is the content of an image (background, shapes and their cells, a word and its
row); :meth:`Scene.key` names that content and decides which split the image belongs to, so two
images with the same content never land in different splits. The pixels also depend on a render
seed (each shape's size and small offsets, the word's offset), drawn from ``random.Random(seed)``:
the same scene and seed give the same bytes.

Cells are numbered row by row, 0 = top left, 15 = bottom right. A cell is 14 x 14 px, exactly
2 x 2 patches of the tiny VLM's 7 px patches, and a shape is centred in its cell: each patch
then holds one quadrant of one shape, so a circle, a square and a triangle differ in every
patch they touch (with shapes at arbitrary offsets a shape's 2-4 patches are cut differently
each time, and a model trained for an hour could tell the colours but not the shapes apart).
"""

from __future__ import annotations

import dataclasses
import random

from PIL import Image, ImageDraw

from .font import draw_word, word_size

IMAGE_SIZE = 56
GRID = 4
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 65), "blue": (40, 80, 225), "yellow": (235, 205, 25),
           "purple": (140, 55, 175), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "grey": (205, 205, 205), "cream": (245, 235, 200)}
WORD_COLOUR = (15, 15, 15)
WORD_SCALE = 2  # 10 x 14 px glyphs: a 3-letter word spans about 5 x 2 patches of 7 px
ROW_NAMES = ("top", "upper", "lower", "bottom")
COL_NAMES = ("left", "centre-left", "centre-right", "right")
CELL_NAMES = tuple(f"{row} {col}" for row in ROW_NAMES for col in COL_NAMES)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One shape: its colour, kind and grid cell."""

    colour: str
    shape: str
    cell: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """The content of one image; ``objects`` are sorted by cell and occupy distinct cells."""

    background: str
    objects: tuple[Obj, ...]
    word: str | None = None
    word_row: int | None = None  # the word fills this row; no shape sits in it

    def key(self) -> str:
        """Canonical text of the content (offsets and sizes excluded): the unit of the split."""
        objects = ",".join(f"{o.colour}-{o.shape}-{o.cell}" for o in self.objects)
        word = f"|{self.word}@{self.word_row}" if self.word else ""
        return f"{self.background}|{objects}{word}"

    def render(self, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
        """The RGB image, ``size`` x ``size``; shape sizes and offsets come from ``seed``."""
        image = Image.new("RGB", (size, size), BACKGROUNDS[self.background])
        self._paint(ImageDraw.Draw(image), seed, size, lambda i, obj: COLOURS[obj.colour], WORD_COLOUR)
        return image

    def label_map(self, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
        """Which thing covers each pixel of :meth:`render` (same seed): a mode "L" image with 0 for
        the background, 1 + i for ``objects[i]`` and 100 + k for the word's k-th letter."""
        image = Image.new("L", (size, size), 0)
        self._paint(ImageDraw.Draw(image), seed, size, lambda i, obj: 1 + i, lambda k, letter: 100 + k)
        return image

    def _paint(self, draw: ImageDraw.ImageDraw, seed: int, size: int, object_fill, word_fill) -> None:
        rng = random.Random(seed)
        cell = size / GRID
        for i, obj in enumerate(self.objects):
            r = rng.choice((5.5, 6.0)) * size / IMAGE_SIZE  # box of 11-12 px in a 14 px cell
            cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
            _draw_shape(draw, obj.shape, object_fill(i, obj), cx, cy, r)
        if self.word:
            width, height = word_size(self.word, WORD_SCALE)
            x = rng.randint(1, max(1, size - width - 1))
            y = int(self.word_row * cell + (cell - height) / 2)
            draw_word(draw, (x, max(0, y)), self.word, word_fill, WORD_SCALE)

    # Queries used by the task definitions -------------------------------------------------
    def with_shape(self, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.shape == shape]

    def with_colour(self, colour: str) -> list[Obj]:
        return [o for o in self.objects if o.colour == colour]

    def has(self, colour: str, shape: str) -> bool:
        return any(o.colour == colour and o.shape == shape for o in self.objects)

    def unique_by_name(self) -> list[Obj]:
        """Objects that no other object shares both colour and shape with."""
        return [o for o in self.objects if sum(p.name == o.name for p in self.objects) == 1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill, cx: float, cy: float, r: float) -> None:
    box = [round(cx - r), round(cy - r), round(cx + r) - 1, round(cy + r) - 1]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def random_scene(rng: random.Random, n_objects: int, word: str | None = None,
                 colours: tuple[str, ...] | None = None) -> Scene:
    """``n_objects`` shapes in distinct random cells (outside the word's row when there is a word)."""
    word_row = rng.randrange(GRID) if word else None
    free = [c for c in range(GRID * GRID) if word_row is None or c // GRID != word_row]
    if n_objects > len(free):
        raise ValueError(f"random_scene: {n_objects} shapes do not fit in {len(free)} free cells")
    palette = colours or tuple(COLOURS)
    cells = rng.sample(free, n_objects)
    objects = tuple(sorted((Obj(rng.choice(palette), rng.choice(SHAPES), c) for c in cells), key=lambda o: o.cell))
    return Scene(rng.choice(tuple(BACKGROUNDS)), objects, word, word_row)


def a(word: str) -> str:
    """``word`` with its indefinite article."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption(scene: Scene) -> str:
    """A ShareGPT4V-style description: every shape in reading order, the background and the word."""
    parts = [f"{a(o.name)} at {CELL_NAMES[o.cell]}" for o in scene.objects]
    if not parts:
        text = "There are no shapes"
    elif len(parts) == 1:
        text = parts[0]
    else:
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{text[0].upper()}{text[1:]}, on {a(scene.background)} background."
    if scene.word:
        text += f" The word {scene.word} is written across the {ROW_NAMES[scene.word_row]} row."
    return text
