"""Held-out perplexity of SmolLM2-135M-Instruct pruned by every method, through the project's CLIs.

    pip install -e ".[real-lm]"
    python benchmarks/real_lm/make_text.py --out ~/.cache/atv-sparse/real-lm-text
    nice -n 15 python benchmarks/real_lm/perplexity.py run      # appends to results/real-lm-ppl.runs.jsonl
    python benchmarks/real_lm/perplexity.py table               # -> results/real-lm-ppl.md / .json

The model is :mod:`smollm2`'s checkpoint (the Q4_1 release dequantized to bf16); the text is
:mod:`make_text`'s (Python 3.11 documentation from Debian: tutorial + FAQ to calibrate, two
HOWTOs held out). Each cell runs ``python -m atv_sparse.convert CKPT --method M --pattern P
--nsamples N --seqlen S --seed s --calib calibration.txt --format dense`` and then ``python -m
atv_sparse.evaluate OUT --ppl evaluation.txt --seqlen W``. Dense-with-zeros output, because on a
CPU the packed checkpoint runs on the reference backend, which decompresses every layer on every
call: scoring the packed magnitude-50% model took 487 s against 73 s for the dense one here (the
same weights; tests/test_real_lm.py checks the packed round trip on this model). Both
are child processes with one torch thread; the convert child's wall time, its own phase timings
(prune_report.json) and its peak resident set size (``wait4``'s ru_maxrss) are recorded.

Order: every (method, pattern) at seed 0 first, pattern by pattern (2:4, 50%, 4:8, 60%), then
seeds 1 and 2, so a run cut short still has whole columns; ``run`` skips cells already in the runs file. Magnitude pruning
uses no calibration, so it runs once (its seed changes nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
RUNS = RESULTS / "real-lm-ppl.runs.jsonl"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("2:4", "50%", "4:8", "60%")  # run in this order; tables print them so too
SEEDS = (0, 1, 2)
NSAMPLES, SEQLEN, WINDOW = 16, 256, 512


def pattern_flags(pattern: str) -> list[str]:
    if pattern.endswith("%"):
        return ["--pattern", "unstructured", "--sparsity", str(int(pattern[:-1]) / 100)]
    return ["--pattern", pattern]


def measured(cmd: list[str], log) -> tuple[int, float, int]:
    """Run ``cmd`` with its output appended to ``log``; (exit status, wall seconds, peak RSS bytes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss * 1024


def evaluate(model_dir: Path, text: Path, window: int, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="atv-sparse-ppl-") as tmp:
        out = Path(tmp) / "ppl.json"
        cmd = [sys.executable, "-m", "atv_sparse.evaluate", str(model_dir), "--ppl", str(text), "--seqlen",
               str(window), "--device", "cpu", "--json", str(out)]
        code, wall, rss = measured(cmd, log)
        if code != 0:
            raise SystemExit(f"error: evaluate failed on {model_dir} (exit {code}); see the log")
        ppl = json.loads(out.read_text())["ppl"]
    return {"ppl": ppl["ppl"], "eval_tokens": ppl["tokens"], "eval_windows": ppl["windows"],
            "eval_dropped": ppl.get("dropped"), "eval_wall_s": wall, "eval_peak_rss_bytes": rss}


def run_cell(ckpt: Path, text_dir: Path, method: str, pattern: str, seed: int, args, log) -> dict:
    row = {"method": method, "pattern": pattern, "seed": seed, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "window": args.window, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if method == "dense":
        return {**row, **evaluate(ckpt, text_dir / "evaluation.txt", args.window, log)}
    with tempfile.TemporaryDirectory(prefix="atv-sparse-real-lm-") as tmp:
        out = Path(tmp) / "pruned"
        cmd = [sys.executable, "-m", "atv_sparse.convert", str(ckpt), "--method", method, *pattern_flags(pattern),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(seed),
               "--calib", str(text_dir / "calibration.txt"), "--device", "cpu", "--format", "dense", "--out", str(out),
               "--quiet"]
        code, wall, rss = measured(cmd, log)
        if code != 0:
            raise SystemExit(f"error: convert failed ({method} {pattern} seed {seed}, exit {code}); see the log")
        report = json.loads((out / "prune_report.json").read_text())
        row.update(prune_wall_s=wall, prune_peak_rss_bytes=rss, prune_timings_s=report["timings_s"])
        return {**row, **evaluate(out, text_dir / "evaluation.txt", args.window, log)}


def machine() -> dict:
    import torch
    import transformers

    from atv_sparse.tinybench.hardware import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": 1}


def cells(methods, patterns, seeds) -> list[tuple[str, str, int]]:
    """dense first, then each seed's grid, pattern by pattern (every method of a pattern together, so
    a run cut short leaves whole columns); dense and magnitude (no calibration) once, as seed 0."""
    out = [("dense", "-", 0)]
    for seed in seeds:
        out += [(m, p, seed if m != "magnitude" else 0) for p in patterns for m in methods
                if m != "magnitude" or seed == seeds[0]]
    return out


def read_runs(path: Path = RUNS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run(args) -> None:
    sys.path.insert(0, str(HERE))
    from smollm2 import ensure_checkpoint

    ckpt = ensure_checkpoint(args.cache)
    sources = json.loads((args.text / "sources.json").read_text())
    (args.runs.parent / "real-lm-text-sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    context = {"machine": machine(), "text": {k: {"sha256": v["sha256"], "bytes": v["bytes"]}
                                              for k, v in sources["files"].items()},
               "model": json.loads((ckpt / "conversion.json").read_text())}
    with open(args.log, "a") as log:
        for method, pattern, seed in cells(args.methods, args.patterns, args.seeds):
            # Read before each cell: another `run` (say, --seeds 2) may share the runs file.
            done = {(r["method"], r["pattern"], r["seed"]) for r in read_runs(args.runs)
                    if (r["nsamples"], r["seqlen"], r["window"]) == (args.nsamples, args.seqlen, args.window)}
            if (method, pattern, seed) in done:
                continue
            row = {**run_cell(ckpt, args.text, method, pattern, seed, args, log), **context}
            with open(args.runs, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method:9s} {pattern:4s} seed {seed}: ppl {row['ppl']:.3f}"
                  f"  prune {row.get('prune_wall_s', 0):.0f} s  eval {row['eval_wall_s']:.0f} s", flush=True)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, pattern): per-seed perplexities, mean, sd, median prune time, max RSS."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["pattern"]), []).append(r)
    out = []
    for (method, pattern), rs in groups.items():
        ppls = [r["ppl"] for r in sorted(rs, key=lambda r: r["seed"])]
        out.append({"method": method, "pattern": pattern, "seeds": [r["seed"] for r in sorted(rs, key=lambda r: r["seed"])],
                    "ppl": ppls, "ppl_mean": statistics.mean(ppls),
                    "ppl_sd": statistics.stdev(ppls) if len(ppls) > 1 else None,
                    "prune_s_median": statistics.median(r["prune_wall_s"] for r in rs) if method != "dense" else None,
                    "prune_peak_rss_mb": max(r["prune_peak_rss_bytes"] for r in rs) / 1e6 if method != "dense" else None})
    return out


