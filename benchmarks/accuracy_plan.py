"""Which pruned models the accuracy tables need (``benchmarks/accuracy.py``): the rows and columns of
every section as :class:`Job` s, each unique job run once.

A section is a list of rows, a row ``(label, {column: [Job per seed]})``; ``plan_jobs`` builds them
from the CLI's settings, ``unique_jobs`` lists what to prune.
"""

from __future__ import annotations

import dataclasses

from atv_sparse.prune.recipe import METHODS

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

