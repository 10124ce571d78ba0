"""The accuracy tables as markdown (``OUT.md``), ATV's per-block figure, and the files written.

Everything here reads the tables ``accuracy_stats.build_tables`` made (or their JSON, for
``--rerender``): nothing is pruned or scored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from accuracy_plan import MAIN_METHODS, OUTLIER_SCALE, Job, job
from accuracy_stats import verdict

HERE = Path(__file__).resolve().parent


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
            cells.append(paired_cell(tables["paired"][f"{key}|{col}"]))
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


def paired_cell(d: dict | None) -> str:
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
            pair = [paired_cell(cols[c].get("vs_reference")) for c in columns] if paired else []
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
    from atv_sparse.convert.plot import plot_blocks

    j = job("plain", "wanda", "atv", args.patterns[0], args.seeds[0])
    if j not in results:
        return None
    return plot_blocks(results[j]["blocks"], path, f"ATV {args.patterns[0]}, {args.model_name}, seed {args.seeds[0]}")


def shown(path: str) -> str:
    """``path`` relative to the repository when it is inside it (results name no home directory)."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return path


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary name, so that a killed run leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

