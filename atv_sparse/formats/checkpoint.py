"""Writing a pruned model as a Hugging Face directory: compressed (bitmask + values) or dense.

The writer streams: tensors reach the output shards in state-dict order as they become final (a
pruned block's as soon as it is pruned, ``CheckpointStream``), and a shard's bytes go to disk as
they arrive (``ShardWriter``), so memory never holds the model or a whole shard. Everything goes
to a hidden temporary directory beside ``out_dir`` that is renamed into place only when complete,
so a failed or interrupted write never leaves a directory that looks like a checkpoint
(``staging.StagedOutputDir``).
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
from .bitmask import BITMASK_SUFFIX, VALUES_SUFFIX, compress, unpack_bitmask
from .dtypes import DTYPE_NAMES
from .safetensors_io import INDEX_NAME, SINGLE_NAME
from .shard_io import safetensors_header, write_checksums
from .staging import StagedOutputDir, copy_aux_files

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
    """

    def __init__(self, model: nn.Module, out_dir: Path, *, read, pruned: set[str], patterns: dict, packed: bool,
                 source_dir: Path | None, max_shard_size: int, overwrite: bool):
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
        self.ready: dict[str, dict[str, torch.Tensor]] = {}
        self.cursor = 0

    def __enter__(self) -> "CheckpointStream":
        self.stage = StagedOutputDir(self.out_dir, self.overwrite, self.source_dir).__enter__()
        self.tmp = self.stage.tmp
        self.shards = ShardWriter(self.tmp, self.max_shard_size)
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.shards.close()
        self.stage.__exit__(kind, error, tb)

    def put(self, name: str, linear: nn.Module, keep: torch.Tensor) -> None:
        """Module ``name`` is pruned: its weight and its keep-mask ``keep`` ((out, in) bool) are final;
        write what is now in order."""
        weight = linear.weight.detach()
        if self.packed:
            tensors = _packed(name, weight, keep, self.patterns[name])
        else:
            tensors = {f"{name}.weight": weight.contiguous()}
        self.ready[f"{name}.weight"] = {k: v.cpu() for k, v in tensors.items()}
        self._advance()

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
        self.stage.commit()
        files = sorted(p.name for p in self.out_dir.iterdir())
        return {"files": files, "bytes": sum((self.out_dir / f).stat().st_size for f in shards), "shards": shards}


class ShardWriter:
    """Named tensors -> safetensors shards of at most ``max_shard_size`` bytes, in arrival order.

    A shard's data is appended to a spill file as tensors arrive, so memory never holds a shard;
    closing the shard writes the file ``safetensors.torch.save_file`` would write (same header,
    same data order, byte for byte) from the spill file. Shards are named part-N until
    ``finish`` knows their count and renames them (with the index when there are several).
    """

    def __init__(self, tmp: Path, max_shard_size: int):
        self.tmp, self.max_shard_size = tmp, max_shard_size
        self.spill_path = tmp / ".spill"
        self.spill = open(self.spill_path, "w+b")
        self.entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, spill offset, bytes
        self.shard_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.digests: dict[str, str] = {}  # part name -> SHA-256, hashed while the shard is written

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors that belong together (a packed weight's bitmask and values) go to one shard."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.entries and self.shard_bytes + nbytes > self.max_shard_size:
            self.flush()
        for name, t in tensors.items():
            raw = t.contiguous().reshape(-1).view(torch.uint8)
            offset = self.spill.tell()
            self.spill.write(memoryview(raw.numpy()))
            self.entries.append((name, DTYPE_NAMES[t.dtype], list(t.shape), offset, raw.numel()))
        self.shard_bytes += nbytes

    def flush(self) -> None:
        if self.entries:
            fname = f"part-{len(self.written):05d}.safetensors"
            self.digests[fname] = _save_shard(self.entries, self.spill, self.tmp / fname)
            self.written.append((fname, [e[0] for e in self.entries]))
            self.entries, self.shard_bytes = [], 0
            self.spill.seek(0)
            self.spill.truncate()

    def close(self) -> None:
        if not self.spill.closed:
            self.spill.close()
        self.spill_path.unlink(missing_ok=True)

    def finish(self) -> list[str]:
        """Close the last shard; final names, and the index for several shards. Returns the file names."""
        self.flush()
        self.close()
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
    return digest.hexdigest()
