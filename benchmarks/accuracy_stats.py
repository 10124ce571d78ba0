"""The accuracy tables' numbers from finished runs: retention, its spread over seeds, and paired
differences on the same items (ATV against each baseline, each row against its section's
reference, each written prediction).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from accuracy_plan import Job


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


def paired_difference(ours: list[dict], theirs: list[dict], field: str = "correct",
                      scale: float = 100.0) -> tuple[float, float]:
    """ATV minus a baseline in points of average accuracy (mean over tasks), per item averaged over
    the seeds first (seed k of one against seed k of the other; a seedless baseline against every
    seed), with the standard error over items: sqrt(sum over tasks of SE_t^2) / T.

    ``field`` names the per-task, per-item values compared: ``"correct"`` (exact match, 0/1
    strings), ``"choice"`` (closed-choice correctness, only its tasks) or ``"nll_items"`` (answer
    NLL in nats, with ``scale=1``); ``scale`` multiplies the result (100: points)."""
    if len(theirs) == 1 and len(ours) > 1:
        theirs = theirs * len(ours)
    tasks = list(ours[0][field])
    deltas, variances = [], []
    for t in tasks:
        n = len(ours[0][field][t])
        d = [sum(float(a[field][t][i]) - float(b[field][t][i]) for a, b in zip(ours, theirs, strict=True))
             / len(ours) for i in range(n)]
        mean = sum(d) / n
        deltas.append(mean)
        variances.append(sum((x - mean) ** 2 for x in d) / max(1, n - 1) / n)
    return scale * sum(deltas) / len(tasks), scale * math.sqrt(sum(variances)) / len(tasks)


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

