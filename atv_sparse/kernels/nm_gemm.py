"""N:M sparse GEMM for larger token counts: weight tiles decompressed in registers, then ``tl.dot``.

The path for 4:8 at medium and large M (no 4:8 tensor-core instruction exists) and the fallback
for 2:4 where cuSPARSELt is missing. Same layout as ``nm_gemv`` (``nm_layout.py``):

    for each (BLOCK_M tokens x BLOCK_N rows) output tile:
        acc = 0                                             (fp32, tl.dot's accumulator)
        for each BLOCK_K slice of input columns k:
            g, p  = k // m, k % m                           group and place within it
            mask  = bitmask byte (m = 8) or nibble (m = 4) of group g
            kept  = (mask >> p) & 1
            rank  = popcount(mask & ((1 << p) - 1))         kept values before p in the group
            W     = kept ? values[rows, g * n + rank] : 0   (BLOCK_N, BLOCK_K), in registers
            acc  += x[tokens, k] @ W^T
        out = acc (+ bias)

Arguments: as ``nm_gemv``'s (x_ptr (M, K), values_ptr (N, K n / m), mask_ptr (N, ceil(K / 8)),
bias_ptr, out_ptr (M, N), their strides), plus K and the tile sizes BLOCK_M, BLOCK_N, BLOCK_K
(each >= 16 for tl.dot) chosen by @triton.autotune, keyed on the token bucket M_BUCKET and (N, K). DOT_FP32 upcasts the tiles before tl.dot: set only for bf16 under
Triton's interpreter, whose bf16 tl.dot returns garbage (GPUs use the native bf16 dot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nm_common import check_problem, interpreting, launch, load_group_masks, m_bucket, store_output


@triton.jit
def _popcount8(v):
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


# The config tests and the interpreter launch (nm_common.one_config).
DEFAULT_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the usual fp16 tensor-core tiles, small M first.
    # Not (64, 128, 32, 4, 3) nor (128, 256, 32, 8, 3): with the in-register decompression they
    # spill (40-352 bytes of stack on sm_80, up to 104 on sm_90a; kernel-report.md).
    shapes = [(16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 32, 4, 4), (128, 64, 32, 4, 3),
              (128, 128, 32, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _nm_gemm_kernel(
    x_ptr, values_ptr, mask_ptr, bias_ptr, out_ptr,
    M, N, K, KV, M_BUCKET,
    stride_xm, stride_xk, stride_vn, stride_bn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, DOT_FP32: tl.constexpr, NKEEP: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        nk = (rn[:, None] < N) & (rk[None, :] < K)
        g = rk // GROUP
        p = rk % GROUP
        bits = load_group_masks(mask_ptr, rn, g, stride_bn, nk, GROUP)
        kept = ((bits >> p[None, :]) & 1) != 0
        rank = _popcount8(bits & ((1 << p[None, :]) - 1))
        w = tl.load(values_ptr + rn[:, None] * stride_vn + g[None, :] * NKEEP + rank, mask=nk & kept, other=0.0)
        xt = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if DOT_FP32:
            xt, w = xt.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(xt, tl.trans(w))
    store_output(out_ptr, acc, rm, rn, M, N, stride_om, stride_on, bias_ptr, HAS_BIAS, OUT_BF16)


def nm_gemm(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int,
            bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (M, K) fp16 / bf16; values: (N, K * n / m); bitmask: (N, ceil(K / 8)) uint8 -> (M, N)."""
    check_problem(x, values, bitmask, n, m)
    (M, K), (N, KV) = x.shape, values.shape
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))

    launch(_nm_gemm_kernel, DEFAULT_CONFIG, grid,
           x, values, bitmask, bias if bias is not None else values, out,
           M, N, K, KV, m_bucket(M),
           x.stride(0), x.stride(1), values.stride(0), bitmask.stride(0), out.stride(0), out.stride(1),
           HAS_BIAS=bias is not None, OUT_BF16=out.dtype == torch.bfloat16,
           DOT_FP32=x.dtype == torch.bfloat16 and interpreting(), NKEEP=n, GROUP=m)
    return out
