"""The sequential block driver: prune a model block by block with propagated calibration inputs.

    capture block-0 inputs (real embeddings, real keyword arguments) for every sample
    for each decoder block b:
        selector.begin_block(b)       which positions feed b's statistics (all, here)
        Calibrating   run b densely with hooks on its target linears -> statistics
        Pruning       statistics -> masks -> weights zeroed (SparseGPT: updated) in place
        Propagating   run the pruned b -> inputs of block b + 1

The loop itself is walk.py's ``walk_blocks``: blocks visit the compute device (or are read from the
checkpoint) one at a time; calibration activations stay on the CPU unless they fit comfortably on
the device. The driver always runs the model's own modules: it never re-implements a decoder layer.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AtvSparseError
from ..formats.bitmask import pack_bitmask
from ..patterns import Pattern
from .rule import PruningRule
from .selectors import MixedTokens
from .walk import RESIDENT, BlockJournal, Residency, TokenSelector, capture_block_inputs, check_finite, walk_blocks

# The driver knows no rule by name: it asks the ``PruningRule`` for statistics and masks.
# (The methods users name, their rules and selectors, are ``recipe.METHODS``.)
# Receives each pruned linear (full module name, module, keep-mask: (out, in) bool on the CPU) while
# its weights are materialised: the streaming checkpoint writer.
Sink = Callable[[str, nn.Module, torch.Tensor], None]


@dataclasses.dataclass
class PruneResult:
    """bitmasks: module name -> packed keep-mask (out, ceil(in / 8)) uint8 on the CPU (empty when
    a sink received them; packed, 1 bit per weight, since they are held for the whole model);
    blocks: one report dict per block; timings: seconds per phase, in the order they ran; budget:
    how the abs / dbs / drift-fixed budget was calibrated (target, its source, scale c, dense s_bar
    per block, total selected), empty for other selectors."""

    bitmasks: dict[str, torch.Tensor]
    blocks: list[dict]
    timings: dict[str, float]
    budget: dict = dataclasses.field(default_factory=dict)


@torch.no_grad()
def prune_blocks(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, targets: dict[str, nn.Linear],
                 rule: PruningRule, pattern: Pattern, samples: list[dict] | None, device: torch.device,
                 selector: TokenSelector | None = None, sparsities: dict[str, float] | None = None, progress: bool = True,
                 residency: Residency = RESIDENT, sink: Sink | None = None,
                 journal: BlockJournal | None = None) -> PruneResult:
    """Prune ``targets`` (full module names -> linears) in place, block by block.

    rule: the pruning rule (``rule.PruningRule``); a calibrated one needs ``samples``: model
    inputs per sample, at least ``input_ids`` (1, T) int64. ``selector`` picks the positions
    feeding each block's statistics (default: all). ``sparsities`` overrides an unstructured
    pattern's sparsity per module (TAMP's DAS). ``residency`` says where the weights are (default:
    the model is in host memory; each block visits ``device`` in turn). ``sink(name, linear,
    keep)`` is called with every pruned linear and its keep-mask ((out, in) bool on the CPU) while its
    weights are still materialised (the streaming checkpoint writer), before its block is freed;
    ``result.bitmasks`` then stays empty. ``journal`` (a resumed conversion, ``walk.BlockJournal``):
    blocks it has finished are restored, not pruned again, and their reports come from it; it is told
    when each block is done.

    Targets outside the decoder blocks (named explicitly by the user) are pruned where they run:
    linears that run before block 0 (vision tower, projector) from statistics over all their
    input rows gathered while block-0 inputs are captured, which are then captured again through
    the pruned linears; ``lm_head`` last, from the final norm of the last block's outputs.
    """
    if not isinstance(rule, PruningRule):
        raise TypeError(f"rule must be a PruningRule (recipe.METHODS), got {type(rule).__name__}")
    selector = selector or MixedTokens()
    timings = {"capture": 0.0, "calibrate": 0.0, "prune": 0.0, "propagate": 0.0}
    result = PruneResult({}, list(journal.reports) if journal is not None else [], timings)
    calibrated = rule.calibrated
    in_blocks = {n: m for n, m in targets.items() if n.startswith(layers_prefix + ".")}
    outside = {n: m for n, m in targets.items() if n not in in_blocks}
    after_blocks = {}

    def prune_into_result(name, mod, stats):
        layer_pattern = Pattern(None, None, sparsities[name]) if sparsities and name in sparsities else pattern
        keep = _prune_linear(rule, mod, stats, layer_pattern)
        if sink is None:
            result.bitmasks[name] = pack_bitmask(keep).cpu()
        else:  # the sink owns it: a model larger than memory has masks larger than a block
            sink(name, mod, keep.cpu())

    captured = None
    if not calibrated:
        for name, mod in outside.items():
            residency.bring(mod, device)
            prune_into_result(name, mod, None)
            residency.free(mod)
    else:
        if not samples:
            raise AtvSparseError(f"{rule.name} scores need calibration samples; `samples` is empty")
        t0 = time.perf_counter()
        if outside:
            before = _stats_while(outside, rule, device,
                                  lambda: capture_block_inputs(model, layers, samples, device, progress, residency))
            for name, st in before.items():
                residency.bring(outside[name], device)
                prune_into_result(name, outside[name], st)
            after_blocks = {n: m for n, m in outside.items() if n not in before}
        # Captured again through the pruned linears (still materialised; the capture frees them).
        captured = capture_block_inputs(model, layers, samples, device, progress, residency)
        timings["capture"] = time.perf_counter() - t0

    for step in walk_blocks(model, layers, samples if calibrated else None, device, residency=residency,
                            progress=progress, captured=captured, journal=journal):
        b, run = step.index, step.run
        prefix = f"{layers_prefix}.{b}."
        block_targets = {name: mod for name, mod in in_blocks.items() if name.startswith(prefix)}
        report = {"block": b, "modules": len(block_targets)}

        stats = {}
        if calibrated and block_targets:
            t0 = time.perf_counter()
            report.update(selector.begin_block(b, run, len(samples)))
            stats, counts = _collect_stats(run, block_targets, rule, selector, len(samples), device,
                                           f"{step.label}: Calibrating", progress)
            report.update(counts)
            report["time_calibrate_s"] = time.perf_counter() - t0
            timings["calibrate"] += report["time_calibrate_s"]

        t0 = time.perf_counter()
        for name, mod in tqdm(block_targets.items(), desc=f"{step.label}: Pruning", disable=not progress,
                              leave=False):
            prune_into_result(name, mod, stats.pop(name, None))
        report["time_prune_s"] = time.perf_counter() - t0
        timings["prune"] += report["time_prune_s"]

        if calibrated and (b + 1 < step.count or after_blocks):
            t0 = time.perf_counter()
            step.propagate()
            report["time_propagate_s"] = time.perf_counter() - t0
            timings["propagate"] += report["time_propagate_s"]
        result.blocks.append(report)
        if journal is not None:
            journal.finished(b, report)
    if after_blocks:
        t0 = time.perf_counter()
        _prune_output_head(model, after_blocks, captured[0], rule, device, prune_into_result, residency)
        timings["prune"] += time.perf_counter() - t0
    return result


def _prune_linear(rule: PruningRule, mod: nn.Linear, stats, pattern: Pattern) -> torch.Tensor:
    """``rule.prune`` on one linear's weight, in place; its keep-mask (out, in) bool. One named step
    per pruned linear, where tests/kill_convert.py stops a conversion mid-block."""
    return rule.prune(mod.weight.data, stats, pattern)


def _stats_while(linears: dict[str, nn.Linear], rule: PruningRule, device, work) -> dict:
    """Statistics of every input row of ``linears`` while ``work()`` runs; only those that ran."""
    stats = {name: rule.new_stats(mod.in_features, device) for name, mod in linears.items()}
    handles = [mod.register_forward_hook(lambda m, args, out, st=stats[name]: st.update(args[0]))
               for name, mod in linears.items()]
    try:
        work()
    finally:
        for h in handles:
            h.remove()
    ran = {name: st for name, st in stats.items() if st.nsamples > 0}
    for name, st in ran.items():
        check_finite(name, rule.statistic(st))
    return ran


def _prune_output_head(model, linears: dict[str, nn.Linear], hidden: list, rule: PruningRule, device, prune,
                       residency: Residency) -> None:
    """Prune ``lm_head`` from the final norm of the last block's outputs (all positions)."""
    head = model.get_output_embeddings()
    for name, mod in linears.items():
        if mod is not head:
            raise AtvSparseError(f"target {name} never ran while the model processed the calibration samples, "
                                 "so it has no statistics; remove it from the targets")
    norm = model.get_decoder().norm
    residency.bring(norm, device)
    residency.bring(head, device)
    try:
        stats = _stats_while(linears, rule, device, lambda: [head(norm(h.to(device))) for h in hidden])
        for name, mod in linears.items():
            prune(name, mod, stats[name])
    finally:
        residency.free(norm)
        residency.free(head)


