"""The embedded default multimodal calibration set: drawn shapes with captions and Q&A, no download.

Each image is a plain background with 1-4 shapes (circle, square, triangle) in named colours, each
in its own cell of a 3 x 3 grid, and sometimes a short word in another cell. Each sample is either
a caption ("Describe the image." -> "A red circle above a blue square.") or one question about
the image (colour, count, position or existence) with its answer. Everything comes from
``random.Random(seed)``: the same seed gives pixel-equal images and identical texts.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .multimodal import Conversation

BACKGROUNDS = {"white": (255, 255, 255), "grey": (210, 210, 210), "cream": (245, 235, 205)}
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top middle", "top right", "middle left", "centre", "middle right",
         "bottom left", "bottom middle", "bottom right")
WORDS = ("CAT", "SUN", "SKY", "TREE", "STOP", "GO", "BOOK", "FISH")
NUMBERS = ("zero", "one", "two", "three", "four")
CAPTION_PROMPTS = ("Describe the image.", "What do you see in this picture?", "Write a short caption.")


def synthetic_conversations(n: int, seed: int = 0, size: int = 96) -> list[Conversation]:
    """``n`` deterministic image conversations with ``size`` x ``size`` RGB images."""
    rng = random.Random(seed)
    return [_sample(rng, size, f"synthetic sample {i}") for i in range(n)]


def _sample(rng: random.Random, size: int, source: str) -> Conversation:
    background = rng.choice(sorted(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    cells = rng.sample(range(len(CELLS)), k=5)  # distinct cells: up to 4 shapes, then the word
    shapes = []  # (colour, shape, cell)
    for cell in cells[:rng.randint(1, 4)]:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        _draw_shape(draw, rng, shape, COLOURS[colour], cell, size / 3)
        shapes.append((colour, shape, cell))
    shapes.sort(key=lambda item: item[2])  # described top to bottom, left to right
    word = None
    if rng.random() < 0.3:
        word = rng.choice(WORDS)
        row, col = divmod(cells[len(shapes)], 3)
        draw.text((col * size / 3 + 2, row * size / 3 + size / 9), word, fill=(0, 0, 0))

    if rng.random() < 0.4:
        turns = [("user", rng.choice(CAPTION_PROMPTS)), ("assistant", _caption(shapes, background, word))]
    else:
        turns = list(_question(rng, shapes))
    return Conversation(image=image, turns=turns, source=source)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, shape: str, fill, cell: int, cell_size: float):
    row, col = divmod(cell, 3)
    r = cell_size * rng.uniform(0.25, 0.4)
    cx = (col + 0.5) * cell_size + rng.uniform(-0.08, 0.08) * cell_size
    cy = (row + 0.5) * cell_size + rng.uniform(-0.08, 0.08) * cell_size
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _relation(a: int, b: int) -> str:
    """Where cell ``a`` is relative to cell ``b``."""
    (ra, ca), (rb, cb) = divmod(a, 3), divmod(b, 3)
    if ra != rb:
        return "above" if ra < rb else "below"
    return "to the left of" if ca < cb else "to the right of"


def _caption(shapes, background: str, word: str | None) -> str:
    if len(shapes) == 2:
        (c0, s0, p0), (c1, s1, p1) = shapes
        text = f"{_a(c0)} {s0} {_relation(p0, p1)} {_a(c1)} {s1}"
    else:
        parts = [f"{_a(c)} {s} in the {CELLS[p]}" for c, s, p in shapes]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{text[0].upper()}{text[1:]}, on {_a(background)} background."
    if word:
        text += f' The word "{word}" is written on it.'
    return text


def _question(rng: random.Random, shapes) -> tuple[tuple[str, str], tuple[str, str]]:
    kind = rng.choice(("colour", "count", "position", "exists"))
    colour, shape, cell = rng.choice(shapes)
    if kind == "colour" and sum(s == shape for _, s, _ in shapes) == 1:
        q, a = f"What colour is the {shape}?", f"{colour.capitalize()}."
    elif kind == "position" and sum((c, s) == (colour, shape) for c, s, _ in shapes) == 1:
        q, a = f"Where is the {colour} {shape}?", f"In the {CELLS[cell]}."
    elif kind == "exists":
        if rng.random() < 0.5:  # ask about something that may be absent, for balanced yes/no
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        present = any(c == colour and s == shape for c, s, _ in shapes)
        q, a = f"Is there {_a(colour)} {shape} in the image?", "Yes." if present else "No."
    else:
        n = len(shapes)
        q, a = "How many shapes are there?", f"{NUMBERS[n].capitalize()}."
    return ("user", q), ("assistant", a)
