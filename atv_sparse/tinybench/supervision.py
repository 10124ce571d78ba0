"""Training-only supervision of the tiny VLMs' image understanding: the labels of what each patch
and each scene contains, the objects a question refers to, and the linear heads that read them
(``AuxHeads``). Used by ``benchmarks/tiny_model/train.py`` (the bundled tiny VLM) and
``benchmarks/tiny_next/train.py`` (the tiny LLaVA-NeXT); nothing here is part of a saved model.

Without these losses a language model learning to read image tokens ignores them for the first
1,000+ steps (the bundled model's first runs: visual tasks at chance, text tasks learned), which a
CPU budget of minutes cannot afford.
"""

from __future__ import annotations

import re

import numpy
import torch
import torch.nn.functional as F

from . import model as tiny_vlm
from . import tasks as synthetic

PATCH = tiny_vlm.PATCH_SIZE
SIDE = tiny_vlm.IMAGE_SIZE // PATCH
COLOURS, SHAPES = list(synthetic.COLOURS), list(synthetic.SHAPES)
N_COMBOS = len(COLOURS) * len(SHAPES)
# Per patch (0 = nothing): colour, shape, colour-shape pair, letter, patch row, patch column.
PATCH_CLASSES = (len(COLOURS) + 1, len(SHAPES) + 1, N_COMBOS + 1, 27, SIDE, SIDE)
MAX_COUNT = 7
N_CELLS = synthetic.GRID * synthetic.GRID
# Per image: total count, count of each shape, count of each colour (0..6 each), the word, and
# the colour and the shape in every grid cell (0 = empty): the whole scene, as a table.
SCENE_CLASSES = ((MAX_COUNT,) * (1 + len(SHAPES) + len(COLOURS)) + (len(synthetic.WORDS) + 1,)
                 + (len(COLOURS) + 1,) * N_CELLS + (len(SHAPES) + 1,) * N_CELLS)


def patch_labels(item: synthetic.Item) -> torch.Tensor:
    """(64, 6) int64 per patch of the 56 px image, row by row (``PATCH_CLASSES``): colour, shape and
    colour-shape pair (1-based, 0 = none) of the object covering most of the patch (at least 6 of
    its 49 pixels), the letter drawn there, and the patch's row and column. The pair is its own
    class so that a patch's feature binds colour to shape: the mean over the patches then counts
    every pair."""
    return crop_labels(item.scene, numpy.asarray(item.scene.label_map(item.render_seed), dtype=numpy.int64))


def anyres_patch_labels(item: synthetic.Item, size: int) -> torch.Tensor:
    """(crops, 64, 6) int64: :func:`patch_labels` of every crop LLaVA-NeXT's processor makes of the
    ``size`` px square image (a multiple of 56 px), in its order: the base view (the image resized to
    56 px: the label map drawn at 56 px) and then the 56 px tiles, row by row."""
    side = tiny_vlm.IMAGE_SIZE
    assert size % side == 0, f"size {size}: expected a multiple of {side} px"
    full = numpy.asarray(item.scene.label_map(item.render_seed, size=size), dtype=numpy.int64)
    crops = [numpy.asarray(item.scene.label_map(item.render_seed), dtype=numpy.int64)]
    crops += [full[r:r + side, c:c + side] for r in range(0, size, side) for c in range(0, size, side)]
    return torch.stack([crop_labels(item.scene, crop) for crop in crops])


