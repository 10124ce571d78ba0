"""Writing safetensors shards while hashing them, and the ``checksums.json`` that records the hashes.

``write_shard(tensors, path)`` writes the same bytes as ``safetensors.torch.save_file`` (tested
byte for byte) and feeds every byte it writes to SHA-256 on the way out, so a shard's digest
costs no second read of a multi-GB file. The layout safetensors uses, which this reproduces:

    8 bytes   little-endian u64: length of the JSON header (a multiple of 8)
    header    compact JSON {"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}, ...},
              padded with spaces; tensors ordered by dtype (widest first, as below), then by name
    data      each tensor's bytes, row-major, little endian, in header order, back to back

``ShardWriter`` is the streaming form (header from the tensors' specs first, then one tensor at a
time) for a writer that never holds a whole shard; ``write_shard`` is the one-call form.

``checksums.json`` beside the shards: ``{"algorithm": "sha256", "files": {name: {"sha256": hex,
"bytes": n}}}``. It is a file of its own rather than a field in config.json or the index: a
single-file checkpoint has no index, and a model re-saved by ``save_pretrained`` gets new shards
but keeps config.json, which would then carry stale digests.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from ..errors import AtvSparseError

CHECKSUMS_NAME = "checksums.json"

DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
                torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
# safetensors' Dtype enum order, the dict's order above; it writes the highest first.
DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPE_NAMES.values())}


def _spec(name: str, tensor: torch.Tensor) -> tuple[str, str, list[int], int]:
    dtype = DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise AtvSparseError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors by atv_sparse")
    return name, dtype, list(tensor.shape), tensor.numel() * tensor.element_size()


def safetensors_header(entries, metadata: dict[str, str] | None = None) -> tuple[bytes, list]:
    """The 8-byte length and padded JSON header safetensors writes for ``entries`` (name, dtype
    name, shape, bytes), and the entries in its on-disk order (widest dtype first, then name)."""
    ordered = sorted(entries, key=lambda e: (-DTYPE_RANK[e[1]], e[0]))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for name, dtype, shape, nbytes in ordered:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, ordered


class ShardWriter:
    """One safetensors file written tensor by tensor, hashed as it is written.

    specs: (name, tensor-like with .dtype/.shape/.numel()/.element_size()) for every tensor, in
    any order: the header needs all of them before the first data byte. Then ``write(name,
    tensor)`` in ``order`` (the on-disk order), and ``close()`` returns the SHA-256 hex digest.
    """

    def __init__(self, path: str | Path, specs, metadata: dict[str, str] | None = None):
        raw, entries = safetensors_header([_spec(n, t) for n, t in specs], metadata)
        self.order = [e[0] for e in entries]
        self._sizes = {e[0]: e[3] for e in entries}
        self._next = 0
        self._hash = hashlib.sha256()
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._put(raw)

    def _put(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next] if self._next < len(self.order) else None
        if name != expected:
            raise ValueError(f"{self.path}: tensor {name} written out of order (expected {expected})")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != self._sizes[name]:
            raise ValueError(f"{self.path}: tensor {name} has {data.numel()} bytes, its header says "
                             f"{self._sizes[name]}")
        if data.numel():
            self._put(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> str:
        """Finish the file; the SHA-256 of all its bytes, as lower-case hex."""
        self._file.close()
        if self._next != len(self.order):
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()


def write_shard(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """``safetensors.torch.save_file(tensors, path, metadata)``, returning the file's SHA-256 hex digest."""
    writer = ShardWriter(path, tensors.items(), metadata)
    try:
        for name in writer.order:
            writer.write(name, tensors[name])
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_checksums(directory: str | Path, digests: dict[str, str]) -> None:
    """Record file name -> SHA-256 hex digest (and each file's size) in ``directory/checksums.json``."""
    directory = Path(directory)
    files = {name: {"sha256": digest, "bytes": (directory / name).stat().st_size}
             for name, digest in sorted(digests.items())}
    (directory / CHECKSUMS_NAME).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2) + "\n")
