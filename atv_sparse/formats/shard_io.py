"""Writing safetensors shards while hashing them, and the ``checksums.json`` that records the hashes.

``safetensors_header`` builds the header ``safetensors.torch.save_file`` writes, so that the streaming
writer (``checkpoint.ShardWriter``) can write the same bytes (tested byte for byte) and feed every
byte to SHA-256 on the way out: a shard's digest costs no second read of a multi-GB file (``sha256_of``
hashes a file already on disk: the checksum check, a resumed run's journal). The layout:

    8 bytes   little-endian u64: length of the JSON header (a multiple of 8)
    header    compact JSON {"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}, ...},
              padded with spaces; tensors ordered by dtype (highest ``dtypes.DTYPE_RANK`` first), then by name
    data      each tensor's bytes, row-major, little endian, in header order, back to back

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

from .dtypes import DTYPE_RANK

CHECKSUMS_NAME = "checksums.json"



def safetensors_header(entries, metadata: dict[str, str] | None = None) -> tuple[bytes, list]:
    """The 8-byte length and padded JSON header safetensors writes for ``entries`` (name, dtype
    name, shape, bytes), and the entries in its on-disk order (highest dtype rank first, then name)."""
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


def sha256_of(path: str | Path, nbytes: int | None = None, hasher: bool = False):
    """SHA-256 of the file ``path`` (of its first ``nbytes`` only, when given): the hex digest, or
    with ``hasher`` the hash object, to go on feeding."""
    with open(path, "rb") as f:
        if nbytes is None:
            digest = hashlib.file_digest(f, "sha256")
        else:
            digest, left = hashlib.sha256(), nbytes
            while left > 0:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
    return digest if hasher else digest.hexdigest()


def write_checksums(directory: str | Path, digests: dict[str, str]) -> None:
    """Record file name -> SHA-256 hex digest (and each file's size) in ``directory/checksums.json``."""
    directory = Path(directory)
    files = {name: {"sha256": digest, "bytes": (directory / name).stat().st_size}
             for name, digest in sorted(digests.items())}
    (directory / CHECKSUMS_NAME).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2) + "\n")
