/*
 * nm_decode.cu: sparse GEMV / skinny GEMM for decode (M = 1..16 tokens), 2:4 and 4:8, fp16 / bf16.
 *
 *     out[t, r] = sum_k x[t, k] * W[r, k]  (+ bias[r])                    plain
 *     out[t, r] = silu(sum_k x[t, k] Wg[r, k]) * (sum_k x[t, k] Wu[r, k])  gated (MLP gate / up)
 *
 * W is read in the checkpoint's layout, unchanged (atv_sparse_cuda.cuh): values (N, K / 2), the
 * kept weights of each row in column order, and bitmask (N, K / 8) uint8, one bit per column.
 * Decode is memory-bound: dense fp16 moves 2 bytes per weight, this layout 0.5 x 2 + 1 / 8 =
 * 1.125, so the kernel's whole job is to stream values and masks once at full bandwidth.
 *
 * Algorithm, per lane:
 *
 *     for each step j of this warp's contiguous slice of K (U = 4 steps at a time, 2 when MT >= 8;
 *     then a tail loop of single steps, the row's last partial step checked per lane):
 *         c    = 32 j + lane                            this lane's chunk: 16 columns, 8 values
 *         v[s] = values[row_s, 8c : 8c + 8]             one 16-byte load per weight stream s
 *         k[s] = bitmask[row_s, 2c : 2c + 2]            its two mask bytes (coalesced 64 B/warp)
 *     (all U x 2 x 2 loads issued before any is used)
 *     for each loaded chunk:
 *         w    = float(v)                                once per row, reused for every token
 *         sel  = lut[k & 0xff], lut[k >> 8]              pick / mix selectors, one 16-byte shared load each
 *         for each token t:
 *             xa, xb = x[t, 16c : 16c + 8], x[t, 16c + 8 : 16c + 16]   two 16-byte loads (L1)
 *             xs     = the 8 activations of kept columns, picked from xa, xb by 3 prmt per pair
 *             acc[s][t] += dot(float(xs), w)             fp32 FMAs
 *     acc -> warp sum (xor shuffles) -> shared red[warp] -> row group's ksplit warps summed in
 *     order -> bias / silu * up -> rounded once to fp16 / bf16 -> out
 *
 * Why these choices:
 * - Each mask byte (8 columns) holds exactly four kept columns for both patterns and owns four
 *   consecutive values, so one decoder and one 256-entry selector table serve 2:4 and 4:8.
 * - Values are loaded lane-interleaved (lane l takes chunk 32 j + l): each warp-wide load is 512
 *   contiguous bytes. The two mask bytes of a chunk are then 2 bytes apart per lane, so the mask
 *   load is a coalesced 64-byte warp load of 2 bytes per lane; a 16-byte mask load per lane would
 *   cover 8 chunks and force either lane-contiguous value loads (32 cache lines per warp
 *   instruction) or a repacked mask, for the same bytes moved.
 * - Activations are read with 16-byte read-only loads straight from global memory: x is at most
 *   16 x K x 2 bytes, every warp of an SM re-reads the same columns, and the weight loads bypass
 *   L1 (no_allocate), so x is served from L1 as a shared-memory copy would be, without K-slicing
 *   for M = 16 (16 x 14336 x 2 bytes exceed shared memory) and without block barriers in the loop.
 * - The kept activations are selected in registers (prmt), never gathered from memory: no bank
 *   conflicts, and a corrupt mask cannot address outside its chunk.
 * - Split-K stays inside a block (the row group's warps, reduced through shared memory): no
 *   workspace, no atomics, deterministic sums, and nothing allocated by the caller.
 *
 * Work partition (kWarps = 4 warps per block; ksplit = 1, 2 or 4 chosen by the launcher from N,
 * K and the SM count; plain: 2 output rows per row group, gated: 1 row, its gate and up weights):
 *
 *              K: chunks of 16 columns, steps of 32 chunks (one per lane)
 *              step 0          step 1          step 2          step 3   ...
 *            +---------------+---------------+---------------+---------------+
 *   block b  | warp 0        | warp 0        | warp 1        | warp 1        |  row group 0:
 *   ksplit=2 |  rows r, r+1  |  rows r, r+1  |               |               |  rows r, r+1
 *            +---------------+---------------+---------------+---------------+
 *            | warp 2        | warp 2        | warp 3        | warp 3        |  row group 1:
 *            |  rows r+2,r+3 |               |               |               |  rows r+2, r+3
 *            +---------------+---------------+---------------+---------------+
 *   block b+1: rows r+4 .. r+7 ...          grid = ceil(N / rows per block), one dimension
 *   within a step: lane l <-> chunk 32 j + l <-> columns 16 (32 j + l) .. + 15
 *
 * Kernel parameters:
 *   a.x           (M, K) activations, fp16 / bf16, row stride a.ldx (multiple of 8 elements),
 *                 16-byte aligned
 *   a.values      (N, K / 2) kept weights, same dtype, row stride a.ldv (multiple of 8), 16-byte
 *                 aligned; the gate's when gated
 *   a.mask        (N, K / 8) uint8 bitmask, row stride a.ldb (even), 2-byte aligned
 *   a.up_values,
 *   a.up_mask     gated only: the up weight, same shapes and strides; null otherwise
 *   a.bias        (N,) or null; plain only
 *   a.out         (M, N) output, row stride a.ldo; written once per element, never read
 *   a.M, a.N, a.K tokens (1..MT), output features, input features (multiple of 16)
 *   ksplit        warps sharing one row group's K (1, 2, 4; divides kWarps)
 * Template parameters:
 *   T             __half or __nv_bfloat16
 *   MT            token tile 1, 2, 4, 8 or 16: acc has 2 x MT fp32 registers; tokens >= a.M skipped
 *   GATED         silu(gate) * up instead of a plain (+ bias) layer
 * Shared memory: lut (256 x 16 B selector table, filled by the block at start) and red (per-warp
 * sums, kWarps x 2 MT floats): at most 4.5 KB, static.
 * Instruction budget at M = 1 (benchmarks/kernel_report.py counts the SASS): per 8 kept values
 * 4 loads (values, mask, two activation loads shared by the two streams), 2 shared loads, 8
 * widenings of values and 8 of activations, 12 prmt and 8 FFMA, about 6 instructions per kept
 * weight in all (the prmt run as written: __byte_perm would mask each selector first).
 * Registers: __launch_bounds__(128, 4) caps them at 128 per thread (at least 16 warps per SM);
 * the CI compile check fails on any spill (-warn-spills, -warn-lmem-usage as errors).
 */
