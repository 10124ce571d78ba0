"""What resuming costs: a conversion killed halfway and resumed, against one that ran through.

    python benchmarks/prune_memory.py build --shape llama-3.2-3b --dir /data/ckpts
    python benchmarks/resume_overhead.py --ckpt /data/ckpts/llama-3.2-3b --work /data/out --kill-after 14

Three child processes, ``python -m atv_sparse.convert`` each, same arguments (Wanda 2:4 by
default, ``--device cpu``):

1. the uninterrupted run (wall time; its prune_report.json's per-block times);
2. the same run SIGKILLed as soon as its journal records ``--kill-after`` finished blocks (the
   journal in ``.OUT.partial`` is polled, as an operator's kill would land: anywhere in the next block);
3. ``--resume``: wall time, and from its prune_report.json the seconds spent rebuilding the next
   block's inputs (capture + every finished block restored from the staging shards and run over
   the calibration set) against what those blocks cost the uninterrupted run.

The resumed output is compared file by file (SHA-256; prune_report.json without timings) with
the uninterrupted run's. Results: ``results/resume_overhead.json`` (appended) and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "resume_overhead.json"
VOLATILE = {"timings_s", "peak_rss_bytes", "resumed"}


def convert(argv: list[str], log: Path, kill_after: int | None = None, stage: Path | None = None) -> float:
    """Run convert; with ``kill_after``, SIGKILL it once ``stage``'s journal records that many blocks."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "atv_sparse.convert", *argv], stdout=f,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if kill_after is not None and _blocks_done(stage) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return time.perf_counter() - t0
            time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"convert {' '.join(argv)} exited {proc.returncode}; see {log}")
    if kill_after is not None:
        raise SystemExit(f"the run finished before {kill_after} blocks were journaled")
    return time.perf_counter() - t0


def _blocks_done(stage: Path) -> int:
    try:
        return json.loads((stage / ".journal.json").read_text())["blocks_done"]
    except (OSError, ValueError, KeyError):
        return 0


def _strip(report):
    if isinstance(report, dict):
        return {k: _strip(v) for k, v in report.items() if k not in VOLATILE and not k.startswith("time_")}
    return [_strip(v) for v in report] if isinstance(report, list) else report


def digests(out: Path) -> dict[str, str]:
    return {p.name: (json.dumps(_strip(json.loads(p.read_text())), sort_keys=True) if p.name == "prune_report.json"
                     else hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(out.iterdir())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="where the outputs go (removed at the end)")
    p.add_argument("--kill-after", type=int, required=True, help="finished blocks before the kill")
    p.add_argument("--method", default="wanda")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--table", action="store_true", help="only rewrite the .md from the .json")
    args = p.parse_args()
    if not args.table:
        record(args)
    table()


def record(args) -> None:
    import torch
    sys.path.insert(0, str(HERE))
    from prune_memory import checkpoint_bytes, machine

    args.work.mkdir(parents=True, exist_ok=True)
    full_out, out = args.work / "full", args.work / "resumed"
    for d in (full_out, out, out.parent / f".{out.name}.partial"):
        shutil.rmtree(d, ignore_errors=True)
    base = [str(args.ckpt), "--method", args.method, "--pattern", "2:4", "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--device", "cpu", "--quiet"]
    full_wall = convert([*base, "--out", str(full_out)], args.work / "full.log")
    killed_wall = convert([*base, "--out", str(out)], args.work / "killed.log", args.kill_after,
                          out.parent / f".{out.name}.partial")
    stage = out.parent / f".{out.name}.partial"
    done = _blocks_done(stage)
    resume_wall = convert([*base, "--out", str(out), "--resume"], args.work / "resume.log")
    full = json.loads((full_out / "prune_report.json").read_text())
    resumed = json.loads((out / "prune_report.json").read_text())
    identical = digests(full_out) == digests(out)
    blocks = full["blocks"]
    block_work = [b.get("time_calibrate_s", 0) + b.get("time_prune_s", 0) + b.get("time_propagate_s", 0)
                  for b in blocks]
    row = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "checkpoint": args.ckpt.name, "checkpoint_bytes": checkpoint_bytes(args.ckpt), "method": args.method,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "blocks": len(blocks), "killed_after_blocks": done,
           "full_wall_s": round(full_wall, 1), "killed_wall_s": round(killed_wall, 1),
           "resume_wall_s": round(resume_wall, 1),
           "lost_s": round(killed_wall + resume_wall - full_wall, 1),
           "rebuild_s": round(resumed["resumed"]["rebuild_s"], 1),
           "capture_s_full": round(full["timings_s"].get("capture", 0), 1),
           "capture_s_resumed": round(resumed["timings_s"].get("capture", 0), 1),
           "finished_blocks_work_s_full": round(sum(block_work[:done]), 1),
           "full_timings_s": {k: round(v, 1) for k, v in full["timings_s"].items()},
           "resumed_timings_s": {k: round(v, 1) for k, v in resumed["timings_s"].items()},
           "identical": identical, "threads": torch.get_num_threads(), "machine": machine(),
           "command": "python benchmarks/resume_overhead.py " + " ".join(sys.argv[1:])}
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows.append(row)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "machine"}, indent=1))
    for d in (full_out, out):
        shutil.rmtree(d, ignore_errors=True)


def table() -> None:
    rows = json.loads(RESULTS.read_text())
    m = rows[-1]["machine"]
    lines = ["# Resume overhead (python -m atv_sparse.convert --resume, --device cpu)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, torch {m['torch']}, "
             "shared with other jobs. A run SIGKILLed once its journal records the blocks shown, then resumed, "
             "against an uninterrupted run of the same arguments. `rebuild / block`: restoring one finished block "
             "(its source weights read, its pruned linears read back from the staged shards and decompressed) and "
             "running it over the calibration set; `pruning / block, same run`: what each block still to prune cost "
             "the resumed run (calibrate + prune + propagate, reads not included), measured in the same process, "
             "so under the same load. Wall times of different runs are not comparable on this shared machine "
             "(its load changed between the runs): `lost` (killed + resumed - uninterrupted) is listed as measured.",
             "", "| checkpoint | method | calibration | killed after | uninterrupted | killed at | resumed | rebuild "
             "| rebuild / block | pruning / block, same run | capture again | lost | output |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        done, left = r["killed_after_blocks"], r["blocks"] - r["killed_after_blocks"]
        t = r["resumed_timings_s"]
        work = (t.get("calibrate", 0) + t.get("prune", 0) + t.get("propagate", 0)) / max(left, 1)
        lines.append(f"| {r['checkpoint']} ({r['checkpoint_bytes'] / 1e9:.2f} GB) | {r['method']} 2:4 | "
                     f"{r['nsamples']} x {r['seqlen']} | {done} of {r['blocks']} blocks | "
                     f"{r['full_wall_s']:.0f} s | {r['killed_wall_s']:.0f} s | {r['resume_wall_s']:.0f} s | "
                     f"{r['rebuild_s']:.0f} s | {r['rebuild_s'] / max(done, 1):.1f} s | {work:.1f} s | "
                     f"{r['capture_s_resumed']:.1f} s | {r['lost_s']:.0f} s | "
                     f"{'bit-identical' if r['identical'] else 'DIFFERS'} |")
    lines += ["", f"Reproduce: `{rows[-1]['command']}` (after `python benchmarks/prune_memory.py build --shape "
              "llama-3.2-3b --dir DIR`). Prediction written before the run: `resume_overhead-prediction.md`."]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
