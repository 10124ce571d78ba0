"""Bitmask + values: the on-disk form of one pruned weight (docs/design.md 6).

For a weight W (out, in) and its keep-mask:
- ``bitmask``: uint8 (out, ceil(in / 8)); bit k of byte c is column 8c + k (little endian),
  1 = kept, padding bits past ``in`` are 0.
- ``values``: the kept entries in row-major order, in W's dtype; (out, in * n / m) for N:M
  (every row keeps the same count), 1-D for unstructured.

Worked example, one row of 8 columns kept at columns 0, 3, 5, 6 (2:4 since each half keeps 2)::

    keep   = 1 0 0 1 | 0 1 1 0      -> byte = 0b0110_1001 = 0x69
    W row  = a b c d | e f g h      -> values row = a d f g
"""

from __future__ import annotations

import torch

from ..errors import AtvSparseError

# The checkpoint names of a pruned module P's two tensors: P.weight_bitmask and P.weight_values.
BITMASK_SUFFIX = ".weight_bitmask"
VALUES_SUFFIX = ".weight_values"


def bitmask_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of ``weight_bitmask``: (out, ceil(in / 8)), one bit per column, 8 columns a byte."""
    return out_features, -(-in_features // 8)


def values_shape(out_features: int, in_features: int, n: int | None, m: int | None) -> tuple[int, int] | None:
    """Shape of ``weight_values`` for N:M, (out, in * n / m); ``None`` for unstructured (1-D, length = popcount)."""
    return None if m is None else (out_features, in_features * n // m)


def packed_nbytes(out_features: int, in_features: int, kept: int, element_size: int) -> int:
    """Bytes of ``weight_bitmask`` + ``weight_values`` for one pruned linear keeping ``kept`` weights."""
    rows, width = bitmask_shape(out_features, in_features)
    return rows * width + kept * element_size


def _bit_shifts(device: torch.device) -> torch.Tensor:
    """(8,) uint8 0..7 made on ``device`` by a fill kernel: a constant tensor kept on the CPU and
    copied over per call would be a host-to-device copy, which CUDA-graph capture forbids."""
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """keep: (out, in) bool -> bitmask: (out, ceil(in / 8)) uint8, little-endian bits."""
    out_features, in_features = keep.shape
    rows, width = bitmask_shape(out_features, in_features)
    padded = torch.zeros(rows, width * 8, dtype=torch.uint8, device=keep.device)
    padded[:, :in_features] = keep
    bits = padded.reshape(out_features, -1, 8) << _bit_shifts(keep.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """bitmask: (out, ceil(in / 8)) uint8 -> keep: (out, in) bool."""
    bits = (bitmask.unsqueeze(-1) >> _bit_shifts(bitmask.device)) & 1
    return (bits != 0).reshape(bitmask.shape[0], -1)[:, :in_features]


def compress(weight: torch.Tensor, keep: torch.Tensor, n: int | None = None,
             m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: (out, in), keep: (out, in) bool -> (bitmask, values); values 2-D for N:M."""
    values = weight[keep]
    if m is not None:
        values = values.reshape(weight.shape[0], weight.shape[1] * n // m)
    return pack_bitmask(keep), values


def decompress(bitmask: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """(bitmask, values) -> dense weight (out, in) in the values' dtype, zeros where pruned.

    A gather by running popcount rather than boolean-mask assignment: no data-dependent shape, so
    no host sync, and CUDA graphs can capture it (the reference backend runs this per call)."""
    keep = unpack_bitmask(bitmask, in_features)
    if values.numel() == 0:
        return torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    position = (keep.reshape(-1).cumsum(0) - 1).clamp_(min=0)
    gathered = values.reshape(-1)[position].view(keep.shape)
    return torch.where(keep, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


def validate_compressed(name: str, bitmask: torch.Tensor, values: torch.Tensor, out_features: int,
                        in_features: int, n: int | None, m: int | None) -> None:
    """Refuse a corrupt pair with a message naming the tensor.

    Checks dtypes and shapes, zero padding bits, every N:M group holding exactly N ones, and the
    popcount equal to the number of values.
    """
    mask_name, values_name = name + BITMASK_SUFFIX, name + VALUES_SUFFIX
    hint = "the checkpoint is corrupt or truncated; re-run atv_sparse.convert"
    expected = bitmask_shape(out_features, in_features)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != expected:
        raise AtvSparseError(f"{mask_name}: expected uint8 {expected}, found {bitmask.dtype} "
                             f"{tuple(bitmask.shape)}; {hint}")
    if not values.is_floating_point():
        raise AtvSparseError(f"{values_name}: expected a float tensor, found {values.dtype}; {hint}")
    keep = unpack_bitmask(bitmask, expected[1] * 8)
    if in_features % 8 and keep[:, in_features:].any():
        raise AtvSparseError(f"{mask_name}: bits set past column {in_features}; {hint}")
    keep = keep[:, :in_features]
    if m is not None:
        want = values_shape(out_features, in_features, n, m)
        if tuple(values.shape) != want:
            raise AtvSparseError(f"{values_name}: expected shape {want} for pattern {n}:{m}, found "
                                 f"{tuple(values.shape)}; {hint}")
        per_group = keep.reshape(out_features, in_features // m, m).sum(-1)
        bad = (per_group != n).nonzero()
        if len(bad):
            row, group = bad[0].tolist()
            raise AtvSparseError(f"{mask_name}: row {row}, columns {group * m}..{group * m + m - 1} keep "
                                 f"{per_group[row, group].item()} weights, pattern {n}:{m} needs {n}; {hint}")
    else:
        if values.dim() != 1:
            raise AtvSparseError(f"{values_name}: expected a 1-D tensor for an unstructured pattern, "
                                 f"found shape {tuple(values.shape)}; {hint}")
        kept = int(keep.sum())
        if kept != values.numel():
            raise AtvSparseError(f"{values_name}: holds {values.numel()} values but {mask_name} keeps {kept}; {hint}")
