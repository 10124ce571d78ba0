"""Per-shape backend plans for a model's sparse linears, measured once per device and cached.

For every distinct (pattern, dtype, out x in, gated) among a model's ``SparseLinear`` modules and
every token bucket of ``atv_sparse.ops.dispatch.BUCKETS``, time each usable kernel backend and
dense cuBLAS on random weights of that shape (several copies, rotated so the L2 cache does not
hold them), and record the fastest sparse backend, or ``dense`` where dense cuBLAS beat all of
them and ``dense_fallback`` allows keeping a dense copy (so ``auto`` is never slower than dense,
at the price of that copy's memory). The table lives in one JSON file per GPU model and software
stack (``dispatch.default_table_path``; ``ATV_SPARSE_DISPATCH_TABLE`` overrides it, and a
hand-edited file is taken as is). ``ATV_SPARSE_AUTOTUNE=0`` skips measuring (heuristic plans).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.dispatch import (BUCKETS, TOKEN_LIMITS, Plan, default_table_path, heuristic_plan, plan_from_entry,
                            read_table, table_key, write_table)
from .sparse_linear import SparseLinear

ROTATE_BYTES = 256 * 2**20  # > 2x the L2 cache of an H100 (50 MB) or A100 (40 MB)
MAX_COPIES = 16


def first_quantile(result) -> float:
    """The first quantile of a ``triton.testing.do_bench(..., quantiles=[...])`` result: with a single
    quantile do_bench returns a bare float (triton 3.6 and 3.9, ``testing._summarize_statistics``),
    with several a list."""
    return float(result[0]) if isinstance(result, (list, tuple)) else float(result)


def do_bench_median_ms(fn: Callable[[], object], warmup: int = 10, rep: int = 50) -> float:
    """Median time of ``fn`` in ms over ``rep`` ms of calls (``triton.testing.do_bench``, CUDA events)."""
    import triton.testing

    return first_quantile(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5]))


def bench_median_ms(backend: str, tokens: int, fn: Callable[[], object]) -> float:
    """``do_bench_median_ms`` as ``measure_entry``'s timer; backend and tokens only label the call."""
    return do_bench_median_ms(fn)


def random_like(template: SparseLinear, seed: int) -> SparseLinear:
    """A ``SparseLinear`` of the template's shape, pattern, dtype and device with random weights."""
    out_f, in_f = template.out_features, template.in_features
    gen = torch.Generator(device=template.weight_values.device).manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=template.bias is not None, device=template.weight_values.device,
                       dtype=template.weight_values.dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen, device=linear.weight.device) * 0.02)
    return SparseLinear.from_linear(linear, template.pattern, gated=template.gated, name=template.name)


def _rotating_call(layers: list[SparseLinear], backend: str, x: torch.Tensor, alg_id: int) -> Callable[[], object]:
    """A call that runs the next copy each time, so no copy's weights stay in L2 between calls."""
    turn = itertools.cycle(layers)
    return lambda: next(turn).run(backend, x, alg_id)


def measure_entry(template: SparseLinear, usable: list[str], dense_fallback: bool = True,
                  timer: Callable[[str, int, Callable[[], object]], float] = bench_median_ms) -> dict:
    """Time every usable backend and dense per token bucket; returns a table entry."""
    from ..ops.cusparselt import search_alg_id

    dense_bytes = template.out_features * template.in_features * template.weight_values.element_size()
    copies = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(dense_bytes, 1))))
    layers = [random_like(template, seed) for seed in range(copies)]
    every = tuple(usable) + ("dense",)
    for layer in layers:
        layer._build_layouts(Plan(every, tuple(0 if b == "cusparselt" else -1 for b in every)))
    choice, alg_ids, times_ms = [], [], {}
    device = template.weight_values.device
    for tokens in BUCKETS:
        x = torch.randn(tokens, template.in_features, device=device, dtype=template.weight_values.dtype)
        times, algs = {}, {}
        for backend in [*usable, "dense"]:
            if tokens > TOKEN_LIMITS.get(backend, tokens):
                continue
            algs[backend] = -1
            if backend == "cusparselt":
                first = layers[0]
                bias = None if first.gated else first.bias
                algs[backend] = search_alg_id(first.cslt_weight, first.dense_weight_copy, tokens, bias, first.name)
            times[backend] = timer(backend, tokens, _rotating_call(layers, backend, x, algs[backend]))
        sparse = [b for b in times if b != "dense"] or ["reference"]
        best = min(sparse, key=lambda b: times.get(b, math.inf))
        if dense_fallback and times["dense"] < times.get(best, math.inf):
            best = "dense"
        choice.append(best)
        alg_ids.append(algs.get(best, -1))
        times_ms[str(tokens)] = times
    return {"buckets": list(BUCKETS), "choice": choice, "alg_ids": alg_ids, "ms": times_ms, "copies": copies}


def prepare_model(model: nn.Module, backend: str = "auto", autotune: bool = True, dense_fallback: bool = True,
                  table_path: str | Path | None = None, progress: bool = True) -> dict[str, str]:
    """Name every ``SparseLinear``, set its backend and build its plan; returns name -> plan summary.

    A fixed backend that cannot run a layer raises ``AtvSparseError`` naming the layer and what is
    usable instead. ``auto`` on a GPU reads (or measures and writes) the per-shape table.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    if autotune and os.environ.get("ATV_SPARSE_AUTOTUNE") == "0":
        autotune = False
    entries, dirty, path = None, False, None
    summary = {}
    for name, module in tqdm(modules, desc="Preparing sparse layers", disable=not progress or not modules):
        module.name, module.backend = name, backend
        device = module.weight_values.device
        plan = None
        if backend == "auto" and device.type == "cuda":
            usable = [b for b in module.usable_backends() if b != "reference"]
            if entries is None:
                path = Path(table_path) if table_path else default_table_path(device)
                entries = read_table(path)
            key = table_key(module.pattern.n, module.pattern.m, module.weight_values.dtype, module.out_features,
                            module.in_features, module.gated) if module.pattern.is_nm else None
            if key is not None and key in entries:
                plan = plan_from_entry(entries[key], usable)
            if plan is None and key is not None and autotune and usable:
                entries[key] = measure_entry(module, usable, dense_fallback)
                dirty = True
                plan = plan_from_entry(entries[key], usable)
            if plan is None:
                plan = heuristic_plan(usable, dense_fallback)
        module.prepare(plan)
        summary[name] = module.plan.summary()
    if dirty:
        write_table(path, entries, torch.cuda.get_device_name(modules[0][1].weight_values.device))
    return summary

