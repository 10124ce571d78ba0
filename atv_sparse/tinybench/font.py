"""A 5 x 7 pixel font for A-Z, drawn with PIL rectangles.

PIL's own default font changed between Pillow releases (a bitmap font before 10.1, a FreeType
font since), so words drawn with it would not be the same bytes everywhere. These glyphs are;
``draw_word`` paints each lit pixel as a ``scale`` x ``scale`` square.
"""

from __future__ import annotations

from PIL import ImageDraw

GLYPH_W, GLYPH_H = 5, 7
_GLYPHS = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#", "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.", "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####", "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.###.", "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.", "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#", "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#", "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.", "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#", "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.", "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.", "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.", "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..", "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
}
GLYPHS = {letter: tuple(rows.split("|")) for letter, rows in _GLYPHS.items()}


def word_size(word: str, scale: int, spacing: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of ``word`` drawn at ``scale`` with ``spacing`` glyph columns between letters."""
    n = len(word)
    return scale * (n * GLYPH_W + (n - 1) * spacing), scale * GLYPH_H


def draw_word(draw: ImageDraw.ImageDraw, xy: tuple[int, int], word: str, fill, scale: int, spacing: int = 1) -> None:
    """Paint ``word`` (letters A-Z) with its top-left corner at ``xy``; ``fill`` is a colour, or a
    function (index, letter) -> colour (a label map paints each letter with its own value)."""
    x0, y0 = xy
    for i, letter in enumerate(word):
        if letter not in GLYPHS:
            raise ValueError(f"draw_word: no glyph for {letter!r} in {word!r}; the font has A-Z only")
        colour = fill(i, letter) if callable(fill) else fill
        gx = x0 + i * scale * (GLYPH_W + spacing)
        for r, row in enumerate(GLYPHS[letter]):
            for c, lit in enumerate(row):
                if lit == "#":
                    draw.rectangle([gx + c * scale, y0 + r * scale,
                                    gx + (c + 1) * scale - 1, y0 + (r + 1) * scale - 1], fill=colour)
