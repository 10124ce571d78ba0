"""Resuming an interrupted conversion: the journal, the run's identity, and stopping on a signal.

A conversion stages its output in ``.OUT.partial`` beside ``--out`` (``formats.staging``). After
each block it rewrites a journal there (atomically): the blocks done, their reports and
sparsity.json entries, the dense pre-passes' results, the writer's state (shards closed so far
with their SHA-256, the open shard's spill file) and the run's identity (recipe, calibration,
input checkpoint, output settings). ``convert --resume`` with the same arguments:

    find_interrupted(out, resume=True)   the journal (None: nothing staged, or nothing finished)
    check_same_run(journal, identity)    one error naming what changed; nothing touched
    CheckpointStream(resume=writer)      shards checked by SHA-256, later writes dropped
    prune_model(journal=...)             finished blocks restored from the staged shards and
                                         run on the calibration set (block inputs rebuilt), the
                                         rest pruned as the interrupted run would have

Costs of a resume: the calibration capture, one forward of every finished block over the
calibration set, reading the finished blocks' weights (source, then staged and decompressed) and
one SHA-256 pass over the staged shards. On the Llama-3.2-3B shape, Wanda 2:4 on a CPU, a block
took 24.8 s to rebuild against 28.4 s to prune (benchmarks/results/resume_overhead.md).

Without ``--resume`` a staged run is reported in one line with the command that resumes it and
the one that removes it; it is never reused or deleted silently. SIGINT / SIGTERM stop at the end
of the current block (``stop_on_signals``), with a line saying how to resume; a second one stops
at once (the journal on disk is then the previous block's, which ``--resume`` reads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from torch import nn

from ..errors import AtvSparseError
from ..formats.checkpoint import CheckpointStream
from ..formats.safetensors_io import checkpoint_files, data_start
from ..formats.shard_io import sha256_of
from ..formats.staging import StagedOutputDir, read_journal, staging_is_locked, staging_path

JOURNAL_FORMAT = 1


class ConversionStopped(AtvSparseError):
    """A signal stopped the conversion at a block boundary; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resume_command(argv: list[str]) -> str:
    """The command line that resumes the run started with ``argv`` (convert's arguments)."""
    args = [a for a in argv if a != "--resume"]
    return shlex.join(["python", "-m", "atv_sparse.convert", *args, "--resume"])


def find_interrupted(out: Path, resume: bool, argv: list[str]) -> dict | None:
    """The journal of an interrupted run staged for ``out``, before anything is read or written.

    Without ``resume`` a staged run is an error naming it, with the commands that resume or remove
    it. With ``resume``: its journal, or None when there is nothing to resume (no staging directory;
    or one with no finished block, which is removed: the run starts over).
    """
    tmp = staging_path(out)
    if not tmp.exists():
        return None
    if staging_is_locked(tmp):
        raise AtvSparseError(f"{tmp} is being written by another conversion that is still running; wait for it "
                             "to finish or stop it")
    journal = read_journal(tmp)
    if journal is not None and journal.get("format") != JOURNAL_FORMAT:
        raise AtvSparseError(f"{tmp}: its journal has format {journal.get('format')!r}, this version reads "
                             f"{JOURNAL_FORMAT}; remove it (rm -rf {shlex.quote(str(tmp))}) and start over")
    if not resume:
        done = (f"{journal['blocks_done']} of {journal['blocks_total']} blocks done" if journal is not None
                else "no block finished")
        command = journal["command"] if journal is not None else resume_command(argv)
        raise AtvSparseError(f"{tmp} holds an interrupted conversion to {out} ({done}); resume it: {command}  "
                             f"or remove it: rm -rf {shlex.quote(str(tmp))}")
    if journal is None:
        print(f"resume: {tmp} holds no finished block; starting over", file=sys.stderr)
        shutil.rmtree(tmp)
    return journal


