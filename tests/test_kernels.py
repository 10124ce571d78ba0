"""Triton N:M kernel (interpreted on a CPU, native on CUDA) against a float64 reference of the masked
dense matmul: error at most 2x plain PyTorch's at the same precision; outputs poisoned first."""

import zlib

import pytest
import torch

from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import compress, decompress
from atv_sparse.kernels.nm_layout import kept_columns, position_lut, unpack
from atv_sparse.nn import SparseLinear
from atv_sparse.ops import sparse_linear
from atv_sparse.patterns import parse_pattern

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 8)]
TOKENS = [1, 3, 16, 33]
SHAPES = [(40, 136), (17, 264)]  # odd N, K a multiple of 8 but not of the tiles


def nm_keep(out, inn, n, m, gen):
    idx = torch.rand(out, inn // m, m, generator=gen).argsort(-1)[..., :n]
    keep = torch.zeros(out, inn // m, m, dtype=torch.bool)
    keep.scatter_(-1, idx, True)
    return keep.reshape(out, inn)


@pytest.mark.parametrize("n,m", PATTERNS, ids=str)
def test_layout_unpack_exact(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    for out, inn in SHAPES + [(5, 12 if m == 4 else 16)]:
        w = torch.randn(out, inn, generator=gen).half()
        keep = nm_keep(out, inn, n, m, gen)
        bitmask, values = compress(w, keep, n, m)
        assert torch.equal(unpack(values, bitmask, inn, n, m), decompress(bitmask, values, inn))
        assert torch.equal(kept_columns(bitmask, inn, n, m), keep.nonzero()[:, 1].reshape(out, -1))


def test_position_lut_worked_example():
    assert position_lut(2, 4)[0x9].item() == 0b1100 and position_lut(2, 4)[0x6].item() == 0b1001
    assert position_lut(4, 8)[0x69].item() == 0 | 3 << 3 | 5 << 6 | 6 << 9
    assert position_lut(2, 4)[0x7].item() == 0  # not a 2-of-4 mask


def kernel(name):
    from atv_sparse.kernels.nm_gemm import nm_gemm
    from atv_sparse.kernels.nm_gemv import nm_gemv

    return {"gemv": nm_gemv, "gemm": nm_gemm}[name]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"M{t}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m", PATTERNS, ids=str)
@pytest.mark.parametrize("which", ["gemv", "gemm"])
def test_triton_kernel_error_bound(which, n, m, dtype, tokens, bias):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{n}:{m}-{dtype}-{tokens}-{bias}".encode()))
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen).to(dtype)
        bitmask, values = compress(w, nm_keep(out_f, in_f, n, m, gen), n, m)
        x = torch.randn(tokens, in_f, generator=gen).to(dtype)
        b = torch.randn(out_f, generator=gen).to(dtype) if bias else None
        dense = decompress(bitmask, values, in_f)
        ref = x.double() @ dense.double().T + (b.double() if bias else 0)
        plain = torch.nn.functional.linear(x, dense, b)
        out = torch.full((tokens, out_f), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
        kernel(which)(x.to(DEVICE), values.to(DEVICE), bitmask.to(DEVICE), n, m, None if b is None else b.to(DEVICE),
                out=out)
        assert torch.isfinite(out).all()
        kernel_err = (out.cpu().double() - ref).abs().max().item()
        torch_err = (plain.double() - ref).abs().max().item()
        assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


def test_sparse_linear_backends_and_errors():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=gen).half()
    keep = nm_keep(24, 64, 2, 4, gen)
    bitmask, values = compress(w, keep, 2, 4)
    x = torch.randn(2, 5, 64, generator=gen).half()
    ref = sparse_linear(x, bitmask, values, 64, backend="reference", n=2, m=4)
    big = torch.randn(70, 64, generator=gen).half()  # > 64 tokens: the tl.dot GEMM
    big_tri = sparse_linear(big.to(DEVICE), bitmask.to(DEVICE), values.to(DEVICE), 64, backend="triton", n=2, m=4)
    big_ref = big.double() @ decompress(bitmask, values, 64).double().T
    big_plain = sparse_linear(big, bitmask, values, 64, backend="reference", n=2, m=4)
    assert (big_tri.cpu().double() - big_ref).abs().max() <= 2 * (big_plain.double() - big_ref).abs().max()
    auto = sparse_linear(x, bitmask, values, 64, backend="auto", n=2, m=4)
    if DEVICE == "cpu":
        assert torch.equal(auto, ref)  # auto is the reference backend on a CPU
    tri = sparse_linear(x.to(DEVICE), bitmask.to(DEVICE), values.to(DEVICE), 64, backend="triton", n=2, m=4)
    assert tri.shape == (2, 5, 24)
    exact = x.double() @ decompress(bitmask, values, 64).double().T
    assert (tri.cpu().double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max()
    with pytest.raises(AtvSparseError, match="float32"):
        sparse_linear(x.float(), bitmask, values.float(), 64, backend="triton", n=2, m=4)
    with pytest.raises(AtvSparseError, match="unstructured"):
        sparse_linear(x, bitmask, values.reshape(-1), 64, backend="triton")
    with pytest.raises(AtvSparseError, match="not one of"):
        sparse_linear(x, bitmask, values, 64, backend="cusparselt-v9", n=2, m=4)
    with pytest.raises(AtvSparseError, match=r"atv_sparse::nm_linear: the Triton kernels run .* got n=3, m=7"):
        torch.ops.atv_sparse.nm_linear(x, values, bitmask, 3, 7)


def test_sparse_linear_module_on_triton_matches_reference_within_bound():
    lin = torch.nn.Linear(64, 40, bias=True).half()
    keep = nm_keep(40, 64, 4, 8, torch.Generator().manual_seed(1))
    lin.weight.data[~keep] = 0
    module = SparseLinear.from_dense(lin, keep, parse_pattern("4:8"))
    x = torch.randn(3, 64).half()
    ref = module(x)  # auto -> reference on a CPU
    module.backend = "triton"
    out = module.to(DEVICE)(x.to(DEVICE)).cpu()
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max()
    assert "backend=triton" in repr(module)


def test_custom_op_opcheck():
    from atv_sparse.ops import nm_linear

    gen = torch.Generator().manual_seed(2)
    bitmask, values = compress(torch.randn(16, 32, generator=gen).half(), nm_keep(16, 32, 2, 4, gen), 2, 4)
    x = torch.randn(3, 32, generator=gen).half()
    torch.library.opcheck(nm_linear, (x.to(DEVICE), values.to(DEVICE), bitmask.to(DEVICE), 2, 4, None))


@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"M{t}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)], ids=str)
def test_fused_gate_up_error_bound(n, m, dtype, tokens):
    from atv_sparse.kernels.nm_gemv import nm_gemv

    gen = torch.Generator().manual_seed(zlib.crc32(f"{n}:{m}-{dtype}-{tokens}-gated".encode()))
    out_f, in_f = 40, 136
    gate, up = (compress(torch.randn(out_f, in_f, generator=gen).to(dtype), nm_keep(out_f, in_f, n, m, gen), n, m)
                for _ in range(2))
    x = torch.randn(tokens, in_f, generator=gen).to(dtype)
    wg, wu = decompress(*gate, in_f), decompress(*up, in_f)
    g64, u64 = x.double() @ wg.double().T, x.double() @ wu.double().T
    ref = torch.nn.functional.silu(g64) * u64
    plain = torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu)
    out = torch.full((tokens, out_f), float("nan"), dtype=dtype, device=DEVICE)
    nm_gemv(x.to(DEVICE), gate[1].to(DEVICE), gate[0].to(DEVICE), n, m, out=out,
            up=(up[1].to(DEVICE), up[0].to(DEVICE)))
    kernel_err = (out.cpu().double() - ref).abs().max().item()
    torch_err = (plain.double() - ref).abs().max().item()
    assert torch.isfinite(out).all() and kernel_err <= 2 * torch_err, (kernel_err, torch_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning times configs on a GPU")
@pytest.mark.parametrize("which,tokens", [("gemv", 1), ("gemv", 16), ("gemm", 70)], ids=str)
def test_autotuned_launch_on_gpu(monkeypatch, which, tokens):
    """The rest of the suite runs one config (ATV_SPARSE_TRITON_ONE_CONFIG=1, conftest.py); these few
    shapes go through @triton.autotune and every config it may pick (compiled and timed)."""
    monkeypatch.delenv("ATV_SPARSE_TRITON_ONE_CONFIG", raising=False)
    gen = torch.Generator().manual_seed(tokens)
    out_f, in_f = 272, 512
    bitmask, values = compress(torch.randn(out_f, in_f, generator=gen).half(), nm_keep(out_f, in_f, 2, 4, gen), 2, 4)
    x = torch.randn(tokens, in_f, generator=gen).half()
    dense = decompress(bitmask, values, in_f)
    ref = x.double() @ dense.double().T
    plain = torch.nn.functional.linear(x, dense)
    out = torch.full((tokens, out_f), float("nan"), dtype=torch.float16, device="cuda")
    kernel(which)(x.cuda(), values.cuda(), bitmask.cuda(), 2, 4, out=out)
    assert torch.isfinite(out).all()
    assert (out.cpu().double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max()
