"""Checking a checkpoint's shards against the SHA-256 digests its writer recorded.

``atv_sparse.convert`` hashes every shard while it writes it and records the digests in
``DIR/checksums.json`` (``shard_io``). ``verify_checkpoint`` reads every shard once more and names
the first one whose bytes differ: a flipped bit in the kept values is otherwise indistinguishable
from a real weight, and safetensors carries no checksum of its own. ``atv_sparse.load(DIR,
verify=True)`` runs it before loading; ``python -m atv_sparse.verify DIR`` is its CLI.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import AtvSparseError
from .safetensors_io import checkpoint_files, parse_json
from .shard_io import CHECKSUMS_NAME, sha256_of

_HEX = re.compile(r"[0-9a-f]{64}")


def read_checksums(model_dir: str | Path) -> dict[str, tuple[str, int]]:
    """``checksums.json`` of ``model_dir``: file name -> (SHA-256 hex, size in bytes), checked."""
    path = Path(model_dir) / CHECKSUMS_NAME
    if not path.is_file():
        raise AtvSparseError(f"{model_dir}: no {CHECKSUMS_NAME}, so there is nothing to verify against (written before "
                             "atv_sparse recorded checksums, or re-saved by save_pretrained); convert it again, or "
                             "load it without verify")
    data = parse_json(path.read_bytes(), str(path))
    files = data.get("files") if isinstance(data, dict) and data.get("algorithm") == "sha256" else None
    if not isinstance(files, dict):
        raise AtvSparseError(f"{path}: expected {{\"algorithm\": \"sha256\", \"files\": {{name: {{\"sha256\": hex, "
                             f"\"bytes\": size}}}}}}")
    out = {}
    for name, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if (name != os.path.basename(name) or name in ("", ".", "..") or not isinstance(digest, str)
                or _HEX.fullmatch(digest) is None or not isinstance(size, int) or isinstance(size, bool)):
            raise AtvSparseError(f"{path}: entry {name[:200]!r} is not {{\"sha256\": 64 hex digits, \"bytes\": size}} "
                                 "for a file of this directory")
        out[name] = (digest, size)
    return out


def verify_checkpoint(model_dir: str | Path) -> dict[str, str]:
    """Hash every shard of ``model_dir`` and compare with ``checksums.json``; file name -> digest.

    Every safetensors file the checkpoint loads must be listed and match, size first (free) and
    then SHA-256; the error names the first file (in name order) that differs. Shards are hashed
    in parallel threads: hashlib releases the GIL, and one core hashes about 1 GB/s, slower than
    a page-cached or NVMe read.
    """
    model_dir = Path(model_dir)
    expected = read_checksums(model_dir)
    files = checkpoint_files(model_dir)
    for path in files:
        if path.name not in expected:
            raise AtvSparseError(f"{path}: not listed in {CHECKSUMS_NAME}; the checkpoint's files were changed "
                                 "after it was written; convert it again")
        size = expected[path.name][1]
        actual_size = path.stat().st_size
        if actual_size != size:
            raise AtvSparseError(f"{path}: {actual_size} bytes, {CHECKSUMS_NAME} recorded {size}; the shard is "
                                 "truncated or damaged; copy or convert it again")
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(sha256_of, files))
    for path, actual in zip(files, digests, strict=True):
        digest = expected[path.name][0]
        if actual != digest:
            raise AtvSparseError(f"{path}: SHA-256 {actual[:16]}... differs from the {digest[:16]}... recorded in "
                                 f"{CHECKSUMS_NAME}; the shard was damaged after it was written; copy or convert it "
                                 "again")
    return {path.name: digest for path, digest in zip(files, digests, strict=True)}

