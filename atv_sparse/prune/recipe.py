"""What a pruning run does, as one frozen value: the method, the pattern and their settings.

Two tables name everything a run can be made of (docs/design.md 10):

- ``METHODS``: a method's name (the CLI's ``--method``, the benchmarks' rows) -> its pruning rule
  (a ``rule.PruningRule`` class: statistics, prune, memory estimate, recorded settings) and the
  token selector that picks the positions feeding its statistics (docs/design.md 4);
- ``SELECTORS``: a token selector's name (``--calib-tokens``) -> how to build it and which of the
  selection settings it records.

``PruneRecipe`` holds the method's rule *with its own settings* (``SparseGpt(blocksize,
percdamp)``, ``Tamp(das)``) and the token selection with its settings (``TokenSelection``), each
validated when built, so ``pipeline.prune_model`` only ever sees a consistent one.
``PruneRecipe.build`` takes the CLI's flat vocabulary and hands each setting to its owner.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..calib.calibration_set import SampleTokens
from ..errors import AtvSparseError
from ..patterns import Pattern
from .ablation_tokens import ABLATION_SELECTORS
from .magnitude import Magnitude
from .rule import PruningRule
from .selectors import BUDGET_RULES, AtvTokens, MixedTokens, RandomTokens, TextTokens, VisualTokens
from .sparsegpt import SparseGpt
from .tamp_tokens import Tamp, TampTokens
from .walk import TokenSelector
from .wanda import Wanda


@dataclasses.dataclass(frozen=True)
class Method:
    """rule: the pruning rule's class (built with its settings); tokens: the default selector (a
    name of ``SELECTORS``; None: no calibration data); own_tokens: the selector is part of the
    method, so ``calib_tokens`` cannot replace it."""

    rule: type[PruningRule]
    tokens: str | None
    own_tokens: bool = False


METHODS: dict[str, Method] = {
    "magnitude": Method(Magnitude, None),
    "wanda": Method(Wanda, "mixed"),
    "sparsegpt": Method(SparseGpt, "mixed"),
    # Wanda scores over ATV's text + block-adaptive visual tokens; with SparseGPT's update.
    "atv": Method(Wanda, "atv", own_tokens=True),
    "atv-sparsegpt": Method(SparseGpt, "atv", own_tokens=True),
    # Wanda scores over TAMP's AMIA tokens (TAMP's statistics).
    "tamp": Method(Tamp, "tamp", own_tokens=True),
}


@dataclasses.dataclass(frozen=True)
class TokenSelection:
    """The selector ``tokens`` (a name of ``SELECTORS``) and the settings selectors read.

    alpha / budget_rule: ATV's budget (atv and random); budget_target: the total visual budget the
    abs / dbs / drift-fixed selectors match (None: the drift rule's total on a dense pass),
    recorded as coming from budget_source."""

    tokens: str
    alpha: float = 1.0
    budget_rule: str = "code"
    budget_target: int | None = None
    budget_source: str | None = None

    def __post_init__(self):
        if self.tokens not in SELECTORS:
            raise AtvSparseError(f"`calib_tokens` {self.tokens!r}: choose one of {', '.join(selector_names())}")
        if self.alpha < 0:
            raise AtvSparseError(f"`alpha` must be >= 0, got {self.alpha}")
        if self.budget_rule not in BUDGET_RULES:
            raise AtvSparseError(f"`budget_rule` {self.budget_rule!r}: choose one of {', '.join(BUDGET_RULES)}")
        if self.budget_target is not None and not SELECTORS[self.tokens].fitted_budget:
            fitted = "/".join(n for n, s in SELECTORS.items() if s.fitted_budget)
            raise AtvSparseError(f"`budget_target` applies to `calib_tokens` {fitted} only")

    def settings(self) -> dict:
        """The settings its selector records (``Selector.records``)."""
        return {k: getattr(self, k) for k in SELECTORS[self.tokens].records}


@dataclasses.dataclass(frozen=True)
class Selector:
    """build(tokens, selection, seed): the selector for the samples' positions ``tokens`` (one
    ``SampleTokens`` per sample; None for a text-only model: only selectors with ``text_only``
    accept that). records: the ``TokenSelection`` fields recorded with it. fitted_budget: its scale
    is fitted to a total visual budget on a dense pass (``ablation_tokens.calibrate_scale``).
    listed: offered as ``--calib-tokens`` (TAMP's own selector is not)."""

    build: Callable[[list[SampleTokens] | None, TokenSelection, int], TokenSelector]
    records: tuple[str, ...] = ()
    fitted_budget: bool = False
    listed: bool = True
    text_only: bool = False


SELECTORS: dict[str, Selector] = {
    "mixed": Selector(lambda tokens, sel, seed: MixedTokens(tokens), text_only=True),
    "text": Selector(lambda tokens, sel, seed: TextTokens(tokens)),
    "visual": Selector(lambda tokens, sel, seed: VisualTokens(tokens)),
    "atv": Selector(lambda tokens, sel, seed: AtvTokens(tokens, sel.alpha, sel.budget_rule),
                    records=("alpha", "budget_rule")),
    "random": Selector(lambda tokens, sel, seed: RandomTokens(tokens, sel.alpha, sel.budget_rule, seed),
                       records=("alpha", "budget_rule")),
    **{name: Selector(lambda tokens, sel, seed, cls=cls: cls(tokens), fitted_budget=True)
       for name, cls in ABLATION_SELECTORS.items()},
    "tamp": Selector(lambda tokens, sel, seed: TampTokens(tokens), listed=False),
}


def selector_names() -> tuple[str, ...]:
    """The selectors a user may name (``--calib-tokens``)."""
    return tuple(name for name, spec in SELECTORS.items() if spec.listed)


def make_selector(selection: TokenSelection, tokens: list[SampleTokens] | None, seed: int = 0) -> TokenSelector:
    """The selector ``selection`` names, for the samples' positions ``tokens``."""
    spec = SELECTORS[selection.tokens]
    if tokens is None and not spec.text_only:
        raise AtvSparseError(f"{selection.tokens} token selection needs a vision-language model with image "
                             "calibration data")
    return spec.build(tokens, selection, seed)


@dataclasses.dataclass(frozen=True)
class PruneRecipe:
    """One pruning run's settings, checked when built.

    method: a name of ``METHODS``; pattern: N:M or unstructured; rule: the method's rule with its
    settings (default: the rule's defaults); selection: the token selector and its settings (None:
    the method's own selector with default settings; always None for a method without calibration
    data); seed: the calibration windows' and the random selector's seed.
    """

    method: str
    pattern: Pattern
    rule: PruningRule | None = None
    selection: TokenSelection | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be a Pattern (atv_sparse.parse_pattern), got {type(self.pattern).__name__}")
        if self.method not in METHODS:
            raise AtvSparseError(f"`method` {self.method!r}: choose one of {', '.join(METHODS)}")
        spec = METHODS[self.method]
        if self.rule is None:
            object.__setattr__(self, "rule", spec.rule())
        elif type(self.rule) is not spec.rule:
            raise AtvSparseError(f"`method` {self.method} runs the {spec.rule.name} rule, not {self.rule.name}")
        if self.selection is None and spec.tokens is not None:
            object.__setattr__(self, "selection", TokenSelection(spec.tokens))
        if self.selection is not None:
            if spec.tokens is None:
                raise AtvSparseError(f"`calib_tokens` does not apply to `method` {self.method} (it uses no calibration "
                                     "data)")
            if spec.own_tokens and self.selection.tokens != spec.tokens:
                plain = next((n for n, m in METHODS.items() if m.rule is spec.rule and not m.own_tokens), "wanda")
                raise AtvSparseError(f"`method` {self.method} selects tokens itself; use `method` {plain} "
                                     f"`calib_tokens` {self.selection.tokens} instead")
        self.rule.check(self.pattern)

    @classmethod
    def build(cls, method: str, pattern: Pattern, *, calib_tokens: str | None = None, seed: int = 0,
              **settings) -> "PruneRecipe":
        """The recipe from the CLI's flat vocabulary: ``calib_tokens`` and ``seed``, and each other
        setting handed to its owner: the method's rule (``blocksize``, ``das``, ...) or the token
        selection (``alpha``, ``budget_rule``, ``budget_target``, ``budget_source``). A setting of
        another rule is ignored at its default value and refused otherwise (``das`` for wanda)."""
        if method not in METHODS:
            raise AtvSparseError(f"`method` {method!r}: choose one of {', '.join(METHODS)}")
        spec = METHODS[method]
        own = {f.name for f in dataclasses.fields(spec.rule)}
        selection_fields = {f.name for f in dataclasses.fields(TokenSelection)} - {"tokens"}
        rule_settings, selection = {}, {}
        for key, value in settings.items():
            if key in own:
                rule_settings[key] = value
            elif key in selection_fields:
                selection[key] = value
            else:
                owner = next((m.rule for m in METHODS.values() if key in {f.name for f in dataclasses.fields(m.rule)}),
                             None)
                if owner is None:
                    raise TypeError(f"unknown setting {key!r}")
                field = next(f for f in dataclasses.fields(owner) if f.name == key)
                if "only" in field.metadata and value != field.default:
                    raise AtvSparseError(f"`{key}` applies to {field.metadata['only']} only")
                owner(**{key: value})  # checked as its own rule checks it, then unused here
        if calib_tokens is not None and spec.tokens is None:
            raise AtvSparseError(f"`calib_tokens` does not apply to `method` {method} (it uses no calibration data)")
        tokens = calib_tokens or spec.tokens
        if tokens is None:
            TokenSelection("mixed", **selection)  # checked although this method selects nothing
        return cls(method, pattern, spec.rule(**rule_settings),
                   TokenSelection(tokens, **selection) if tokens is not None else None, seed)

    @property
    def tokens(self) -> str | None:
        """The token selector feeding the statistics; None when the method uses no calibration data."""
        return self.selection.tokens if self.selection is not None else None

    def make_selector(self, tokens: list[SampleTokens] | None) -> TokenSelector | None:
        """This run's selector for the samples' positions ``tokens``; None without calibration data."""
        return make_selector(self.selection, tokens, self.seed) if self.selection is not None else None



__all__ = ["METHODS", "Method", "PruneRecipe", "SELECTORS", "Selector", "TokenSelection", "make_selector",
           "selector_names"]