def _collect_stats(run, block_targets, rule: PruningRule, selector, num_samples, device, desc, progress):
    """Statistics pass: the dense block on every sample with hooks on its target linears.

    Returns ({name: stats}, {"tokens": positions used per linear, and for vision-language models
    "text_tokens_used" / "visual_tokens_used"}).
    """
    stats = {name: rule.new_stats(mod.in_features, device) for name, mod in block_targets.items()}
    positions, sample = None, 0
    per_linear = selector.linear_positions if selector.per_linear else None

    def hook(module, args, output):
        x, name = args[0], module_names[module]
        pos = per_linear(sample, name, output) if per_linear is not None else positions
        if pos is not None:
            x = x[:, pos.to(x.device)]
        stats[name].update(x)

    module_names = {mod: name for name, mod in block_targets.items()}
    handles = [mod.register_forward_hook(hook) for mod in block_targets.values()]
    counts = {"tokens": 0}
    kinds = getattr(selector, "tokens", None)  # SampleTokens per sample, for vision-language models
    if kinds is not None and not per_linear:
        counts.update(text_tokens_used=0, visual_tokens_used=0)
    try:
        for j in tqdm(range(num_samples), desc=desc, disable=not progress, leave=False):
            positions, sample = selector.positions(j), j
            x = run.hidden[j]
            counts["tokens"] += x.shape[0] * x.shape[1] if positions is None else len(positions)
            if "text_tokens_used" in counts:
                used = slice(None) if positions is None else positions
                counts["text_tokens_used"] += int(kinds[j].text[used].sum())
                counts["visual_tokens_used"] += int(kinds[j].visual[used].sum())
            run(j)
    finally:
        for h in handles:
            h.remove()
    for name, st in stats.items():
        check_finite(name, rule.statistic(st))
    return stats, counts

