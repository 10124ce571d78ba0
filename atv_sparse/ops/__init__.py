"""Sparse linear execution: custom ops and backend choice (docs/design.md 7.1).

- ``triton_ops``: ``atv_sparse::nm_linear`` / ``atv_sparse::nm_gated`` over the Triton kernels
  (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
- ``cusparselt``: ``atv_sparse::cslt_linear`` over torch's cuSPARSELt ops (2:4, CUDA);
- ``cuda_lib``: the csrc decode kernels behind a C ABI (``atv_sparse::nm_linear_cuda``);
- ``dispatch``: which backend serves which token count (``Plan``), the measured per-shape table.

Every op has a fake implementation, so ``torch.compile`` traces through it, and allocates only its
output, so CUDA graphs capture it. ``sparse_linear`` below is the stateless entry point; a
``SparseLinear`` module additionally keeps the layouts a plan needs (cuSPARSELt's buffer).
"""

from __future__ import annotations

import torch

from ..errors import AtvSparseError
from .dispatch import BACKENDS, machine_status
from .triton_ops import nm_gated, nm_linear

__all__ = ["BACKENDS", "available_backends", "machine_status", "nm_gated", "nm_linear", "sparse_linear"]


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` on this machine (``reference`` always can)."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if machine_status(b, device) is None]


def sparse_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                  bias: torch.Tensor | None = None, backend: str = "auto", n: int | None = None,
                  m: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W compressed (pattern n:m, or unstructured when m is None).

    x: (..., in) in the values' dtype; bitmask: (out, ceil(in / 8)) uint8; values: kept weights,
    (out, in * n / m) for N:M, 1-D otherwise. Returns (..., out). Stateless: ``auto`` uses the
    kernels that need no prepared layout (cuda / triton for few tokens on a GPU, else reference);
    ``cusparselt`` needs a ``SparseLinear``, which keeps its compressed buffer between calls.
    """
    from ..nn.sparse_linear import SparseLinear
    from ..patterns import Pattern

    if backend not in BACKENDS:
        raise AtvSparseError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "cusparselt":
        raise AtvSparseError("backend 'cusparselt' needs a prepared layout: run the layer as an "
                             "atv_sparse.SparseLinear (SparseLinear.from_packed) instead of sparse_linear")
    pattern = Pattern(n, m, 1 - n / m if m else 1 - values.numel() / max(bitmask.shape[0] * in_features, 1))
    layer = SparseLinear.from_packed(bitmask, values, in_features, pattern, bias=bias, backend=backend,
                                     validate=False)
    return layer(x)
