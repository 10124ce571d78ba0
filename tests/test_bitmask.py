"""Bitmask + values: round trips are bit-exact, bit order is little endian, corruption is refused."""

import zlib

import numpy as np
import pytest
import torch

from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import compress, decompress, pack_bitmask, unpack_bitmask, validate_compressed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 8), (None, None)]
SHAPES = [(13, 72), (33, 136), (7, 27)]  # 27: in not a multiple of 8 (unstructured only)


def random_keep(out, inn, n, m, gen):
    if m is None:
        return torch.rand(out, inn, generator=gen) < 0.45
    scores = torch.rand(out, inn // m, m, generator=gen)
    idx = scores.argsort(-1)[..., :n]
    keep = torch.zeros(out, inn // m, m, dtype=torch.bool)
    keep.scatter_(-1, idx, True)
    return keep.reshape(out, inn)


def cases():
    for dtype in DTYPES:
        for n, m in PATTERNS:
            for shape in SHAPES:
                if m is not None and shape[1] % m:
                    continue
                yield pytest.param(dtype, n, m, shape, id=f"{str(dtype)[6:]}-{n}:{m}-{shape[0]}x{shape[1]}")


@pytest.mark.parametrize("dtype,n,m,shape", list(cases()))
def test_round_trip_bit_exact(dtype, n, m, shape):
    # crc32 of the case, not hash(): str hashes are salted per process, so a failure would not reproduce.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}-{n}:{m}-{shape}".encode()))
    weight = torch.randn(shape, generator=gen).to(dtype)
    keep = random_keep(*shape, n, m, gen)
    if m is None:
        keep[0, :8] = False  # a stretch of a row with nothing kept
    bitmask, values = compress(weight, keep, n, m)
    assert bitmask.dtype == torch.uint8 and bitmask.shape == (shape[0], -(-shape[1] // 8))
    assert values.dtype == dtype
    if m is not None:
        assert values.shape == (shape[0], shape[1] * n // m)
    else:
        assert values.dim() == 1 and values.numel() == int(keep.sum())
    assert torch.equal(unpack_bitmask(bitmask, shape[1]), keep)
    dense = decompress(bitmask, values, shape[1])
    expected = torch.where(keep, weight, torch.zeros((), dtype=dtype))
    assert torch.equal(dense.view(torch.uint8), expected.view(torch.uint8))
    validate_compressed("layer", bitmask, values, shape[0], shape[1], n, m)


def test_bit_order_is_little_endian():
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(5, 29, generator=gen) < 0.5
    ref = np.packbits(keep.numpy(), axis=1, bitorder="little")
    assert np.array_equal(pack_bitmask(keep).numpy(), ref)
    # The worked example of the module docstring.
    row = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert pack_bitmask(row).item() == 0x69


def test_values_are_row_major():
    weight = torch.arange(16, dtype=torch.float32).reshape(2, 8)
    keep = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0], [0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    _, values = compress(weight, keep, 2, 4)
    assert values.tolist() == [[0, 3, 5, 6], [9, 10, 12, 15]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (None, None)], ids=str)
def test_flipped_bit_is_refused(n, m):
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 64, generator=gen)
    bitmask, values = compress(weight, random_keep(16, 64, n, m, gen), n, m)
    bad = bitmask.clone()
    bad[7, 3] ^= 1 << 5
    with pytest.raises(AtvSparseError, match=r"blk\.weight_(bitmask|values)"):
        validate_compressed("blk", bad, values, 16, 64, n, m)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (None, None)], ids=str)
def test_truncated_values_are_refused(n, m):
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(16, 64, generator=gen)
    bitmask, values = compress(weight, random_keep(16, 64, n, m, gen), n, m)
    short = values[:, :-1] if m is not None else values[:-1]
    with pytest.raises(AtvSparseError, match=r"blk\.weight_values"):
        validate_compressed("blk", bitmask, short, 16, 64, n, m)


def test_padding_bits_are_refused():
    keep = torch.rand(4, 27) < 0.5
    bitmask, values = compress(torch.randn(4, 27), keep)
    bad = bitmask.clone()
    bad[2, -1] |= 0x80  # column 31 does not exist
    with pytest.raises(AtvSparseError, match="past column 27"):
        validate_compressed("blk", bad, values, 4, 27, None, None)


def test_wrong_shape_is_refused():
    keep = random_keep(8, 16, 2, 4, torch.Generator().manual_seed(0))
    bitmask, values = compress(torch.randn(8, 16), keep, 2, 4)
    with pytest.raises(AtvSparseError, match=r"blk\.weight_bitmask: expected uint8 \(9, 2\)"):
        validate_compressed("blk", bitmask, values, 9, 16, 2, 4)
