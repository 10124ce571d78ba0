"""Skinny N:M sparse GEMM for decode (few tokens): ``out = x @ W^T + bias``, W given as n:m values
plus bitmask (the layout of ``nm_layout.py``), streamed once, activations gathered. With GATED,
a second weight U (the MLP's up projection, W being the gate) is streamed alongside and the
kernel returns ``silu(x @ W^T) * (x @ U^T)``, the LLaMA / Qwen2 MLP's first half, in one pass.

Memory-bound at small M, so the kernel reads each kept value and its metadata exactly once:

    for each tile of BLOCK_N output rows (and BLOCK_M tokens):
        acc = 0                                            (fp32: fp16 products summed over K
        for each chunk of BLOCK_V kept values per row:      lose accuracy in fp16)
            vals  = values[rows, chunk]                    (BLOCK_N, BLOCK_V)
            g, r  = chunk // n, chunk % n                  group and rank of each kept value
            mask  = bitmask byte (m = 8) or nibble (m = 4) of group g
            col   = g * m + (index of the r-th set bit of mask)      bit operations, no table
            acc  += sum_v x[tokens, col] * vals            gather, (BLOCK_M, BLOCK_N, BLOCK_V)
        out[tokens, rows] = acc (+ bias)

Arguments (pointers / sizes / strides / meta-parameters):
    x_ptr       (M, K) activations, fp16 / bf16, strides (stride_xm, stride_xk)
    values_ptr  (N, KV) kept weights, KV = K * NKEEP / GROUP, row stride stride_vn, unit column stride
    mask_ptr    (N, ceil(K / 8)) uint8 bitmask, row stride stride_bn
    up_values_ptr, up_mask_ptr   the second weight when GATED (same shapes and strides), else unused
    bias_ptr    (N,) or unused when HAS_BIAS is False
    out_ptr     (M, N) output in x's dtype, strides (stride_om, stride_on)
    M, N, KV    tokens, output features, kept values per row
    GATED       silu(first) * second instead of first (no bias then)
    HAS_BIAS    add bias_ptr; OUT_BF16: round the fp32 accumulator to bf16 explicitly (nm_common.store_output)
    NKEEP, GROUP  n and m of the pattern
    BLOCK_M, BLOCK_N, BLOCK_V  tile sizes: BLOCK_M = min(16, next_pow2(M)) from the host, BLOCK_N and
                BLOCK_V (and warps) from @triton.autotune, keyed on the token bucket M_BUCKET and (N, KV)

Positions are decoded with bit operations (clear the r lowest set bits, then the index of the
lowest remaining one) rather than looked up in a table: no table load per value and no table to
copy to the device on a first call (which CUDA-graph capture would forbid).

Autotuning runs on the first call of each key (token bucket, N, KV): warm every bucket before
capturing a CUDA graph (``atv_sparse.nn.autotune`` measures every bucket at load; latency.py and
llama_decode run each shape once before capture), or set ATV_SPARSE_TRITON_ONE_CONFIG=1.

Parallelism at decode comes from many narrow row tiles (BLOCK_N down to 8 rows: 512 programs for
N = 4096), not from split-K, which would need a zeroed fp32 workspace (an extra allocation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nm_common import check_problem, launch, load_group_masks, m_bucket, store_output


@triton.jit
def kth_set_bit(bits, k, NKEEP: tl.constexpr):
    """Index (0..7) of the k-th (0-based) set bit of each 8-bit mask in ``bits``; k < NKEEP."""
    for i in tl.static_range(NKEEP - 1):
        bits = tl.where(k > i, bits & (bits - 1), bits)  # clear the lowest set bit, k times
    low = bits & -bits  # the lowest remaining set bit, a power of two: its log2 bit by bit
    return ((low & 0xAA) != 0).to(tl.int32) + 2 * ((low & 0xCC) != 0).to(tl.int32) + 4 * ((low & 0xF0) != 0).to(tl.int32)


@triton.jit
def _nm_chunk(x_ptr, values_ptr, mask_ptr, rm, rn, rv, nv, M, stride_xm, stride_xk, stride_vn, stride_bn,
              NKEEP: tl.constexpr, GROUP: tl.constexpr):
    """sum over one chunk of kept values of x[tokens, col] * value: (BLOCK_M, BLOCK_N) fp32."""
    vals = tl.load(values_ptr + rn[:, None] * stride_vn + rv[None, :], mask=nv, other=0.0)
    g = rv // NKEEP
    r = rv % NKEEP
    bits = load_group_masks(mask_ptr, rn, g, stride_bn, nv, GROUP)
    col = g[None, :] * GROUP + kth_set_bit(bits, r[None, :], NKEEP)
    xg = tl.load(x_ptr + rm.to(tl.int64)[:, None, None] * stride_xm + col[None, :, :] * stride_xk,
                 mask=(rm[:, None, None] < M) & nv[None, :, :], other=0.0)
    return tl.sum(xg.to(tl.float32) * vals[None, :, :].to(tl.float32), axis=2)


# The config tests and the interpreter launch (nm_common.one_config): within the spill limit of
# _prune at BLOCK_M = 16, so the same config serves every token count.
DEFAULT_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_V": 64}, num_warps=4)


def _configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w)
            for bn in (8, 16, 32) for bv in (64, 128, 256) for w in (4, 8)]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose (BLOCK_M, BLOCK_N, BLOCK_V) gather would spill registers (> 16K fp32)."""
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    kept = [c for c in configs if block_m * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] <= 16384]
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "KV"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _nm_gemv_kernel(
    x_ptr, values_ptr, mask_ptr, up_values_ptr, up_mask_ptr, bias_ptr, out_ptr,
    M, N, KV, M_BUCKET,
    stride_xm, stride_xk, stride_vn, stride_bn, stride_om, stride_on,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
    NKEEP: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for v0 in range(0, KV, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        nv = (rn[:, None] < N) & (rv[None, :] < KV)
        acc += _nm_chunk(x_ptr, values_ptr, mask_ptr, rm, rn, rv, nv, M, stride_xm, stride_xk,
                         stride_vn, stride_bn, NKEEP, GROUP)
        if GATED:
            acc_up += _nm_chunk(x_ptr, up_values_ptr, up_mask_ptr, rm, rn, rv, nv, M, stride_xm,
                                stride_xk, stride_vn, stride_bn, NKEEP, GROUP)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    store_output(out_ptr, acc, rm, rn, M, N, stride_om, stride_on, bias_ptr, HAS_BIAS, OUT_BF16)


def nm_gemv(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int,
            bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
            up: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: (M, K) fp16 / bf16; values: (N, K * n / m) same dtype; bitmask: (N, ceil(K / 8)) uint8.
    up: optional (values, bitmask) of a second weight of the same shape: then the result is
    ``silu(x W^T) * (x U^T)`` (bias must be None). Returns (M, N) in x's dtype (into ``out`` if given)."""
    check_problem(x, values, bitmask, n, m)
    M, N, KV = x.shape[0], values.shape[0], values.shape[1]
    if up is not None and (up[0].shape != values.shape or up[1].shape != bitmask.shape
                           or up[0].stride() != values.stride() or up[1].stride() != bitmask.stride()
                           or bias is not None):
        raise ValueError("the up weight must match the gate weight's shapes and strides, with no bias")
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    up_values, up_mask = up if up is not None else (values, bitmask)
    block_m = min(16, triton.next_power_of_2(M))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))

    launch(_nm_gemv_kernel, DEFAULT_CONFIG, grid,
           x, values, bitmask, up_values, up_mask, bias if bias is not None else values, out,
           M, N, KV, m_bucket(M),
           x.stride(0), x.stride(1), values.stride(0), bitmask.stride(0), out.stride(0), out.stride(1),
           GATED=up is not None, HAS_BIAS=bias is not None, OUT_BF16=out.dtype == torch.bfloat16, NKEEP=n,
           GROUP=m, BLOCK_M=block_m)
    return out
