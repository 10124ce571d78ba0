"""Magnitude against ATV as the outlier channels grow: how many outlier channels does it take before
activation-aware pruning beats magnitude on a bundled tiny model?

    python benchmarks/outlier_strength.py --model tiny-next   # -> benchmarks/results/outlier-strength-tiny-next.{md,json}

``atv_sparse.analysis.outliers`` multiplies C hidden channels of every RMSNorm by c and divides the
input columns they feed by c: the same function, and the same Wanda-score masks (so ATV's pruned
model is the plain model's), while magnitude sees those columns shrunk c-fold and removes them. The
accuracy tables use C = 4, c = 32, and on the tiny LLaVA-NeXT magnitude still keeps more than ATV
there at 4:8 and 50-70%. This prunes magnitude with C in ``--channels`` and reports ATV - magnitude
on the same items (paired, seeds of ATV averaged per item first, SE over items).

Runs are shared with ``benchmarks/accuracy.py`` through its run log (``accuracy_runs.RunLog``; same
checkpoint, items and calibration size): the plain ATV and magnitude runs and the C = 4 magnitude runs come from there
when that benchmark has made them, and the new runs are appended to it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch

import accuracy_plan
import accuracy_runs
from accuracy_plan import Job
from accuracy_render import paired_cell, shown, write_atomic
from accuracy_stats import paired_difference, retention_of

HERE = Path(__file__).resolve().parent


def variant_name(channels: int) -> str:
    """The accuracy benchmark's name for its own outlier variant, ``outlier{C}`` for the others."""
    return "outlier" if channels == accuracy_plan.OUTLIER_CHANNELS else f"outlier{channels}"


def plan(args) -> dict[str, list[Job]]:
    """Row -> jobs (one per seed for ATV, one for magnitude), every pattern."""
    rows = {"ATV": [accuracy_plan.job("plain", "wanda", "atv", p, s) for p in args.patterns for s in args.seeds],
            "magnitude, no outliers": [accuracy_plan.job("plain", "magnitude", None, p, None) for p in args.patterns]}
    for c in args.channels:
        rows[f"magnitude, {c} outlier channels"] = [accuracy_plan.job(variant_name(c), "magnitude", None, p, None)
                                                    for p in args.patterns]
    return rows


def add_variants(state: dict, channels: list[int], scale: float) -> dict[str, list[int]]:
    """The outlier variants ``accuracy_runs.setup`` did not build, added to ``state["models"]``; returns
    variant -> the hidden channels scaled."""
    from atv_sparse.analysis.outliers import add_outlier_channels

    chosen = {"outlier": state["outlier_channels"]}
    for c in channels:
        name = variant_name(c)
        if name not in state["models"]:
            model = copy.deepcopy(state["models"]["plain"])
            chosen[name] = add_outlier_channels(model, c, scale, seed=0).channels
            state["models"][name] = model
    return chosen


def build_table(args, rows: dict[str, list[Job]], results: dict[str, dict]) -> list[dict]:
    dense = results[Job("plain", "dense", None, "dense", None).name()]
    atv = {p: [results[j.name()] for j in rows["ATV"] if j.pattern == p] for p in args.patterns}
    table = []
    for label, jobs in rows.items():
        for p in args.patterns:
            mine = [results[j.name()] for j in jobs if j.pattern == p]
            row = {"row": label, "pattern": p, "accuracy": 100 * sum(r["average"] for r in mine) / len(mine),
                   "retention": sum(retention_of(r, dense)["average"] for r in mine) / len(mine)}
            if label != "ATV":
                row["atv_minus"], row["se"] = paired_difference(atv[p], mine)
            table.append(row)
    return table


