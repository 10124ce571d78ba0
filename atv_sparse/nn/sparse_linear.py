"""``SparseLinear``: a drop-in for ``nn.Linear`` whose weight is stored as bitmask + values."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.bitmask import compress, decompress, expected_values_shape, validate_compressed
from ..ops import sparse_linear
from ..patterns import Pattern


class SparseLinear(nn.Module):
    """A linear layer with a pruned weight kept compressed (DESIGN.md 6).

    Buffers (their names are the checkpoint keys):
    - ``weight_bitmask``: (out, ceil(in / 8)) uint8, bit k of byte c = column 8c + k, 1 = kept;
    - ``weight_values``: kept weights in row-major order, (out, in * n / m) for N:M, 1-D otherwise.
    ``bias``: optional (out,) parameter, as in ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, pattern: Pattern, bias: bool = False,
                 num_values: int | None = None, device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.pattern = pattern
        self.backend = backend
        values_shape = expected_values_shape(out_features, in_features, pattern.n, pattern.m)
        if values_shape is None:
            if num_values is None:
                raise ValueError("an unstructured SparseLinear needs num_values (the number of kept weights)")
            values_shape = (num_values,)
        self.register_buffer("weight_bitmask", torch.empty(out_features, -(-in_features // 8),
                                                           dtype=torch.uint8, device=device))
        self.register_buffer("weight_values", torch.empty(values_shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, keep: torch.Tensor, pattern: Pattern) -> "SparseLinear":
        """Compress ``linear`` (its weight already pruned) with keep-mask ``keep`` (out, in) bool."""
        bitmask, values = compress(linear.weight.data, keep, pattern.n, pattern.m)
        module = cls(linear.in_features, linear.out_features, pattern, bias=linear.bias is not None,
                     num_values=values.numel(), device=values.device, dtype=values.dtype)
        module.weight_bitmask.copy_(bitmask)
        module.weight_values.copy_(values)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    def validate(self, name: str) -> None:
        """Raise ``AtvSparseError`` naming ``name`` if the stored tensors are inconsistent."""
        validate_compressed(name, self.weight_bitmask, self.weight_values, self.out_features,
                            self.in_features, self.pattern.n, self.pattern.m)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (out, in) tensor with zeros where pruned."""
        return decompress(self.weight_bitmask, self.weight_values, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight_bitmask, self.weight_values, self.in_features, self.bias,
                             backend=self.backend, n=self.pattern.n, m=self.pattern.m)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"bias={self.bias is not None}, backend={self.backend}")
