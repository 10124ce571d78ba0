"""What ``convert`` records beside the weights and prints: sparsity.json entries, the method
settings, the dry-run table, the summary and the dense-vs-pruned accuracy table."""

from __future__ import annotations

import time
from pathlib import Path

from ..patterns import Pattern
from ..prune.recipe import PruneRecipe
from ..prune.targets import TargetPlan
from ..reports import human_bytes


def module_entry(linear, keep, pattern: Pattern) -> tuple[dict, int]:
    """sparsity.json's entry for one pruned linear, and its number of zeros, from its keep-mask
    ``keep``: (out, in) bool."""
    entry = {"shape": [linear.out_features, linear.in_features], "pattern": str(pattern),
             "sparsity": 1 - keep.sum().item() / keep.numel()}
    if pattern.is_nm:
        groups = keep.reshape(keep.shape[0], -1, pattern.m).sum(-1)
        entry["pattern_check"] = "ok" if bool((groups == pattern.n).all()) else "FAILED"
    else:
        entry["pattern_check"] = "n/a (unstructured)"
    return entry, keep.logical_not().sum().item()


def sparsity_json(targets, pruned: dict[str, tuple[dict, int]], pattern: Pattern, skipped: dict[str, str]) -> dict:
    """targets: module names in model order; pruned: name -> ``module_entry``; skipped: name -> why dense."""
    modules = {name: pruned[name][0] for name in targets}
    for name, why in skipped.items():
        modules[name] = {"pattern": "dense", "sparsity": 0.0, "pattern_check": f"skipped: {why}"}
    return {"pattern": str(pattern), "modules": modules}


def method_settings(recipe: PruneRecipe, *, nsamples: int, seqlen: int, calibration: str, dtype: str, device: str,
                    budget: dict) -> dict:
    """The settings a run used, for quantization_config's method_settings and prune_report.json:
    only those that change its result (magnitude: none but dtype and device): the calibration's,
    the selector's (``TokenSelection.settings``), the budget calibration's and the rule's
    (``PruningRule.settings``)."""
    if recipe.tokens is None:
        return {"dtype": dtype, "device": device}
    settings = {"nsamples": nsamples, "seqlen": seqlen, "seed": recipe.seed, "calibration": calibration,
                "dtype": dtype, "device": device, "calib_tokens": recipe.tokens,
                **recipe.selection.settings(), **budget, **recipe.rule.settings()}
    return settings


def print_dry_run(method: str, ckpt, adapter, plan: TargetPlan, pattern: Pattern, est: dict, fmt: str) -> None:
    """The module table and the estimates (``estimate.estimate_conversion``) of a run that writes nothing."""
    width = max(len(n) for n in list(plan.targets) + list(plan.skipped))
    print(f"dry run: {method} {pattern} on {ckpt} ({adapter.architecture}); nothing is written")
    print(f"{'module':<{width}}  {'shape (out x in)':>18}  action")
    for name, lin in plan.targets.items():
        print(f"{name:<{width}}  {lin.out_features:>8} x {lin.in_features:<7}  prune {pattern}")
    for name, why in plan.skipped.items():
        print(f"{name:<{width}}  {'':>18}  dense ({why})")
    print(f"targets: {len(plan.targets)} pruned, {len(plan.skipped)} skipped")
    print(f"estimated output ({fmt}): {human_bytes(est['output_bytes'])} (input {human_bytes(est['input_bytes'])})")
    print(f"estimated peak memory: host {human_bytes(est['peak_host_bytes'])} (runtime "
          f"{human_bytes(est['runtime_bytes'])} + the {est['peak_phase']} phase; one block holds "
          f"{human_bytes(est['peak_block_bytes'])}, calibration activations {human_bytes(est['activation_bytes'])}), "
          f"device {human_bytes(est['peak_device_bytes'])} (one block + its statistics)")


def print_summary(s: dict) -> None:
    """The summary ``convert.run`` returns, as the lines it prints."""
    timing = " | ".join(f"{k} {v:.2f} s" for k, v in s["timings_s"].items())
    print(f"atv_sparse.convert: {s['method']} {s['pattern']} on {s['source']} ({s['architecture']})")
    print(f"  modules pruned : {s['modules_pruned']}" + (f" ({s['modules_skipped']} left dense)" if s["modules_skipped"] else ""))
    print(f"  sparsity       : {100 * s['sparsity_targets']:.2f}% of pruned layers, {100 * s['sparsity_model']:.2f}% of all weights")
    mix = s.get("calibration_tokens")
    if mix is not None:
        print(f"  calibration    : {mix['visual']:,} image + {mix['text']:,} text tokens "
              f"({100 * mix['visual_share']:.1f}% visual)")
    print(f"  time           : {timing}")
    print(f"  weights        : {human_bytes(s['bytes_before'])} -> {human_bytes(s['bytes_after'])} "
          f"({s['bytes_after'] / max(s['bytes_before'], 1):.2f}x, {s['format']})")
    print(f"  peak memory    : {human_bytes(s['peak_rss_bytes'])} resident "
          f"({s['peak_rss_bytes'] / max(s['bytes_before'], 1):.2f}x the input checkpoint)")
    print(f"  output         : {s['out']}")


def accuracy_report(ckpt: Path, out: str, per_task: int, device, quiet: bool) -> dict:
    """Dense (``ckpt``) vs pruned (``out``) accuracy on ``per_task`` synthetic test items per task,
    printed as a table; returns {"per_task", "dense", "pruned", "average_retention", "tasks"}."""
    from ..evaluation.items import scene_size, synthetic_items
    from ..evaluation.loading import load_model_and_processor
    from ..evaluation.metrics import compare
    from ..evaluation.scoring import evaluate_model, prepare_items

    t0 = time.perf_counter()
    model, processor = load_model_and_processor(ckpt, device=str(device))
    items = synthetic_items(per_task, seed=0, size=scene_size(processor))
    prepared = prepare_items(model, processor, items)  # the output has the same processor files
    dense = evaluate_model(model, processor, prepared, progress=not quiet)
    del model  # one model in memory at a time
    model, _ = load_model_and_processor(Path(out), device=str(device))
    result = compare(evaluate_model(model, processor, prepared, progress=not quiet), dense)
    print(f"  accuracy       : synthetic test split, {per_task} items per task, teacher-forced exact match "
          f"({time.perf_counter() - t0:.1f} s)")
    width = max(len(t) for t in result["tasks"])
    print(f"    {'task':<{width}}  dense  pruned  retention")
    for task, s in result["tasks"].items():
        ret = "-" if s["retention"] is None else f"{s['retention']:.1f}%"
        print(f"    {task:<{width}}  {100 * s['baseline_accuracy']:5.1f}  {100 * s['accuracy']:6.1f}  {ret:>9}")
    ret = result["average_retention"]
    print(f"    {'average':<{width}}  {100 * result['baseline_average']:5.1f}  {100 * result['average']:6.1f}  "
          f"{'-' if ret is None else f'{ret:.1f}%':>9}")
    return {"per_task": per_task, "dense": result["baseline_average"], "pruned": result["average"],
            "average_retention": ret,
            "tasks": {t: {k: s[k] for k in ("baseline_accuracy", "accuracy", "retention")}
                      for t, s in result["tasks"].items()}}
