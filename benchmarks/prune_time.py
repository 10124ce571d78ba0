"""Pruning cost of every method on the same model and calibration data.

    python benchmarks/prune_time.py [--model DIR] [--nsamples 32] [--pattern 2:4] [--repeats 3]

Without --model it builds the tiny LLaVA-NeXT of the test suite (random weights) in a temp dir.
Times the pruning proper (capture, statistics passes, mask selection, propagation; not loading or
writing) through ``atv_sparse.convert`` and prints seconds and the ratio to Wanda, measured in
one run; --save writes Markdown + JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import statistics
import tempfile
from pathlib import Path

import torch

from atv_sparse.tinybench.hardware import cpu_name

HERE = Path(__file__).resolve().parent
METHODS = ("magnitude", "wanda", "sparsegpt", "tamp", "atv")
PHASES = ("capture", "calibrate", "prune", "propagate", "DAS pre-pass")


def prune_seconds(ckpt: Path, method: str, args, out: Path) -> float:
    from atv_sparse.convert import run

    with contextlib.redirect_stdout(io.StringIO()):
        summary = run([str(ckpt), "--method", method, "--pattern", args.pattern, "--nsamples", str(args.nsamples),
                       "--device", args.device, "--out", str(out), "--overwrite", "--quiet"])
    return sum(summary["timings_s"].get(p, 0.0) for p in PHASES)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: tiny LLaVA-NeXT)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives steadier timings)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/prune_time-<date>.{md,json}")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model
        if ckpt is None:
            from atv_sparse.tinybench.families import write_tiny_vlm

            ckpt = write_tiny_vlm(Path(tmp) / "tiny-llava-next", "llava_next")
        prune_seconds(ckpt, "wanda", args, Path(tmp) / "warmup")
        times = {m: [] for m in METHODS}
        for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every method alike
            for method in METHODS:
                times[method].append(prune_seconds(ckpt, method, args, Path(tmp) / method))
    median = {m: statistics.median(v) for m, v in times.items()}
    rows = [(m, median[m], median[m] / median["wanda"]) for m in METHODS]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    header = (f"pruning time, {args.pattern}, {args.nsamples} samples, model {args.model or 'tiny LLaVA-NeXT (tests)'}, "
              f"device {args.device} ({device}), torch {torch.__version__}, {args.threads} thread(s), "
              f"median of {args.repeats}")
    lines = [header, "", "| method | seconds | x Wanda |", "| --- | ---: | ---: |"]
    lines += [f"| {m} | {s:.3f} | {r:.2f} |" for m, s, r in rows]
    print("\n".join(lines))
    if args.save:
        stamp = datetime.date.today().isoformat()
        out = HERE / "results" / f"prune_time-{stamp}"
        out.with_suffix(".md").write_text("# " + "\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps({
            "date": stamp, "device": device, "torch": torch.__version__, "pattern": args.pattern,
            "nsamples": args.nsamples, "threads": args.threads, "model": str(args.model or "tiny LLaVA-NeXT (tests)"),
            "seconds": times, "median_s": median, "ratio_to_wanda": {m: r for m, _, r in rows}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
