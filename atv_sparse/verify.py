"""Check a checkpoint's shards against the SHA-256 digests its writer recorded.

    python -m atv_sparse.verify DIR

The check is ``formats.verify.verify_checkpoint``: every shard read once more and hashed, the
first one whose bytes differ from ``DIR/checksums.json`` named. Exit code 0 when every shard
matches, 2 with ``error: <message>`` otherwise. ``atv_sparse.load(DIR, verify=True)`` runs the
same check before loading.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import AtvSparseError
from .formats.shard_io import CHECKSUMS_NAME
from .formats.verify import verify_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atv_sparse.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", metavar="DIR", help="a checkpoint written by atv_sparse.convert")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        digests = verify_checkpoint(args.dir)
    except AtvSparseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    nbytes = sum((Path(args.dir) / name).stat().st_size for name in digests)
    print(f"ok: {len(digests)} shard(s), {nbytes / 1e9:.3f} GB, SHA-256 matches {CHECKSUMS_NAME} "
          f"({seconds:.1f} s, {nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
