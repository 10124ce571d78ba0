"""Reading safetensors checkpoints: every header checked before anything loads a tensor, then
single tensors read on demand.

A checkpoint directory holds ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. ``checkpoint_tensors`` reads only the headers (no tensor data),
once per shard, and refuses a truncated or corrupt file with a message naming it; the map it
returns is what every reader of the checkpoint uses (``models.lazy`` reads a module's tensors
with ``read_tensor`` from it, ``estimate`` sizes the output from it).

Every header is held to what the safetensors reader itself requires, so that a file accepted here
never fails later inside safetensors or transformers with an error that names nothing:

- at least 8 bytes; a little-endian u64 header length of at most 100 MB (safetensors' own limit)
  that fits in the file;
- a UTF-8 JSON object starting with ``{``, no key twice; ``__metadata__`` (optional) maps
  strings to strings;
- each tensor: exactly ``dtype`` (a known name), ``shape`` (non-negative integers) and
  ``data_offsets`` (two integers, begin <= end), and ``end - begin`` equal to the bytes its
  dtype and shape need;
- the tensors' byte ranges, in offset order, tile the data area exactly: no overlap, no gap,
  nothing past the end, no bytes left over.

Any other case is an ``AtvSparseError`` naming the file and, where there is one, the tensor:
never a ``TypeError``, ``KeyError``, ``struct.error`` or ``OverflowError``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import AtvSparseError
from .dtypes import DTYPE_BYTES, SAFETENSORS_DTYPES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers itself
MAX_INDEX_BYTES = 100_000_000

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_HINT = "the file is corrupt or truncated; copy or convert it again"


def _is_count(value) -> bool:
    """A JSON integer that fits safetensors' usize (booleans are ints to Python, not to JSON)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _no_duplicates(what: str):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise AtvSparseError(f"{what}: key {key[:200]!r} appears twice; {_HINT}")
            seen[key] = value
        return seen
    return hook


