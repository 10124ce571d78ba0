"""Running one compressed linear on a backend, without a module (docs/design.md 7.1).

Everything here is a function of tensors the caller keeps: ``SparseLinear`` keeps them as buffers,
the vLLM plugin on vLLM's layer. A layer's state is its checkpoint pair (bitmask + values), its
``Plan`` and the layouts the plan needs, built once when the layer is prepared:

    prepare once:  plan = default_plan(...) or a measured one (ops.autotune.plan_for_layer)
                   cslt_weight, dense_copy = build_layouts(plan, bitmask, values, in_features)
    every call:    backend, alg_id = pick_backend(plan, tokens)
                   y = run_backend(backend, x, bitmask, values, ..., cslt_weight, dense_copy)

Only ``cusparselt`` (its compressed buffer) and ``dense`` (a dense copy of the weight) need a
layout; the other backends read the checkpoint pair as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError
from ..formats.bitmask import decompress
from . import triton_ops
from .dispatch import TOKEN_LIMITS, Plan, heuristic_plan

# Backends that need a layout built once per layer (build_layouts): never used by a stateless call.
LAYOUT_BACKENDS = ("cusparselt", "dense")


def default_plan(device: torch.device, kernels: list[str], dense_fallback: bool = False) -> Plan:
    """The plan of a layer nothing was measured for: the reference backend off a GPU (Triton's
    interpreter is for tests, not for serving), ``heuristic_plan`` over ``kernels`` on one."""
    return Plan.uniform("reference") if device.type != "cuda" else heuristic_plan(kernels, dense_fallback)


def build_layouts(plan: Plan, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                  cslt_weight: torch.Tensor | None = None,
                  dense_copy: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The layouts ``plan`` needs: (cuSPARSELt buffer or None, dense (out, in) copy or None).

    Layouts already built (``cslt_weight``, ``dense_copy``) are kept where the plan still uses them
    and dropped where it does not; a missing one is built from one decompression of the pair.
    """
    needs_cslt, needs_dense = "cusparselt" in plan.backends, "dense" in plan.backends
    cslt_weight = cslt_weight if needs_cslt else None
    dense_copy = dense_copy if needs_dense else None
    if (needs_cslt and cslt_weight is None) or (needs_dense and dense_copy is None):
        dense = decompress(bitmask, values, in_features)
        if needs_cslt and cslt_weight is None:
            from .cusparselt import cslt_pack

            cslt_weight = cslt_pack(dense)
        if needs_dense:
            dense_copy = dense
        del dense  # freed now unless kept as the dense copy
    return cslt_weight, dense_copy


def pick_backend(plan: Plan, tokens: int, fixed: str | None = None, name: str = "sparse linear") -> tuple[str, int]:
    """(backend, cuSPARSELt algorithm id) that ``plan`` gives ``tokens`` tokens (see ``token_limited``)."""
    backend, alg_id = plan.pick(tokens)
    return token_limited(backend, tokens, fixed, name), alg_id


def token_limited(backend: str, tokens: int, fixed: str | None = None, name: str = "sparse linear") -> str:
    """``backend``, or Triton where ``backend`` has a token limit (the CUDA decode kernels) below ``tokens``.

    A caller that fixed that backend (``fixed``) is refused instead, naming ``name``.
    """
    limit = TOKEN_LIMITS.get(backend)
    if limit is not None and tokens > limit:
        if fixed == backend:
            raise AtvSparseError(f"{name}: backend '{backend}' runs up to {limit} tokens, got {tokens}; "
                                 f"use backend='auto'")
        return "triton"
    return backend


def run_backend(backend: str, x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                n: int | None, m: int | None, bias: torch.Tensor | None = None, gated: bool = False,
                alg_id: int = 0, cslt_weight: torch.Tensor | None = None,
                dense_copy: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` (or the gated ``silu(x Wg^T) * (x Wu^T)``) on one backend, no checks.

    x: (..., in_features); bitmask: (out, ceil(in_features / 8)) uint8; values: (out, in * n / m)
    for N:M, 1-D otherwise. Returns (..., out), or (..., out / 2) when gated (the weight stacks the
    gate rows over the up rows). Only ``cusparselt`` and ``dense`` read a prepared layout
    (``cslt_weight``, ``dense_copy``: see ``build_layouts``).
    """
    if backend == "triton":
        if gated:
            return triton_ops.nm_gated(x, values, bitmask, n, m)
        return triton_ops.nm_linear(x, values, bitmask, n, m, bias)
    if backend == "cuda":
        from . import cuda_lib

        if gated:
            half = values.shape[0] // 2
            return cuda_lib.nm_gated_cuda(x, values[:half], bitmask[:half], values[half:], bitmask[half:], n, m)
        return cuda_lib.nm_linear_cuda(x, values, bitmask, n, m, bias)
    if backend == "cusparselt":
        from .cusparselt import cslt_linear

        y = cslt_linear(x, cslt_weight, bitmask.shape[0], alg_id, bias)
    elif backend == "dense":
        y = F.linear(x, dense_copy, bias)
    else:
        y = F.linear(x, decompress(bitmask, values, in_features), bias)
    if gated:
        half = bitmask.shape[0] // 2
        return F.silu(y[..., :half]) * y[..., half:]
    return y
