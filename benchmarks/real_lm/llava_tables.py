"""The paper's tables on the real-LM LLaVA (:mod:`smollm2_llava`): every method, two measures per pruned model.

    pip install -e ".[real-lm]"
    python benchmarks/real_lm/make_text.py --out ~/.cache/atv-sparse/real-lm-text
    nice -n 10 python benchmarks/real_lm/llava_tables.py run      # appends to results/real-lm-llava.runs.jsonl
    python benchmarks/real_lm/llava_tables.py table               # -> results/real-lm-llava.md / .json

Rows: magnitude, Wanda with mixed (its default), text-only and visual-only calibration, SparseGPT,
TAMP, ATV and ATV + SparseGPT (``atv_sparse.prune.recipe.METHODS``); columns: the ``--patterns``.
Each pruned model is made as ``benchmarks/accuracy.py`` makes the tiny tables' (its
``accuracy_runs.run_job``: a fresh copy of the dense model pruned in memory by
``atv_sparse.prune.pipeline``, the code ``convert`` runs, every linear of the 30 decoder blocks,
on ``--nsamples`` ShareGPT4V-style conversations of the synthetic calibration split, 112 px
scenes) and measured twice:

- the bench's accuracy: teacher-forced exact match on ``--per-task`` test items of every synthetic
  task (the same items for every model), retention against the dense model and paired differences
  on the same items, as in ``accuracy-tiny-next``;
- the real-text perplexity of its language model: ``real_lm/perplexity.py``'s held-out text (two
  Python HOWTOs, :mod:`make_text`) in full windows of ``--window`` tokens, Wanda's protocol
  (``atv_sparse.evaluation.perplexity``): what the paper says text calibration protects.

The model runs in bf16 (the LM checkpoint's dtype; pruning statistics are accumulated by the
pipeline as ``convert`` does on a CPU). Every finished model goes to the run log (keyed by the
assembled weights, items, samples and window), so a stopped run resumes; ``run`` orders the jobs
dense, then each pattern's methods together, so a run cut short leaves whole columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
RESULTS = BENCH / "results"
OUT = RESULTS / "real-lm-llava"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(BENCH))

from accuracy_plan import Job, job  # noqa: E402
from accuracy_runs import STATE, RunLog, calibration_sets, init_worker, run_job, run_key  # noqa: E402
from accuracy_stats import paired_difference, retention_of  # noqa: E402

PATTERNS = ("2:4", "50%", "4:8", "60%")
# Row label -> (score rule, token selector), as accuracy_plan builds them from METHODS.
ROWS = {"magnitude": ("magnitude", None), "Wanda (mixed)": ("wanda", "mixed"), "Wanda text-only": ("wanda", "text"),
        "Wanda visual-only": ("wanda", "visual"), "SparseGPT": ("sparsegpt", "mixed"), "TAMP": ("tamp", "tamp"),
        "ATV": ("wanda", "atv"), "ATV + SparseGPT": ("sparsegpt", "atv")}
DENSE = Job("plain", "dense", None, "dense", None)
# (label, row A, row B, measure, relation) checked in the table; see real-lm-llava-prediction.md.
# Perplexity: "<" means A's perplexity below B's. Accuracy: ">=" means A not behind B by more than 2 SE.
PREDICTIONS = (
    ("ppl: SparseGPT < Wanda (mixed)", "SparseGPT", "Wanda (mixed)", "ppl", "<"),
    ("ppl: Wanda text-only < Wanda (mixed)", "Wanda text-only", "Wanda (mixed)", "ppl", "<"),
    ("ppl: Wanda (mixed) < Wanda visual-only", "Wanda (mixed)", "Wanda visual-only", "ppl", "<"),
    ("ppl: ATV < Wanda (mixed)", "ATV", "Wanda (mixed)", "ppl", "<"),
    ("ppl: ATV + SparseGPT < SparseGPT", "ATV + SparseGPT", "SparseGPT", "ppl", "<"),
    ("ppl: every calibrated method < magnitude", None, "magnitude", "ppl", "<"),
    ("accuracy: ATV >= Wanda (mixed)", "ATV", "Wanda (mixed)", "accuracy", ">="),
    ("accuracy: ATV >= TAMP", "ATV", "TAMP", "accuracy", ">="),
    ("accuracy: Wanda (mixed) >= Wanda visual-only", "Wanda (mixed)", "Wanda visual-only", "accuracy", ">="),
)


def plan(patterns, seeds, rows=tuple(ROWS)) -> list[tuple[str, Job]]:
    """(row label, job): dense first, then each pattern's rows together; magnitude once (no calibration)."""
    jobs = [("dense", DENSE)]
    for pattern in patterns:
        for seed in seeds:
            for label, (score, tokens) in ROWS.items():
                if label in rows and (score != "magnitude" or seed == seeds[0]):
                    jobs.append((label, job("plain", score, tokens, pattern, seed)))
    return jobs


