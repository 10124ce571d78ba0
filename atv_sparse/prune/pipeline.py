"""One pruning run, as a recipe says: selector, budget calibration, DAS, block driver.

``convert`` calls it between opening a checkpoint and writing one; ``benchmarks/accuracy.py``
calls it on fresh copies of one dense model, many times, without touching the disk.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import AtvSparseError
from .ablation_tokens import ABLATION_SELECTORS, calibrate_scale, dense_saliencies
from .driver import PruneResult, Sink, prune_blocks
from .recipe import ABLATION_TOKENS, PruneRecipe
from .selectors import CALIB_TOKENS, AtvTokens, MixedTokens, RandomTokens, SampleTokens, TextTokens, VisualTokens
from .tamp_tokens import TampTokens, das_sparsities
from .walk import RESIDENT, BlockJournal, Residency, TokenSelector

if TYPE_CHECKING:
    from ..calib.samples import CalibrationSet


def prune_model(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, targets: dict[str, nn.Linear],
                recipe: PruneRecipe, calibration: CalibrationSet | None, device: torch.device, *,
                progress: bool = True, residency: Residency = RESIDENT, sink: Sink | None = None,
                journal: BlockJournal | None = None, prepass: dict | None = None) -> PruneResult:
    """Prune ``targets`` (full module names -> linears) of ``model`` in place as ``recipe`` says.

    calibration: the model inputs per sample and, for a vision-language model, their visual /
    text positions (``atv_sparse.calib.load_calibration``); None for magnitude. ABS / DBS /
    drift-fixed get the scale that makes their total visual budget equal ``recipe.budget_target``
    (default: the drift rule's total on a dense pass, docs/design.md 4.5). ``residency`` and
    ``sink``: where the weights live and who receives each pruned linear (``driver.prune_blocks``);
    every extra pass walks the blocks the same way.

    Resuming: ``journal`` goes to the driver (``driver.prune_blocks``); ``prepass`` is a dict the
    dense pre-passes' results are kept in (``"budget"``: the ABS / DBS / drift-fixed calibration,
    ``"das"``: DAS's sparsities). A pre-pass whose result is already there does not run again: it
    walks the dense model, which the interrupted run saw exactly as this one would.

    Returns the driver's result, with the extra passes' timings before the driver's and the budget
    calibration's settings in ``budget``.
    """
    samples = calibration.samples if calibration is not None else None
    prepass = {} if prepass is None else prepass
    timings: dict[str, float] = {}
    budget: dict = {}
    selector = None
    if recipe.tokens is not None:
        selector = make_selector(recipe.tokens, calibration.tokens if calibration is not None else None,
                                 recipe.alpha, recipe.budget_rule, recipe.seed)
    if recipe.tokens in ABLATION_TOKENS and "budget" in prepass:
        budget.update(prepass["budget"])
        selector.scale = budget["scale_c"]
    elif recipe.tokens in ABLATION_TOKENS:
        t0 = time.perf_counter()
        s_bars, drift_total = dense_saliencies(model, layers, samples, selector, device, recipe.alpha,
                                               recipe.budget_rule, progress=progress, residency=residency)
        target = drift_total if recipe.budget_target is None else recipe.budget_target
        selector.scale = calibrate_scale(selector, s_bars, target)
        budget.update(budget_target=target, budget_source=recipe.budget_source or "drift rule on a dense pass",
                      scale_c=selector.scale, dense_s_bar=s_bars)
        prepass["budget"] = dict(budget)
        timings["budget dense pass"] = time.perf_counter() - t0
    sparsities = prepass.get("das") if recipe.das else None
    if recipe.das and sparsities is None:
        t0 = time.perf_counter()
        sparsities, _ = das_sparsities(model, layers, layers_prefix, targets, samples, selector.tokens, device,
                                       recipe.pattern.sparsity, progress=progress, residency=residency)
        prepass["das"] = sparsities
        timings["DAS pre-pass"] = time.perf_counter() - t0
    result = prune_blocks(model, layers, layers_prefix, targets, recipe.score, recipe.pattern, samples, device,
                          selector=selector, blocksize=recipe.blocksize, percdamp=recipe.percdamp,
                          sparsities=sparsities, progress=progress, residency=residency, sink=sink,
                          journal=journal)
    if budget:
        budget["budget_selected"] = sum(b.get("visual_tokens", 0) for b in result.blocks)
    return dataclasses.replace(result, timings={**timings, **result.timings}, budget=budget)


def make_selector(name: str, tokens: list[SampleTokens] | None, alpha: float = 1.0, budget_rule: str = "code",
                  seed: int = 0) -> TokenSelector:
    """The selector called ``name`` (one of ``CALIB_TOKENS``, or ``tamp`` for TAMP's AMIA)."""
    if name == "mixed":
        return MixedTokens(tokens)
    if tokens is None:
        raise AtvSparseError(f"{name} token selection needs a vision-language model with image calibration data")
    simple = {"text": TextTokens, "visual": VisualTokens, "tamp": TampTokens, **ABLATION_SELECTORS}
    if name in simple:
        return simple[name](tokens)
    if name == "atv":
        return AtvTokens(tokens, alpha, budget_rule)
    if name == "random":
        return RandomTokens(tokens, alpha, budget_rule, seed)
    raise AtvSparseError(f"calib_tokens {name!r}: choose one of {', '.join(CALIB_TOKENS)}")


__all__ = ["make_selector", "prune_model"]
