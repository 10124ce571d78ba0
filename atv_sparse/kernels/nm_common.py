"""Pieces shared by the N:M Triton kernels: reading group masks, the epilogue, the shape check."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Token-count buckets the autotuners key on: the dispatcher's buckets (atv_sparse.ops.dispatch),
# so measuring a plan also tunes every kernel configuration later calls use.
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)


def m_bucket(tokens: int) -> int:
    for upper in M_BUCKETS:
        if tokens <= upper:
            return upper
    return M_BUCKETS[-1]


# "1": every Triton kernel launches its DEFAULT_CONFIG instead of autotuning. Tests set it (conftest.py):
# each new (dtype, pattern, BLOCK_M, bias, shape, bucket) key would otherwise compile and time every
# config (18 for the skinny kernel), over a thousand compilations for the kernel tests alone.
ENV_ONE_CONFIG = "ATV_SPARSE_TRITON_ONE_CONFIG"


def interpreting() -> bool:
    """Triton's CPU interpreter (how CI runs the kernels): one config, no tuning."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def one_config() -> bool:
    """Launch the default config without autotuning (the interpreter, or ATV_SPARSE_TRITON_ONE_CONFIG=1)."""
    return interpreting() or os.environ.get(ENV_ONE_CONFIG) == "1"


def launch(kernel, config: "triton.Config", grid, *args, **constexprs) -> None:
    """Run an ``@triton.autotune`` kernel: autotuned, or with ``config`` when ``one_config()``.

    grid: a function of the meta-parameters (the config's block sizes), as for ``kernel[grid]``."""
    if one_config():
        meta = {**constexprs, **config.kwargs}
        kernel.fn[grid(meta)](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        kernel[grid](*args, **constexprs)


@triton.jit
def load_group_masks(mask_ptr, rn, g, stride_bn, valid, GROUP: tl.constexpr):
    """The m-bit mask of group g of rows rn, (len(rn), len(g)) int32: a byte for m = 8, a nibble
    (the first group of a byte in the low nibble) for m = 4."""
    if GROUP == 8:
        bits = tl.load(mask_ptr + rn[:, None] * stride_bn + g[None, :], mask=valid, other=0).to(tl.int32)
    else:
        bits = tl.load(mask_ptr + rn[:, None] * stride_bn + (g // 2)[None, :], mask=valid, other=0).to(tl.int32)
        bits = (bits >> ((g % 2) * 4)[None, :]) & 0xF
    return bits


@triton.jit
def store_output(out_ptr, acc, rm, rn, M, N, stride_om, stride_on, bias_ptr,
                 HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr):
    """out[rm, rn] = acc (+ bias), cast to the output dtype; acc is (len(rm), len(rn))."""
    store_tile(out_ptr, acc, rm[:, None], rn[None, :], M, N, stride_om, stride_on, bias_ptr, HAS_BIAS, OUT_BF16)


@triton.jit
def store_tile(out_ptr, acc, tok, row, M, N, stride_om, stride_on, bias_ptr,
               HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr):
    """out[tok, row] = acc (+ bias[row]) for index tensors tok, row broadcastable to acc's shape.

    Token offsets in 64 bits: tok * stride_om reaches 2^31 at M x N >= 2^31 elements (a 152k-token
    vocabulary lm_head at ~14k tokens), where int32 offsets would wrap and write out of bounds."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row, mask=row < N, other=0.0).to(tl.float32)
    if OUT_BF16:
        # Round to nearest even by hand: Triton's interpreter (how CI runs the kernels) truncates
        # fp32 -> bf16 and ignores fp_downcast_rounding; on a GPU the cast below is then exact.
        bits = acc.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        acc = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + tok.to(tl.int64) * stride_om + row * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(tok < M) & (row < N))


def check_problem(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int) -> None:
    """Shapes and strides the kernels need, with an error naming the sizes."""
    M, K = x.shape
    N, KV = values.shape
    if m not in (4, 8) or K % m or KV != K * n // m or bitmask.shape != (N, -(-K // 8)):
        raise ValueError(f"Problem (M={M}, N={N}, K={K}) not compatible with values {tuple(values.shape)} and "
                         f"bitmask {tuple(bitmask.shape)} for pattern {n}:{m}")
    if values.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("values and bitmask must have unit column stride")
