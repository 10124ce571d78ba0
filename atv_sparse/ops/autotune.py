"""Per-shape backend plans, measured once per device and cached (docs/design.md 7.1).

For a layer shape (pattern, dtype, out x in, gated) and every token bucket of
``dispatch.BUCKETS``, time each usable kernel backend and dense cuBLAS on random weights of that
shape (several copies, rotated so the L2 cache does not hold them), and record the fastest sparse
backend, or ``dense`` where dense cuBLAS beat all of them and ``dense_fallback`` allows keeping a
dense copy (so ``auto`` is never slower than dense, at the price of that copy's memory). The
table lives in one JSON file per GPU model and software stack (``dispatch.default_table_path``;
``ATV_SPARSE_DISPATCH_TABLE`` overrides it, and a hand-edited file is taken as is).
``ATV_SPARSE_AUTOTUNE=0`` skips measuring (heuristic plans).

``PlanTable.plan`` is the one place a layer's plan comes from: ``atv_sparse.load`` (through
``nn.prepare.prepare_model``) and the vLLM plugin both ask it, once per layer when it is prepared.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..formats.bitmask import compress, decompress
from .backends import FACTS
from .dispatch import (BUCKETS, TOKEN_LIMITS, Plan, default_table_path, heuristic_plan, plan_from_entry, read_table,
                       table_key, usable_backends, write_table)
from .runner import build_layouts, default_plan, run_backend

ROTATE_BYTES = 256 * 2**20  # > 2x the L2 cache of an H100 (50 MB) or A100 (40 MB)
MAX_COPIES = 16


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What a plan depends on: pattern (n, m; None for unstructured), dtype, (out, in), gated, bias."""

    n: int | None
    m: int | None
    dtype: torch.dtype
    out_features: int
    in_features: int
    gated: bool = False
    bias: bool = False

    def table_key(self) -> str | None:
        """The key of this shape in the table (None: unstructured layers are never measured)."""
        if self.m is None:
            return None
        return table_key(self.n, self.m, self.dtype, self.out_features, self.in_features, self.gated)

    def usable(self, device: torch.device) -> list[str]:
        """Kernel backends that can run a layer of this shape on ``device``, in preference order."""
        return usable_backends(device, self.n, self.m, self.dtype, self.out_features, self.in_features)


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


@dataclasses.dataclass
class _Copy:
    """One random layer of the measured shape, with every layout a backend may read."""

    bitmask: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    cslt_weight: torch.Tensor | None = None
    dense_copy: torch.Tensor | None = None
    sp24: torch.Tensor | None = None


def random_copy(shape: LayerShape, device: torch.device, seed: int) -> _Copy:
    """Random weights of ``shape`` (N:M only) pruned by magnitude, compressed, on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn(shape.out_features, shape.in_features, generator=gen, device=device) * 0.02).to(shape.dtype)
    groups = weight.abs().float().reshape(shape.out_features, -1, shape.m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(shape.n, dim=-1).indices, True)
    bitmask, values = compress(weight, keep.reshape(weight.shape), shape.n, shape.m)
    bias = None
    if shape.bias:
        bias = ((torch.rand(shape.out_features, generator=gen, device=device) - 0.5) * 0.02).to(shape.dtype)
    return _Copy(bitmask, values, bias)


def _rotating_call(copies: list[_Copy], shape: LayerShape, backend: str, x: torch.Tensor,
                   alg_id: int) -> Callable[[], object]:
    """A call that runs the next copy each time, so no copy's weights stay in L2 between calls."""
    turn = itertools.cycle(copies)

    def call():
        c = next(turn)
        return run_backend(backend, x, c.bitmask, c.values, shape.in_features, shape.n, shape.m, c.bias,
                           shape.gated, alg_id, c.cslt_weight, c.dense_copy, c.sp24)

    return call


