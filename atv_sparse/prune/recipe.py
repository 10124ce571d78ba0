"""What a pruning run does, as one frozen value: the method, the pattern and their settings.

``METHODS`` is the one table from a method's name (the CLI's ``--method``, the benchmarks' rows)
to the score / update rule the block driver runs and the token selector that picks the positions
feeding its statistics (docs/design.md 4). ``PruneRecipe`` validates every setting when it is
built, so ``pipeline.prune_model`` only ever sees a consistent one.
"""

from __future__ import annotations

import dataclasses

from ..errors import AtvSparseError
from ..patterns import Pattern
from .selectors import BUDGET_RULES, CALIB_TOKENS

ABLATION_TOKENS = ("abs", "dbs", "drift-fixed")


@dataclasses.dataclass(frozen=True)
class Method:
    """score: the driver's rule ("magnitude", "wanda", "sparsegpt", "tamp"); tokens: the default
    selector (``selectors.CALIB_TOKENS`` or "tamp"; None: no calibration data); own_tokens: the
    selector is part of the method, so ``calib_tokens`` cannot replace it."""

    score: str
    tokens: str | None
    own_tokens: bool = False


METHODS = {
    "magnitude": Method("magnitude", None),
    "wanda": Method("wanda", "mixed"),
    "sparsegpt": Method("sparsegpt", "mixed"),
    # Wanda scores over ATV's text + block-adaptive visual tokens; with SparseGPT's update.
    "atv": Method("wanda", "atv", own_tokens=True),
    "atv-sparsegpt": Method("sparsegpt", "atv", own_tokens=True),
    # Wanda scores over TAMP's AMIA tokens (TAMP's statistics).
    "tamp": Method("tamp", "tamp", own_tokens=True),
}


@dataclasses.dataclass(frozen=True)
class PruneRecipe:
    """One pruning run's settings, checked when built.

    method: a name of ``METHODS``; pattern: N:M or unstructured; calib_tokens: another selector
    for the method's statistics (``selectors.CALIB_TOKENS``; None: the method's own). alpha /
    budget_rule: ATV's budget (atv and random selectors); seed: the random selector's seed.
    das: TAMP's layer-wise sparsities (tamp, unstructured only). budget_target: the total visual
    budget the abs / dbs / drift-fixed selectors match (None: the drift rule's total on a dense
    pass), recorded as coming from budget_source. blocksize / percdamp: SparseGPT's.
    """

    method: str
    pattern: Pattern
    calib_tokens: str | None = None
    alpha: float = 1.0
    budget_rule: str = "code"
    seed: int = 0
    das: bool = False
    budget_target: int | None = None
    budget_source: str | None = None
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be a Pattern (atv_sparse.parse_pattern), got {type(self.pattern).__name__}")
        if self.method not in METHODS:
            raise AtvSparseError(f"`method` {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.blocksize < 1:
            raise AtvSparseError(f"`blocksize` must be at least 1, got {self.blocksize}")
        if not 0 <= self.percdamp:
            raise AtvSparseError(f"`percdamp` must be >= 0, got {self.percdamp}")
        if self.alpha < 0:
            raise AtvSparseError(f"`alpha` must be >= 0, got {self.alpha}")
        if self.budget_rule not in BUDGET_RULES:
            raise AtvSparseError(f"`budget_rule` {self.budget_rule!r}: choose one of {', '.join(BUDGET_RULES)}")
        spec = METHODS[self.method]
        if self.calib_tokens is not None:
            if self.calib_tokens not in CALIB_TOKENS + ("tamp",):
                raise AtvSparseError(f"`calib_tokens` {self.calib_tokens!r}: choose one of {', '.join(CALIB_TOKENS)}")
            if spec.tokens is None:
                raise AtvSparseError(f"`calib_tokens` does not apply to `method` {self.method} (it uses no calibration "
                                     "data)")
            if spec.own_tokens and self.calib_tokens != spec.tokens:
                plain = "sparsegpt" if spec.score == "sparsegpt" else "wanda"
                raise AtvSparseError(f"`method` {self.method} selects tokens itself; use `method` {plain} "
                                     f"`calib_tokens` {self.calib_tokens} instead")
        if self.das and (self.method != "tamp" or self.pattern.is_nm):
            raise AtvSparseError("`das` applies to `method` tamp with `pattern` unstructured only")
        if self.budget_target is not None and self.tokens not in ABLATION_TOKENS:
            raise AtvSparseError(f"`budget_target` applies to `calib_tokens` {'/'.join(ABLATION_TOKENS)} only")

    @property
    def score(self) -> str:
        """The block driver's score / update rule."""
        return METHODS[self.method].score

    @property
    def tokens(self) -> str | None:
        """The token selector feeding the statistics; None when the method uses no calibration data."""
        return self.calib_tokens or METHODS[self.method].tokens


__all__ = ["ABLATION_TOKENS", "METHODS", "Method", "PruneRecipe"]
