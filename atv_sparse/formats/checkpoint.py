"""Writing a pruned model as a Hugging Face directory: compressed (bitmask + values) or dense.

The writer streams: tensors are visited in state-dict order, a pruned weight is compressed only
when its shard is written, and each shard is freed before the next. Everything goes to a hidden
temporary directory beside ``out_dir`` that is renamed into place only when complete, so a failed
or interrupted write never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import AtvSparseError
from .bitmask import compress, unpack_bitmask
from .safetensors_io import INDEX_NAME, SINGLE_NAME
from .shard_io import CHECKSUMS_NAME, write_checksums, write_shard

# Files of the source directory that the writer produces itself (never copied).
_OWN_FILES = {"config.json", INDEX_NAME, "sparsity.json", "prune_report.json", CHECKSUMS_NAME}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


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


def check_output_dir(out_dir: Path, overwrite: bool, source_dir: Path | None = None) -> None:
    """Refuse an existing ``out_dir`` without ``overwrite``, and never write over the source."""
    out_dir = Path(out_dir)
    if source_dir is not None and out_dir.resolve() == Path(source_dir).resolve():
        raise AtvSparseError(f"--out {out_dir} is the input checkpoint itself; choose another directory")
    if out_dir.exists() and not overwrite:
        raise AtvSparseError(f"--out {out_dir} already exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise AtvSparseError(f"--out {out_dir} exists and is not a directory")


def packed_nbytes(out_features: int, in_features: int, kept: int, element_size: int) -> int:
    """Bytes of ``weight_bitmask`` + ``weight_values`` for one pruned linear."""
    return out_features * -(-in_features // 8) + kept * element_size


def _named_tensors(model: nn.Module, bitmasks: dict[str, torch.Tensor], patterns: dict, packed: bool):
    """Yield (name, thunk) in state-dict order; a thunk makes the tensor(s) to write.

    Tied tensors (same storage, e.g. lm_head tied to the embeddings) are written once, under the
    first name, as ``save_pretrained`` does.
    """
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        module_name = name.removesuffix(".weight")
        if packed and name.endswith(".weight") and module_name in bitmasks:
            yield name, (lambda t=tensor, mn=module_name: _packed(mn, t, bitmasks[mn], patterns[mn]))
        else:
            yield name, (lambda n=name, t=tensor: {n: t.contiguous()})


def _packed(module_name: str, weight: torch.Tensor, bitmask: torch.Tensor, pattern) -> dict:
    keep = unpack_bitmask(bitmask, weight.shape[1])
    mask_t, values = compress(weight, keep, pattern.n, pattern.m)
    return {f"{module_name}.weight_bitmask": mask_t, f"{module_name}.weight_values": values}


def write_checkpoint(model: nn.Module, out_dir: Path, *, source_dir: Path | None, bitmasks: dict[str, torch.Tensor],
                     patterns: dict, packed: bool, quantization_config: dict | None, extra_json: dict[str, dict],
                     max_shard_size: int, overwrite: bool, extra_files: dict[str, Path] | None = None) -> dict:
    """Write ``model`` (pruned in place) to ``out_dir``; return {"files": [...], "bytes": total}.

    bitmasks: module name -> packed keep-mask; patterns: module name -> Pattern. ``packed``
    writes bitmask + values for those modules and ``quantization_config`` into config.json;
    otherwise dense weights with zeros. ``extra_json``: file name -> content, or a function returning it called just before the
    directory is moved into place (so a report can include the write time). ``extra_files``:
    file name -> a finished file to move in (a plot).
    Auxiliary files of ``source_dir`` (tokenizer, processor, generation config) are copied.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, source_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        shards = _write_shards(model, tmp, bitmasks, patterns, packed, max_shard_size)
        if source_dir is not None:
            _copy_aux_files(Path(source_dir), tmp)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
        if packed:
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
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise AtvSparseError(f"writing {out_dir} failed: {e}; nothing was written") from None
        raise
    files = sorted(p.name for p in out_dir.iterdir())
    return {"files": files, "bytes": sum((out_dir / f).stat().st_size for f in shards), "shards": shards}


def _write_shards(model, tmp: Path, bitmasks, patterns, packed: bool, max_shard_size: int) -> list[str]:
    shard, shard_bytes, written, weight_map = {}, 0, [], {}
    digests = {}  # temporary shard name -> SHA-256, hashed while writing (no second pass)

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"part-{len(written):05d}.safetensors"
            digests[fname] = write_shard(shard, tmp / fname, metadata={"format": "pt"})
            written.append((fname, list(shard)))
            shard, shard_bytes = {}, 0

    for _, make in _named_tensors(model, bitmasks, patterns, packed):
        tensors = {k: v.cpu() for k, v in make().items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard and shard_bytes + nbytes > max_shard_size:
            flush()
        shard.update(tensors)
        shard_bytes += nbytes
    flush()
    if len(written) == 1:
        os.replace(tmp / written[0][0], tmp / SINGLE_NAME)
        write_checksums(tmp, {SINGLE_NAME: digests[written[0][0]]})
        return [SINGLE_NAME]
    names, total = [], 0
    for i, (fname, keys) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp / fname, tmp / final)
        total += (tmp / final).stat().st_size
        weight_map.update({k: final for k in keys})
        names.append(final)
    write_checksums(tmp, {final: digests[fname] for final, (fname, _) in zip(names, written, strict=True)})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _copy_aux_files(source_dir: Path, tmp: Path) -> None:
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and path.name not in _OWN_FILES and not path.name.endswith(_WEIGHT_SUFFIXES) \
                and not path.name.endswith(".index.json"):
            shutil.copy2(path, tmp / path.name)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not overwrite:  # appeared while we were writing
            raise AtvSparseError(f"--out {out_dir} already exists; pass --overwrite to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
