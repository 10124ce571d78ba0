"""Custom ops over the Triton N:M kernels of ``atv_sparse.kernels`` (docs/design.md 7.1).

Each op has a fake implementation that repeats the shape checks, so ``torch.compile`` traces a
model through it without running a kernel. The op picks the skinny kernel (``nm_gemv``) up to
``GEMV_MAX_TOKENS`` tokens and the tile GEMM (``nm_gemm``) above; the only allocation is the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError
from ..kernels.nm_layout import SUPPORTED_GROUPS  # torch only: Triton is imported with the kernels

GEMV_MAX_TOKENS = 64


def _check_pattern(n: int, m: int, op: str) -> None:
    if m not in SUPPORTED_GROUPS or not 0 < n < m:
        raise AtvSparseError(f"atv_sparse::{op}: the Triton kernels run n:m patterns with m in {SUPPORTED_GROUPS} and "
                             f"0 < n < m, got n={n}, m={m}")


def _check_fake(x, values, n, m, name):
    torch._check(x.shape[-1] * n == values.shape[1] * m,
                 lambda: f"{name}: x has K={x.shape[-1]} but values {tuple(values.shape)} hold K*{n}/{m}")
    torch._check(x.dtype == values.dtype, lambda: f"{name}: x is {x.dtype}, values {values.dtype}")


@torch.library.custom_op("atv_sparse::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., K) fp16 / bf16; values: (N, K * n / m); bitmask: (N, ceil(K / 8)) uint8 -> (..., N)."""
    from ..kernels.nm_gemm import nm_gemm
    from ..kernels.nm_gemv import nm_gemv

    _check_pattern(n, m, "nm_linear")
    rows = x.reshape(-1, x.shape[-1])
    kernel = nm_gemv if rows.shape[0] <= GEMV_MAX_TOKENS else nm_gemm
    return kernel(rows, values, bitmask, n, m, bias).reshape(*x.shape[:-1], values.shape[0])


@nm_linear.register_fake
def _(x, values, bitmask, n, m, bias=None):
    _check_fake(x, values, n, m, "nm_linear")
    return x.new_empty(*x.shape[:-1], values.shape[0])


@torch.library.custom_op("atv_sparse::nm_gated", mutates_args=())
def nm_gated(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``silu(x Wg^T) * (x Wu^T)`` with W = [Wg; Wu] stacked by rows (the fused gate/up weight).

    x: (..., K) fp16 / bf16; values: (2I, K * n / m); bitmask: (2I, ceil(K / 8)) uint8 -> (..., I).
    Up to ``GEMV_MAX_TOKENS`` tokens one skinny kernel streams both halves in one pass; above, the
    tile GEMM computes both halves and the product is taken in PyTorch.
    """
    from ..kernels.nm_gemm import nm_gemm
    from ..kernels.nm_gemv import nm_gemv

    _check_pattern(n, m, "nm_gated")
    rows = x.reshape(-1, x.shape[-1])
    half = values.shape[0] // 2
    if rows.shape[0] <= GEMV_MAX_TOKENS:
        out = nm_gemv(rows, values[:half], bitmask[:half], n, m, up=(values[half:], bitmask[half:]))
    else:
        both = nm_gemm(rows, values, bitmask, n, m)
        out = F.silu(both[:, :half]) * both[:, half:]
    return out.reshape(*x.shape[:-1], half)


@nm_gated.register_fake
def _(x, values, bitmask, n, m):
    _check_fake(x, values, n, m, "nm_gated")
    torch._check(values.shape[0] % 2 == 0, lambda: f"nm_gated: {values.shape[0]} rows is not gate + up")
    return x.new_empty(*x.shape[:-1], values.shape[0] // 2)
