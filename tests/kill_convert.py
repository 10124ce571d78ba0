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

Imported, it gives the resume tests (test_resume.py) and the full matrix (kill_matrix.py) what they
share: ``convert_in_subprocess``, ``kill_then_resume`` and ``digests``.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
# Fields of prune_report.json that differ between any two runs of the same arguments.
VOLATILE = {"timings_s", "peak_rss_bytes", "resumed"}


def report_without_timings(report):
    if isinstance(report, dict):
        return {k: report_without_timings(v) for k, v in report.items()
                if k not in VOLATILE and not k.startswith("time_")}
    if isinstance(report, list):
        return [report_without_timings(v) for v in report]
    return report


def digests(out: Path) -> dict[str, str]:
    """File name -> SHA-256 of every output file, hidden ones included; for prune_report.json its
    content without the timings instead."""
    result = {}
    for path in sorted(out.iterdir()):
        if path.name == "prune_report.json":
            result[path.name] = json.dumps(report_without_timings(json.loads(path.read_text())), sort_keys=True)
        else:
            result[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def convert_in_subprocess(spec: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``atv_sparse.convert argv`` in a child process killed or signalled as ``spec`` says.

    The child is a fork of this process (patched there, not here): no interpreter start or
    imports per run, which on a loaded machine are most of a tiny conversion's time. Its output
    goes to a file, returned as ``stderr``."""
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                sys.stdout = sys.stderr = open(log.name, "w", buffering=1)
                code = main(spec, argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        _, status = os.waitpid(pid, 0)
        log.seek(0)
        return subprocess.CompletedProcess([spec, *argv], os.waitstatus_to_exitcode(status), "", log.read())


def kill_then_resume(out: Path, argv: list[str], spec: str, expect_rc: int = -9) -> subprocess.CompletedProcess:
    """Run ``argv`` to ``out`` killed at ``spec``, then ``--resume`` it in this process (unless the kill
    came after the output was in place); the caller compares ``digests(out)`` with a reference."""
    from atv_sparse.convert import run
    from atv_sparse.formats.staging import staging_path

    proc = convert_in_subprocess(spec, [*argv, "--out", str(out)])
    if proc.returncode != expect_rc:
        raise AssertionError(f"{spec}: exit {proc.returncode}, expected {expect_rc}\n{proc.stderr[-3000:]}")
    if out.exists():  # killed after the rename: nothing is left to resume
        assert not staging_path(out).exists()
    else:
        assert staging_path(out).is_dir(), f"{spec}: no staging directory left to resume"
        run([*argv, "--out", str(out), "--resume"])
    assert not staging_path(out).exists()
    return proc


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
