"""An output model directory written whole or not at all, and the journal that lets a run resume.

Every writer of a model directory (``formats.checkpoint``, ``analysis.outliers``) writes into a
hidden temporary directory beside ``out_dir`` and renames it into place only when complete, so a
failed or interrupted write never leaves a directory that looks like a checkpoint:

    with StagedOutputDir(out_dir, overwrite, source_dir) as stage:
        ... write files into stage.tmp ...
        copy_aux_files(source_dir, stage.tmp, own={"config.json"})
        stage.commit()                  # renamed into place; without it the temporary dir is removed

A resumable stage (``resumable=True``, ``convert``) has a fixed name, ``.OUT.partial``
(``staging_path``), so a later run finds it; it holds a lock while a process writes it, a journal
(``write_journal``: written to a temporary name, fsynced, renamed, so a reader sees the previous
journal or the new one, never a torn one) and is kept when the run stops after a journal was
written (``keep``). The finished directory gets the mode a plain ``mkdir`` gives (0777 less the
umask), not ``mkdtemp``'s 0700, so a server running as another user can read it.

Messages name this module's parameters in backticks (`` `out_dir` ``, `` `overwrite` ``), which a CLI
writes as its flags (``errors.with_flags``).
"""

from __future__ import annotations

import fcntl
import json
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
JOURNAL_NAME = ".journal.json"


def staging_path(out_dir: Path) -> Path:
    """Where a resumable run stages ``out_dir``: ``.NAME.partial`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


def directory_mode() -> int:
    """The mode ``mkdir`` gives a new directory under this process's umask (0777 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


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


def read_journal(tmp: Path) -> dict | None:
    """The journal of staging directory ``tmp`` (None when it has none yet)."""
    path = Path(tmp) / JOURNAL_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        journal = json.loads(text)
    except ValueError:  # cannot happen through write_journal's rename; a hand-edited file
        raise AtvSparseError(f"{path}: not a journal this version can read; remove {Path(tmp)} and start "
                             "over") from None
    if not isinstance(journal, dict):
        raise AtvSparseError(f"{path}: not a journal this version can read; remove {Path(tmp)} and start over")
    return journal


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_staging(tmp: Path) -> int:
    """Hold an exclusive lock on staging directory ``tmp`` (an open fd; closing it releases the lock)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AtvSparseError(f"{tmp} is being written by another conversion that is still running; wait for it "
                             "to finish or stop it") from None
    return fd


def staging_is_locked(tmp: Path) -> bool:
    """Whether a running process holds ``tmp``'s lock."""
    try:
        os.close(lock_staging(tmp))
    except AtvSparseError:
        return True
    return False


class StagedOutputDir:
    """``tmp``: a hidden directory beside ``out_dir``, renamed to ``out_dir`` by ``commit``.

    Entering checks ``out_dir`` (``check_output_dir``); leaving without ``commit`` removes ``tmp``
    (unless resumable and ``keep`` is set), and an ``OSError`` on the way (disk full) becomes an
    ``AtvSparseError`` naming ``out_dir``. ``resumable``: ``tmp`` is ``staging_path(out_dir)``,
    created, or adopted as it is with ``resume`` (the caller has read its journal), and locked.
    """

    def __init__(self, out_dir: Path, overwrite: bool, source_dir: Path | None = None, *, resumable: bool = False,
                 resume: bool = False):
        self.out_dir, self.overwrite, self.source_dir = Path(out_dir), overwrite, source_dir
        self.resumable, self.resume = resumable, resume
        self.committed = False
        self.keep = False  # resumable: a journal was written, so a failure keeps tmp for --resume
        self._lock: int | None = None

    def __enter__(self) -> "StagedOutputDir":
        check_output_dir(self.out_dir, self.overwrite, self.source_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        if not self.resumable:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
            return self
        self.tmp = staging_path(self.out_dir)
        if not self.resume:
            self.tmp.mkdir()  # an existing one is the caller's to report (convert: resume or remove it)
        self._lock = lock_staging(self.tmp)
        self.keep = self.resume and read_journal(self.tmp) is not None
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self.committed:
            return
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(error, OSError):
            kept = f"; the finished blocks are kept in {self.tmp}" if self.keep else "; nothing was written"
            raise AtvSparseError(f"writing {self.out_dir} failed: {error}{kept}") from None

    def write_journal(self, content: dict) -> None:
        """Replace the journal atomically (temporary name, fsync, rename, fsync of the directory)."""
        part = self.tmp / (JOURNAL_NAME + ".new")
        with open(part, "w") as f:
            f.write(json.dumps(content, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, self.tmp / JOURNAL_NAME)
        _fsync_dir(self.tmp)
        self.keep = True

    def drop_journal(self) -> None:
        """Remove the journal (the run is complete; a directory in place never holds one)."""
        (self.tmp / JOURNAL_NAME).unlink(missing_ok=True)

    def commit(self) -> None:
        """Move ``tmp`` to ``out_dir`` (replacing it with ``overwrite``; refused if it appeared meanwhile).

        The journal goes first (``drop_journal``); ``tmp`` gets ``directory_mode``."""
        out_dir = self.out_dir
        self.drop_journal()
        os.chmod(self.tmp, directory_mode())
        if out_dir.exists():
            check_output_dir(out_dir, self.overwrite)  # it may have appeared meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(self.tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, out_dir)
        self.committed = True
