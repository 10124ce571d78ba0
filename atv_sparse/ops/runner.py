"""Running one compressed linear on a backend, without a module (docs/design.md 7.1).

Everything here is a function of tensors the caller keeps: ``SparseLinear`` keeps them as buffers,
the vLLM plugin on vLLM's layer. A layer's state is its checkpoint pair (bitmask + values), its
``Plan`` and the layouts the plan needs, built once when the layer is prepared:

    prepare once:  plan = default_plan(...) or a measured one (ops.autotune.plan_for_layer)
                   cslt_weight, dense_copy, sp24 = build_layouts(plan, bitmask, values, in_features)
    every call:    backend, alg_id = pick_backend(plan, tokens)
                   y = run_backend(backend, x, bitmask, values, ..., cslt_weight, dense_copy, sp24)

Which backends need a layout is the table's ``Backend.layout`` (``ops/backends.py``): today
``cusparselt`` (its compressed buffer), ``dense`` (a dense copy of the weight) and ``cuda_sp24``
(the sparse tensor-core fragments, ``kernels/cuda_layouts.pack_sp24``); the other backends read
the checkpoint pair as it is.
"""

from __future__ import annotations

import torch

from ..errors import AtvSparseError
from ..formats.bitmask import decompress
from .backends import FACTS, LAYOUT_BACKENDS, TOKEN_LIMITS  # noqa: F401  (LAYOUT_BACKENDS re-exported)
from .dispatch import Plan, heuristic_plan


def default_plan(device: torch.device, kernels: list[str], dense_fallback: bool = False) -> Plan:
    """The plan of a layer nothing was measured for: ``heuristic_plan`` over the ``kernels`` that
    an ``auto`` plan may pick on this device type (``Backend.plan_devices``: never Triton's CPU
    interpreter, which is for tests), so the reference backend where none is left."""
    kernels = [b for b in kernels if device.type in FACTS[b].plan_devices]
    return heuristic_plan(kernels, dense_fallback) if kernels else Plan.uniform("reference")


def place_weights(plan: Plan, bitmask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask, values) where the plan's backends want them (``Backend.place``: the cpu kernels
    read them from huge pages); the same tensors when no backend asks. Equal values, no second copy
    kept: the caller replaces its tensors with these."""
    for name in dict.fromkeys(plan.backends):
        place = FACTS[name].place
        if place is not None:
            bitmask, values = place(bitmask), place(values)
    return bitmask, values


def build_layouts(plan: Plan, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                  cslt_weight: torch.Tensor | None = None, dense_copy: torch.Tensor | None = None,
                  sp24: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """The layouts ``plan`` needs: (cuSPARSELt buffer or None, dense (out, in) copy or None,
    sparse tensor-core fragments (``pack_sp24``, flat uint8) or None).

    Layouts already built (``cslt_weight``, ``dense_copy``, ``sp24``) are kept where the plan still
    uses them and dropped where it does not; a missing cuSPARSELt buffer or dense copy is built from
    one decompression of the pair, the fragments straight from the pair.
    """
    layouts = {FACTS[b].layout for b in plan.backends}
    needs_cslt, needs_dense = "cslt" in layouts, "dense" in layouts
    cslt_weight = cslt_weight if needs_cslt else None
    dense_copy = dense_copy if needs_dense else None
    sp24 = sp24 if "sp24" in layouts else None
    if "sp24" in layouts and sp24 is None:
        from ..kernels.cuda_layouts import pack_sp24

        sp24 = pack_sp24(values, bitmask)
    if (needs_cslt and cslt_weight is None) or (needs_dense and dense_copy is None):
        dense = decompress(bitmask, values, in_features)
        if needs_cslt and cslt_weight is None:
            from .cusparselt import cslt_pack

            cslt_weight = cslt_pack(dense)
        if needs_dense:
            dense_copy = dense
        del dense  # freed now unless kept as the dense copy
    return cslt_weight, dense_copy, sp24


def pick_backend(plan: Plan, tokens: int, fixed: str | None = None, name: str = "sparse linear") -> tuple[str, int]:
    """(backend, cuSPARSELt algorithm id) that ``plan`` gives ``tokens`` tokens (see ``token_limited``)."""
    backend, alg_id = plan.pick(tokens)
    return token_limited(backend, tokens, fixed, name), alg_id


def token_limited(backend: str, tokens: int, fixed: str | None = None, name: str = "sparse linear") -> str:
    """``backend``, or its ``over_limit`` backend (the CUDA decode kernels: Triton) where ``backend``
    has a token limit below ``tokens``.

    A caller that fixed that backend (``fixed``) is refused instead, naming ``name``.
    """
    entry = FACTS[backend]
    if entry.token_limit is not None and tokens > entry.token_limit:
        if fixed == backend:
            raise AtvSparseError(f"{name}: backend '{backend}' runs up to {entry.token_limit} tokens, got {tokens}; "
                                 f"use backend='auto'")
        return entry.over_limit
    return backend


def run_backend(backend: str, x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                n: int | None, m: int | None, bias: torch.Tensor | None = None, gated: bool = False,
                alg_id: int = 0, cslt_weight: torch.Tensor | None = None,
                dense_copy: torch.Tensor | None = None, sp24: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` (or the gated ``silu(x Wg^T) * (x Wu^T)``) on one backend, no checks.

    x: (..., in_features); bitmask: (out, ceil(in_features / 8)) uint8; values: (out, in * n / m)
    for N:M, 1-D otherwise. Returns (..., out), or (..., out / 2) when gated (the weight stacks the
    gate rows over the up rows). Only backends with a ``layout`` read a prepared one
    (``cslt_weight``, ``dense_copy``, ``sp24``: see ``build_layouts``).
    """
    entry = FACTS[backend]
    layout = {"cslt": cslt_weight, "dense": dense_copy, "sp24": sp24}.get(entry.layout)
    return entry.run(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout)
