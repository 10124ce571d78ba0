"""The Triton kernels' N:M layout: the on-disk values + bitmask, and its decode in PyTorch.

For a pattern n:m with m in {4, 8}, every row of a weight W (out x in) keeps exactly n values per
group of m consecutive columns. The kernels read

- ``values``: (out, in * n / m) fp16 / bf16, the kept weights of each row in column order (the
  checkpoint's ``weight_values``, used as is);
- ``bitmask``: (out, ceil(in / 8)) uint8, bit k of byte c = column 8c + k (the checkpoint's
  ``weight_bitmask``). A group of 8 is one byte; a group of 4 is one nibble (low nibble first);
- ``lut``: (2^m,) int32, ``position_lut(n, m)``: for a group mask with n bits set, the columns
  (within the group) of its kept values, ``log2(m)`` bits each, lowest first.

So kept value v of a row sits in group g = v // n, as the group's r = v % n-th kept value, at
column ``g * m + ((lut[mask_g] >> (r * log2(m))) & (m - 1))``: the index of the r-th set bit of
mask_g, which the kernels compute with bit operations (``nm_gemv.kth_set_bit``); the table here
is the PyTorch twin the tests compare against. Metadata is 1 bit per weight:
2:4 and 4:8 both move 1.125 bytes per weight against dense fp16's 2 (the 1.78x ceiling).

Worked example, one row of 8 columns under 2:4, kept columns 0, 3 | 5, 6::

    W row   = a b c d | e f g h       values = a d f g         (v = 0 1 2 3)
    bitmask = 0b0110_1001 = 0x69      group 0 = low nibble 0x9, group 1 = high nibble 0x6
    lut[0x9] = 0 | 3 << 2 = 0b1100    v=1: g=0, r=1 -> (0b1100 >> 2) & 3 = 3 -> column 3 (d)
    lut[0x6] = 1 | 2 << 2 = 0b1001    v=2: g=1, r=0 -> 1 -> column 4 + 1 = 5 (f)

The same row under 4:8 is one group, mask 0x69, lut[0x69] = 0 | 3<<3 | 5<<6 | 6<<9.
"""

from __future__ import annotations

import functools

import torch

SUPPORTED_GROUPS = (4, 8)


@functools.lru_cache(maxsize=None)
def _position_table(n: int, m: int) -> tuple[int, ...]:
    bits = m.bit_length() - 1
    table = []
    for mask in range(1 << m):
        cols = [c for c in range(m) if mask >> c & 1]
        entry = 0
        if len(cols) == n:
            for r, c in enumerate(cols):
                entry |= c << (r * bits)
        table.append(entry)
    return tuple(table)


def position_lut(n: int, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2^m,) int32: kept columns of each n-of-m group mask (0 for masks without exactly n bits)."""
    # callers check the pattern first (atv_sparse.ops.triton_ops, naming the op): here it is an invariant
    assert m in SUPPORTED_GROUPS and 0 < n < m, f"the Triton layout supports n:m with m in {SUPPORTED_GROUPS} and " \
                                                f"0 < n < m, got {n}:{m}"
    return torch.tensor(_position_table(n, m), dtype=torch.int32, device=device)


def group_masks(bitmask: torch.Tensor, in_features: int, m: int) -> torch.Tensor:
    """bitmask (out, ceil(in / 8)) uint8 -> (out, in / m) int64, one m-bit mask per group."""
    b = bitmask.to(torch.int64)
    if m == 8:
        return b[:, : in_features // 8]
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, : in_features // 4]


def kept_columns(bitmask: torch.Tensor, in_features: int, n: int, m: int) -> torch.Tensor:
    """(out, in * n / m) int64: the column of every kept value, decoded the way the kernels do."""
    lut = position_lut(n, m, bitmask.device).to(torch.int64)
    masks = group_masks(bitmask, in_features, m)  # (out, groups)
    bits = m.bit_length() - 1
    ranks = torch.arange(n, device=bitmask.device)
    pos = (lut[masks][..., None] >> (ranks * bits)) & (m - 1)  # (out, groups, n)
    cols = torch.arange(0, in_features, m, device=bitmask.device)[None, :, None] + pos
    return cols.reshape(bitmask.shape[0], -1)


def unpack(values: torch.Tensor, bitmask: torch.Tensor, in_features: int, n: int, m: int) -> torch.Tensor:
    """The dense (out, in) weight the kernels compute with, from values + bitmask via the table."""
    dense = torch.zeros(values.shape[0], in_features, dtype=values.dtype, device=values.device)
    dense.scatter_(1, kept_columns(bitmask, in_features, n, m), values)
    return dense
