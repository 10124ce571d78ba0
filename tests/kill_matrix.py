"""The full kill-and-resume matrix: every method x every kill point x an LLM and two VLM families.

    python tests/kill_matrix.py [--out benchmarks/results/kill-matrix] [--only SUBSTRING]

Each cell converts a tiny random checkpoint in a child process that is SIGKILLed (or sent
SIGINT / SIGTERM, once or twice) at one point (``kill_convert.py``), resumes it with ``--resume``,
and compares the SHA-256 of every output file with an uninterrupted run of the same arguments
(prune_report.json: all but its timings). CI runs a subset of this (tests/test_resume.py, every
point and every method once); this script runs the product and writes OUT.json and OUT.md.
Exit status 1 if any cell fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from conftest import write_tiny_model  # noqa: E402
from kill_convert import digests, kill_then_resume  # noqa: E402

TEXT = ["--nsamples", "3", "--seqlen", "24", "--quiet", "--max-shard-size", "40KB"]
VLM = ["--nsamples", "2", "--quiet", "--max-shard-size", "60KB"]
TEXT_METHODS = {"magnitude": ["--method", "magnitude"], "wanda": ["--method", "wanda"],
                "sparsegpt": ["--method", "sparsegpt"]}
VLM_METHODS = {**TEXT_METHODS, "atv": ["--method", "atv"], "atv-sparsegpt": ["--method", "atv-sparsegpt"],
               "tamp": ["--method", "tamp"],
               "tamp --das": ["--method", "tamp", "--das", "--pattern", "unstructured"]}
# (name, spec, expected exit status). Linear 9 is in the second block (7 target linears a block).
POINTS = [("calibration capture", "capture:2", -9), ("mid-block", "prune:9", -9), ("between blocks", "block:2", -9),
          ("mid shard write", "shard:3", -9), ("final writes", "finish:1", -9), ("before the rename", "commit:1", -9),
          ("during the rename", "rename:1", -9), ("after the rename", "renamed:1", -9),
          ("SIGINT", "prune:9:INT", 130), ("SIGTERM", "prune:9:TERM", 143), ("SIGINT twice", "prune:9:INT2", 130)]


def checkpoints(base: Path) -> dict[str, tuple[Path, list[str], dict]]:
    from atv_sparse.tinybench.families import TEXT_DIMS, write_tiny_vlm

    dims = {**TEXT_DIMS, "num_hidden_layers": 3}
    return {"llama (LLM)": (write_tiny_model(base / "llama", "llama", num_hidden_layers=4), TEXT, TEXT_METHODS),
            "llava_next (VLM)": (write_tiny_vlm(base / "llava_next", "llava_next", text_dims=dims), VLM, VLM_METHODS),
            "qwen2_vl (VLM)": (write_tiny_vlm(base / "qwen2_vl", "qwen2_vl", text_dims=dims), VLM, VLM_METHODS)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE.parent / "benchmarks" / "results" / "kill-matrix"))
    parser.add_argument("--only", default=None, help="run the cells whose 'family / method / point' contains this")
    parser.add_argument("--table", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if args.table:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_results(Path(args.out), saved["cells"], saved["meta"]["seconds"], saved["meta"])
        return 0
    torch.set_num_threads(1)  # as the child processes compute
    from atv_sparse.convert import run

    work = Path(tempfile.mkdtemp(prefix="atv-sparse-kill-matrix-"))
    cells, t_start = [], time.time()
    try:
        for family, (ckpt, quick, methods) in checkpoints(work).items():
            for method, margs in methods.items():
                argv = [str(ckpt), *margs, *quick]
                ref = None
                for point, spec, rc in POINTS:
                    name = f"{family} / {method} / {point}"
                    if (args.only and args.only not in name) or (method == "magnitude" and spec.startswith("capture")):
                        continue  # magnitude reads no calibration data: it has no capture
                    if ref is None:
                        run([*argv, "--out", str(work / "ref")])
                        ref = digests(work / "ref")
                        shutil.rmtree(work / "ref")
                    out = work / "out"
                    t0 = time.perf_counter()
                    try:
                        kill_then_resume(out, argv, spec, rc)
                        same = digests(out) == ref
                        error = None if same else "output differs from the uninterrupted run"
                    except Exception as e:  # a failing cell is recorded; the matrix goes on
                        same, error = False, f"{type(e).__name__}: {e}"
                        traceback.print_exc()
                    cells.append({"family": family, "method": method, "point": point, "spec": spec,
                                  "files": len(ref), "identical": same, "error": error,
                                  "seconds": round(time.perf_counter() - t0, 1)})
                    print(f"{'ok  ' if same else 'FAIL'} {name} ({spec})", flush=True)
                    write_results(Path(args.out), cells, time.time() - t_start)  # partial results survive a stop
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(Path(args.out), cells, time.time() - t_start)
    return 0 if cells and all(c["identical"] for c in cells) else 1


def write_results(out: Path, cells: list[dict], seconds: float, meta: dict | None = None) -> None:
    import transformers

    import atv_sparse

    meta = meta or {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "atv_sparse": atv_sparse.__version__, "command": "python " + " ".join(sys.argv),
            "seconds": round(seconds)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1) + "\n")
    families = list(dict.fromkeys(c["family"] for c in cells))
    points = [name for name, _, _ in POINTS if any(c["point"] == name for c in cells)]
    lines = [f"# Kill and resume: {sum(c['identical'] for c in cells)} of {len(cells)} cells bit-identical", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, "
             f"atv_sparse {meta['atv_sparse']}; `{meta['command']}` ({meta['seconds']} s).", "",
             "Each cell: the conversion killed (SIGKILL) or signalled at the point named, resumed with "
             "`--resume`, every output file compared by SHA-256 with an uninterrupted run (prune_report.json "
             "without its timings). `ok` = identical; magnitude reads no calibration data, so it has no capture "
             "to kill.", ""]
    for family in families:
        rows = [c for c in cells if c["family"] == family]
        methods = list(dict.fromkeys(c["method"] for c in rows))
        lines += [f"## {family}", "", "| point | " + " | ".join(methods) + " |",
                  "| --- |" + " --- |" * len(methods)]
        for point in points:
            marks = []
            for method in methods:
                cell = next((c for c in rows if c["method"] == method and c["point"] == point), None)
                marks.append("" if cell is None else "ok" if cell["identical"] else f"FAIL: {cell['error']}")
            lines.append(f"| {point} | " + " | ".join(marks) + " |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