def agrees_with_dense(backend: str, c: _Copy, shape: LayerShape, name: str = "layer") -> bool:
    """Whether ``backend`` computes copy ``c`` within twice dense's own error of a float64 reference
    (plus 1e-3 of the reference's largest value, as cuSPARSELt's algorithm ids are checked), at 1
    and at 16 tokens; a warning names the layer when it does not."""
    import torch.nn.functional as F

    dense = c.dense_copy if c.dense_copy is not None else decompress(c.bitmask, c.values, shape.in_features)
    bias = None if shape.gated else c.bias
    for tokens in (1, 16):
        gen = torch.Generator(device=dense.device).manual_seed(tokens)
        x = torch.randn(tokens, shape.in_features, generator=gen, device=dense.device, dtype=shape.dtype)
        ref = F.linear(x.double(), dense.double(), None if bias is None else bias.double())
        plain = F.linear(x, dense, bias)
        if shape.gated:
            half = ref.shape[-1] // 2
            ref, plain = F.silu(ref[:, :half]) * ref[:, half:], F.silu(plain[:, :half]) * plain[:, half:]
        y = run_backend(backend, x, c.bitmask, c.values, shape.in_features, shape.n, shape.m, c.bias, shape.gated,
                        -1, c.cslt_weight, c.dense_copy, c.sp24)
        budget = 2 * (plain.double() - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
        if y.shape != ref.shape or not torch.isfinite(y).all() or (y.double() - ref).abs().max().item() > budget:
            print(f"atv-sparse: {name}: backend '{backend}' disagrees with the dense layer; left out of its plan",
                  flush=True)
            return False
    return True


def measure_entry(shape: LayerShape, device: torch.device | str, usable: list[str], dense_fallback: bool = True,
                  timer: Callable[[str, int, Callable[[], object]], float] = bench_median_ms,
                  name: str = "layer") -> dict:
    """Time every usable backend and dense per token bucket for an N:M ``shape``; returns a table entry."""
    from .cusparselt import search_alg_id

    device = torch.device(device)
    dense_bytes = shape.out_features * shape.in_features * torch.empty(0, dtype=shape.dtype).element_size()
    count = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(dense_bytes, 1))))
    every = tuple(usable) + ("dense",)
    layouts = Plan(every, tuple(0 if b == "cusparselt" else -1 for b in every))
    copies = []
    for seed in range(count):
        c = random_copy(shape, device, seed)
        c.cslt_weight, c.dense_copy, c.sp24 = build_layouts(layouts, c.bitmask, c.values, shape.in_features)
        copies.append(c)
    usable = [b for b in usable if not FACTS[b].check_before_timing or agrees_with_dense(b, copies[0], shape, name)]
    choice, alg_ids, times_ms = [], [], {}
    for tokens in BUCKETS:
        x = torch.randn(tokens, shape.in_features, device=device, dtype=shape.dtype)
        times, algs = {}, {}
        for backend in [*usable, "dense"]:
            if tokens > TOKEN_LIMITS.get(backend, tokens):
                continue
            algs[backend] = -1
            if backend == "cusparselt":
                first = copies[0]
                bias = None if shape.gated else first.bias
                algs[backend] = search_alg_id(first.cslt_weight, first.dense_copy, tokens, bias, name)
            times[backend] = timer(backend, tokens, _rotating_call(copies, shape, backend, x, algs[backend]))
        sparse = [b for b in times if b != "dense"] or ["reference"]
        best = min(sparse, key=lambda b: times.get(b, math.inf))
        if dense_fallback and times["dense"] < times.get(best, math.inf):
            best = "dense"
        choice.append(best)
        alg_ids.append(algs.get(best, -1))
        times_ms[str(tokens)] = times
    return {"buckets": list(BUCKETS), "choice": choice, "alg_ids": alg_ids, "ms": times_ms, "copies": count}


class PlanTable:
    """The measured table of one device, read when first needed and written back by ``save``.

    path: the table file (None: ``dispatch.default_table_path`` of the first device asked about).
    """

    def __init__(self, path: str | Path | None = None, autotune: bool = True, dense_fallback: bool = True):
        self.path = Path(path) if path else None
        self.autotune = autotune and os.environ.get("ATV_SPARSE_AUTOTUNE") != "0"
        self.dense_fallback = dense_fallback
        self.entries: dict | None = None
        self.device_name: str | None = None
        self.dirty = False

    def plan(self, shape: LayerShape, device: torch.device, name: str = "layer") -> Plan:
        """The plan for a layer of ``shape`` on ``device`` with backend ``auto``.

        Off a GPU: ``runner.default_plan`` (the ``cpu`` kernels for every token count where they
        built, else the reference backend). On one: the table's entry (measured
        now if missing and ``autotune``), else ``heuristic_plan``.
        """
        usable = shape.usable(device)
        if device.type != "cuda":
            return default_plan(device, usable)
        if self.entries is None:
            self.path = self.path or default_table_path(device)
            self.entries = read_table(self.path)
            self.device_name = torch.cuda.get_device_name(device)
        key = shape.table_key()
        plan = None
        if key is not None and key in self.entries:
            plan = plan_from_entry(self.entries[key], usable)
        if plan is None and key is not None and self.autotune and usable:
            self.entries[key] = measure_entry(shape, device, usable, self.dense_fallback, name=name)
            self.dirty = True
            plan = plan_from_entry(self.entries[key], usable)
        return plan if plan is not None else heuristic_plan(usable, self.dense_fallback)

    def save(self) -> None:
        """Write the table back if anything was measured since it was read (atomically)."""
        if self.dirty:
            write_table(self.path, self.entries, self.device_name)
            self.dirty = False
