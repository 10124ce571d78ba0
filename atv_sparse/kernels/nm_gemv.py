"""Skinny N:M sparse GEMM for decode (few tokens): ``out = x @ W^T + bias``, W given as n:m values
plus bitmask (the layout of ``nm_layout.py``), streamed once. With GATED, a second weight U (the
MLP's up projection, W being the gate) is streamed alongside and the kernel returns
``silu(x @ W^T) * (x @ U^T)``, the LLaMA / Qwen2 MLP's first half, in one pass.

Memory-bound at small M: an H100 at the 1.78x ceiling must retire about 13 kept weights per cycle
per SM against 32 load/store lanes, so the inner loop must issue at most one load instruction per
kept weight. For the patterns that keep half of each group (2:4, 4:8) it works on *units* of 8
consecutive kept values of a row, which cover 16 consecutive columns (4 groups of 4, or 2 of 8):

    rows r = (token, weight row) pairs of the tile       (BLOCK_M * BLOCK_N "virtual rows")
    for each chunk of BLOCK_V kept values per row (BLOCK_V / 8 units):
        vals  = values[row, unit * 8 + 0..7]            one 16-byte load per unit
        xa,xb = x[token, unit * 16 + 0..7], [+ 8..15]   two 16-byte loads (the unit's 16 columns)
        mask  = bitmask[row, unit * 2 + 0..1]           one 2-byte load (16 bits, one per column)
        split each into its 8 (or 16, 2) elements       register renaming, no data movement
        per group: the column of each kept value is a set bit of the group's mask; pick x among
        the candidate columns with selects (lowest set bit first: bit operations, no table)
        acc[r, unit] += sum of vals * picked x          fp32 (fp16 sums over K lose accuracy)
    out[token, row] = sum over units of acc (+ bias)

So a thread issues 4 loads per 8 kept weights per token (0.5 per kept weight at M = 1), against
2.75 for a gather of x per kept value with a position table (kernel-report.md). Tokens are folded
into the rows (each token re-reads the weight tile, from L1): the loads per kept weight per token
stay 0.5 at any BLOCK_M, and the registers per thread are set by the tile (``_prune``).

Other n:4 / n:8 patterns (1:4, 3:4, 1:8, ...) take the generic path: x gathered per kept value,
the column of value v (group g = v // n, rank r = v % n) decoded as the r-th set bit of the group
mask.

Arguments (pointers / sizes / strides / meta-parameters):
    x_ptr       (M, K) activations, fp16 / bf16, strides (stride_xm, stride_xk)
    values_ptr  (N, KV) kept weights, KV = K * NKEEP / GROUP, row stride stride_vn, unit column stride
    mask_ptr    (N, ceil(K / 8)) uint8 bitmask, row stride stride_bn
    up_values_ptr, up_mask_ptr   the second weight when GATED (same shapes and strides), else unused
    bias_ptr    (N,) or unused when HAS_BIAS is False
    out_ptr     (M, N) output in x's dtype, strides (stride_om, stride_on)
    M, N, KV    tokens, output features, kept values per row
    GATED       silu(first) * second instead of first (no bias then)
    HAS_BIAS    add bias_ptr; OUT_BF16: round the fp32 accumulator to bf16 explicitly (nm_common.store_tile)
    NKEEP, GROUP  n and m of the pattern
    BLOCK_M, BLOCK_N, BLOCK_V  tile sizes: BLOCK_M = min(16, next_pow2(M)) from the host, BLOCK_N and
                BLOCK_V (a multiple of 8) and warps from @triton.autotune, keyed on the token bucket
                M_BUCKET and (N, KV)

Autotuning runs on the first call of each key (token bucket, N, KV): warm every bucket before
capturing a CUDA graph (``atv_sparse.ops.autotune`` measures every bucket at load; latency.py and
llama_decode run each shape once before capture), or set ATV_SPARSE_TRITON_ONE_CONFIG=1.

Parallelism at decode comes from many narrow row tiles (BLOCK_N down to 8 rows: 512 programs for
N = 4096), not from split-K, which would need a zeroed fp32 workspace (an extra allocation).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .nm_common import check_problem, launch, load_group_masks, m_bucket, store_tile

UNIT = 8  # kept values per unit: one 16-byte load of fp16 / bf16 values


@triton.jit
def kth_set_bit(bits, k, NKEEP: tl.constexpr):
    """Index (0..7) of the k-th (0-based) set bit of each 8-bit mask in ``bits``; k < NKEEP."""
    for i in tl.static_range(NKEEP - 1):
        bits = tl.where(k > i, bits & (bits - 1), bits)  # clear the lowest set bit, k times
    low = bits & -bits  # the lowest remaining set bit, a power of two: its log2 bit by bit
    return ((low & 0xAA) != 0).to(tl.int32) + 2 * ((low & 0xCC) != 0).to(tl.int32) + 4 * ((low & 0xF0) != 0).to(tl.int32)


@triton.jit
def _split8(t, R: tl.constexpr, U: tl.constexpr):
    """(R, U, 8) -> its 8 slices along the last axis, (R, U) each, in order (in-register splits)."""
    a, b = tl.split(tl.reshape(t, (R, U, 4, 2)))            # a: 0 2 4 6, b: 1 3 5 7
    a0, a1 = tl.split(tl.reshape(a, (R, U, 2, 2)))          # a0: 0 4, a1: 2 6
    b0, b1 = tl.split(tl.reshape(b, (R, U, 2, 2)))          # b0: 1 5, b1: 3 7
    t0, t4 = tl.split(a0)
    t2, t6 = tl.split(a1)
    t1, t5 = tl.split(b0)
    t3, t7 = tl.split(b1)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _group24(nib, v0, v1, x0, x1, x2, x3):
    """One 2:4 group: v0 * x[first set bit of nib] + v1 * x[second]; (R, U) fp32."""
    low = nib & -nib  # 1, 2 or 4: the first kept column
    high = nib ^ low  # 2, 4 or 8: the second
    first = tl.where(low == 1, x0, tl.where(low == 2, x1, x2))
    second = tl.where(high == 8, x3, tl.where(high == 4, x2, x1))
    return v0.to(tl.float32) * first.to(tl.float32) + v1.to(tl.float32) * second.to(tl.float32)


@triton.jit
def _pick5(low, base: tl.constexpr, c0, c1, c2, c3, c4):
    """c_i where low == 1 << (base + i): the k-th of 4 kept columns of 8 lies in k..k+4."""
    return tl.where(low == (1 << base), c0, tl.where(low == (2 << base), c1, tl.where(
        low == (4 << base), c2, tl.where(low == (8 << base), c3, c4))))


@triton.jit
def _group48(byte, v0, v1, v2, v3, x0, x1, x2, x3, x4, x5, x6, x7):
    """One 4:8 group: sum_k v_k * x[k-th set bit of byte]; (R, U) fp32."""
    l0 = byte & -byte
    rest = byte ^ l0
    l1 = rest & -rest
    rest = rest ^ l1
    l2 = rest & -rest
    l3 = rest ^ l2
    acc = v0.to(tl.float32) * _pick5(l0, 0, x0, x1, x2, x3, x4).to(tl.float32)
    acc += v1.to(tl.float32) * _pick5(l1, 1, x1, x2, x3, x4, x5).to(tl.float32)
    acc += v2.to(tl.float32) * _pick5(l2, 2, x2, x3, x4, x5, x6).to(tl.float32)
    acc += v3.to(tl.float32) * _pick5(l3, 3, x3, x4, x5, x6, x7).to(tl.float32)
    return acc


@triton.jit
def _unit_sum(vals, mask_bytes, xa, xb, R: tl.constexpr, U: tl.constexpr, GROUP: tl.constexpr):
    """sum over each unit's 8 kept values of value * x at its column: (R, U) fp32.

    vals (R, U, 8) kept values; mask_bytes (R, U, 2) the unit's 16 mask bits; xa, xb (R, U, 8)
    x at the unit's columns 0..7 and 8..15."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _split8(vals, R, U)
    a0, a1, a2, a3, a4, a5, a6, a7 = _split8(xa, R, U)
    b0, b1, b2, b3, b4, b5, b6, b7 = _split8(xb, R, U)
    m0, m1 = tl.split(mask_bytes.to(tl.int32))
    if GROUP == 4:  # groups: columns 0-3 | 4-7 (xa) | 8-11 | 12-15 (xb); nibbles low first
        acc = _group24(m0 & 0xF, v0, v1, a0, a1, a2, a3)
        acc += _group24(m0 >> 4, v2, v3, a4, a5, a6, a7)
        acc += _group24(m1 & 0xF, v4, v5, b0, b1, b2, b3)
        acc += _group24(m1 >> 4, v6, v7, b4, b5, b6, b7)
    else:  # groups: columns 0-7 (xa) | 8-15 (xb), one byte each
        acc = _group48(m0, v0, v1, v2, v3, a0, a1, a2, a3, a4, a5, a6, a7)
        acc += _group48(m1, v4, v5, v6, v7, b0, b1, b2, b3, b4, b5, b6, b7)
    return acc