#include "launch.cuh"
#include "nm_common.cuh"

namespace atv {
namespace {

template <typename T, int MT, bool GATED>
__global__ void __launch_bounds__(kThreads, 4) nm_decode_kernel(NmArgs<T> a, int ksplit) {
    constexpr int S = Streams<GATED>::kCount;
    __shared__ uint4 lut[kLutSize];
    __shared__ float red[kWarps][S * MT];

    for (int i = threadIdx.x; i < kLutSize; i += kThreads) lut[i] = byte_selectors(static_cast<uint32_t>(i));
    __syncthreads();

    const Partition part(a.K, ksplit, Streams<GATED>::kRows);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int row0 = part.first_row(blockIdx.x, warp);

    float acc[S][MT];
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        ATV_UNROLL
        for (int t = 0; t < MT; ++t) acc[s][t] = 0.f;
    }
    lane_partials<T, MT, GATED>(a, part, lut, row0, part.slice(warp), lane, acc);

    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        ATV_UNROLL
        for (int t = 0; t < MT; ++t) {
            ATV_UNROLL
            for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
                acc[s][t] += __shfl_xor_sync(0xffffffffu, acc[s][t], offset);
        }
    }
    if (lane == 0) {
        ATV_UNROLL
        for (int s = 0; s < S; ++s) {
            ATV_UNROLL
            for (int t = 0; t < MT; ++t) red[warp][s * MT + t] = acc[s][t];
        }
    }
    __syncthreads();
    if (part.slice(warp) == 0 && lane < S * MT)
        write_output<T, MT, GATED>(a, red, warp, ksplit, row0, lane);
}

