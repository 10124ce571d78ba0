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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from atv_sparse.prune.recipe import METHODS
from atv_sparse.tinybench.hardware import cpu_name

HERE = Path(__file__).resolve().parent
PATTERNS = ("2:4", "4:8", "50%", "60%", "70%")
SEEDS = (0, 1, 2)
# Row label -> method (atv_sparse.prune.recipe.METHODS: its score rule and token selector).
MAIN_METHODS = {"magnitude": "magnitude", "Wanda": "wanda", "SparseGPT": "sparsegpt", "TAMP": "tamp", "ATV": "atv",
                "ATV + SparseGPT": "atv-sparsegpt"}
SELECTORS = {"text-only": "text", "visual-only": "visual", "mixed": "mixed", "ATV (drift)": "atv", "ABS": "abs",
             "DBS": "dbs", "random": "random", "drift-fixed": "drift-fixed"}
ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
CALIBRATIONS = {"visual-only": "visual", "mixed": "mixed", "text-only": "text", "ATV": "atv"}
MOT_PATHWAYS, MOT_ROWS, MOT_SPARSITIES = ("text", "visual"), ("text", "visual", "all"), ("50%", "60%")
VARIANTS = ("plain", "outlier")
TABLES = ("main", "ablation", "alpha", "calibration", "mot")
# --model names of the bundled models -> (default --out, name in titles)
BUNDLED = {"tiny-vlm": ("accuracy-tiny", "the bundled tiny VLM"), "tiny-next": ("accuracy-tiny-next", "the tiny LLaVA-NeXT")}
INVARIANT_SCORES = ("wanda", "tamp")
OUTLIER_CHANNELS, OUTLIER_SCALE = 4, 32.0


@dataclasses.dataclass(frozen=True)
class Job:
    """One pruned model to score. ``seed`` is None for magnitude (no calibration data)."""

    variant: str
    score: str
    tokens: str | None
    pattern: str
    seed: int | None
    alpha: float = 1.0
    mot: tuple[str, str] | None = None  # (pathway pruned, calibration rows)

    def name(self) -> str:
        parts = [self.variant, self.score, self.tokens or "-", self.pattern, f"seed{self.seed}"]
        if self.alpha != 1.0:
            parts.append(f"alpha{self.alpha:g}")
        if self.mot:
            parts.append(f"mot-{self.mot[0]}-{self.mot[1]}")
        return "/".join(parts)


def job(variant: str, score: str, tokens: str | None, pattern: str, seed: int | None, **kw) -> Job:
    return Job(variant, score, tokens, pattern, None if score == "magnitude" else seed, **kw)


# ---------------------------------------------------------------------------------------------
# The worker side: one process holds the dense models, the calibration samples and the items.
# ---------------------------------------------------------------------------------------------

_STATE: dict = {}


def setup(args, score: bool = True) -> dict:
    """Load the model, build both variants, the calibration samples per seed and (``score``) the
    scored items."""
    from atv_sparse.analysis.outliers import add_outlier_channels
    from atv_sparse.evaluation.items import scene_size, synthetic_items
    from atv_sparse.evaluation.loading import load_model_and_processor
    from atv_sparse.evaluation.scoring import cache_decoder_inputs, prepare_items
    from atv_sparse.models import adapter_for, read_config

    model_dir = Path(args.model)
    model, processor = load_model_and_processor(model_dir, dtype=torch.float32)
    adapter = adapter_for(read_config(model_dir), model_dir)
    outlier = copy.deepcopy(model)
    transform = add_outlier_channels(outlier, OUTLIER_CHANNELS, OUTLIER_SCALE, seed=0)
    token_id = model.config.image_token_id
    calib = calibration_sets(processor, token_id, args.nsamples, args.seeds)
    first = next(iter(calib.values()))
    state = {"models": {"plain": model, "outlier": outlier}, "processor": processor, "adapter": adapter,
             "image_tokens": first.token_mix()["visual"] // len(first.samples),  # one image per conversation
             "calib": calib, "outlier_channels": transform.channels}
    if score:
        items = synthetic_items(args.per_task, seed=args.test_seed, size=scene_size(processor))
        state["prepared"] = prepare_items(model, processor, items)
        state["decoder_inputs"] = cache_decoder_inputs(model, state["prepared"])
    return state


