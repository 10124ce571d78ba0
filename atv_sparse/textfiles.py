"""Reading a user's text file (calibration, evaluation, perplexity) with one set of errors."""

from __future__ import annotations

import json
from collections.abc import Callable
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


def is_text(value: str) -> bool:
    """False for a string JSON decoded from unpaired surrogate escapes (\\ud800-\\udfff), which no
    tokenizer, file name or UTF-8 output takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_lines(text: str, source: str, limit: int | None = None,
               locate: Callable[[int, int], str] = lambda index, lineno: f"line {lineno}") -> list[tuple[object, str]]:
    """(record, where) for the non-blank lines of JSON-lines ``text``, the first ``limit`` of them;
    ``where = locate(index, lineno)`` names a record for messages (index counts records from 0, lineno
    lines from 1). A line that is not JSON, whatever ``json`` raises for it, is an ``AtvSparseError``
    "``source``, ``where``: not valid JSON (...)"."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        where = locate(len(records), lineno)
        try:
            records.append((json.loads(line), where))
        except (ValueError, RecursionError) as e:
            raise AtvSparseError(f"{source}, {where}: not valid JSON ({json_problem(e)})") from None
    return records


def json_problem(e: ValueError | RecursionError) -> str:
    """What a failed ``json.loads`` says: the decoder's message, "nested too deeply" (past the stack), or
    the ``ValueError`` of an integer past 4300 digits, cut to 100 characters."""
    if isinstance(e, json.JSONDecodeError):
        return e.msg
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)[:100]