def _method_rows(by: dict, cell) -> list[str]:
    """One markdown row per method of ``METHODS``: ``cell(summary)`` per pattern, "-" where not run."""
    return [f"| {method} | " + " | ".join("-" if by.get((method, p)) is None else cell(by[(method, p)])
                                          for p in PATTERNS) + " |" for method in METHODS]


def table(runs: Path = RUNS) -> str:
    rows = read_runs(runs)
    if not rows:
        raise SystemExit(f"error: {runs} holds no runs; run `python benchmarks/real_lm/perplexity.py run` first")
    summary = summarize(rows)
    by = {(s["method"], s["pattern"]): s for s in summary}
    first = rows[0]
    m, model, text = first["machine"], first["model"], first["text"]
    dense = by[("dense", "-")]["ppl_mean"] if ("dense", "-") in by else None
    lines = [
        "# Real-LM perplexity: SmolLM2-135M-Instruct (Q4_1 release, dequantized to bf16)",
        "",
        f"Made by `benchmarks/real_lm/perplexity.py table` from `real-lm-ppl.runs.jsonl` ({len(rows)} runs, "
        f"{rows[0]['date'][:10]} to {rows[-1]['date'][:10]}); logs: `real-lm-ppl.log` and `real-lm-ppl.seed2.log` "
        "(a second `run` beside the first, sharing the runs file: seed 2, then seed 1's 60% and 4:8); the runs "
        "of the two attempts stopped for their sizes are in `real-lm-ppl.aborted.runs.jsonl`; prediction written "
        "before the runs: `real-lm-ppl-prediction.md`.",
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs, one torch thread, python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}.",
        f"Model: `{model['gguf']}` from `{model['package']}` (wheel sha256 {model['wheel_sha256'][:16]}...), "
        "every weight dequantized from 4 bits: figures compare methods on this model, not with published "
        "SmolLM2 numbers.",
        f"Text: Python 3.11 docs (Debian python3.11-doc; pages, sizes and sha256 in `real-lm-text-sources.json`): calibration = tutorial + FAQ "
        f"(sha256 {text['calibration.txt']['sha256'][:16]}...), evaluation = 2 HOWTOs "
        f"(sha256 {text['evaluation.txt']['sha256'][:16]}..., {first['eval_tokens']} tokens, "
        f"{first['eval_windows']} full windows of {first['window']}; the trailing {first.get('eval_dropped')} "
        "dropped as in Wanda).",
        f"Calibration: {first['nsamples']} windows x {first['seqlen']} tokens at seeded offsets; every linear of the 30 blocks pruned (210 layers; "
        "embeddings / tied lm_head dense), bf16 on the CPU; output dense-with-zeros (`--format dense`).",
        "",
        "Perplexity (lower is better), mean ± sd over calibration seeds (per-seed values in the JSON); "
        "prune time = wall time of the convert process (median over seeds), peak = its max RSS. The times were "
        "taken at nice 15 on 2 cores shared with about a dozen busier processes: they measure the machine's load "
        "as much as the method (magnitude pruning, which reads no calibration data, took 34-150 s), so read them as an upper bound; the "
        "peaks are not affected.",
        "",
        "| method | " + " | ".join(PATTERNS) + " |",
        "|---|" + "---|" * len(PATTERNS),
    ]
    if dense is not None:
        lines.append(f"| dense | {dense:.2f} |" + " |" * (len(PATTERNS) - 1))
    lines += _method_rows(by, lambda s: f"{_mean_sd(s['ppl'])} (n={len(s['ppl'])})")
    lines += ["", "| method | " + " | ".join(f"{p} time / peak" for p in PATTERNS) + " |",
              "|---|" + "---|" * len(PATTERNS)]
    lines += _method_rows(by, lambda s: f"{s['prune_s_median']:.0f} s / {s['prune_peak_rss_mb']:.0f} MB")
    lines += ["", "Paired by seed (the same seed draws the same calibration windows): SparseGPT minus Wanda, "
              "mean ± sd of the per-seed differences.", "", "| pattern | SparseGPT - Wanda | seeds |", "|---|---|---|"]
    for p in PATTERNS:
        w, g = by.get(("wanda", p)), by.get(("sparsegpt", p))
        if w and g:
            common = sorted(set(w["seeds"]) & set(g["seeds"]))
            diffs = [g["ppl"][g["seeds"].index(s)] - w["ppl"][w["seeds"].index(s)] for s in common]
            lines.append(f"| {p} | {_mean_sd(diffs)} | {len(diffs)} |")
    lines += ["", "Reproduce: `pip install -e \".[real-lm]\"`, `python benchmarks/real_lm/make_text.py --out DIR`, "
              "`nice -n 15 python benchmarks/real_lm/perplexity.py run --text DIR`, then `... table`.", ""]
    (RESULTS / "real-lm-ppl.json").write_text(json.dumps({"summary": summary, "machine": m, "model": model,
                                                          "text": text}, indent=1) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the missing cells, appending to the runs file")
    r.add_argument("--text", type=Path, default=Path.home() / ".cache" / "atv-sparse" / "real-lm-text",
                   help="make_text.py's output folder")
    r.add_argument("--cache", type=Path, default=None, help="smollm2.py's cache folder")
    r.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    r.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--nsamples", type=int, default=NSAMPLES)
    r.add_argument("--seqlen", type=int, default=SEQLEN)
    r.add_argument("--window", type=int, default=WINDOW, help="perplexity window (evaluate --seqlen)")
    r.add_argument("--runs", type=Path, default=RUNS)
    r.add_argument("--log", type=Path, default=RESULTS / "real-lm-ppl.log")
    t = sub.add_parser("table", help="render results/real-lm-ppl.md and .json from the runs file")
    t.add_argument("--runs", type=Path, default=RUNS)
    args = p.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        text = table(args.runs)
        (RESULTS / "real-lm-ppl.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