def crop_labels(scene, label_map) -> torch.Tensor:
    """(64, 6) int64 ``PATCH_CLASSES`` of one 56 x 56 crop of a scene's label map (a numpy array)."""
    labels = torch.zeros(SIDE * SIDE, len(PATCH_CLASSES), dtype=torch.long)
    grid = torch.from_numpy(label_map.copy())
    patches = grid.view(SIDE, PATCH, SIDE, PATCH).permute(0, 2, 1, 3).reshape(SIDE * SIDE, PATCH * PATCH)
    for k, values in enumerate(patches):
        counts = torch.bincount(values, minlength=128)
        counts[0] = 0
        v = int(counts.argmax())
        if 1 <= v < 100 and counts[v] >= 6:
            obj = scene.objects[v - 1]
            c, s = COLOURS.index(obj.colour), SHAPES.index(obj.shape)
            labels[k, 0], labels[k, 1], labels[k, 2] = 1 + c, 1 + s, 1 + c * len(SHAPES) + s
        elif v >= 100 and counts[v] >= 6:
            labels[k, 3] = 1 + ord(scene.word[v - 100]) - ord("A")
        labels[k, 4], labels[k, 5] = k // SIDE, k % SIDE
    return labels


def scene_labels(scene) -> tuple[torch.Tensor, torch.Tensor]:
    """((N_COMBOS,) float 0/1: which colour-shape pairs are present, (len(SCENE_CLASSES),) int64:
    the counts, the word and the per-cell colours and shapes of ``SCENE_CLASSES``)."""
    present = torch.zeros(N_COMBOS)
    cell_colour, cell_shape = [0] * N_CELLS, [0] * N_CELLS
    for obj in scene.objects:
        present[COLOURS.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)] = 1
        cell_colour[obj.cell], cell_shape[obj.cell] = 1 + COLOURS.index(obj.colour), 1 + SHAPES.index(obj.shape)
    counts = [len(scene.objects)] + [len(scene.with_shape(s)) for s in SHAPES] + [len(scene.with_colour(c))
                                                                                   for c in COLOURS]
    word = 1 + synthetic.WORDS.index(scene.word) if scene.word else 0
    return present, torch.tensor([min(n, MAX_COUNT - 1) for n in counts] + [word] + cell_colour + cell_shape)


# Per referent slot (0 = none): row, column, colour and shape of an object a question is about.
REF_CLASSES = (synthetic.GRID + 1, synthetic.GRID + 1, len(COLOURS) + 1, len(SHAPES) + 1)
REF_SLOTS = 2
_RELATION = re.compile(r"Is the (\w+ \w+) (?:to the left or to the right of|above or below) the (\w+ \w+)\?")
_COMPOSE = re.compile(r"What colour is the shape (left of|right of|above|below) the (\w+)\?")
_COLOUR_OF = re.compile(r"What colour is the (\w+)\?")
_SHAPE_OF = re.compile(r"What shape is the (\w+) object\?")
_EXIST = re.compile(r"Is there an? (\w+) (\w+) in the image\?")


def referents(scene, question: str) -> list:
    """The objects of ``scene`` that ``question`` is about, in the order the answer needs them:
    the two shapes of a relation, the reference shape then the target of a compositional colour
    question, the shape an attribute / multiple-choice colour question names, the shapes an
    existence question names that are there (in cell order); [] for counts, words and captions."""
    first_line = question.split("\n")[0]
    if m := _RELATION.fullmatch(first_line):
        by_name = {o.name: o for o in scene.unique_by_name()}
        return [by_name[m[1]], by_name[m[2]]]
    if m := _COMPOSE.fullmatch(first_line):
        ref = scene.with_shape(m[2])[0]
        return [ref, synthetic.shapes_beside(scene, ref, m[1])[0]]
    if m := _COLOUR_OF.fullmatch(first_line):
        return scene.with_shape(m[1])[:1]
    if m := _SHAPE_OF.fullmatch(first_line):
        return scene.with_colour(m[1])[:1]
    if m := _EXIST.fullmatch(first_line):
        return [o for o in scene.objects if o.colour == m[1] and o.shape == m[2]]
    return []


def referent_labels(scene, turns: list[tuple[str, str]]) -> torch.Tensor:
    """(len(turns), REF_SLOTS * 4) int64: per turn and referent slot, ``REF_CLASSES`` (1-based,
    0 = no such referent)."""
    n = len(REF_CLASSES)
    labels = torch.zeros(len(turns), REF_SLOTS * n, dtype=torch.long)
    for t, (question, _) in enumerate(turns):
        for k, obj in enumerate(referents(scene, question)[:REF_SLOTS]):
            labels[t, n * k:n * (k + 1)] = torch.tensor(
                [1 + obj.row, 1 + obj.col, 1 + COLOURS.index(obj.colour), 1 + SHAPES.index(obj.shape)])
    return labels


