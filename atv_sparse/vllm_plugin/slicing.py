"""One tensor-parallel shard of an unstructured compressed weight, found through the popcounts.

An unstructured ``weight_values`` is 1-D (the kept weights of every row, row-major), so vLLM
cannot narrow it the way it narrows a 2-D tensor. Given the whole weight's bitmask and values
and the rows and columns a rank keeps (in order), ``slice_compressed`` returns that sub-matrix's
own bitmask and values:

    keep      = unpack(bitmask)                       (out, in) bool
    start[r]  = sum(keep[:r])                         offset of row r's first value
    pos[r, c] = start[r] + cumsum(keep[r])[c] - 1     index in values of kept weight (r, c)
    sub       = keep[rows][:, cols]
    values'   = values[pos[rows][:, cols][sub]]       still row-major: rows and cols ascend

Worked example, 2 x 4 weight, keep = [[1 0 1 0], [0 1 1 1]], values = [a b | c d e]:
columns 2..3 of both rows -> sub = [[1 0], [1 1]], values' = [b d e].
"""

from __future__ import annotations

import torch

from ..formats.bitmask import bitmask_shape, pack_bitmask, unpack_bitmask

ROWS_PER_CHUNK = 1024  # bounds the (rows, in) int64 position table at load time


def slice_compressed(bitmask: torch.Tensor, values: torch.Tensor, in_features: int, rows: torch.Tensor,
                     cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed form of ``W[rows][:, cols]``.

    bitmask: (out, ceil(in_features / 8)) uint8; values: (popcount,) kept weights, row-major;
    rows: (r,) int64 ascending row indices; cols: (c,) int64 ascending column indices.
    Returns (bitmask (r, ceil(c / 8)) uint8, values (kept in the slice,) in values' dtype).
    """
    counts = unpack_bitmask(bitmask, in_features).sum(dim=1)
    starts = counts.cumsum(0) - counts
    masks, pieces = [], []
    for first in range(0, rows.numel(), ROWS_PER_CHUNK):
        chunk = rows[first:first + ROWS_PER_CHUNK]
        keep = unpack_bitmask(bitmask[chunk], in_features)
        pos = starts[chunk, None] + keep.cumsum(dim=1) - 1
        sub = keep[:, cols]
        pieces.append(values[pos[:, cols][sub]])
        masks.append(pack_bitmask(sub))
    if not masks:
        return torch.zeros(bitmask_shape(0, cols.numel()), dtype=torch.uint8), values[:0]
    return torch.cat(masks), torch.cat(pieces)