template <typename T, bool GATED>
cudaError_t launch(const NmArgs<T>& a, int sms, cudaStream_t stream) {
    const int ksplit = choose_ksplit(a.N, a.K, Streams<GATED>::kRows, sms);
    const Partition part(a.K, ksplit, Streams<GATED>::kRows);
    const dim3 grid((a.N + part.rows_per_block() - 1) / part.rows_per_block());
    switch (token_tile(a.M)) {
        case 1: nm_decode_kernel<T, 1, GATED><<<grid, kThreads, 0, stream>>>(a, ksplit); break;
        case 2: nm_decode_kernel<T, 2, GATED><<<grid, kThreads, 0, stream>>>(a, ksplit); break;
        case 4: nm_decode_kernel<T, 4, GATED><<<grid, kThreads, 0, stream>>>(a, ksplit); break;
        case 8: nm_decode_kernel<T, 8, GATED><<<grid, kThreads, 0, stream>>>(a, ksplit); break;
        default: nm_decode_kernel<T, 16, GATED><<<grid, kThreads, 0, stream>>>(a, ksplit); break;
    }
    return cudaGetLastError();
}

template <typename T>
int run(int device, const NmArgs<T>& a, bool gated, cudaStream_t stream) {
    if (a.M == 0 || a.N == 0) return ATV_OK;
    return run_on_device(device, [&](int sms) {
        return gated ? launch<T, true>(a, sms, stream) : launch<T, false>(a, sms, stream);
    });
}

int dispatch(int device, const void* x, int64_t ldx, const void* values, const void* mask,
             const void* up_values, const void* up_mask, int64_t ldv, int64_t ldb, const void* bias,
             void* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int n, int m, int dtype, bool gated,
             cudaStream_t stream) {
    const int bad = check_args(x, ldx, values, ldv, mask, ldb, up_values, up_mask, gated, bias, out, ldo, M, N,
                               K, n, m, dtype);
    if (bad != ATV_OK) return bad;
    if (dtype == ATV_DTYPE_F16)
        return run(device, make_args<__half>(x, ldx, values, mask, up_values, up_mask, ldv, ldb, bias, out, ldo,
                                              M, N, K), gated, stream);
    return run(device, make_args<__nv_bfloat16>(x, ldx, values, mask, up_values, up_mask, ldv, ldb, bias, out,
                                                 ldo, M, N, K), gated, stream);
}

}  // namespace
}  // namespace atv

extern "C" int atv_nm_linear(int device, const void* x, int64_t ldx, const void* values, int64_t ldv,
                             const void* bitmask, int64_t ldb, const void* bias, void* out, int64_t ldo,
                             int64_t M, int64_t N, int64_t K, int n, int m, int dtype, cudaStream_t stream) {
    return atv::dispatch(device, x, ldx, values, bitmask, nullptr, nullptr, ldv, ldb, bias, out, ldo, M, N, K, n,
                         m, dtype, false, stream);
}

extern "C" int atv_nm_gated(int device, const void* x, int64_t ldx, const void* gate_values,
                            const void* gate_bitmask, const void* up_values, const void* up_bitmask,
                            int64_t ldv, int64_t ldb, void* out, int64_t ldo, int64_t M, int64_t N,
                            int64_t K, int n, int m, int dtype, cudaStream_t stream) {
    return atv::dispatch(device, x, ldx, gate_values, gate_bitmask, up_values, up_bitmask, ldv, ldb, nullptr,
                         out, ldo, M, N, K, n, m, dtype, true, stream);
}