def setup(args) -> None:
    """The dense model (bf16), calibration sets, prepared items and the perplexity measure into ``STATE``."""
    from atv_sparse.evaluation.items import scene_size, synthetic_items
    from atv_sparse.evaluation.loading import load_model_and_processor
    from atv_sparse.evaluation.perplexity import text_perplexity
    from atv_sparse.evaluation.scoring import cache_decoder_inputs, prepare_items
    from atv_sparse.models import adapter_for, read_config

    model_dir = Path(args.model)
    model, processor = load_model_and_processor(model_dir, dtype=torch.bfloat16)
    text = (args.text / "evaluation.txt").read_text()

    def perplexity(pruned) -> dict:
        t0 = time.perf_counter()
        r = text_perplexity(pruned, processor.tokenizer, text, seqlen=args.window, source="evaluation.txt")
        return {"ppl": r["ppl"], "ppl_tokens": r["tokens"], "ppl_windows": r["windows"],
                "ppl_s": round(time.perf_counter() - t0, 2)}

    items = synthetic_items(args.per_task, seed=args.test_seed, size=scene_size(processor))
    prepared = prepare_items(model, processor, items)
    STATE.update(models={"plain": model}, processor=processor, adapter=adapter_for(read_config(model_dir), model_dir),
                 calib=calibration_sets(processor, model.config.image_token_id, args.nsamples, args.seeds),
                 prepared=prepared, decoder_inputs=cache_decoder_inputs(model, prepared), measure=perplexity)


def log_key(args) -> dict:
    return {**run_key(args), "window": args.window, "dtype": "bfloat16"}


def machine() -> dict:
    import transformers

    from atv_sparse.tinybench.hardware import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": 1}


