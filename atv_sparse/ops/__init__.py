"""Backend dispatch for sparse linear layers (DESIGN.md 7.1).

- ``reference``: decompress the bitmask + values to a dense weight and call ``F.linear``; any
  device, dtype and pattern; the oracle in tests.
- ``triton``: the N:M kernels of ``atv_sparse.kernels`` (m in {4, 8}, fp16 / bf16): ``nm_gemv``
  up to 64 tokens, ``nm_gemm`` (tiles decompressed in registers, ``tl.dot``) above, registered as
  the custom op ``atv_sparse::nm_linear`` (with a fake implementation, so
  ``torch.compile`` traces it). Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
- ``auto``: on CUDA, ``triton`` for up to 64 tokens where it applies; otherwise ``reference``
  (on a CPU always ``reference``: the interpreter is for tests, not speed).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError
from ..formats.bitmask import decompress

BACKENDS = ("auto", "triton", "reference")
TRITON_MAX_TOKENS = 64


@torch.library.custom_op("atv_sparse::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., K) fp16 / bf16; values: (N, K * n / m); bitmask: (N, ceil(K / 8)) uint8 -> (..., N)."""
    from ..kernels.nm_gemm import nm_gemm
    from ..kernels.nm_gemv import nm_gemv

    rows = x.reshape(-1, x.shape[-1])
    kernel = nm_gemv if rows.shape[0] <= TRITON_MAX_TOKENS else nm_gemm
    return kernel(rows, values, bitmask, n, m, bias).reshape(*x.shape[:-1], values.shape[0])


@nm_linear.register_fake
def _(x, values, bitmask, n, m, bias=None):
    torch._check(x.shape[-1] * n == values.shape[1] * m,
                 lambda: f"nm_linear: x has K={x.shape[-1]} but values {tuple(values.shape)} hold K*{n}/{m}")
    torch._check(x.dtype == values.dtype, lambda: f"nm_linear: x is {x.dtype}, values {values.dtype}")
    return x.new_empty(*x.shape[:-1], values.shape[0])


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA, and on the CPU only in Triton's interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def triton_applies(x: torch.Tensor, values: torch.Tensor, n: int | None, m: int | None) -> str | None:
    """None when the triton backend can run this call, else why not."""
    if m not in (4, 8):
        return f"pattern {n}:{m} (the kernel handles n:4 and n:8)" if m else "an unstructured pattern"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} activations (the kernel takes float16 / bfloat16)"
    if not triton_available(x.device):
        return f"device {x.device} (Triton runs on CUDA, or on the CPU with TRITON_INTERPRET=1)"
    return None


def sparse_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                  bias: torch.Tensor | None = None, backend: str = "auto", n: int | None = None,
                  m: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W compressed (pattern n:m, or unstructured when m is None).

    x: (..., in) in the values' dtype; bitmask: (out, ceil(in / 8)) uint8; values: kept weights.
    Returns (..., out).
    """
    if backend not in BACKENDS:
        raise AtvSparseError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "reference":
        why_not = triton_applies(x, values, n, m)
        if backend == "triton" and why_not:
            raise AtvSparseError(f"backend 'triton' cannot run {why_not}; available here: reference"
                                 + (", triton" if triton_available(x.device) else ""))
        tokens = x.numel() // max(x.shape[-1], 1)
        if why_not is None and (backend == "triton" or (x.device.type == "cuda" and tokens <= TRITON_MAX_TOKENS)):
            return nm_linear(x.to(values.device), values, bitmask, n, m, bias)
    return F.linear(x, decompress(bitmask, values, in_features), bias)
