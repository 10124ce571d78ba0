"""One pruning run on a model already in memory: selector, budget calibration, DAS, block driver.

``convert`` calls it between loading a checkpoint and writing one; ``benchmarks/accuracy.py``
calls it on fresh copies of one dense model, many times, without touching the disk.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import AtvSparseError
from ..patterns import Pattern
from .ablation_tokens import ABLATION_SELECTORS, calibrate_scale, dense_saliencies
from .driver import PruneResult, Sink, prune_blocks
from .selectors import CALIB_TOKENS, AtvTokens, MixedTokens, RandomTokens, SampleTokens, TextTokens, VisualTokens
from .tamp_tokens import TampTokens, das_sparsities
from .walk import RESIDENT, Residency, TokenSelector

ABLATION_TOKENS = ("abs", "dbs", "drift-fixed")


def prune_model(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, targets: dict[str, nn.Linear],
                method: str, pattern: Pattern, samples: list[dict] | None, tokens: list[SampleTokens] | None,
                device: torch.device, *, calib_tokens: str | None = None, alpha: float = 1.0,
                budget_rule: str = "code", seed: int = 0, das: bool = False, budget_target: int | None = None,
                budget_source: str | None = None, blocksize: int = 128, percdamp: float = 0.01,
                progress: bool = True, residency: Residency = RESIDENT,
                sink: Sink | None = None) -> tuple[PruneResult, dict, dict]:
    """Prune ``targets`` of ``model`` in place.

    method: the score ("magnitude", "wanda", "sparsegpt", "tamp"); calib_tokens: the positions
    feeding the statistics (``selectors.CALIB_TOKENS`` or "tamp"; None for magnitude); samples /
    tokens: model inputs per calibration sample and their visual / text positions (tokens None
    for a text-only model). ABS / DBS / drift-fixed get the scale that makes their total visual
    budget equal ``budget_target`` (default: the drift rule's total on a dense pass, docs/design.md
    4.5). ``das``: TAMP's layer-wise sparsities (unstructured only). ``residency`` and ``sink``:
    where the weights live and who receives each pruned linear (``driver.prune_blocks``); every
    extra pass walks the blocks the same way.

    Returns (the driver's result, settings to record: budget calibration, timings of the extra
    passes by name).
    """
    timings: dict[str, float] = {}
    settings: dict = {}
    selector = None
    if calib_tokens is not None:
        selector = make_selector(calib_tokens, tokens, alpha, budget_rule, seed)
    if calib_tokens in ABLATION_TOKENS:
        t0 = time.perf_counter()
        s_bars, drift_total = dense_saliencies(model, layers, samples, selector, device, alpha, budget_rule,
                                               progress=progress, residency=residency)
        target = drift_total if budget_target is None else budget_target
        selector.scale = calibrate_scale(selector, s_bars, target)
        settings.update(budget_target=target, budget_source=budget_source or "drift rule on a dense pass",
                        scale_c=selector.scale, dense_s_bar=s_bars)
        timings["budget dense pass"] = time.perf_counter() - t0
    sparsities = None
    if das:
        if pattern.is_nm:
            raise AtvSparseError("DAS applies to unstructured sparsity only")
        t0 = time.perf_counter()
        sparsities, _ = das_sparsities(model, layers, layers_prefix, targets, samples, selector.tokens, device,
                                       pattern.sparsity, progress=progress, residency=residency)
        timings["DAS pre-pass"] = time.perf_counter() - t0
    result = prune_blocks(model, layers, layers_prefix, targets, method, pattern, samples, device,
                          selector=selector, blocksize=blocksize, percdamp=percdamp, sparsities=sparsities,
                          progress=progress, residency=residency, sink=sink)
    if settings:
        settings["budget_selected"] = sum(b.get("visual_tokens", 0) for b in result.blocks)
    return result, settings, timings


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


__all__ = ["ABLATION_TOKENS", "make_selector", "prune_model"]