def run(args) -> None:
    import multiprocessing

    from smollm2_llava import RECORD_FILE, ensure_model

    args.model = str(args.model or ensure_model(args.cache, args.projector))
    record = Path(args.model) / RECORD_FILE
    log = RunLog(args.runs, log_key(args))
    done = log.load()
    todo = [(label, j) for label, j in plan(args.patterns, args.seeds, args.rows) if j.name() not in done]
    print(f"{len(todo)} models to prune and score ({len(done)} in {args.runs})", flush=True)
    if not todo:
        return
    torch.set_num_threads(1)
    t0 = time.time()
    setup(args)
    mix = {str(s): c.token_mix() for s, c in STATE["calib"].items()}
    print(f"setup {time.time() - t0:.0f} s; calibration token mix {mix}", flush=True)
    context = {"machine": machine(), "calibration_tokens": mix, "model": Path(args.model).name,
               "projector": json.loads(record.read_text()) if record.is_file() else None,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    jobs = [j for _, j in todo]
    pool = None
    if args.workers > 1 and len(jobs) > 1:
        pool = multiprocessing.get_context("fork").Pool(args.workers, initializer=init_worker, initargs=(1,))
        outputs = pool.imap(run_job, jobs)
    else:
        outputs = map(run_job, jobs)
    try:
        for (label, j), r in zip(todo, outputs, strict=True):
            r.update(context, label=label, nsamples=args.nsamples if j.seed is not None else None,
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            log.append(r)
            print(f"{label:18s} {j.pattern:5s} seed {j.seed}: ppl {r['ppl']:.2f}  accuracy {100 * r['average']:.1f}%  "
                  f"prune {r['prune_s']:.0f} s  score {r['eval_s']:.0f} s  ppl {r['ppl_s']:.0f} s", flush=True)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def read_runs(path: Path) -> tuple[dict, dict]:
    """(key, job name -> run) of the runs file's last key (the latest settings)."""
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not entries:
        raise SystemExit(f"error: {path} holds no runs; run `python benchmarks/real_lm/llava_tables.py run` first")
    key = entries[-1]["key"]
    return key, {e["run"]["name"]: e["run"] for e in entries if e["key"] == key}


def _pd(a: dict, b: dict) -> str:
    d, se = paired_difference([a], [b])
    return f"{d:+.1f} ± {se:.1f}"


def table(runs_path: Path) -> tuple[str, dict]:
    key, runs = read_runs(runs_path)
    if DENSE.name() not in runs:
        raise SystemExit(f"error: {runs_path}: no dense run for these settings")
    dense = runs[DENSE.name()]
    tasks = list(dense["tasks"])
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for r in runs.values():
        if r["label"] != "dense":
            by_cell.setdefault((r["label"], r["job"]["pattern"]), []).append(r)
    patterns = [p for p in PATTERNS if any(col == p for _, col in by_cell)]
    first = next(iter(runs.values()))
    m = first["machine"]
    mix = first["calibration_tokens"]
    share = ", ".join(f"seed {s}: {v['visual']:,} image + {v['text']:,} text tokens ({100 * v['visual_share']:.1f}% "
                      "visual)" for s, v in mix.items())
    seeds = sorted({r["job"]["seed"] for r in runs.values() if r["job"]["seed"] is not None})
    projector = first.get("projector")
    # Runs logged before the projector was recorded were all made with the first stage 1 (the only
    # projector then), the file now kept as projector-stage1-v1.safetensors.
    projector = (f"projector `{projector['projector']}` (sha256 {projector['sha256'][:12]})" if projector else
                 "projector `projector-stage1-v1.safetensors` (the first stage 1: these runs predate the stage1-v2 "
                 "projector and the projector record)")
    lines = [
        "# The paper's tables on a real LM: the SmolLM2-135M LLaVA-NeXT, pruned by every method",
        "",
        f"Made by `benchmarks/real_lm/llava_tables.py table` from `real-lm-llava.runs.jsonl` (dense + {len(runs) - 1} pruned "
        f"models, {min(r['date'] for r in runs.values())[:16]} to {max(r['date'] for r in runs.values())[:16]} UTC; "
        "log: `real-lm-llava.log`); prediction written before the runs: `real-lm-llava-prediction.md`.",
        f"Model: `{first['model']}` (`benchmarks/real_lm/smollm2_llava.py`: SmolLM2-135M-Instruct, the Q4_1 "
        "release dequantized to bf16, frozen; the bundled tiny CLIP tower, frozen; "
        f"{projector}, trained in stage 1 only; model card `benchmarks/real_lm/smollm2_llava/README.md`), run in bf16. "
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs, one torch thread per model, torch "
        f"{m['torch']}, transformers {m['transformers']}.",
        f"Calibration: {key['nsamples']} conversations of the synthetic calibration split per seed (seeds "
        f"{', '.join(map(str, seeds))}; 112 px scenes, 336 image tokens each): {share}. Every linear of the 30 "
        "decoder blocks pruned (210 layers); tower, projector, embeddings and the tied LM head dense.",
        f"Accuracy: {key['per_task']} test items per task (seed {key['test_seed']}), teacher-forced exact match "
        "(answer + `<|im_end|>`), the same items for every model; retention = 100 x accuracy / dense accuracy per "
        "task, Average = unweighted mean over the tasks the dense model scores above 0 on. Paired differences: "
        "points of average accuracy on the same items, ± standard error over items.",
        f"Perplexity: the real-LM table's held-out text (`real-lm-text-sources.json`: two Python HOWTOs), "
        f"{dense['ppl_windows']} full windows of {key['window']} tokens of {dense['ppl_tokens']}, scored by the "
        "language model alone (no image), lower is better.",
        "",
        "## Dense model",
        "",
        f"Text perplexity {dense['ppl']:.2f}; average accuracy {100 * dense['average']:.1f}% over {len(tasks)} tasks.",
        "",
        "| " + " | ".join(tasks) + " |",
        "|" + "---:|" * len(tasks),
        "| " + " | ".join(f"{100 * dense['tasks'][t]['accuracy']:.0f}" for t in tasks) + " |",
        "",
    ]
    summary = {}
    for p in patterns:
        lines += [f"## {p}", "",
                  "| method | text ppl | ppl / dense | accuracy % | retention % | vs dense (pts) | ATV - this (pts) | "
                  "prune s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        atv = by_cell.get(("ATV", p))
        for label in ROWS:
            rs = by_cell.get((label, p))
            if not rs:
                lines.append(f"| {label} | - | - | - | - | - | - | - |")
                continue
            r = rs[0]  # one seed per cell (see the prediction file for why)
            ret = retention_of(r, dense)["average"] if dense["average"] > 0 else None
            vs_atv = "" if label == "ATV" or not atv else _pd(atv[0], r)
            summary[f"{label}|{p}"] = {"ppl": r["ppl"], "accuracy": r["average"], "retention": ret,
                                       "tasks": {t: s["accuracy"] for t, s in r["tasks"].items()},
                                       "vs_dense": paired_difference([r], [dense]),
                                       "atv_minus": None if not vs_atv else paired_difference([atv[0]], [r]),
                                       "prune_s": r["prune_s"], "eval_s": r["eval_s"], "ppl_s": r["ppl_s"],
                                       "seed": r["job"]["seed"]}
            lines.append(f"| {label} | {r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.2f} | {100 * r['average']:.1f} | "
                         f"{'-' if ret is None else f'{ret:.1f}'} | {_pd(r, dense)} | {vs_atv} | {r['prune_s']:.0f} |")
        lines += ["", f"Per-task accuracy, % ({p}):", "", "| method | " + " | ".join(tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        for label in ROWS:
            if (label, p) in by_cell:
                r = by_cell[(label, p)][0]
                lines.append(f"| {label} | " + " | ".join(f"{100 * r['tasks'][t]['accuracy']:.0f}" for t in tasks)
                             + " |")
        lines.append("")
    gaps = modality_gaps()
    if gaps:
        lines += ["## Modality gap beside the two tiny VLMs", "",
                  "`benchmarks/modality_gap.py` on each model's default calibration conversations (its own JSON "
                  "names the count): share of visual tokens; kept weights in common between Wanda 50% masks scored "
                  "from text-only and from visual-only statistics (mean over the decoder linears, range); cosine "
                  "between the text and visual tokens' per-channel activation RMS profiles at each linear's input "
                  "(range), and at block 0's attention input; visual / text RMS norm ratio (range).", "",
                  "| model | file | samples | visual share | overlap, mean (range) | cosine range | block 0 attn in | "
                  "norm ratio range |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for g in gaps:
            lines.append(f"| {g['model']} | `{g['file']}` | {g['samples']} | {100 * g['visual_share']:.1f}% | "
                         f"{100 * g['overlap_mean']:.1f}% ({100 * g['overlap_min']:.1f}-{100 * g['overlap_max']:.1f}) | "
                         f"{g['cosine_min']:.3f}-{g['cosine_max']:.3f} | {g['block0_attn_cosine']:.3f} | "
                         f"{g['ratio_min']:.2f}-{g['ratio_max']:.2f} |")
        lines.append("")
    checks = prediction_checks(by_cell, patterns)
    if checks:
        lines += ["## Predictions and outcomes", "",
                  "Perplexity: one pruned model per cell (seed 0), compared directly. Accuracy: paired difference "
                  "A - B, held when A is not behind B by more than 2 SE (two models that both score 0 hold "
                  "trivially: read those with the accuracy beside them).", "",
                  "| prediction | column | outcome | held |", "|---|---|---|---|"]
        for c in checks:
            held = "no" if not c["held"] else "trivially (both 0)" if c["both_zero"] else "yes"
            lines.append(f"| {c['prediction']} | {c['column']} | {c['outcome']} | {held} |")
        trivial = sum(c["both_zero"] for c in checks)
        lines += ["", f"{sum(c['held'] for c in checks)} of {len(checks)} held, {trivial} of them trivially (two models "
                  "that both score 0 on the bench)."]
    lines += ["", "Reproduce: `pip install -e \".[real-lm]\"`, `python benchmarks/real_lm/make_text.py --out "
              "~/.cache/atv-sparse/real-lm-text`, `nice -n 10 python benchmarks/real_lm/llava_tables.py run "
              f"--patterns {' '.join(patterns)} --per-task {key['per_task']} --nsamples {key['nsamples']}`, then "
              "`... table`.", ""]
    payload = {"key": key, "machine": m, "calibration_tokens": mix,
               "dense": {"ppl": dense["ppl"], "accuracy": dense["average"],
                         "tasks": {t: s["accuracy"] for t, s in dense["tasks"].items()}},
               "cells": summary, "predictions": checks, "modality_gap": gaps}
    return "\n".join(lines), payload


GAP_FILES = {"tiny_vlm": "modality-gap-tiny.json", "tiny_next": "modality-gap-tiny-next.json",
             "SmolLM2 LLaVA": "modality-gap-smollm2-llava.json"}


def modality_gaps() -> list[dict]:
    """The summary of each model's ``benchmarks/modality_gap.py`` JSON in ``results/`` (those present)."""
    import statistics

    out = []
    for model, name in GAP_FILES.items():
        path = RESULTS / name
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        lin = list(r["linears"].values())
        first_q = next(g for n, g in r["linears"].items() if n.endswith("layers.0.self_attn.q_proj"))
        out.append({"model": model, "file": name, "samples": r["samples"], "visual_share": r["visual_share"],
                    "overlap_mean": statistics.fmean(g["overlap"] for g in lin),
                    "overlap_min": min(g["overlap"] for g in lin), "overlap_max": max(g["overlap"] for g in lin),
                    "cosine_min": min(g["cosine"] for g in lin), "cosine_max": max(g["cosine"] for g in lin),
                    "ratio_min": min(g["norm_ratio"] for g in lin), "ratio_max": max(g["norm_ratio"] for g in lin),
                    "block0_attn_cosine": first_q["cosine"]})
    return out


def prediction_checks(by_cell: dict, patterns: list[str]) -> list[dict]:
    out = []
    for label, a, b, measure, relation in PREDICTIONS:
        for p in patterns:
            rows_a = [a] if a else [r for r in ROWS if r != b]
            if (b, p) not in by_cell or any((r, p) not in by_cell for r in rows_a):
                continue
            rb = by_cell[(b, p)][0]
            if measure == "ppl":
                held = all(by_cell[(r, p)][0]["ppl"] < rb["ppl"] for r in rows_a)
                outcome = ", ".join(f"{by_cell[(r, p)][0]['ppl']:.2f}" for r in rows_a) + f" vs {rb['ppl']:.2f}"
            else:
                ra = by_cell[(a, p)][0]
                d, se = paired_difference([ra], [rb])
                held = d >= -2 * se if relation == ">=" else d > 2 * se
                outcome = (f"{d:+.1f} ± {se:.1f} pts ({'within 2 SE' if abs(d) <= 2 * se else 'A ahead' if d > 0 else 'A behind'}"
                           f"; accuracy {100 * ra['average']:.1f}% vs {100 * rb['average']:.1f}%)")
            trivial = measure == "accuracy" and by_cell[(a, p)][0]["average"] == 0 == rb["average"]
            out.append({"prediction": label, "column": p, "outcome": outcome, "held": held, "both_zero": trivial})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="prune and score the missing models, appending to the runs file")
    r.add_argument("--model", type=Path, default=None, help="the assembled model (default: smollm2_llava.py's, made "
                   "once in the cache)")
    r.add_argument("--cache", type=Path, default=None, help="smollm2.py's cache folder")
    r.add_argument("--projector", type=Path, default=None,
                   help="trained projector the model is assembled with when --model is not given (default: the "
                        "shipped projector.safetensors; projector-stage1-v1.safetensors made the committed tables)")
    r.add_argument("--text", type=Path, default=Path.home() / ".cache" / "atv-sparse" / "real-lm-text",
                   help="make_text.py's output folder")
    r.add_argument("--patterns", nargs="+", choices=PATTERNS, default=["2:4", "50%"])
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                   help=f"methods (default all: {', '.join(ROWS)})")
    r.add_argument("--per-task", type=int, default=8, help="test items per task")
    r.add_argument("--nsamples", type=int, default=8, help="calibration conversations per seed")
    r.add_argument("--test-seed", type=int, default=0)
    r.add_argument("--window", type=int, default=512, help="perplexity window, as real_lm/perplexity.py")
    r.add_argument("--workers", type=int, default=1, help="processes, one torch thread each")
    r.add_argument("--runs", type=Path, default=OUT.with_suffix(".runs.jsonl"))
    t = sub.add_parser("table", help="render results/real-lm-llava.md and .json from the runs file")
    t.add_argument("--runs", type=Path, default=OUT.with_suffix(".runs.jsonl"))
    t.add_argument("--out", type=Path, default=OUT, help="output path without suffix")
    args = p.parse_args(argv)
    if args.command == "run":
        from smollm2_llava import PROJECTOR_FILE, TRAINED

        if args.model is not None and args.projector is not None:
            p.error("--projector assembles the model; it cannot be combined with --model")
        args.projector = args.projector or TRAINED / PROJECTOR_FILE
        for name in ("per_task", "nsamples", "workers", "window"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1")
        run(args)
        return 0
    text, payload = table(args.runs)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