def calibration_sets(processor, token_id: int, nsamples: int, seeds) -> dict:
    """seed -> the ``CalibrationSet`` of ``nsamples`` conversations of the synthetic calibration split
    (scenes drawn at the model's :func:`scene_size`, as ``convert``'s default calibration draws them)."""
    from atv_sparse.calib import conversation_calibration
    from atv_sparse.evaluation.items import scene_size
    from atv_sparse.tinybench.tasks import calibration_conversations

    size = scene_size(processor)
    return {seed: conversation_calibration(
        processor, calibration_conversations(nsamples, seed, size=size), token_id)
        for seed in seeds}


def calibration_token_mix(args) -> dict[str, dict]:
    """seed -> the calibration set's token mix (``CalibrationSet.token_mix``), without pruning anything."""
    from atv_sparse.models.processors import load_processor
    from transformers import AutoConfig

    sets = calibration_sets(load_processor(Path(args.model)), AutoConfig.from_pretrained(args.model).image_token_id,
                            args.nsamples, args.seeds)
    return {str(seed): c.token_mix() for seed, c in sets.items()}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def parse_label(label: str):
    from atv_sparse.patterns import parse_pattern

    if label.endswith("%"):
        return parse_pattern("unstructured", float(label[:-1]) / 100)
    return parse_pattern(label)


@torch.no_grad()
def run_job(job: Job) -> dict:
    """Prune a fresh copy of the job's dense model and score it: per task accuracy, NLL and the
    per-item correctness (a 0/1 string in item order), plus the driver's per-block report."""
    from atv_sparse.evaluation.scoring import evaluate_model

    st = _STATE
    t0 = time.perf_counter()
    model = copy.deepcopy(st["models"][job.variant])
    calibration = st["calib"][job.seed] if job.seed is not None else None
    blocks = []
    pattern = None if job.pattern == "dense" else parse_label(job.pattern)  # None: the dense baseline
    if pattern is not None and job.mot is not None:
        from atv_sparse.analysis.mot import attach_mot, mot_prune

        probe = attach_mot(model)
        report = mot_prune(probe, calibration.samples, pathway=job.mot[0], calib=job.mot[1], pattern=pattern,
                           device="cpu")
        blocks = report.blocks
    elif pattern is not None:
        from atv_sparse.prune.pipeline import prune_model
        from atv_sparse.prune.recipe import PruneRecipe
        from atv_sparse.prune.targets import resolve_targets

        adapter = st["adapter"]
        layers, prefix = adapter.decoder_layers(model), adapter.layers_prefix(model)
        plan = resolve_targets(model, prefix, pattern)
        targets = {name: model.get_submodule(name) for name in plan.targets}
        # Every score rule is also a method's name; the job's selector replaces (or is) its own.
        recipe = PruneRecipe.build(job.score, pattern, calib_tokens=job.tokens, alpha=job.alpha, seed=job.seed or 0)
        result = prune_model(model, layers, prefix, targets, recipe, calibration, torch.device("cpu"), progress=False)
        blocks = result.blocks
    t1 = time.perf_counter()
    # Only decoder linears are pruned (and the outlier transform touches only decoder blocks), so
    # every run shares the dense model's embeddings and image features; the MoT probe routes by ids.
    items = st["prepared"] if job.mot is not None else st["decoder_inputs"]
    scored = evaluate_model(model, st["processor"], items, progress=False)
    correct: dict[str, list[str]] = {}
    for r in scored["records"]:
        correct.setdefault(r["task"], []).append("1" if r["correct"] else "0")
    return {"job": dataclasses.asdict(job), "name": job.name(), "average": scored["average"],
            "average_nll": scored["average_nll"],
            "tasks": {t: {"accuracy": s["accuracy"], "nll": s["nll"]} for t, s in scored["tasks"].items()},
            "correct": {t: "".join(c) for t, c in correct.items()},
            "blocks": [{k: v for k, v in b.items() if not k.startswith("time_")} for b in blocks],
            "prune_s": round(t1 - t0, 2), "eval_s": round(time.perf_counter() - t1, 2)}