def parse_json(raw: bytes, what: str, constants: bool = False):
    """``raw`` as strict UTF-8 JSON, with the file named in every refusal.

    json raises more than JSONDecodeError on hostile input: ValueError past 4300 digits in one
    integer, RecursionError for deep nesting; all of them are the file's fault, not ours.
    constants: accept NaN / Infinity, which Python writes into config.json files (safetensors
    refuses them in a header).
    """
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(what),
                           parse_constant=float if constants else _refuse_constant)
        # A lone surrogate escape ("\\ud800") is valid to Python's json, not to safetensors' (serde): a
        # string that cannot be UTF-8 encoded fails here (UnicodeEncodeError is a ValueError).
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except AtvSparseError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        detail = f"{type(e).__name__}: {e}" if not isinstance(e, RecursionError) else "nested too deeply"
        raise AtvSparseError(f"{what}: not valid UTF-8 JSON ({detail[:200]}); {_HINT}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} for one file, every rule above checked."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise AtvSparseError(f"{path}: not a safetensors file ({size} bytes); {_HINT}")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise AtvSparseError(f"{path}: header of {header_len} bytes runs past the end of the "
                                     f"{size}-byte file; {_HINT}")
            if header_len > MAX_HEADER_BYTES:
                raise AtvSparseError(f"{path}: header of {header_len} bytes is larger than safetensors allows "
                                     f"({MAX_HEADER_BYTES}); {_HINT}")
            text = f.read(header_len)
    except OSError as e:
        raise AtvSparseError(f"{path}: cannot read ({e.strerror or e})") from None
    if not text.startswith(b"{"):
        raise AtvSparseError(f"{path}: unreadable safetensors header (it does not start with '{{'); {_HINT}")
    header = parse_json(text, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise AtvSparseError(f"{path}: unreadable safetensors header; {_HINT}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AtvSparseError(f"{path}: safetensors __metadata__ must map strings to strings; {_HINT}")
    ranges = []
    for name, info in header.items():
        ranges.append((*_check_entry(path, name, info), name))
    _check_tiling(path, sorted(ranges), size - 8 - header_len)
    return header


def _check_entry(path: Path, name: str, info) -> tuple[int, int]:
    def bad(what: str) -> AtvSparseError:
        return AtvSparseError(f"{path}: tensor {name[:200]}: {what}; {_HINT}")

    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise bad('malformed header entry (expected exactly "dtype", "shape" and "data_offsets")')
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"unknown dtype {str(dtype)[:40]!r} (known: {', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {str(shape)[:80]} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"data_offsets {str(offsets)[:80]} is not [begin, end] with 0 <= begin <= end")
    nbytes = DTYPE_BYTES[dtype]
    for dim in shape:
        nbytes *= dim
    begin, end = offsets
    if end - begin != nbytes:
        raise bad(f"spans {end - begin} bytes, its shape {shape} {dtype} needs {nbytes}")
    return begin, end


def _check_tiling(path: Path, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """Byte ranges sorted by offset must follow one another from 0 to exactly ``data_size``."""
    position, previous = 0, None
    for begin, end, name in ranges:
        if end > data_size:
            raise AtvSparseError(f"{path}: tensor {name} ends at byte {end} but the file holds only "
                                 f"{data_size} data bytes; {_HINT}")
        if begin < position:
            raise AtvSparseError(f"{path}: tensors {previous} and {name} overlap (bytes {begin}..{position}); {_HINT}")
        if begin > position:
            raise AtvSparseError(f"{path}: bytes {position}..{begin} before tensor {name} belong to no tensor; {_HINT}")
        position, previous = end, name
    if position != data_size:
        raise AtvSparseError(f"{path}: {data_size - position} bytes after the last tensor belong to no tensor; {_HINT}")


def read_index(model_dir: Path) -> dict[str, str]:
    """``weight_map`` of ``model_dir``'s index: tensor name -> shard file name, checked.

    Shard names must be plain file names inside the directory: an index is a file a user may
    have downloaded, and ``../../x`` would send the loader anywhere.
    """
    index = Path(model_dir) / INDEX_NAME
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise AtvSparseError(f"{index}: larger than {MAX_INDEX_BYTES} bytes; not a safetensors index")
        raw = index.read_bytes()
    except OSError as e:
        raise AtvSparseError(f"{index}: cannot read ({e.strerror or e})") from None
    data = parse_json(raw, str(index))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AtvSparseError(f"{index}: not a valid safetensors index (expected a non-empty \"weight_map\" "
                             "object of tensor name -> shard file)")
    for name, fname in weight_map.items():
        if (not isinstance(fname, str) or not fname.endswith(".safetensors") or fname != os.path.basename(fname)
                or fname in (".", "..") or "\\" in fname or "\0" in fname):
            raise AtvSparseError(f"{index}: tensor {name[:200]} is mapped to {str(fname)[:200]!r}, expected the "
                                 "name of a .safetensors file in the same directory")
    return weight_map


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, checked to exist."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_NAME).is_file():
        files = [model_dir / name for name in sorted(set(read_index(model_dir).values()))]
        for f in files:
            if not f.is_file():
                raise AtvSparseError(f"{f}: listed in {INDEX_NAME} but missing")
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    raise AtvSparseError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}; atv_sparse reads safetensors "
                         "checkpoints only (save the model with save_pretrained(..., safe_serialization=True))")


def checkpoint_tensors(files: list[Path]) -> dict[str, tuple[Path, dict]]:
    """Tensor name -> (file, header entry) over all files, every header checked.

    Where the files come with an index, the index and the headers must agree: each tensor in the
    shard the index names, once, and no tensor the index does not list.
    """
    tensors = {}
    for path in files:
        for name, info in read_header(Path(path)).items():
            if name in tensors:
                raise AtvSparseError(f"{path}: tensor {name} is also in {tensors[name][0]}; a tensor must be "
                                     f"stored once; {_HINT}")
            tensors[name] = (Path(path), info)
    index_dirs = {Path(p).parent for p in files if (Path(p).parent / INDEX_NAME).is_file()}
    for model_dir in index_dirs:
        weight_map = read_index(model_dir)
        for name, (path, _) in tensors.items():
            if path.parent == model_dir and weight_map.get(name) != path.name:
                listed = weight_map.get(name)
                raise AtvSparseError(f"{path}: tensor {name} is in this shard but {INDEX_NAME} "
                                     + (f"places it in {listed}" if listed else "does not list it")
                                     + f"; {_HINT}")
        missing = sorted(n for n in weight_map if n not in tensors)
        if missing:
            raise AtvSparseError(f"{model_dir / INDEX_NAME}: tensor {missing[0]} is listed in "
                                 f"{weight_map[missing[0]]} but that shard does not hold it; {_HINT}")
    return tensors


def data_start(path: Path) -> int:
    """Byte offset of ``path``'s data area (8 + the header length), for ``read_tensor``."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def read_tensor(path: Path, start: int, info: dict) -> torch.Tensor:
    """One tensor of a checked safetensors file (header entry ``info``, data area at ``start``; or of
    any file holding tensor bytes from ``start``, like the writer's spill file) read into its own
    CPU memory, with plain reads rather than a memory map: pages of a mapped shard count in the
    process's resident memory for as long as the mapping lives."""
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(start + begin)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise AtvSparseError(f"{path}: ends inside tensor data (read {done} of {end - begin} bytes); {_HINT}")
            done += n
    return buf.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
