"""Accuracy next to sparsity: every pruning method on the bundled trained tiny VLM.

    python benchmarks/accuracy.py                       # full tables -> benchmarks/results/accuracy-tiny.{md,json}
    python benchmarks/accuracy.py --quick --out /tmp/a  # a subset in about a minute (CI)
    python benchmarks/accuracy.py --rerender benchmarks/results/accuracy-tiny.json   # tables again, from the JSON

The model is ``atv_sparse/assets/tiny_vlm`` (LLaVA-style, 64 image tokens per image; see its model
card), in two variants: ``plain``, and ``outlier`` (``atv_sparse.analysis.outliers``: 4 hidden
channels of every RMSNorm scaled by 32 and the matching input columns of the linears they feed
divided by 32; the same function, bit for bit, with the outlier channels real LLMs have).

Every run prunes a fresh copy of the dense model in memory with ``atv_sparse.prune.pipeline``
(the code ``convert`` runs) on ``--nsamples`` ShareGPT4V-style conversations of the synthetic
calibration split (calibration seed = the run's seed), then scores it teacher-forced on
``--per-task`` test items of every synthetic task (the same items for every run). Sections:

- ``main`` (like the paper's Table A1): magnitude, Wanda, SparseGPT, TAMP, ATV and ATV with
  SparseGPT's update, at 2:4, 4:8 and unstructured 50 / 60 / 70%, both variants;
- ``ablation`` (Table 3): Wanda over the positions of each token selector (text, visual, mixed,
  ATV's drift, ABS, DBS, random, drift-fixed; ABS / DBS / drift-fixed scaled to ATV's total budget);
- ``alpha``: ATV's budget scale alpha in {0, 0.5, 1, 2, 4, 8};
- ``calibration`` (Table A3): Wanda and SparseGPT at 50% with visual-only, mixed, text-only and
  ATV calibration;
- ``mot`` (Table 1): the MoT probe, one pathway pruned with Wanda at 50% / 60% from text, visual
  or all rows;
- the per-block drift and visual budget of ATV (Fig. A1), drawn to a PNG.

Reported per configuration: retention per task (100 * accuracy / dense accuracy, mean over seeds),
the average retention (unweighted over tasks, the paper's "Average" column) as mean and standard
deviation over calibration seeds, the mean answer NLL, and for ATV against every baseline the
paired difference of average accuracy on the same items, averaged over seeds first, with its
standard error over items. Jobs run in ``--workers`` processes of one thread each.

Every finished run is appended to a run log (``OUT.runs.jsonl``, one JSON line per pruned model with
its per-item results), keyed by the checkpoint's bytes, ``--per-task``, ``--nsamples`` and
``--test-seed``: a run stopped part way resumes where it stopped, and a later invocation with more
sections or columns prunes only what is new. The log does not see code changes: delete it (or pass
``--no-run-log``) after changing the pruning or scoring code.

The parts: ``accuracy_plan`` (the jobs of each section), ``accuracy_runs`` (pruning and scoring a
job in worker processes, the run log), ``accuracy_stats`` (retention, paired differences, the
tables) and ``accuracy_render`` (markdown, the figure, writing files); this file is the CLI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

from accuracy_plan import (ALPHAS, BUNDLED, CALIBRATIONS, MOT_PATHWAYS, MOT_SPARSITIES, PATTERNS, SEEDS, SELECTORS,
                           TABLES, VARIANTS, Job, plan_jobs, unique_jobs)
from accuracy_render import HERE, markdown, plot_atv_blocks, shown, write_atomic
from accuracy_runs import STATE, RunLog, calibration_token_mix, init_worker, run_job, run_key, setup
from accuracy_stats import build_tables
from atv_sparse.tinybench.hardware import cpu_name


def parse_args(argv=None):
    from atv_sparse.evaluation.loading import model_dir_of

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-vlm",
                   help=f"a bundled model ({', '.join(BUNDLED)}) or a dense LLaVA-style checkpoint directory")
    p.add_argument("--rerender", metavar="JSON", help="rewrite the tables of an earlier run from its JSON (nothing "
                   "pruned or scored; the other options are ignored)")
    p.add_argument("--quick", action="store_true",
                   help="a subset: 2:4 only, one seed, 12 items per task, 8 calibration samples, fewer ablations")
    p.add_argument("--per-task", type=int, default=500, help="test items per task")
    p.add_argument("--nsamples", type=int, default=64, help="calibration conversations per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="calibration seeds")
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                   help="processes, one torch thread each")
    p.add_argument("--full-outlier", action="store_true",
                   help="also run Wanda, TAMP and ATV on the outlier variant everywhere (they reuse the plain runs, "
                        "checked on one run each, by default)")
    p.add_argument("--out", help="output path without extension: writes OUT.md, OUT.json and OUT-atv-blocks.png "
                   "(default: benchmarks/results/accuracy-tiny for tiny-vlm, accuracy-tiny-next for tiny-next)")
    p.add_argument("--run-log", metavar="JSONL", help="finished runs, reused by later invocations of the same "
                   "checkpoint and settings (default: OUT.runs.jsonl)")
    p.add_argument("--no-run-log", action="store_true", help="prune and score every run, log nothing")
    p.add_argument("--sections", nargs="+", default=list(TABLES), choices=TABLES, help="tables to make")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="model variants of the main table (plain always runs)")
    p.add_argument("--prediction", metavar="FILE",
                   help="what the run is expected to show, written before it: printed at the top of OUT.md, with "
                        "the outcome of each checkable prediction beside it")
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS, help="main-table columns")
    p.add_argument("--ablation-patterns", nargs="+", default=["2:4", "60%"], choices=PATTERNS,
                   help="columns of the selector and alpha tables")
    p.add_argument("--mot-sparsities", nargs="+", default=list(MOT_SPARSITIES), choices=("50%", "60%", "70%"))
    args = p.parse_args(argv)
    if args.rerender:
        return args
    out_name, args.model_name = BUNDLED.get(args.model, (None, f"`{Path(args.model).name}`"))
    args.model = str(model_dir_of(args.model))
    if args.out is None:
        args.out = str(HERE / "results" / (out_name or f"accuracy-{Path(args.model).name}"))
    args.variants = ["plain"] + [v for v in args.variants if v != "plain"]
    args.prediction_text = Path(args.prediction).read_text() if args.prediction else None
    args.selectors, args.alphas, args.calibrations = dict(SELECTORS), list(ALPHAS), dict(CALIBRATIONS)
    args.mot_pathways = list(MOT_PATHWAYS)
    if args.quick:
        args.per_task, args.nsamples, args.seeds = min(args.per_task, 12), min(args.nsamples, 8), args.seeds[:1]
        args.patterns, args.ablation_patterns = ["2:4", "50%"], ["2:4"]
        args.selectors = {k: SELECTORS[k] for k in ("text-only", "visual-only", "mixed", "ATV (drift)", "random")}
        args.alphas, args.calibrations = [0.0, 1.0], {k: CALIBRATIONS[k] for k in ("text-only", "ATV")}
        args.mot_pathways, args.mot_sparsities = ["visual"], ["50%"]
    for name in ("per_task", "nsamples", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def rerender(json_path: Path) -> str:
    """Rewrite OUT.md (and OUT.json) of an earlier run from its JSON, nothing pruned or scored again:
    for a change of the tables' layout. The calibration token mix is measured if the run predates it."""
    payload = json.loads(json_path.read_text())
    args = argparse.Namespace(**payload["settings"])
    args.model = str(HERE.parent / args.model) if not Path(args.model).is_absolute() else args.model
    meta = payload["meta"]
    if "calibration_tokens" not in meta:
        meta["calibration_tokens"] = calibration_token_mix(args)
    tasks = list(payload["tables"]["dense"]["plain"]["tasks"])
    text = markdown(payload["tables"], args, tasks, meta)
    write_atomic(json_path, json.dumps(payload, indent=1, default=str) + "\n")
    write_atomic(json_path.with_suffix(".md"), text + "\n")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rerender:
        print(rerender(Path(args.rerender)))
        return 0
    from tqdm.auto import tqdm

    start = time.time()
    torch.set_num_threads(1)
    out = Path(args.out)
    log = None if args.no_run_log else RunLog(Path(args.run_log or out.with_suffix(".runs.jsonl")), run_key(args))
    logged = log.load() if log else {}
    sections = plan_jobs(args)
    jobs = unique_jobs(sections)
    todo = [j for j in jobs if j.name() not in logged]
    STATE.update(setup(args, score=bool(todo)))
    if logged:
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs from {log.path}", file=sys.stderr)
    nsamples = args.nsamples
    done: dict[Job, dict] = {j: logged[j.name()] for j in jobs if j.name() in logged}
    by_name = {j.name(): j for j in todo}
    ctx = multiprocessing.get_context("fork")  # workers inherit the models and the prepared items
    with tqdm(total=len(todo), desc="Pruning and scoring", unit="model") as bar:
        if args.workers == 1 or len(todo) <= 1:
            outputs = map(run_job, todo)
            pool = None
        else:
            pool = ctx.Pool(args.workers, initializer=init_worker, initargs=(1,))
            outputs = pool.imap_unordered(run_job, todo)
        try:
            for r in outputs:
                j = by_name[r["name"]]
                r["nsamples"] = nsamples if j.seed is not None else None
                done[j] = r
                if log:
                    log.append(r)
                bar.update()
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    results = {j: done[j] for j in jobs}
    tasks = list(results[jobs[0]]["tasks"])
    dense = {v: results[Job(v, "dense", None, "dense", None)] for v in args.variants}
    if "outlier" in dense and dense["plain"]["correct"] != dense["outlier"]["correct"]:
        print("warning: the outlier variant does not score like the plain model", file=sys.stderr)
    tables = build_tables(sections, results, tasks)
    model = STATE["models"]["plain"]
    meta = {"date": datetime.date.today().isoformat(), "model": shown(args.model), "machine": f"{cpu_name()} x{os.cpu_count()}",
            "params": sum(p.numel() for p in model.parameters()), "model_name": args.model_name,
            "image_tokens": STATE["image_tokens"], "prediction": args.prediction_text,
            "outlier_channels": STATE["outlier_channels"], "jobs": len(jobs), "jobs_from_log": len(jobs) - len(todo),
            "cpu_minutes": sum(r["prune_s"] + r["eval_s"] for r in results.values()) / 60,
            "calibration_tokens": {str(seed): c.token_mix() for seed, c in STATE["calib"].items()},
            "wall_minutes": (time.time() - start) / 60, "torch": torch.__version__, "workers": args.workers}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(tables, args, tasks, meta)
    settings = vars(args) | {"model": shown(args.model), "out": shown(args.out)}
    payload = {"meta": meta, "settings": settings, "tables": tables,
               "runs": [{k: v for k, v in r.items() if k != "correct"} for r in results.values()]}
    write_atomic(out.with_suffix(".json"), json.dumps(payload, indent=1, default=str) + "\n")
    try:
        plot_atv_blocks(results, args, out.with_name(out.name + "-atv-blocks.png"))
    except Exception as e:  # noqa: BLE001 - the tables matter more than the picture
        print(f"warning: no plot ({e})", file=sys.stderr)
    write_atomic(out.with_suffix(".md"), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