def markdown(args, table: list[dict], meta: dict) -> str:
    out = [f"# Magnitude against ATV as the outlier channels grow, {args.model_name} ({meta['date']})", "",
           f"Model `{meta['model']}`; {args.per_task} test items per task (seed {args.test_seed}); ATV: "
           f"{args.nsamples} calibration conversations per seed, seeds {', '.join(map(str, args.seeds))}. Outlier "
           f"variants: C hidden channels of every RMSNorm x{args.scale:g}, the input columns they feed "
           f"/{args.scale:g} (the same function; ATV's masks unchanged, so its runs are the plain model's). "
           f"{meta['machine']}; torch {torch.__version__}; {meta['wall_minutes']:.1f} min, {meta['new_runs']} runs "
           f"pruned here, {meta['from_log']} from the run log.", "",
           "ATV - magnitude: paired difference of average accuracy in points (same items, ATV's seeds averaged per "
           "item first) ± SE over items; ▲ / ▼ beyond 2 SE.", "",
           "| row | " + " | ".join(f"{p} accuracy / retention" for p in args.patterns) + " | "
           + " | ".join(f"{p} ATV - row" for p in args.patterns) + " |",
           "| --- |" + " ---: |" * (2 * len(args.patterns))]
    by_row: dict[str, dict] = {}
    for r in table:
        by_row.setdefault(r["row"], {})[r["pattern"]] = r
    for label, cells in by_row.items():
        acc = [f"{cells[p]['accuracy']:.1f} / {cells[p]['retention']:.1f}" for p in args.patterns]
        diff = ["-" if "se" not in cells[p] else paired_cell({"delta": cells[p]["atv_minus"], "se": cells[p]["se"]})
                for p in args.patterns]
        out.append(f"| {label} | " + " | ".join(acc) + " | " + " | ".join(diff) + " |")
    out += ["", "Channels scaled (seed 0): " + "; ".join(f"{v}: {c}" for v, c in meta["channels"].items()), ""]
    return "\n".join(out)


def parse_args(argv=None):
    from atv_sparse.evaluation.loading import model_dir_of

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-next", help="a bundled model (tiny-vlm, tiny-next)")
    p.add_argument("--per-task", type=int, default=500)
    p.add_argument("--nsamples", type=int, default=32, help="ATV's calibration conversations per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--channels", type=int, nargs="+", default=[4, 16, 32], help="outlier channel counts C")
    p.add_argument("--scale", type=float, default=accuracy_plan.OUTLIER_SCALE)
    p.add_argument("--patterns", nargs="+", default=["2:4", "50%"], choices=accuracy_plan.PATTERNS)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="output path without extension (default: benchmarks/results/outlier-strength-"
                                 "{tiny-vlm,tiny-next})")
    p.add_argument("--run-log", metavar="JSONL", help="the accuracy benchmark's run log to share (default: the "
                                                      "one next to its tables for this model)")
    args = p.parse_args(argv)
    if args.model not in accuracy_plan.BUNDLED:
        p.error(f"--model must be one of {', '.join(accuracy_plan.BUNDLED)}")
    if args.scale != accuracy_plan.OUTLIER_SCALE and accuracy_plan.OUTLIER_CHANNELS in args.channels:
        p.error(f"C = {accuracy_plan.OUTLIER_CHANNELS} is the accuracy benchmark's variant, made with scale "
                f"{accuracy_plan.OUTLIER_SCALE:g}; leave it out of --channels or keep --scale")
    out_name, args.model_name = accuracy_plan.BUNDLED[args.model]
    tag = args.model.replace("_", "-")
    args.model = str(model_dir_of(args.model))
    args.out = args.out or str(HERE / "results" / f"outlier-strength-{tag}")
    args.run_log = args.run_log or str(HERE / "results" / f"{out_name}.runs.jsonl")
    return args


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from atv_sparse.tinybench.hardware import cpu_name

    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(1)
    log = accuracy_runs.RunLog(Path(args.run_log), accuracy_runs.run_key(args))
    results = log.load()
    rows = plan(args)
    jobs = [Job("plain", "dense", None, "dense", None)] + list(dict.fromkeys(j for js in rows.values() for j in js))
    todo = [j for j in jobs if j.name() not in results]
    accuracy_runs.STATE.update(accuracy_runs.setup(args, score=bool(todo)))
    channels = add_variants(accuracy_runs.STATE, args.channels, args.scale)
    ctx = multiprocessing.get_context("fork")  # workers inherit the models and the prepared items
    with tqdm(total=len(todo), desc="Pruning and scoring", unit="model") as bar, \
            ctx.Pool(max(1, min(args.workers, len(todo))), accuracy_runs.init_worker, (1,)) as pool:
        for result in pool.imap_unordered(accuracy_runs.run_job, todo):
            log.append(result)
            results[result["name"]] = result
            bar.update()
    table = build_table(args, rows, results)
    meta = {"date": datetime.date.today().isoformat(), "model": shown(args.model),
            "machine": cpu_name(), "wall_minutes": (time.time() - start) / 60, "new_runs": len(todo),
            "from_log": len(jobs) - len(todo),
            "channels": {v: c for v, c in channels.items() if v in {j.variant for j in jobs}}}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "run_log")}
    settings["model"] = shown(args.model)
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"settings": settings, "meta": meta, "table": table},
                                                         indent=1) + "\n")
    text = markdown(args, table, meta)
    write_atomic(out.with_suffix(".md"), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
