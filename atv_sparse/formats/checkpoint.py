"""Writing a pruned model as a Hugging Face directory: compressed (bitmask + values) or dense.

The writer streams: tensors reach the output shards in state-dict order as they become final (a
pruned block's as soon as it is pruned, ``CheckpointStream``), and a shard's bytes go to disk as
they arrive (``ShardWriter``), so memory never holds the model or a whole shard. Everything goes
to a hidden temporary directory beside ``out_dir`` that is renamed into place only when complete,
so a failed or interrupted write never leaves a directory that looks like a checkpoint
(``staging.StagedOutputDir``).

Resuming (``convert --resume``, docs/design.md 3): ``CheckpointStream.state()`` is what the journal
records after each block (the state-dict cursor, the shards closed so far with their SHA-256, and
the open shard's entries with the length and SHA-256 of its spill file); a stream built with that
state checks it against the files, drops whatever was written after it, and carries on, so the
bytes written equal those of a run that never stopped. ``read_pruned`` reads a finished block's
pruned weights back from the staging directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import AtvSparseError
from .bitmask import BITMASK_SUFFIX, VALUES_SUFFIX, compress, decompress, unpack_bitmask
from .dtypes import DTYPE_NAMES
from .safetensors_io import INDEX_NAME, SINGLE_NAME, data_start, read_header, read_tensor
from .shard_io import safetensors_header, sha256_of, write_checksums
from .staging import JOURNAL_NAME, StagedOutputDir, copy_aux_files

_CHUNK = 1 << 26  # bytes read back from the spill file at a time


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"64KiB"`` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        value = float(number) * units[t[len(number):]]
    except (ValueError, KeyError):
        raise AtvSparseError(f"size {text!r} is not a size like 5GB, 500MB or a byte count") from None
    if value <= 0:
        raise AtvSparseError(f"size {text!r} must be positive")
    return int(value)


def _packed(module_name: str, weight: torch.Tensor, keep: torch.Tensor, pattern) -> dict:
    mask_t, values = compress(weight, keep, pattern.n, pattern.m)
    return {module_name + BITMASK_SUFFIX: mask_t, module_name + VALUES_SUFFIX: values}


def write_checkpoint(model: nn.Module, out_dir: Path, *, source_dir: Path | None, bitmasks: dict[str, torch.Tensor],
                     patterns: dict, packed: bool, quantization_config: dict | None, extra_json: dict[str, dict],
                     max_shard_size: int, overwrite: bool, extra_files: dict[str, Path] | None = None) -> dict:
    """Write ``model`` (in memory, pruned in place) to ``out_dir``; return {"files", "bytes", "shards"}.

    bitmasks: module name -> packed keep-mask (``PruneResult.bitmasks``); patterns: module name -> Pattern. ``packed``
    writes bitmask + values for those modules and ``quantization_config`` into config.json;
    otherwise dense weights with zeros. ``extra_json``: file name -> content, or a function returning it called just before the
    directory is moved into place (so a report can include the write time). ``extra_files``:
    file name -> a finished file to move in (a plot).
    Auxiliary files of ``source_dir`` (tokenizer, processor, generation config) are copied.
    A model too large for memory is written block by block with ``CheckpointStream`` instead.
    """
    state = model.state_dict()
    pruned = set(bitmasks) if packed else set()
    with CheckpointStream(model, out_dir, read=state.__getitem__, pruned=pruned, patterns=patterns, packed=packed,
                          source_dir=source_dir, max_shard_size=max_shard_size, overwrite=overwrite) as stream:
        for name in pruned:
            linear = model.get_submodule(name)
            stream.put(name, linear, unpack_bitmask(bitmasks[name], linear.in_features))
        return stream.finish(quantization_config, extra_json, extra_files)


class CheckpointStream:
    """A checkpoint written while the model is pruned: tensors go to the output shards in state-dict
    order as soon as they are final, so memory holds one block, not the model.

        with CheckpointStream(skeleton, out, read=weights.read, pruned=targets, ...) as stream:
            ... stream.put(name, linear, keep) for every pruned linear, in any order ...
            stream.finish(quantization_config, extra_json)

    ``read(key)``: a tensor of the source as the model holds it (every key except the weights of
    ``pruned`` modules, which only ``put`` provides: packed, or dense with zeros). Tied tensors are
    written once, under the first name, as ``save_pretrained`` does. Everything goes to a hidden
    temporary directory beside ``out_dir``, renamed into place by ``finish``; leaving the ``with``
    block any other way removes it, and a failed write (disk full) is an error naming ``out_dir``.

    ``stage``: the staging directory to write in (default: a new ``StagedOutputDir``); ``resume``:
    a ``state()`` of an earlier stream into the same (adopted) stage, continued from there: a
    ``put`` of a module it already wrote is ignored.
    """

    def __init__(self, model: nn.Module, out_dir: Path, *, read, pruned: set[str], patterns: dict, packed: bool,
                 source_dir: Path | None, max_shard_size: int, overwrite: bool, stage: StagedOutputDir | None = None,
                 resume: dict | None = None):
        self.model, self.out_dir, self.read = model, Path(out_dir), read
        self.patterns, self.packed, self.source_dir, self.overwrite = patterns, packed, source_dir, overwrite
        self.max_shard_size = max_shard_size
        self.waiting = {f"{name}.weight" for name in pruned}
        self.order, seen = [], set()
        for key, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # tied: the same Parameter under a second name
                continue
            seen.add(id(tensor))
            self.order.append(key)
        self.position = {key: i for i, key in enumerate(self.order)}
        self.ready: dict[str, dict[str, torch.Tensor]] = {}
        self.cursor = 0
        self.stage = stage or StagedOutputDir(self.out_dir, overwrite, source_dir)
        self.resume = resume

    def __enter__(self) -> "CheckpointStream":
        self.stage.__enter__()
        self.tmp = self.stage.tmp
        try:
            if self.resume is None:
                self.shards = ShardWriter(self.tmp, self.max_shard_size)
            else:
                self.cursor = int(self.resume["cursor"])
                self.shards = ShardWriter(self.tmp, self.max_shard_size, self.resume["shards"])
                self.shards.remove_unlisted({JOURNAL_NAME})
        except BaseException as e:
            self.stage.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.shards.close(remove=not self.stage.keep)
        self.stage.__exit__(kind, error, tb)

    def put(self, name: str, linear: nn.Module, keep: torch.Tensor) -> None:
        """Module ``name`` is pruned: its weight and its keep-mask ``keep`` ((out, in) bool) are final;
        write what is now in order."""
        if self.position[f"{name}.weight"] < self.cursor:
            return  # written before the run was resumed (a linear outside the blocks, pruned again)
        weight = linear.weight.detach()
        if self.packed:
            tensors = _packed(name, weight, keep, self.patterns[name])
        else:
            tensors = {f"{name}.weight": weight.contiguous()}
        self.ready[f"{name}.weight"] = {k: v.cpu() for k, v in tensors.items()}
        self._advance()

    def state(self) -> dict:
        """What a journal records so a later stream can continue from here (the spill file is synced)."""
        return {"cursor": self.cursor, "shards": self.shards.state()}

    def journaled(self) -> None:
        """The last ``state()`` is in the journal: spill files of shards closed before it can go."""
        self.shards.drop_obsolete()

    def read_pruned(self, name: str, in_features: int) -> torch.Tensor:
        """Module ``name``'s pruned weight (out, in) as already written (packed: decompressed)."""
        if not self.packed:
            return self.shards.read(f"{name}.weight")
        return decompress(self.shards.read(name + BITMASK_SUFFIX), self.shards.read(name + VALUES_SUFFIX),
                          in_features)

    def _advance(self) -> None:
        while self.cursor < len(self.order):
            key = self.order[self.cursor]
            if key in self.ready:
                tensors = self.ready.pop(key)
            elif key in self.waiting:
                return  # not pruned yet: everything after it waits, to keep state-dict order
            else:
                tensors = {key: self.read(key).contiguous().cpu()}
            self.shards.add(tensors)
            self.cursor += 1

    def finish(self, quantization_config: dict | None, extra_json: dict[str, dict],
               extra_files: dict[str, Path] | None = None) -> dict:
        """Close the last shard, write the index, config and extra files, move the directory into place."""
        self._advance()
        if self.cursor < len(self.order):
            raise AssertionError(f"{self.order[self.cursor]} was never put; every pruned module must be")
        shards = self.shards.finish()
        tmp, model = self.tmp, self.model
        if self.source_dir is not None:
            copy_aux_files(Path(self.source_dir), tmp, own={"config.json"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
        if self.packed:
            config["quantization_config"] = quantization_config
            if isinstance(config.get("text_config"), dict):  # where VLM language models read it
                config["text_config"]["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(tmp)
        for fname, content in extra_json.items():
            content = content() if callable(content) else content
            (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
        for fname, src in (extra_files or {}).items():
            shutil.move(src, tmp / fname)
        self.stage.drop_journal()  # first: from here on a resume starts over rather than miss a spill file
        self.shards.close()
        self.stage.commit()
        files = sorted(p.name for p in self.out_dir.iterdir())
        return {"files": files, "bytes": sum((self.out_dir / f).stat().st_size for f in shards), "shards": shards}


class ShardWriter:
    """Named tensors -> safetensors shards of at most ``max_shard_size`` bytes, in arrival order.

    A shard's data is appended to its spill file (``.spill-N``) as tensors arrive, so memory never
    holds a shard; closing the shard writes the file ``safetensors.torch.save_file`` would write (same
    header, same data order, byte for byte) from the spill file. Shards are named part-N until
    ``finish`` knows their count and renames them (with the index when there are several).

    ``state()`` / ``ShardWriter(tmp, size, state)``: the closed shards (name, tensor names, SHA-256)
    and the open one (entries, spill length, SHA-256 of the spill so far), for a journal. A closed
    shard's spill file stays until ``drop_obsolete`` (the journal no longer needs it).
    """

    def __init__(self, tmp: Path, max_shard_size: int, state: dict | None = None):
        self.tmp, self.max_shard_size = tmp, max_shard_size
        self.entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, spill offset, bytes
        self.shard_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.digests: dict[str, str] = {}  # part name -> SHA-256, hashed while the shard is written
        self.obsolete: list[Path] = []
        self.headers: dict[Path, tuple[int, dict]] = {}  # closed shard -> (data start, header), parsed once
        self.spill_hash = hashlib.sha256()
        if state is None:
            self.spill_path = self._spill_name(0)
            self.spill = open(self.spill_path, "w+b")
        else:
            self._restore(state)

    def _spill_name(self, index: int) -> Path:
        return self.tmp / f".spill-{index:05d}"

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors that belong together (a packed weight's bitmask and values) go to one shard."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.entries and self.shard_bytes + nbytes > self.max_shard_size:
            self.flush()
        for name, t in tensors.items():
            raw = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            offset = self.spill.tell()
            self.spill.write(raw)
            self.spill_hash.update(raw)
            self.entries.append((name, DTYPE_NAMES[t.dtype], list(t.shape), offset, raw.nbytes))
        self.shard_bytes += nbytes

    def flush(self) -> None:
        if self.entries:
            fname = f"part-{len(self.written):05d}.safetensors"
            self.digests[fname] = _save_shard(self.entries, self.spill, self.tmp / fname)
            self.written.append((fname, [e[0] for e in self.entries]))
            self.entries, self.shard_bytes = [], 0
            self.spill.close()
            self.obsolete.append(self.spill_path)
            self.spill_path = self._spill_name(len(self.written))
            self.spill = open(self.spill_path, "w+b")
            self.spill_hash = hashlib.sha256()

    def state(self) -> dict:
        self.spill.flush()
        os.fsync(self.spill.fileno())
        return {"closed": [[fname, keys, self.digests[fname]] for fname, keys in self.written],
                "open": {"entries": [list(e) for e in self.entries], "bytes": self.spill.tell(),
                         "sha256": self.spill_hash.hexdigest()}}

    def drop_obsolete(self) -> None:
        for path in self.obsolete:
            path.unlink(missing_ok=True)
        self.obsolete = []

    def _restore(self, state: dict) -> None:
        """Check the closed shards (found under their part name or, after an interrupted ``finish``,
        their final one) and the spill file against ``state``; cut the spill file back to it."""
        hint = f"remove {self.tmp} and start over"
        for i, (fname, keys, digest) in enumerate(state["closed"]):
            path = self.tmp / fname
            if not path.exists():
                renamed = list(self.tmp.glob(f"model-{i + 1:05d}-of-*.safetensors"))
                renamed += [self.tmp / SINGLE_NAME] if i == 0 else []
                found = [p for p in renamed if p.exists() and sha256_of(p) == digest]
                if not found:
                    raise AtvSparseError(f"resume: shard {path} recorded in the journal is missing; {hint}")
                os.replace(found[0], path)
            elif sha256_of(path) != digest:
                raise AtvSparseError(f"resume: shard {path} differs from the journal's SHA-256; {hint}")
            self.written.append((fname, list(keys)))
            self.digests[fname] = digest
        spill = state["open"]
        self.spill_path = self._spill_name(len(self.written))
        if not self.spill_path.exists() or self.spill_path.stat().st_size < spill["bytes"]:
            raise AtvSparseError(f"resume: {self.spill_path} is shorter than the journal records; {hint}")
        self.spill = open(self.spill_path, "r+b")
        self.spill_hash = sha256_of(self.spill_path, spill["bytes"], hasher=True)
        if self.spill_hash.hexdigest() != spill["sha256"]:
            self.spill.close()
            raise AtvSparseError(f"resume: {self.spill_path} differs from the journal's SHA-256; {hint}")
        self.spill.truncate(spill["bytes"])
        self.spill.seek(spill["bytes"])
        self.entries = [(e[0], e[1], list(e[2]), int(e[3]), int(e[4])) for e in spill["entries"]]
        self.shard_bytes = sum(e[4] for e in self.entries)

    def remove_unlisted(self, keep: set[str]) -> None:
        """Delete every file of ``tmp`` that the restored state does not use (written after the journal)."""
        used = keep | {fname for fname, _ in self.written} | {self.spill_path.name}
        for path in self.tmp.iterdir():
            if path.name not in used:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as written so far: from a closed shard or the open shard's spill file."""
        for fname, keys in self.written:
            if key in keys:
                path = self.tmp / fname
                if path not in self.headers:
                    self.headers[path] = data_start(path), read_header(path)
                start, header = self.headers[path]
                return read_tensor(path, start, header[key])
        for name, dtype, shape, offset, nbytes in self.entries:
            if name == key:
                self.spill.flush()
                return read_tensor(self.spill_path, offset, {"dtype": dtype, "shape": shape,
                                                             "data_offsets": [0, nbytes]})
        raise AssertionError(f"{key} was not written")

    def close(self, remove: bool = True) -> None:
        """Close the spill file; ``remove``: delete every spill file (not when the stage is kept)."""
        if not self.spill.closed:
            self.spill.close()
        if remove:
            for path in [*self.obsolete, self.spill_path]:
                path.unlink(missing_ok=True)
            self.obsolete = []

    def finish(self) -> list[str]:
        """Close the last shard; final names, and the index for several shards. Returns the file names.

        The spill files stay (a journal may still name them) until ``close``."""
        self.flush()
        self.close(remove=False)
        tmp, written = self.tmp, self.written
        if len(written) == 1:
            os.replace(tmp / written[0][0], tmp / SINGLE_NAME)
            write_checksums(tmp, {SINGLE_NAME: self.digests[written[0][0]]})
            return [SINGLE_NAME]
        names, total, weight_map = [], 0, {}
        for i, (fname, keys) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp / fname, tmp / final)
            total += (tmp / final).stat().st_size
            weight_map.update({k: final for k in keys})
            names.append(final)
        write_checksums(tmp, {final: self.digests[fname] for final, (fname, _) in zip(names, written, strict=True)})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _save_shard(entries: list[tuple[str, str, list[int], int, int]], spill, path: Path) -> str:
    """Write one safetensors file (header, then each tensor's bytes read back from the spill file),
    hashing every byte on its way out; returns the file's SHA-256 hex digest."""
    raw, ordered = safetensors_header([(name, dtype, shape, nbytes) for name, dtype, shape, _, nbytes in entries],
                                      {"format": "pt"})
    start = {e[0]: e[3] for e in entries}
    digest = hashlib.sha256(raw)
    spill.flush()
    with open(path, "wb") as out:
        out.write(raw)
        for name, _, _, nbytes in ordered:
            done = 0
            while done < nbytes:
                chunk = os.pread(spill.fileno(), min(nbytes - done, _CHUNK), start[name] + done)
                if not chunk:
                    raise OSError(errno.EIO, f"short read of the spill file while writing {path}")
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
        out.flush()
        os.fsync(out.fileno())  # a journal may name this shard next: it must be on disk first
    return digest.hexdigest()
