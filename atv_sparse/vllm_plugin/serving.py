"""What a sparse vLLM linear keeps for serving, built once after loading, and its forward (no vLLM import).

``prepare_layer`` runs once per layer from ``AtvSparseLinearMethod.process_weights_after_loading``:
it validates the loaded pair, takes the layer's plan from the same measured per-shape table as
``atv_sparse.load`` (``ops.autotune.PlanTable``: the ``cpu`` kernels on a CPU where they built,
else the reference backend; the table's entry on a GPU, measured there if missing) and builds the layouts the plan needs (cuSPARSELt's
buffer; a dense copy where dense cuBLAS measured fastest, as ``load``'s default
``dense_fallback=True``). It keeps them on the layer:

- ``atv_plan``: a ``ServingPlan`` (the plan as backend indices and algorithm ids per bucket);
- ``atv_cslt_weight``, ``atv_dense_copy``, ``atv_sp24``: non-persistent buffers, ``None`` unless the plan uses them.

``forward`` (vLLM's ``apply``) only reads them: per call it looks up the token bucket and runs
``ops.runner.run_backend`` inside the custom op ``atv_sparse::vllm_linear``. vLLM compiles its
models with Dynamo in fullgraph mode; an opaque op with a fake implementation is one node of the
graph whatever backend it picks. Nothing is built and nothing is planned per call.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from ..formats.bitmask import validate_compressed
from ..ops.autotune import LayerShape, PlanTable
from ..ops.dispatch import KERNEL_BACKENDS, bucket_index
from ..ops.runner import build_layouts, place_weights, run_backend, token_limited
from ..patterns import Pattern

# A custom op takes no list of strings: the plan crosses it as indices into this tuple.
PLAN_BACKENDS = (*KERNEL_BACKENDS, "reference", "dense")

_tables: dict[torch.device, PlanTable] = {}  # one table per device and process, read once


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """One layer's plan as the op takes it: ``PLAN_BACKENDS[backend_ids[i]]`` and ``alg_ids[i]`` serve
    token bucket i; in_features and the pattern's (n, m) (None, None: unstructured)."""

    in_features: int
    n: int | None
    m: int | None
    backend_ids: tuple[int, ...]
    alg_ids: tuple[int, ...]

    def backends(self) -> tuple[str, ...]:
        return tuple(PLAN_BACKENDS[i] for i in self.backend_ids)


def plan_table(device: torch.device) -> PlanTable:
    """This process's table for ``device`` (the file ``atv_sparse.load`` reads and writes too)."""
    if device not in _tables:
        _tables[device] = PlanTable()
    return _tables[device]


def prepare_layer(layer: nn.Module, in_features: int, pattern: Pattern, name: str) -> None:
    """Validate ``layer.weight_bitmask`` / ``weight_values`` and attach the plan and layouts (once, after loading).

    layer: holds ``weight_bitmask`` (rows, ceil(in_features / 8)) uint8 and ``weight_values``
    parameters, and optionally a ``bias``; name: the layer's vLLM name, for messages.
    """
    bitmask, values = layer.weight_bitmask.data, layer.weight_values.data
    validate_compressed(name, bitmask, values, bitmask.shape[0], in_features, pattern.n, pattern.m)
    bitmask, values = bitmask.contiguous(), values.contiguous()
    layer.weight_bitmask.data, layer.weight_values.data = bitmask, values
    shape = LayerShape(pattern.n, pattern.m, values.dtype, bitmask.shape[0], in_features,
                       bias=getattr(layer, "bias", None) is not None)
    table = plan_table(values.device)
    plan = table.plan(shape, values.device, name)
    table.save()
    layer.weight_bitmask.data, layer.weight_values.data = place_weights(plan, bitmask, values)  # cpu: huge pages
    cslt_weight, dense_copy, sp24 = build_layouts(plan, bitmask, values, in_features)
    layer.atv_plan = ServingPlan(in_features, pattern.n, pattern.m,
                                 tuple(PLAN_BACKENDS.index(b) for b in plan.backends), plan.alg_ids)
    layer.register_buffer("atv_cslt_weight", cslt_weight, persistent=False)
    layer.register_buffer("atv_dense_copy", dense_copy, persistent=False)
    layer.register_buffer("atv_sp24", sp24, persistent=False)


def forward(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (tokens, in_features) -> (tokens, rows), from what ``prepare_layer`` kept."""
    plan = layer.atv_plan
    return torch.ops.atv_sparse.vllm_linear(x, layer.weight_bitmask, layer.weight_values, plan.in_features, plan.n,
                                            plan.m, bias, plan.backend_ids, plan.alg_ids, layer.atv_cslt_weight,
                                            layer.atv_dense_copy, layer.atv_sp24)


@torch.library.custom_op("atv_sparse::vllm_linear", mutates_args=())
def vllm_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int, n: int | None,
                m: int | None, bias: torch.Tensor | None, backend_ids: Sequence[int], alg_ids: Sequence[int],
                cslt_weight: torch.Tensor | None, dense_copy: torch.Tensor | None,
                sp24: torch.Tensor | None) -> torch.Tensor:
    """x: (tokens, in_features) -> (tokens, out) on the backend the layer's plan gives ``tokens``."""
    tokens = x.numel() // in_features
    i = bucket_index(tokens)
    backend = token_limited(PLAN_BACKENDS[backend_ids[i]], tokens)
    return run_backend(backend, x, bitmask, values, in_features, n, m, bias, False, alg_ids[i], cslt_weight,
                       dense_copy, sp24)


@vllm_linear.register_fake
def _(x, bitmask, values, in_features, n, m, bias, backend_ids, alg_ids, cslt_weight, dense_copy, sp24):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"atv_sparse vllm_linear: x has {x.shape[-1]} features, the layer takes {in_features}")
    return x.new_empty(*x.shape[:-1], bitmask.shape[0])
