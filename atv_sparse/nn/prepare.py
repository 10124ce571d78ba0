"""Preparing a loaded model's ``SparseLinear`` modules: each is named, given its backend and the plan
that backend runs (on a GPU with ``backend="auto"``, the plan read from, or measured into, the
per-shape table of ``atv_sparse.ops.autotune``). Nothing is measured here; this applies plans."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..ops.autotune import PlanTable
from .sparse_linear import SparseLinear


def prepare_model(model: nn.Module, backend: str = "auto", autotune: bool = True, dense_fallback: bool = True,
                  table_path: str | Path | None = None, progress: bool = True) -> dict[str, str]:
    """Name every ``SparseLinear``, set its backend and build its plan; returns name -> plan summary.

    A fixed backend that cannot run a layer raises ``AtvSparseError`` naming the layer and what is
    usable instead. ``auto`` on a GPU reads (or measures and writes) the per-shape table.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    table = PlanTable(table_path, autotune=autotune, dense_fallback=dense_fallback)
    summary = {}
    for name, module in tqdm(modules, desc="Preparing sparse layers", disable=not progress or not modules):
        module.name, module.backend = name, backend
        device = module.weight_values.device
        plan = table.plan(module.layer_shape(), device, name) if backend == "auto" and device.type == "cuda" else None
        module.prepare(plan)
        summary[name] = module.plan.summary()
    table.save()
    return summary
