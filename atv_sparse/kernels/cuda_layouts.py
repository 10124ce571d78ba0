"""Load-time runtime layouts of the CUDA kernels that do not read the checkpoint's pair as stored.

``sp24_layout`` builds what ``csrc/sp24_decode.cu`` (2:4 on the sparse tensor cores, mma.sp
m16n8k32) reads: the kept values reordered into the instruction's A-fragment order and the
bitmask turned into its 2-bit metadata, once per layer when a model is loaded, never per call.
The checkpoint format does not change. Fragment order (PTX ISA, sparse mma.m16n8k32 .f16/.bf16;
``csrc/sp24_common.cuh`` has the full table): lane l = 4g + q of a warp holds, for a row tile of
16 rows and a k-block of 32 columns,

    a0 = row g, group q      a1 = row g + 8, group q      (group j = columns 4j .. 4j + 3)
    a2 = row g, group q + 4  a3 = row g + 8, group q + 4  (each: the group's two kept values)

and lanes 4g + h (h = 0, 1) hand the instruction the metadata of groups 4h .. 4h + 3: nibble j of
the low half for row g, of the high half for row g + 8; a nibble is i0 | i1 << 2, the positions
of the two kept columns within the group, i0 < i1.

Worked example: a tile whose row 0 keeps columns 1, 3 of group 0 (values v1, v3) and row 8
keeps columns 0, 2 of group 0 (values w0, w2):

    frag_values[t, b, lane 0, 0:2] = v1 v3     (a0)
    frag_values[t, b, lane 0, 2:4] = w0 w2     (a1)
    frag_meta[t, b, 0] & 0xF          = 1 | 3 << 2 = 0xD   (row 0, group 0)
    frag_meta[t, b, 0] >> 16 & 0xF    = 0 | 2 << 2 = 0x8   (row 8, group 0)
"""

from __future__ import annotations

import torch

from ..errors import AtvSparseError

TILE_ROWS = 16
BLOCK_COLS = 32
PAD_NIBBLE = 0b0100  # positions 0, 1: the metadata of a padding group (its values are zero)


def _nibble_table() -> list[int]:
    """Metadata nibble i0 | i1 << 2 of each 4-bit group mask with two bits set; 255 for the others."""
    table = []
    for mask in range(16):
        kept = [p for p in range(4) if mask >> p & 1]
        table.append(kept[0] | kept[1] << 2 if len(kept) == 2 else 255)
    return table


def _group_nibbles(name: str, bitmask: torch.Tensor) -> torch.Tensor:
    """(N, K / 4) uint8 metadata nibbles of a 2:4 bitmask (N, K / 8) uint8 (one byte per group)."""
    rows = bitmask.shape[0]
    groups = torch.stack([bitmask & 0xF, bitmask >> 4], dim=-1).reshape(rows, -1)   # low nibble first
    table = torch.tensor(_nibble_table(), dtype=torch.uint8, device=bitmask.device)
    nibbles = table.index_select(0, groups.reshape(-1).int()).reshape(groups.shape)
    if bool((nibbles == 255).any()):
        row, group = (nibbles == 255).nonzero()[0].tolist()
        kept = bin(int(groups[row, group])).count("1")
        raise AtvSparseError(f"{name}: bitmask group {group} of row {row} keeps {kept} of 4 columns; the sparse "
                             f"tensor-core layout needs exactly 2 (2:4)")
    return nibbles


def sp24_layout(values: torch.Tensor, bitmask: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse tensor-core layout of a 2:4 weight.

    values: (N, K / 2) fp16 / bf16, the checkpoint's kept values; bitmask: (N, K / 8) uint8;
    K a multiple of 32. Returns ``frag_values`` (ceil(N / 16), K / 32, 32, 8), same dtype, and
    ``frag_meta`` (ceil(N / 16), K / 32, 16) int32 (the kernel reads the bits as uint32), both
    contiguous on the device of ``values``. Rows past N are zero values with metadata 0b0100.
    Raises AtvSparseError naming ``name`` on shapes it cannot lay out or a mask that is not 2:4.
    """
    if values.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.uint8:
        raise AtvSparseError(f"{name}: expected values (N, K/2) and a uint8 bitmask (N, K/8), got "
                             f"{tuple(values.shape)} {values.dtype} and {tuple(bitmask.shape)} {bitmask.dtype}")
    rows, in_features = bitmask.shape[0], bitmask.shape[1] * 8
    if values.shape != (rows, in_features // 2):
        raise AtvSparseError(f"{name}: values {tuple(values.shape)} do not hold 2 of every 4 columns of a bitmask "
                             f"{tuple(bitmask.shape)} ({rows}, {in_features // 2} expected)")
    if in_features % BLOCK_COLS:
        raise AtvSparseError(f"{name}: in_features {in_features} is not a multiple of {BLOCK_COLS} (one mma.sp "
                             f"k-block)")
    nibbles = _group_nibbles(name, bitmask.to(values.device))
    tiles, kblocks = -(-rows // TILE_ROWS), in_features // BLOCK_COLS
    pad = tiles * TILE_ROWS - rows
    vals = torch.cat([values, values.new_zeros(pad, values.shape[1])]) if pad else values
    nibbles = torch.cat([nibbles, nibbles.new_full((pad, nibbles.shape[1]), PAD_NIBBLE)]) if pad else nibbles

    # values: row = 16 t + 8 h8 + g, kept value 16 b + 2 (4 jh + q) + e  ->  [t, b, g, q, jh, h8, e]
    v = vals.reshape(tiles, 2, 8, kblocks, 2, 4, 2)                            # t h8 g b jh q e
    frag_values = v.permute(0, 3, 2, 5, 4, 1, 6).reshape(tiles, kblocks, 32, 8).contiguous()

    # metadata: group 8 b + 4 h + j of row 16 t + 8 h8 + g -> bits 16 h8 + 4 j of word [t, b, 2 g + h]
    nib = nibbles.reshape(tiles, 2, 8, kblocks, 2, 4)                          # t h8 g b h j
    words = torch.zeros(tiles, 8, kblocks, 2, dtype=torch.int32, device=nib.device)
    for h8 in range(2):
        for j in range(4):  # int32 shifts wrap: bit 31 lands as the sign bit, as the kernel reads it
            words |= nib[:, h8, :, :, :, j].to(torch.int32) << (16 * h8 + 4 * j)
    frag_meta = words.permute(0, 2, 1, 3).reshape(tiles, kblocks, 16).contiguous()
    return frag_values, frag_meta


def pack_sp24(values: torch.Tensor, bitmask: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """``sp24_layout`` as one flat uint8 tensor (frag_values' bytes, then frag_meta's), so a layer
    keeps its tensor-core layout in one buffer; ``split_sp24`` takes it apart without copying."""
    frag_values, frag_meta = sp24_layout(values, bitmask, name)
    return torch.cat([frag_values.reshape(-1).view(torch.uint8), frag_meta.reshape(-1).view(torch.uint8)])


def split_sp24(packed: torch.Tensor, dtype: torch.dtype, out_features: int,
               in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frag_values, frag_meta) views of a ``pack_sp24`` buffer of an (out_features, in_features) weight."""
    tiles, kblocks = -(-out_features // TILE_ROWS), in_features // BLOCK_COLS
    nbytes = tiles * kblocks * 32 * 8 * 2
    frag_values = packed[:nbytes].view(dtype).view(tiles, kblocks, 32, 8)
    frag_meta = packed[nbytes:].view(torch.int32).view(tiles, kblocks, 16)
    return frag_values, frag_meta
