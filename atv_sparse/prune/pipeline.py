"""One pruning run, as a recipe says: selector, budget calibration, DAS, block driver.

``convert`` calls it between opening a checkpoint and writing one; ``benchmarks/accuracy.py``
calls it on fresh copies of one dense model, many times, without touching the disk.
"""

from __future__ import annotations

import dataclasses
import time
import torch
from torch import nn

from ..calib.calibration_set import CalibrationSet
from .ablation_tokens import calibrate_scale, dense_saliencies
from .driver import PruneResult, Sink, prune_blocks
from .recipe import SELECTORS, PruneRecipe
from .walk import RESIDENT, BlockJournal, Residency


def prune_model(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, targets: dict[str, nn.Linear],
                recipe: PruneRecipe, calibration: CalibrationSet | None, device: torch.device, *,
                progress: bool = True, residency: Residency = RESIDENT, sink: Sink | None = None,
                journal: BlockJournal | None = None, prepass: dict | None = None) -> PruneResult:
    """Prune ``targets`` (full module names -> linears) of ``model`` in place as ``recipe`` says.

    calibration: the model inputs per sample and, for a vision-language model, their visual /
    text positions (``atv_sparse.calib.load_calibration``); None for magnitude. Selectors with a
    fitted budget (ABS / DBS / drift-fixed) get the scale that makes their total visual budget
    equal ``recipe.selection.budget_target`` (default: the drift rule's total on a dense pass,
    docs/design.md 4.5). A rule's layer sparsities (TAMP's DAS) come from its own pre-pass.
    ``residency`` and ``sink``: where the weights live and who receives each pruned linear
    (``driver.prune_blocks``); every extra pass walks the blocks the same way.

    Resuming: ``journal`` goes to the driver (``driver.prune_blocks``); ``prepass`` is a dict the
    dense pre-passes' results are kept in (``"budget"``: the ABS / DBS / drift-fixed calibration,
    ``"layer_sparsities"``: the rule's pre-pass, TAMP's DAS). A pre-pass whose result is already there does not run again: it
    walks the dense model, which the interrupted run saw exactly as this one would.

    Returns the driver's result, with the extra passes' timings before the driver's and the budget
    calibration's settings in ``budget``.
    """
    samples = calibration.samples if calibration is not None else None
    tokens = calibration.tokens if calibration is not None else None
    prepass = {} if prepass is None else prepass
    timings: dict[str, float] = {}
    budget: dict = {}
    selector = recipe.make_selector(tokens)
    selection = recipe.selection
    fitted = selection is not None and SELECTORS[selection.tokens].fitted_budget
    if fitted and "budget" in prepass:
        budget.update(prepass["budget"])
        selector.scale = budget["scale_c"]
    elif fitted:
        t0 = time.perf_counter()
        s_bars, drift_total = dense_saliencies(model, layers, samples, selector, device, selection.alpha,
                                               selection.budget_rule, progress=progress, residency=residency)
        target = drift_total if selection.budget_target is None else selection.budget_target
        selector.scale = calibrate_scale(selector, s_bars, target)
        budget.update(budget_target=target, budget_source=selection.budget_source or "drift rule on a dense pass",
                      scale_c=selector.scale, dense_s_bar=s_bars)
        prepass["budget"] = dict(budget)
        timings["budget dense pass"] = time.perf_counter() - t0
    sparsities = prepass.get("layer_sparsities")
    if sparsities is None:
        t0 = time.perf_counter()
        sparsities = recipe.rule.layer_sparsities(model, layers, layers_prefix, targets, samples, tokens, device,
                                                  recipe.pattern, progress=progress, residency=residency)
        if sparsities is not None:
            prepass["layer_sparsities"] = sparsities
            timings[recipe.rule.pre_pass_name] = time.perf_counter() - t0
    result = prune_blocks(model, layers, layers_prefix, targets, recipe.rule, recipe.pattern, samples, device,
                          selector=selector, sparsities=sparsities, progress=progress, residency=residency, sink=sink,
                          journal=journal)
    if budget:
        budget["budget_selected"] = sum(b.get("visual_tokens", 0) for b in result.blocks)
    return dataclasses.replace(result, timings={**timings, **result.timings}, budget=budget)


__all__ = ["prune_model"]