class AuxHeads(torch.nn.Module):
    """Training-only linear heads (never saved in the model).

    - ``patch``: the ``PATCH_CLASSES`` of every projected image token;
    - ``scene_image``: the scene summary (``scene_labels``) from the mean of an image's projected
      tokens, which is what a language model attending uniformly to the image reads;
    - ``scene_text``: the same summary from the language model's hidden state after block
      ``--scene-layer`` at the token that predicts the first answer, so the model learns early to
      gather the image there, and the blocks above are left to combine it with the question (on
      the last hidden state the summary was learned but existence and relations stayed at chance:
      the interaction with the question has to happen after the gathering).
    - ``referent``: from the hidden state after block ``--ref-layer`` at the token that predicts
      each answer, the cell, colour and shape of the objects the question refers to
      (``referent_labels``): the retrieval step that attribute, relation, hard-negative existence
      and compositional questions share, supervised directly (without it they stayed near chance
      while counting, which a uniform summary of the image answers, reached 98%).
    The heads read layer-normed features: a loss on raw features grows their norm instead.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.referent = torch.nn.Linear(hidden, REF_SLOTS * sum(REF_CLASSES))
        self.patch = torch.nn.Linear(hidden, sum(PATCH_CLASSES))
        self.scene_image = torch.nn.Linear(hidden, N_COMBOS + sum(SCENE_CLASSES))
        self.scene_text = torch.nn.Linear(hidden, N_COMBOS + sum(SCENE_CLASSES))

    @staticmethod
    def _scene_loss(logits, present, counts):
        """Presence + one cross-entropy per count and the word + the mean cross-entropy of the cell
        colours and of the cell shapes (summed, the 2 x 16 cells would outweigh the rest)."""
        combos, *parts = logits.split([N_COMBOS, *SCENE_CLASSES], dim=-1)
        losses = [F.cross_entropy(part, counts[:, k]) for k, part in enumerate(parts)]
        n_summary = len(SCENE_CLASSES) - 2 * N_CELLS
        cells = losses[n_summary:]
        return (F.binary_cross_entropy_with_logits(combos, present) + sum(losses[:n_summary])
                + (sum(cells[:N_CELLS]) + sum(cells[N_CELLS:])) / N_CELLS)

    def forward(self, projected, text_hidden, patch_target, present, counts):
        """projected: (B, T, H), an image's T projected tokens (the bundled VLM: 64; a 112 px
        LLaVA-NeXT image: its 5 crops' 320); text_hidden: (B, H); patch_target: (B, T, 6) from
        ``patch_labels`` / ``anyres_patch_labels``; present, counts from ``scene_labels``."""
        norm = F.layer_norm(projected, projected.shape[-1:])
        parts = self.patch(norm).reshape(-1, sum(PATCH_CLASSES)).split(PATCH_CLASSES, dim=-1)
        target = patch_target.reshape(-1, len(PATCH_CLASSES))
        loss = sum(F.cross_entropy(part, target[:, k]) for k, part in enumerate(parts))
        loss = loss + self._scene_loss(self.scene_image(norm.mean(1)), present, counts)
        text = F.layer_norm(text_hidden, text_hidden.shape[-1:])
        return loss + self._scene_loss(self.scene_text(text), present, counts)

    def referent_loss(self, turn_hidden, target):
        """turn_hidden: (n_turns, H) at each answer's first prediction; target: ``referent_labels``."""
        logits = self.referent(F.layer_norm(turn_hidden, turn_hidden.shape[-1:]))
        parts = logits.split(list(REF_CLASSES) * REF_SLOTS, dim=-1)
        return sum(F.cross_entropy(part, target[:, k]) for k, part in enumerate(parts)) / REF_SLOTS
