"""An output model directory written whole or not at all.

Every writer of a model directory (``formats.checkpoint``, ``analysis.outliers``) writes into a
hidden temporary directory beside ``out_dir`` and renames it into place only when complete, so a
failed or interrupted write never leaves a directory that looks like a checkpoint:

    with StagedOutputDir(out_dir, overwrite, source_dir) as stage:
        ... write files into stage.tmp ...
        copy_aux_files(source_dir, stage.tmp, own={"config.json"})
        stage.commit()                  # renamed into place; without it the temporary dir is removed

Messages name this module's parameters in backticks (`` `out_dir` ``, `` `overwrite` ``), which a CLI
writes as its flags (``errors.with_flags``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import AtvSparseError
from .safetensors_io import INDEX_NAME
from .shard_io import CHECKSUMS_NAME


# Never copied from the source: weights and their index (the writer writes its own), and the
# reports and digests that describe the source's weights, not the output's.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
REPORT_FILES = frozenset({INDEX_NAME, CHECKSUMS_NAME, "sparsity.json", "prune_report.json"})


def check_output_dir(out_dir: Path, overwrite: bool, source_dir: Path | None = None) -> None:
    """Refuse an existing ``out_dir`` without ``overwrite``, a file there, and the source itself."""
    out_dir = Path(out_dir)
    if source_dir is not None and out_dir.resolve() == Path(source_dir).resolve():
        raise AtvSparseError(f"`out_dir` {out_dir} is the input checkpoint itself; choose another directory")
    if out_dir.exists() and not overwrite:
        raise AtvSparseError(f"`out_dir` {out_dir} already exists; pass `overwrite` to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise AtvSparseError(f"`out_dir` {out_dir} exists and is not a directory")


def copy_aux_files(source_dir: Path, tmp: Path, own: set[str] | frozenset[str] = frozenset()) -> None:
    """Copy the source's tokenizer, processor, chat-template and generation files into ``tmp``.

    Skipped: weights, ``REPORT_FILES``, the writer's ``own`` files, and anything already in ``tmp``.
    """
    for path in sorted(Path(source_dir).iterdir()):
        skip = path.name in REPORT_FILES or path.name in own or path.name.endswith(WEIGHT_SUFFIXES)
        if path.is_file() and not skip and not (tmp / path.name).exists():
            shutil.copy2(path, tmp / path.name)


class StagedOutputDir:
    """``tmp``: a hidden directory beside ``out_dir``, renamed to ``out_dir`` by ``commit``.

    Entering checks ``out_dir`` (``check_output_dir``); leaving without ``commit`` removes ``tmp``,
    and an ``OSError`` on the way (disk full) becomes an ``AtvSparseError`` naming ``out_dir``.
    """

    def __init__(self, out_dir: Path, overwrite: bool, source_dir: Path | None = None):
        self.out_dir, self.overwrite, self.source_dir = Path(out_dir), overwrite, source_dir
        self.committed = False

    def __enter__(self) -> "StagedOutputDir":
        check_output_dir(self.out_dir, self.overwrite, self.source_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self.committed:
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise AtvSparseError(f"writing {self.out_dir} failed: {error}; nothing was written") from None

    def commit(self) -> None:
        """Move ``tmp`` to ``out_dir`` (replacing it with ``overwrite``; refused if it appeared meanwhile)."""
        out_dir = self.out_dir
        if out_dir.exists():
            check_output_dir(out_dir, self.overwrite)  # it may have appeared meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(self.tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, out_dir)
        self.committed = True
