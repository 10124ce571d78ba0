"""Reading safetensors headers and checking files before anything loads them.

A checkpoint directory holds ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. ``checkpoint_tensors`` reads only the headers (no tensor data)
and refuses a truncated or corrupt file with a message naming it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import AtvSparseError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} for one file, after checking its size."""
    hint = "the file is corrupt or truncated; copy or convert it again"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise AtvSparseError(f"{path}: not a safetensors file ({size} bytes); {hint}")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise AtvSparseError(f"{path}: header of {header_len} bytes runs past the end of the file; {hint}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AtvSparseError(f"{path}: unreadable safetensors header; {hint}") from None
    if not isinstance(header, dict):
        raise AtvSparseError(f"{path}: unreadable safetensors header; {hint}")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            nbytes = numel * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise AtvSparseError(f"{path}: tensor {name} has a malformed header entry; {hint}") from None
        if end > data_size:
            raise AtvSparseError(f"{path}: tensor {name} ends at byte {end} but the file holds only "
                                 f"{data_size} data bytes; {hint}")
        if end - begin != nbytes:
            raise AtvSparseError(f"{path}: tensor {name} spans {end - begin} bytes, its shape "
                                 f"{info['shape']} {info['dtype']} needs {nbytes}; {hint}")
    return header


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, checked to exist."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AtvSparseError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
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
    """Tensor name -> (file, header entry) over all files, every header checked."""
    tensors = {}
    for path in files:
        for name, info in read_header(Path(path)).items():
            tensors[name] = (Path(path), info)
    return tensors