@triton.jit
def _unit_chunk(x_ptr, values_ptr, mask_ptr, tok, row, v0, KV, M, N, stride_xm, stride_xk, stride_vn, stride_bn,
                R: tl.constexpr, U: tl.constexpr, GROUP: tl.constexpr):
    """One chunk of U units per virtual row (half-keeping patterns): (R, U) fp32 partial sums."""
    unit = v0 // 8 + tl.arange(0, U)                                    # unit index along the row
    j = tl.arange(0, 8)
    kept = unit[None, :, None] * 8 + j[None, None, :]                   # (1, U, 8) kept-value index
    ok_row = (row < N)[:, None, None]
    vals = tl.load(values_ptr + row[:, None, None] * stride_vn + kept, mask=ok_row & (kept < KV), other=0.0)
    col = unit[None, :, None] * 16 + j[None, None, :]                   # the unit's first 8 columns
    x_rows = x_ptr + tok.to(tl.int64)[:, None, None] * stride_xm
    ok_x = (tok < M)[:, None, None]
    xa = tl.load(x_rows + col * stride_xk, mask=ok_x & (col < 2 * KV), other=0.0)
    xb = tl.load(x_rows + (col + 8) * stride_xk, mask=ok_x & (col + 8 < 2 * KV), other=0.0)
    byte = unit[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]      # (1, U, 2) mask bytes of the unit
    mask_bytes = tl.load(mask_ptr + row[:, None, None] * stride_bn + byte,
                         mask=ok_row & (byte * 8 < 2 * KV), other=0)
    return _unit_sum(vals, mask_bytes, xa, xb, R, U, GROUP)


