"""Backend dispatch for sparse linear layers (DESIGN.md 7.1).

Only the ``reference`` backend exists today: decompress the bitmask + values to a dense weight and
call ``F.linear``. It is the CPU path and the oracle the GPU backends will be tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError
from ..formats.bitmask import decompress

BACKENDS = ("reference",)


def sparse_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int,
                  bias: torch.Tensor | None = None, backend: str = "reference") -> torch.Tensor:
    """y = x @ W^T + bias with W given compressed.

    x: (..., in) in the values' dtype; bitmask: (out, ceil(in / 8)) uint8; values: kept weights.
    Returns (..., out).
    """
    if backend != "reference":
        raise AtvSparseError(f"backend {backend!r} is not available; choose one of {BACKENDS}")
    return F.linear(x, decompress(bitmask, values, in_features), bias)
