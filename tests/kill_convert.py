"""Run ``atv_sparse.convert`` and kill or signal it at a chosen point (the resume tests' helper).

    python tests/kill_convert.py POINT:N[:SIGNAL] -- CONVERT ARGUMENTS...

POINT, and where the N-th occurrence acts:
  capture   a calibration sample reaching block 0's catcher (during the capture of block-0 inputs)
  prune     a linear about to be pruned (mid-block: the block's earlier linears are already written)
  block     just after a journal write (between blocks)
  shard     a shard file being written: it is cut to half its size first
  finish    the shards have their final names, checksums.json is next (inside the final writes)
  commit    the staging directory is complete and about to be renamed (journal still there)
  rename    inside the rename: the journal is gone, the directory not yet in place
  renamed   the output is in place
SIGNAL: KILL (default: SIGKILL, nothing runs after it), INT, TERM, or INT2 (SIGINT twice: stop at once).

The conversion runs single-threaded (as the tests' in-process reference runs do), so its
floating-point results are bit-identical to theirs. Exit status: the conversion's, or -9.
"""

import os
import signal
import sys

import torch


def main(spec: str, argv: list[str]) -> int:
    point, count, *rest = spec.split(":")
    target, how = int(count), (rest[0] if rest else "KILL")
    seen = [0]

    def act() -> None:
        if how == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        sig = signal.SIGTERM if how == "TERM" else signal.SIGINT
        for _ in range(2 if how == "INT2" else 1):
            os.kill(os.getpid(), sig)

    def hit() -> None:
        seen[0] += 1
        if seen[0] == target:
            act()

    from atv_sparse.formats import checkpoint, staging
    from atv_sparse.prune import driver, walk

    def wrap(owner, name, before=True):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if before:
                hit()
            result = original(*args, **kwargs)
            if not before:
                hit()
            return result
        setattr(owner, name, wrapped)

    if point == "capture":
        wrap(walk._InputCatcher, "forward")
    elif point == "prune":
        wrap(driver, "_prune_linear")
    elif point == "block":
        wrap(staging.StagedOutputDir, "write_journal", before=False)
    elif point == "shard":
        save = checkpoint._save_shard

        def save_cut_hit(entries, spill, path):
            digest = save(entries, spill, path)
            if seen[0] + 1 == target:  # the shard this kill interrupts: half of it on disk
                os.truncate(path, os.path.getsize(path) // 2)
            hit()
            return digest
        checkpoint._save_shard = save_cut_hit
    elif point == "finish":
        wrap(checkpoint, "write_checksums")
    elif point == "commit":
        wrap(staging.StagedOutputDir, "commit")
    elif point == "rename":
        chmod = os.chmod

        def chmod_then_hit(path, mode, *args, **kwargs):
            chmod(path, mode, *args, **kwargs)
            if str(path).endswith(".partial"):
                hit()
        os.chmod = chmod_then_hit
    elif point == "renamed":
        wrap(staging.StagedOutputDir, "commit", before=False)
    else:
        raise SystemExit(f"unknown kill point {point!r}")

    from atv_sparse.convert import main as convert

    return convert(argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    split = sys.argv.index("--")
    sys.exit(main(sys.argv[1], sys.argv[split + 1:]))
