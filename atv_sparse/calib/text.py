"""Text calibration: a corpus tokenized once, then ``nsamples`` random windows of ``seqlen`` tokens.

Like Wanda's WikiText route, windows start at seeded random offsets of the concatenated corpus
(they may overlap when the corpus is short); no BOS is inserted.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

import torch

from ..errors import AtvSparseError
from ..textfiles import is_text, json_lines, read_user_text

DEFAULT_CALIBRATION = "<embedded default text>"


def default_calibration_text() -> str:
    """The calibration text shipped with the package (written for atv-sparse, no download)."""
    return resources.files(__package__).joinpath("default_calib.txt").read_text(encoding="utf-8")


def read_calibration_text(path: str | Path) -> str:
    """The corpus in ``path``: a ``.jsonl`` file of ``{"text": ...}`` lines, or plain text.

    Any problem with the file is an ``AtvSparseError`` naming it and the line: a line that is not JSON
    (``textfiles.json_lines``: whatever ``json`` raises for a hostile line, an integer past 4300 digits,
    nesting past the stack), a record that is not ``{"text": str}``, and strings that are not text
    (lone surrogate escapes, which no tokenizer takes).
    """
    path = Path(path)
    raw = read_user_text(path, "calibration file")
    if path.suffix == ".jsonl":
        texts = []
        for record, where in json_lines(raw, f"calibration file {path}"):
            if not isinstance(record, dict) or "text" not in record:
                raise AtvSparseError(f"calibration file {path}, {where}: expected a JSON object "
                                     '{"text": ...}')
            texts.append(record["text"])
            if not isinstance(texts[-1], str):
                raise AtvSparseError(f"calibration file {path}, {where}: \"text\" is not a string")
            if not is_text(texts[-1]):
                raise AtvSparseError(f"calibration file {path}, {where}: \"text\" holds an unpaired "
                                     "surrogate escape (\\ud800-\\udfff), which is not text")
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise AtvSparseError(f"calibration file {path} is empty")
    return raw


def text_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int,
                 source: str = DEFAULT_CALIBRATION) -> list[torch.Tensor]:
    """``nsamples`` windows of ``seqlen`` token ids, each (1, seqlen) int64, from seeded offsets."""
    check_calibration_size(nsamples, seqlen)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < seqlen:
        raise AtvSparseError(f"calibration data {source} has {ids.shape[1]} tokens, shorter than one window "
                             f"of `seqlen` {seqlen}; give more text or a smaller `seqlen`")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.shape[1] - seqlen) for _ in range(nsamples)]
    return [ids[:, s:s + seqlen].clone() for s in starts]


def check_calibration_size(nsamples: int, seqlen: int) -> None:
    """At least one sample, and at least one token per text window."""
    if nsamples < 1:
        raise AtvSparseError(f"`nsamples` must be at least 1, got {nsamples}")
    if seqlen < 1:
        raise AtvSparseError(f"`seqlen` must be at least 1, got {seqlen}")
