"""Sparse linear execution: custom ops and backend choice (docs/design.md 7.1).

- ``triton_ops``: ``atv_sparse::nm_linear`` / ``atv_sparse::nm_gated`` over the Triton kernels
  (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
- ``cusparselt``: ``atv_sparse::cslt_linear`` over torch's cuSPARSELt ops (2:4, CUDA);
- ``cuda_lib``: the csrc decode kernels behind a C ABI (``atv_sparse::nm_linear_cuda``);
- ``cpu_lib``: the C++ CPU kernels on the packed pair, built on first use (``atv_sparse::nm_linear_cpu``);
- ``backends``: the table of backend facts (what each backend needs and where it runs);
- ``dispatch``: which backend serves which token count (``Plan``), the measured per-shape table;
- ``autotune``: measuring that table (``PlanTable``: a layer's plan, measured once per shape);
- ``runner``: running a layer on the backend its plan picks, from tensors the caller keeps
  (``SparseLinear`` and the vLLM plugin both call it; nothing here builds a module).

Every op has a fake implementation, so ``torch.compile`` traces through it, and allocates only its
output, so CUDA graphs capture it. ``sparse_linear`` below is the stateless entry point (it
builds no layout per call); callers that prepare a layer once (``SparseLinear``, the vLLM plugin)
keep its plan and the layouts the plan needs (cuSPARSELt's buffer) and call ``runner``.
"""

from __future__ import annotations

import functools

import torch

from ..errors import AtvSparseError
from .dispatch import BACKENDS, TOKEN_LIMITS, Plan, layer_status, machine_status, usable_backends
from .runner import LAYOUT_BACKENDS, default_plan, pick_backend, run_backend
from .triton_ops import nm_gated, nm_linear

__all__ = ["BACKENDS", "available_backends", "machine_status", "nm_gated", "nm_linear", "sparse_linear"]


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` on this machine (``reference`` always can)."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if machine_status(b, device) is None]


@functools.lru_cache(maxsize=1024)
def _stateless_plan(device: torch.device, n: int | None, m: int | None, dtype: torch.dtype, out_features: int,
                    in_features: int) -> Plan:
    """``runner.default_plan`` over the backends that read bitmask + values as they are."""
    usable = [b for b in usable_backends(device, n, m, dtype, out_features, in_features) if b not in LAYOUT_BACKENDS]
    return default_plan(device, usable)


def stateless_backend(device: torch.device, n: int | None, m: int | None, dtype: torch.dtype, out_features: int,
                      in_features: int, tokens: int) -> str:
    """The backend ``sparse_linear(..., backend="auto")`` runs for ``tokens`` tokens."""
    return pick_backend(_stateless_plan(device, n, m, dtype, out_features, in_features), tokens)[0]


def sparse_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                  bias: torch.Tensor | None = None, backend: str = "auto", n: int | None = None,
                  m: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W compressed (pattern n:m, or unstructured when m is None).

    x: (..., in) in the values' dtype; bitmask: (out, ceil(in / 8)) uint8; values: kept weights,
    (out, in * n / m) for N:M, 1-D otherwise. Returns (..., out).

    Stateless (the vLLM plugin's forward): it prepares nothing and keeps nothing, so it uses only
    backends that read bitmask + values as they are. ``auto``: the decode kernels (cuda / triton)
    where they apply, else reference (decompress + ``F.linear``). ``cusparselt`` needs a compressed
    buffer kept between calls: use an ``atv_sparse.SparseLinear`` for it.
    """
    if backend not in BACKENDS:
        raise AtvSparseError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend in LAYOUT_BACKENDS:
        raise AtvSparseError(f"backend '{backend}' needs a prepared layout: run the layer as an "
                             "atv_sparse.SparseLinear (SparseLinear.from_packed) instead of sparse_linear")
    out_features, tokens = bitmask.shape[0], x.numel() // max(in_features, 1)
    if backend == "auto":
        backend = stateless_backend(values.device, n, m, values.dtype, out_features, in_features, tokens)
    else:
        why = layer_status(backend, n, m, values.dtype, out_features, in_features) or machine_status(
            backend, values.device)
        if why is None and tokens > TOKEN_LIMITS.get(backend, tokens):
            why = f"it runs up to {TOKEN_LIMITS[backend]} tokens, got {tokens}"
        if why is not None:
            raise AtvSparseError(f"sparse_linear: backend '{backend}' cannot run this layer ({out_features} x "
                                 f"{in_features}, {values.dtype}) here: {why}")
    return run_backend(backend, x, bitmask, values, in_features, n, m, bias)