class RunLog:
    """Finished runs of one setting, one JSON line each (``{"key": ..., "run": ...}``), appended as
    they finish. Lines of another key (another checkpoint or item count) are kept and ignored; a
    line cut short by a killed run is skipped."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key

    def load(self) -> dict[str, dict]:
        """Job name -> run, for the runs of this key."""
        runs = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("key") == self.key:
                    runs[entry["run"]["name"]] = entry["run"]
        return runs

    def append(self, run: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # a line cut short by a killed run stays on its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps({"key": self.key, "run": run}) + "\n").encode())


def run_key(args) -> dict:
    """What a logged run depends on besides its job: the checkpoint's weights and the items scored."""
    digest = hashlib.sha256()
    for f in sorted(Path(args.model).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return {"weights_sha256": digest.hexdigest()[:16], "per_task": args.per_task, "nsamples": args.nsamples,
            "test_seed": args.test_seed}


# ---------------------------------------------------------------------------------------------
# Which jobs, and the tables made from their results.
# ---------------------------------------------------------------------------------------------

def plan_jobs(args) -> dict[str, list]:
    """Section -> rows; every row is (label, {column: [Job per seed]}). Jobs repeat across sections
    (the ATV 2:4 runs are in main, ablation and alpha); each unique job runs once."""
    seeds = args.seeds
    sections: dict[str, list] = {"dense": [("dense", {v: [Job(v, "dense", None, "dense", None)]
                                                      for v in args.variants})]}

    def cells(score, tokens, patterns, variant="plain", **kw):
        return {p: [job(variant, score, tokens, p, s, **kw) for s in seeds] for p in patterns}

    main, invariance = [], []
    for variant in args.variants:
        for label, method in MAIN_METHODS.items():
            score, tokens = METHODS[method].rule.name, METHODS[method].tokens
            # Wanda-score methods give the outlier variant the plain model's masks exactly (a
            # power-of-two rescaling of input channels leaves |W| * ||X|| bit-identical, and the
            # token selectors see the same hidden states): their outlier cells reuse the plain runs,
            # and one run per method checks it (``invariance``).
            reuse = variant == "outlier" and score in INVARIANT_SCORES and not args.full_outlier
            main.append((f"{variant}|{label}", cells(score, tokens, args.patterns, "plain" if reuse else variant)))
            if reuse:
                invariance.append((label, {args.patterns[0]: [job("outlier", score, tokens, args.patterns[0],
                                                                  seeds[0])]}))
    sections["main"], sections["invariance"] = main, invariance
    ab_patterns = args.ablation_patterns
    sections["ablation"] = [(label, cells("wanda", tokens, ab_patterns)) for label, tokens in args.selectors.items()]
    sections["alpha"] = [(f"alpha={a:g}", cells("wanda", "atv", ab_patterns, alpha=a)) for a in args.alphas]
    sections["calibration"] = [(f"{method} {label}", cells(score, tokens, ["50%"]))
                               for method, score in (("Wanda", "wanda"), ("SparseGPT", "sparsegpt"))
                               for label, tokens in args.calibrations.items()]
    sections["mot"] = [(f"{pathway} pathway, {rows} rows",
                        cells("wanda", "mixed", args.mot_sparsities, mot=(pathway, rows)))
                       for pathway in args.mot_pathways for rows in MOT_ROWS]
    for name in TABLES:
        if name not in args.sections:
            sections[name] = []
    if "main" not in args.sections:
        sections["invariance"] = []
    return sections


def unique_jobs(sections: dict[str, list]) -> list[Job]:
    seen: dict[Job, None] = {}
    for rows in sections.values():
        for _, columns in rows:
            for jobs in columns.values():
                for j in jobs:
                    seen.setdefault(j, None)
    return list(seen)


def retention_of(result: dict, dense: dict) -> dict:
    """Per-task retention (%) and their unweighted mean (tasks where the dense model scores 0 left out)."""
    per_task = {t: 100 * s["accuracy"] / dense["tasks"][t]["accuracy"]
                for t, s in result["tasks"].items() if dense["tasks"][t]["accuracy"] > 0}
    return {"tasks": per_task, "average": sum(per_task.values()) / len(per_task)}


def summarize_cell(results: list[dict], dense: dict) -> dict:
    """Mean and spread over seeds of one configuration."""
    rets = [retention_of(r, dense) for r in results]
    averages = [r["average"] for r in rets]
    return {"retention": {t: statistics.mean(r["tasks"][t] for r in rets) for t in rets[0]["tasks"]},
            "average_retention": statistics.mean(averages),
            "sd": statistics.stdev(averages) if len(averages) > 1 else 0.0,
            "accuracy": statistics.mean(r["average"] for r in results),
            "nll": statistics.mean(r["average_nll"] for r in results), "seeds": len(results),
            "visual_tokens": _visual_tokens_per_sample(results[0])}


def _visual_tokens_per_sample(result: dict) -> float | None:
    used = [b["visual_tokens_used"] for b in result["blocks"] if "visual_tokens_used" in b]
    n = result.get("nsamples")
    return None if not used or not n else sum(used) / len(used) / n


def paired_difference(ours: list[dict], theirs: list[dict]) -> tuple[float, float]:
    """ATV minus a baseline in points of average accuracy (mean over tasks), per item averaged over
    the seeds first (seed k of one against seed k of the other; a seedless baseline against every
    seed), with the standard error over items: sqrt(sum over tasks of SE_t^2) / T."""
    if len(theirs) == 1 and len(ours) > 1:
        theirs = theirs * len(ours)
    tasks = list(ours[0]["correct"])
    deltas, variances = [], []
    for t in tasks:
        n = len(ours[0]["correct"][t])
        d = [sum(int(a["correct"][t][i]) - int(b["correct"][t][i]) for a, b in zip(ours, theirs, strict=True))
             / len(ours) for i in range(n)]
        mean = sum(d) / n
        deltas.append(mean)
        variances.append(sum((x - mean) ** 2 for x in d) / max(1, n - 1) / n)
    return 100 * sum(deltas) / len(tasks), 100 * math.sqrt(sum(variances)) / len(tasks)


def reference_row(section: str, label: str) -> str | None:
    """The row of a selector, alpha or calibration table that the others are paired against:
    ATV's drift selector, alpha = 1, and mixed calibration of the same score rule."""
    if section == "ablation":
        return "ATV (drift)"
    if section == "alpha":
        return "alpha=1"
    if section == "calibration":
        return label.split(" ")[0] + " mixed"
    return None


def verdict(delta: float, se: float) -> str:
    if abs(delta) < 2 * se:
        return "within noise (|d| < 2 SE)"
    return "ATV better" if delta > 0 else "ATV worse"


def build_tables(sections: dict[str, list], results: dict[Job, dict], tasks: list[str]) -> dict:
    dense = {v: results[j] for v, (j,) in sections["dense"][0][1].items()}
    tables: dict = {"dense": {v: {"average": d["average"], "average_nll": d["average_nll"],
                                  "tasks": d["tasks"]} for v, d in dense.items()}}
    for section in ("main", "ablation", "alpha", "calibration", "mot"):
        rows = {}
        for label, columns in sections[section]:
            variant = label.split("|")[0] if section == "main" else "plain"
            rows[label] = {col: summarize_cell([results[j] for j in jobs], dense[variant])
                           for col, jobs in columns.items()}
            ref = reference_row(section, label)
            ref_columns = dict(sections[section]).get(ref)
            if ref_columns is None or ref == label:
                continue
            for col, jobs in columns.items():
                if col in ref_columns:
                    d, se = paired_difference([results[j] for j in jobs], [results[j] for j in ref_columns[col]])
                    rows[label][col]["vs_reference"] = {"reference": ref, "delta": d, "se": se}
        tables[section] = rows
    diffs = {}
    for label, columns in sections["main"]:
        variant, method = label.split("|")
        if method not in ("ATV", "ATV + SparseGPT"):
            continue
        baselines = ["magnitude", "Wanda", "SparseGPT", "TAMP"] if method == "ATV" else ["SparseGPT", "ATV"]
        for base in baselines:
            base_cols = dict(sections["main"])[f"{variant}|{base}"]
            for col, jobs in columns.items():
                d, se = paired_difference([results[j] for j in jobs], [results[j] for j in base_cols[col]])
                diffs[f"{variant}|{method} - {base}|{col}"] = {"delta": d, "se": se, "verdict": verdict(d, se)}
    tables["paired"] = diffs
    checks = {}
    for label, columns in sections["invariance"]:
        (col, (j,)), = columns.items()
        plain = results[dataclasses.replace(j, variant="plain")]
        checks[f"{label} {col} seed {j.seed}"] = results[j]["correct"] == plain["correct"]
    tables["invariance"] = checks
    tables["prediction"] = prediction_checks(sections, results, tables["paired"])
    atv = dict(sections["main"]).get("plain|ATV")
    if atv:
        col, jobs = next(iter(atv.items()))
        tables["atv_blocks"] = {"column": col, "seed": jobs[0].seed, "nsamples": results[jobs[0]].get("nsamples"),
                                "blocks": [{k: b[k] for k in ("block", "s_bar", "k_mean", "k_min", "k_max",
                                                               "text_tokens", "visual_tokens_used") if k in b}
                                           for b in results[jobs[0]]["blocks"]]}
    return tables


# The paper's predictions (docs/design.md, the issue that asked for the tiny LLaVA-NeXT):
# (label, section, row A, row B, column, relation). ">": A ahead of B by more than 2 SE; ">=": A
# not behind B by more than 2 SE.
PREDICTIONS = (
    ("Wanda: ATV >= text-only calibration", "calibration", "Wanda ATV", "Wanda text-only", "50%", ">="),
    ("Wanda: text-only > mixed calibration", "calibration", "Wanda text-only", "Wanda mixed", "50%", ">"),
    ("Wanda: mixed > visual-only calibration", "calibration", "Wanda mixed", "Wanda visual-only", "50%", ">"),
    ("SparseGPT: mixed >= text-only calibration (A7(ii))", "calibration", "SparseGPT mixed", "SparseGPT text-only",
     "50%", ">="),
    ("SparseGPT: mixed >= visual-only calibration (A7(ii))", "calibration", "SparseGPT mixed",
     "SparseGPT visual-only", "50%", ">="),
) + tuple((f"ATV > {base} at {col}", "main", "plain|ATV", f"plain|{base}", col, ">")
          for base in ("Wanda", "TAMP") for col in ("2:4", "4:8", "60%")) + tuple(
    (f"Selectors: ATV (drift) >= {other} at {col}", "ablation", "ATV (drift)", other, col, ">=")
    for other in ("ABS", "DBS", "random", "drift-fixed") for col in ("2:4", "60%")) + tuple(
    (f"alpha = 1 >= alpha = {a} at {col}", "alpha", "alpha=1", f"alpha={a}", col, ">=")
    for a in (0, 8) for col in ("2:4", "60%")) + (
    ("MoT: visual pathway pruned > text pathway pruned (all rows, 50%)", "mot", "visual pathway, all rows",
     "text pathway, all rows", "50%", ">"),)


def prediction_checks(sections: dict[str, list], results: dict[Job, dict], paired: dict) -> list[dict]:
    """Each of :data:`PREDICTIONS` whose cells ran: the paired difference A - B of average accuracy
    (points, standard error over items) and whether the prediction held."""
    out = []
    for label, section, a, b, col, relation in PREDICTIONS:
        rows = dict(sections[section])
        if a not in rows or b not in rows or col not in rows[a] or col not in rows[b]:
            continue
        d, se = paired_difference([results[j] for j in rows[a][col]], [results[j] for j in rows[b][col]])
        held = d > 2 * se if relation == ">" else d > -2 * se
        out.append({"prediction": label, "delta": d, "se": se, "held": held})
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _cell(c: dict) -> str:
    return f"{c['average_retention']:.1f} ± {c['sd']:.1f}"


def calibration_share(meta: dict) -> str:
    """"52.1% visual" over the calibration seeds (one value, or the range when they differ)."""
    shares = sorted(100 * m["visual_share"] for m in meta["calibration_tokens"].values())
    span = f"{shares[0]:.1f}%" if shares[-1] - shares[0] < 0.05 else f"{shares[0]:.1f}-{shares[-1]:.1f}%"
    return f"calibration tokens {span} visual"


def _effort(meta: dict) -> str:
    """What the tables cost: wall time of the last invocation, and CPU time over all runs when some
    came from the run log."""
    text = f"{meta['wall_minutes']:.1f} min for {meta['jobs']} pruned models"
    if meta.get("jobs_from_log"):
        text += (f" ({meta['jobs_from_log']} of them from the run log of earlier invocations; "
                 f"{meta['cpu_minutes']:.0f} CPU-minutes of pruning and scoring over all {meta['jobs']})")
    return text


def markdown(tables: dict, args, tasks: list[str], meta: dict) -> str:
    share = calibration_share(meta)
    mix = meta["calibration_tokens"]
    per_seed = "; ".join(f"seed {s}: {m['visual']:,} image + {m['text']:,} text tokens ({100 * m['visual_share']:.1f}% "
                         "visual)" for s, m in mix.items())
    out = [f"# Accuracy of pruning methods on {meta.get('model_name', 'the bundled tiny VLM')} ({meta['date']})", "",
           f"Model `{meta['model']}` ({meta['params']:,} parameters; {meta['image_tokens']} image tokens per image). "
           f"Test: {args.per_task} items per task of the synthetic test split (seed {args.test_seed}), "
           f"teacher-forced exact match. Calibration: {args.nsamples} conversations of the calibration split per "
           f"seed, seeds {', '.join(map(str, args.seeds))}. {meta['machine']}; torch {torch.__version__}; "
           f"{_effort(meta)}.", "",
           f"Token mix of the calibration sets (every block sees all of them; the paper's LLaVA-NeXT-8B: ~90% "
           f"visual): {per_seed}.", "",
           "Retention = 100 x accuracy / dense accuracy per task; Average = unweighted mean over tasks "
           "(the paper's Average column), mean ± standard deviation over calibration seeds."
           + (" Outlier variant: the same model with hidden channels "
              f"{meta['outlier_channels']} of every RMSNorm x{OUTLIER_SCALE:g} and the columns they feed /"
              f"{OUTLIER_SCALE:g} (bit-identical function)." if "outlier" in args.variants else ""), ""]
    if meta.get("prediction"):
        out += ["## Prediction, written before the run", "", meta["prediction"].strip(), ""]
    if tables.get("prediction"):
        out += [f"## Outcome beside the prediction ({share})", "",
                "Paired difference A - B of average accuracy in points (same items, seeds averaged per item first), "
                "± its standard error over items; '>' holds when A is ahead by more than 2 SE, '>=' when A is not "
                "behind by more than 2 SE.", "", "| prediction | A - B | held |", "| --- | ---: | --- |"]
        out += [f"| {c['prediction']} | {c['delta']:+.2f} ± {c['se']:.2f} | {'yes' if c['held'] else '**no**'} |"
                for c in tables["prediction"]]
        out.append("")
    out += ["## Dense model (no calibration)", "", "| variant | " + " | ".join(tasks) + " | average | answer NLL |",
            "| --- |" + " ---: |" * (len(tasks) + 2)]
    for v, d in tables["dense"].items():
        out.append(f"| {v} | " + " | ".join(f"{100 * d['tasks'][t]['accuracy']:.1f}" for t in tasks)
                   + f" | {100 * d['average']:.1f} | {d['average_nll']:.3f} |")
    out.append("")
    if not tables["main"]:
        _simple_tables(out, tables, share)
        return "\n".join(out)
    out += ["## Main comparison (Table A1-like): retention per task, %", ""]
    for variant in args.variants:
        for col in args.patterns:
            out += [f"### {variant} model, {col} ({share})", "",
                    "| method | " + " | ".join(tasks) + " | Average | accuracy | NLL |",
                    "| --- |" + " ---: |" * (len(tasks) + 3)]
            for label, columns in tables["main"].items():
                if not label.startswith(variant + "|"):
                    continue
                c = columns[col]
                out.append(f"| {label.split('|')[1]} | " + " | ".join(_num(c["retention"].get(t)) for t in tasks)
                           + f" | **{_cell(c)}** | {100 * c['accuracy']:.1f} | {c['nll']:.3f} |")
            out.append("")
    out += [f"## Summary: average retention, % ({share})", "", "| method | " + " | ".join(
        f"{v} {p}" for v in args.variants for p in args.patterns) + " |",
        "| --- |" + " ---: |" * (len(args.variants) * len(args.patterns))]
    for method in MAIN_METHODS:
        row = [_cell(tables["main"][f"{v}|{method}"][p]) for v in args.variants for p in args.patterns]
        out.append(f"| {method} | " + " | ".join(row) + " |")
    out.append("")
    out += [f"## Paired differences of average accuracy (points; same items, seeds averaged per item first; {share})", "",
            "| variant | comparison | " + " | ".join(args.patterns) + " |", "| --- | --- |" + " ---: |" * len(args.patterns)]
    keys = list(dict.fromkeys(k.rsplit("|", 1)[0] for k in tables["paired"]))
    for key in keys:
        variant, comparison = key.split("|")
        cells = []
        for col in args.patterns:
            cells.append(_paired_cell(tables["paired"][f"{key}|{col}"]))
        out.append(f"| {variant} | {comparison} | " + " | ".join(cells) + " |")
    out += ["", "▲ / ▼: the first method better / worse by more than 2 standard errors; unmarked: within noise.", ""]
    if tables["invariance"]:
        same = all(tables["invariance"].values())
        out += [f"Outlier variant, Wanda-score methods ({', '.join(tables['invariance'])}): "
                + ("per-item results identical to the plain model's, as the invariance predicts; their outlier "
                   "rows reuse the plain runs." if same else "**NOT identical to the plain model's** (rerun with "
                   "--full-outlier)."), ""]
    _simple_tables(out, tables, share)
    if tables.get("atv_blocks"):
        a = tables["atv_blocks"]
        out += [f"## ATV's drift and budget per block (Fig. A1-like): Wanda scores, {a['column']}, seed {a['seed']} "
                f"({share})", "",
                "s_bar: mean drift 1 - cos(block input, block output) over the visual positions; K: visual tokens "
                "selected per sample (round(min(1, alpha s_bar) x its text tokens)); text and selected visual tokens "
                f"over the {a['nsamples']} calibration samples.", "",
                "| block | s_bar | K mean (min-max) | text tokens | visual tokens selected |",
                "| ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {b['block']} | {b['s_bar']:.4f} | {b['k_mean']:.2f} ({b['k_min']}-{b['k_max']}) | "
                f"{b['text_tokens']:,} | {b['visual_tokens_used']:,} |" for b in a["blocks"]]
        out.append("")
    return "\n".join(out)


def _paired_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    within = verdict(d["delta"], d["se"]).startswith("within")
    return f"{d['delta']:+.2f} ± {d['se']:.2f}" + ("" if within else " ▲" if d["delta"] > 0 else " ▼")


def _simple_tables(out: list[str], tables: dict, share: str) -> None:
    """The ablation, alpha, calibration and MoT tables (those that ran) appended to ``out``."""
    def simple(title: str, section: str, note: str = "", pairing: str = "") -> None:
        if not tables.get(section):
            return
        columns = list(next(iter(tables[section].values())))
        # Runs from before the paired column (a rerendered JSON) have no "vs_reference".
        paired = any("vs_reference" in cell for cols in tables[section].values() for cell in cols.values())
        out.extend([f"## {title} ({share})", ""] + ([note, ""] if note else []))
        if paired:
            out.extend([f"Paired: the row minus {pairing}, points of average accuracy ± SE over items (seeds "
                        "averaged per item first); ▲ / ▼ beyond 2 SE.", ""])
        out.append("| configuration | " + " | ".join(f"{c} Average" for c in columns) + " | "
                   + (" | ".join(f"{c} paired" for c in columns) + " | " if paired else "")
                   + " | ".join(f"{c} visual tokens / sample / block" for c in columns) + " |")
        out.append("| --- |" + " ---: |" * ((3 if paired else 2) * len(columns)))
        for label, cols in tables[section].items():
            vis = ["-" if cols[c]["visual_tokens"] is None else f"{cols[c]['visual_tokens']:.1f}" for c in columns]
            pair = [_paired_cell(cols[c].get("vs_reference")) for c in columns] if paired else []
            out.append(f"| {label} | " + " | ".join(_cell(cols[c]) for c in columns) + " | "
                       + "".join(p + " | " for p in pair) + " | ".join(vis) + " |")
        out.append("")

    simple("Visual-token selectors (Table 3-like), Wanda scores, plain model", "ablation",
           "ABS, DBS and drift-fixed are scaled to the total visual budget of ATV's drift rule on a dense pass over "
           "the same data (docs/design.md 4.5). ATV's and random's own runs measure drift on inputs propagated "
           "through the blocks already pruned, where it is larger: compare the visual-token columns.",
           "ATV (drift)")
    simple("ATV's alpha (budget scale), plain model", "alpha", "alpha = 0 is text-only calibration.", "alpha = 1")
    simple("Calibration pools (Table A3-like), 50% unstructured, plain model", "calibration",
           pairing="the same method's mixed calibration")
    simple("MoT probe (Table 1-like): one pathway pruned with Wanda, plain model", "mot",
           "The other pathway stays dense; rows = the calibration positions that feed the statistics.")


def plot_atv_blocks(results: dict[Job, dict], args, path: Path) -> Path | None:
    from atv_sparse.plot import plot_blocks

    j = job("plain", "wanda", "atv", args.patterns[0], args.seeds[0])
    if j not in results:
        return None
    return plot_blocks(results[j]["blocks"], path, f"ATV {args.patterns[0]}, {args.model_name}, seed {args.seeds[0]}")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

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


def _shown(path: str) -> str:
    """``path`` relative to the repository when it is inside it (results name no home directory)."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return path


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
    _write(json_path, json.dumps(payload, indent=1, default=str) + "\n")
    _write(json_path.with_suffix(".md"), text + "\n")
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
    _STATE.update(setup(args, score=bool(todo)))
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
            pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(1,))
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
    model = _STATE["models"]["plain"]
    meta = {"date": datetime.date.today().isoformat(), "model": _shown(args.model), "machine": f"{cpu_name()} x{os.cpu_count()}",
            "params": sum(p.numel() for p in model.parameters()), "model_name": args.model_name,
            "image_tokens": _STATE["image_tokens"], "prediction": args.prediction_text,
            "outlier_channels": _STATE["outlier_channels"], "jobs": len(jobs), "jobs_from_log": len(jobs) - len(todo),
            "cpu_minutes": sum(r["prune_s"] + r["eval_s"] for r in results.values()) / 60,
            "calibration_tokens": {str(seed): c.token_mix() for seed, c in _STATE["calib"].items()},
            "wall_minutes": (time.time() - start) / 60, "torch": torch.__version__, "workers": args.workers}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(tables, args, tasks, meta)
    settings = vars(args) | {"model": _shown(args.model), "out": _shown(args.out)}
    payload = {"meta": meta, "settings": settings, "tables": tables,
               "runs": [{k: v for k, v in r.items() if k != "correct"} for r in results.values()]}
    _write(out.with_suffix(".json"), json.dumps(payload, indent=1, default=str) + "\n")
    try:
        plot_atv_blocks(results, args, out.with_name(out.name + "-atv-blocks.png"))
    except Exception as e:  # noqa: BLE001 - the tables matter more than the picture
        print(f"warning: no plot ({e})", file=sys.stderr)
    _write(out.with_suffix(".md"), text + "\n")
    print(text)
    return 0


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