def input_identity(ckpt: Path) -> dict:
    """The input checkpoint as a journal compares it: config.json's SHA-256 and, per safetensors
    file, size, modification time and the SHA-256 of its header (the weights are not hashed: that
    would read the whole checkpoint on every run; a file rewritten in place with the same size,
    time and header goes unnoticed)."""
    identity = {"config.json": sha256_of(Path(ckpt) / "config.json")}
    for path in checkpoint_files(Path(ckpt)):
        header = data_start(path)
        st = path.stat()
        identity[path.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "header_sha256": sha256_of(path, header)}
    return identity


def calibration_digest(calibration) -> str | None:
    """SHA-256 over every calibration sample's tensors (names, dtypes, shapes, bytes) and token kinds."""
    if calibration is None:
        return None
    digest = hashlib.sha256()

    def feed(name: str, value) -> None:
        digest.update(name.encode())
        if torch.is_tensor(value):
            value = value.detach().cpu().contiguous()
            digest.update(f"{value.dtype}{list(value.shape)}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())

    for j, sample in enumerate(calibration.samples):
        for key in sorted(sample):
            feed(f"{j}.{key}", sample[key])
    for j, tokens in enumerate(calibration.tokens or []):
        feed(f"{j}.visual", tokens.visual)
        feed(f"{j}.text", tokens.text)
    return digest.hexdigest()


def run_identity(recipe, calibration: dict, input_: dict, output: dict) -> dict:
    """The four things a resumed run must share with the interrupted one, as JSON values."""
    fields = {"method": recipe.method, "pattern": str(recipe.pattern), "seed": recipe.seed,
              **dataclasses.asdict(recipe.rule)}  # the rule's own settings (blocksize, das, ...)
    if recipe.selection is not None:
        fields.update(dataclasses.asdict(recipe.selection))  # tokens, alpha, budget_rule, ...
    return json.loads(json.dumps({"recipe": fields, "calibration": calibration, "input": input_, "output": output}))


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_same_run(journal: dict, identity: dict, out: Path) -> None:
    """Refuse to resume a run whose recipe, calibration, input or output settings differ."""
    changes = []
    for section, now in identity.items():
        before = journal["identity"].get(section, {})
        for key in [*before, *(k for k in now if k not in before)]:
            if before.get(key) != now.get(key):
                changes.append(f"{section} {key}: {_short(before.get(key))} -> {_short(now.get(key))}")
    if changes:
        tmp = staging_path(out)
        raise AtvSparseError(f"resume: the run staged in {tmp} differs from this one ({'; '.join(changes)}); nothing "
                             f"was changed. Resume it with its own arguments: {journal['command']}  or remove it: "
                             f"rm -rf {shlex.quote(str(tmp))}")


def resumable_stage(out: Path, overwrite: bool, source_dir: Path, journal: dict | None) -> StagedOutputDir:
    """The staging directory of a conversion: a new one, or (``journal``) the interrupted run's."""
    return StagedOutputDir(out, overwrite, source_dir, resumable=True, resume=journal is not None)


class ConversionJournal:
    """The ``prune.walk.BlockJournal`` of a conversion writing through ``stream``.

    pruned: the conversion's module name -> (sparsity.json entry, zeros), filled here from the
    interrupted run's journal and recorded after every block; prepass: the dict
    ``pipeline.prune_model`` keeps the pre-passes' results in.
    """

    def __init__(self, stream: CheckpointStream, *, identity: dict, command: str, layers_prefix: str,
                 targets: dict[str, nn.Linear], num_blocks: int, pruned: dict, previous: dict | None):
        self.stream, self.identity, self.command = stream, identity, command
        self.layers_prefix, self.targets, self.num_blocks, self.pruned = layers_prefix, targets, num_blocks, pruned
        self.done = previous["blocks_done"] if previous else 0
        self.reports: list[dict] = list(previous["blocks"]) if previous else []
        self.prepass: dict = dict(previous["prepass"]) if previous else {}
        if previous:
            pruned.update({name: tuple(value) for name, value in previous["modules"].items()})
            if previous.get("threads") != torch.get_num_threads():
                print(f"warning: resume: this run computes with {torch.get_num_threads()} threads, the interrupted "
                      f"one with {previous.get('threads')}; the output is as valid, but its last bits may differ "
                      "from an uninterrupted run's", file=sys.stderr)
        self.resumed_from = self.done
        self.rebuild_s = 0.0
        self.stop: int | None = None  # the signal that asked to stop

    @property
    def tmp(self) -> Path:
        return self.stream.stage.tmp

    def restore(self, block_index: int, block: nn.Module) -> None:
        prefix = f"{self.layers_prefix}.{block_index}."
        for name, linear in self.targets.items():
            if name.startswith(prefix):
                weight = self.stream.read_pruned(name, linear.in_features)
                if weight.dtype != linear.weight.dtype or weight.shape != linear.weight.shape:
                    raise AtvSparseError(f"resume: {name} in {self.tmp} is {weight.dtype} {tuple(weight.shape)}, the "
                                         f"model holds {linear.weight.dtype} {tuple(linear.weight.shape)}; remove "
                                         f"{self.tmp} and start over")
                linear.weight.data.copy_(weight)

    def finished(self, block_index: int, report: dict) -> None:
        self.reports.append(report)
        self.stream.stage.write_journal({
            "format": JOURNAL_FORMAT, "command": self.command, "identity": self.identity,
            "threads": torch.get_num_threads(),
            "blocks_total": self.num_blocks, "blocks_done": block_index + 1, "blocks": self.reports,
            "modules": {name: list(value) for name, value in self.pruned.items()}, "prepass": self.prepass,
            "writer": self.stream.state()})
        self.stream.journaled()
        self.done = block_index + 1
        if self.stop is not None:
            name = signal.Signals(self.stop).name
            raise ConversionStopped(f"{name}: stopped after block {self.done} of {self.num_blocks}; the finished "
                                    f"blocks are kept in {self.tmp}. Resume with: {self.command}", 128 + self.stop)

    def hint(self) -> str:
        """How to go on from what is on disk now."""
        if self.stream.stage.keep:
            return f"{self.done} of {self.num_blocks} blocks are kept in {self.tmp}; resume with: {self.command}"
        return "no block had finished; nothing was kept"


@contextlib.contextmanager
def kept_for_resume(journal: ConversionJournal):
    """Around a conversion's work: bad input (an ``AtvSparseError``, which the same arguments would
    meet again) removes the staging directory; any other failure after a journal was written
    (CUDA out of memory, a bug, Ctrl-C outside the blocks) keeps it and says how to resume."""
    try:
        yield
    except ConversionStopped:
        raise
    except AtvSparseError:
        journal.stream.stage.keep = False
        raise
    except BaseException as e:
        if journal.stream.stage.keep:
            print(f"stopped ({type(e).__name__}): {journal.hint()}", file=sys.stderr)
        raise


@contextlib.contextmanager
def stop_on_signals(journal: ConversionJournal):
    """SIGINT / SIGTERM ask ``journal`` to stop after the current block; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if journal.stop is None:
            journal.stop = signum
            print(f"\n{name}: stopping after the current block (send it again to stop at once)", file=sys.stderr,
                  flush=True)
            return
        if not journal.stream.stage.keep:
            shutil.rmtree(journal.tmp, ignore_errors=True)
        print(f"{name}: stopped at once; {journal.hint()}", file=sys.stderr, flush=True)
        os._exit(128 + signum)  # at once: no cleanup may run, and the journal on disk stays readable

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["ConversionJournal", "ConversionStopped", "JOURNAL_FORMAT", "calibration_digest", "check_same_run",
           "find_interrupted", "input_identity", "kept_for_resume", "resumable_stage", "resume_command",
           "run_identity", "stop_on_signals"]
