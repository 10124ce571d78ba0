"""Reading a user's text file (calibration, evaluation, perplexity) with one set of errors."""

from __future__ import annotations

from pathlib import Path

from .errors import AtvSparseError


def read_user_text(path: str | Path, what: str, allow_empty: bool = True) -> str:
    """The UTF-8 text of ``path``; a missing, non-UTF-8 (or, unless ``allow_empty``, blank) file is an
    ``AtvSparseError`` naming it as ``what`` (e.g. "calibration file")."""
    path = Path(path)
    if not path.is_file():
        raise AtvSparseError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AtvSparseError(f"{what} {path} is not UTF-8 text") from None
    if not allow_empty and not text.strip():
        raise AtvSparseError(f"{what} {path} is empty")
    return text