@triton.jit
def _gather_chunk(x_ptr, values_ptr, mask_ptr, tok, row, v0, KV, M, N, stride_xm, stride_xk, stride_vn, stride_bn,
                  NKEEP: tl.constexpr, GROUP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One chunk of BLOCK_V kept values per virtual row, x gathered per value (any n:4 / n:8): (R,) fp32."""
    rv = v0 + tl.arange(0, BLOCK_V)
    nv = (row < N)[:, None] & (rv[None, :] < KV)
    vals = tl.load(values_ptr + row[:, None] * stride_vn + rv[None, :], mask=nv, other=0.0)
    g = rv // NKEEP
    bits = load_group_masks(mask_ptr, row, g, stride_bn, nv, GROUP)
    col = g[None, :] * GROUP + kth_set_bit(bits, (rv % NKEEP)[None, :], NKEEP)
    xg = tl.load(x_ptr + tok.to(tl.int64)[:, None] * stride_xm + col * stride_xk, mask=(tok < M)[:, None] & nv,
                 other=0.0)
    return tl.sum(xg.to(tl.float32) * vals.to(tl.float32), axis=1)


def _per_thread(block_m: int, config) -> float:
    """Elements of the (BLOCK_M * BLOCK_N, BLOCK_V) tile each thread holds."""
    return block_m * config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_V"] / (32 * config.num_warps)


def _configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w)
            for bn in (4, 8, 16, 32) for bv in (8, 16, 32, 64, 128, 256) for w in (4, 8)]


def _prune(configs, named_args, **kwargs):
    """Keep tiles where each thread holds whole units (>= 8 elements: below that a unit is split
    across threads and the pieces go through shared memory, 5-30 loads per kept weight) and few
    enough not to spill: 16 elements (two units), 8 for gated 4:8, whose 16 spill 24 bytes
    (kernel-report.md)."""
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    gated = kwargs.get("GATED", named_args.get("GATED", False))
    group = kwargs.get("GROUP", named_args.get("GROUP", 4))
    most = 8 if gated and group == 8 else 16
    kept = [c for c in configs if 8 <= _per_thread(block_m, c) <= most]
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def default_config(block_m: int, gated: bool, group: int):
    """The config tests and the interpreter launch (nm_common.one_config): one autotune may pick for
    this token tile, so one-config runs use the layouts a GPU runs; the widest row tile, so the
    interpreter (which runs programs one by one) runs few programs."""
    configs = _prune(_configs(), {}, BLOCK_M=block_m, GATED=gated, GROUP=group)
    return max(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], -c.num_warps))


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
    R: tl.constexpr = BLOCK_M * BLOCK_N  # virtual rows: (token, weight row) pairs
    U: tl.constexpr = BLOCK_V // 8
    r = tl.arange(0, R)
    tok = tl.program_id(1) * BLOCK_M + r // BLOCK_N
    row = tl.program_id(0) * BLOCK_N + r % BLOCK_N
    if 2 * NKEEP == GROUP:  # 2:4, 4:8: units of 8 kept values, x picked in registers
        acc = tl.zeros((R, U), dtype=tl.float32)
        acc_up = tl.zeros((R, U), dtype=tl.float32)
        for v0 in range(0, KV, BLOCK_V):
            acc += _unit_chunk(x_ptr, values_ptr, mask_ptr, tok, row, v0, KV, M, N, stride_xm, stride_xk, stride_vn,
                               stride_bn, R, U, GROUP)
            if GATED:
                acc_up += _unit_chunk(x_ptr, up_values_ptr, up_mask_ptr, tok, row, v0, KV, M, N, stride_xm, stride_xk,
                                      stride_vn, stride_bn, R, U, GROUP)
        out = tl.sum(acc, axis=1)
        out_up = tl.sum(acc_up, axis=1)
    else:
        out = tl.zeros((R,), dtype=tl.float32)
        out_up = tl.zeros((R,), dtype=tl.float32)
        for v0 in range(0, KV, BLOCK_V):
            out += _gather_chunk(x_ptr, values_ptr, mask_ptr, tok, row, v0, KV, M, N, stride_xm, stride_xk,
                                 stride_vn, stride_bn, NKEEP, GROUP, BLOCK_V)
            if GATED:
                out_up += _gather_chunk(x_ptr, up_values_ptr, up_mask_ptr, tok, row, v0, KV, M, N, stride_xm,
                                        stride_xk, stride_vn, stride_bn, NKEEP, GROUP, BLOCK_V)
    if GATED:
        out = out / (1.0 + tl.exp(-out)) * out_up
    store_tile(out_ptr, out, tok, row, M, N, stride_om, stride_on, bias_ptr, HAS_BIAS, OUT_BF16)


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

    launch(_nm_gemv_kernel, default_config(block_m, up is not None, m), grid,
           x, values, bitmask, up_values, up_mask, bias if bias is not None else values, out,
           M, N, KV, m_bucket(M),
           x.stride(0), x.stride(1), values.stride(0), bitmask.stride(0), out.stride(0), out.stride(1),
           GATED=up is not None, HAS_BIAS=bias is not None, OUT_BF16=out.dtype == torch.bfloat16, NKEEP=n,
           GROUP=m, BLOCK_M=block_m)
    return out
