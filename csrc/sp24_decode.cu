/*
 * sp24_decode.cu: 2:4 decode and skinny GEMM (M = 1..16 tokens) on the sparse tensor cores,
 * fp16 / bf16, from the load-time fragment layout of sp24_common.cuh.
 *
 *     out[t, r] = sum_k x[t, k] * W[r, k]  (+ bias[r])                    plain
 *     out[t, r] = silu(sum_k x[t, k] Wg[r, k]) * (sum_k x[t, k] Wu[r, k])  gated (MLP gate / up)
 *
 * Algorithm, per warp (one row tile of 16 rows, its slice of the k-blocks):
 *
 *     for each k-block b of the warp's contiguous slice (U at a time: loads first, then mmas):
 *         a[s] = frag_values[tile, b, lane]       one 16-byte load per weight stream s
 *         e[s] = frag_meta[tile, b, 2g + q % 2]   one 4-byte load
 *         b[n] = x[token 8n + g, 32b + 2q + 8r]   four 4-byte loads per token tile (from L1)
 *         acc[s][n] = mma.sp(a[s], b[n], e[s], acc[s][n])   256 kept weights x 8 tokens each
 *     acc -> shared red[warp] -> the row group's ksplit warps summed in order -> bias / silu * up
 *     -> rounded once -> out
 *
 * Instruction budget at M = 1 (what benchmarks/kernel_report.py counts): per k-block a lane
 * issues 1 + 1 + 4 loads and 1 HMMA.SP for 8 kept weights (256 per warp), plus the loop's address
 * arithmetic: about 1 instruction per kept weight, against ~12 for the CUDA-core kernel
 * (nm_decode.cu), whose selection in registers costs more than its loads.
 *
 * Work partition: as nm_decode.cu, with a row tile of 16 rows in place of 2 rows: a block of
 * kWarps = 4 warps holds 4 / ksplit row groups; ksplit (1, 2, 4) from the tile count, K and the
 * SM count; grid = ceil(tiles / row groups per block).
 *
 * Template parameters: T (__half / __nv_bfloat16), NT (token tiles of 8: 1 for M <= 8, else 2),
 * GATED (two weight streams, gate and up, sharing the activation loads).
 * Shared memory: red, kWarps x streams x 16 x 16 floats (8 KB gated). Registers: capped at 128
 * by __launch_bounds__(128, 4); the CI compile check fails on any spill.
 */
#include <type_traits>

#include "launch.cuh"
#include "sp24_common.cuh"

namespace atv {
namespace sp24 {
namespace {

// One m16n8k32 mma.sp, fp32 accumulators in place. PTX_TYPE, A's and B's type ("f16" / "bf16"), is all
// that differs between the two element types.
#define ATV_MMA_SP(PTX_TYPE)                                                                                \
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." PTX_TYPE "." PTX_TYPE        \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;" \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e))

template <typename T>
__device__ __forceinline__ void mma_sp(const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e, float (&c)[4]) {
    static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16 only");
    if constexpr (std::is_same<T, __half>::value)
        ATV_MMA_SP("f16");
    else
        ATV_MMA_SP("bf16");
}
#undef ATV_MMA_SP

template <typename T, int S, int NT>
__device__ __forceinline__ void mma_step(const Frag<S, NT>& f, float (&acc)[S][NT][4]) {
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        ATV_UNROLL
        for (int nt = 0; nt < NT; ++nt) mma_sp<T>(f.a[s], f.b[nt], f.e[s], acc[s][nt]);
    }
}

template <typename T, int NT, bool GATED>
__global__ void __launch_bounds__(kThreads, 4) sp24_decode_kernel(Args<T> a, int ksplit) {
    constexpr int S = GATED ? 2 : 1;
    constexpr int U = Unroll<S, NT>::kSteps;
    __shared__ float red[kWarps][S][kTileRows][2 * kTokens];

    const int kblocks = a.kblocks();
    const TilePartition part(ksplit, kblocks);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int tile = part.tile(blockIdx.x, warp);
    float acc[S][NT][4] = {};
    if (tile < a.tiles()) {  // warp-uniform: every lane of a warp takes the same branch
        LaneStreams<T, S, NT> p = lane_streams<T, S, NT>(a, tile, part.first(warp), lane);
        int left = part.count(warp, kblocks);
        for (; left >= U; left -= U) {
            Frag<S, NT> f[U];
            ATV_UNROLL
            for (int u = 0; u < U; ++u) load_frag(p, u, f[u]);
            ATV_UNROLL
            for (int u = 0; u < U; ++u) mma_step<T>(f[u], acc);
            advance(p, U);
        }
        for (; left > 0; --left) {
            Frag<S, NT> f;
            load_frag(p, 0, f);
            mma_step<T>(f, acc);
            advance(p, 1);
        }
    }
    store_partials<S, NT>(acc, lane, red[warp]);
    __syncthreads();
    if (part.slice(warp) == 0 && tile < a.tiles()) {
        for (int idx = lane; idx < kTileRows * a.M; idx += kWarpSize)
            write_tile_output<T, S>(a, red, warp, ksplit, tile, idx);
    }
}

template <typename T, bool GATED>
cudaError_t launch(const Args<T>& a, int sms, cudaStream_t stream) {
    const int ksplit = choose_ksplit_for(a.tiles(), a.kblocks(), sms);
    const TilePartition part(ksplit, a.kblocks());
    const dim3 grid((a.tiles() + part.groups - 1) / part.groups);
    if (token_tiles(a.M) == 1)
        sp24_decode_kernel<T, 1, GATED><<<grid, kThreads, 0, stream>>>(a, ksplit);
    else
        sp24_decode_kernel<T, 2, GATED><<<grid, kThreads, 0, stream>>>(a, ksplit);
    return cudaGetLastError();
}

template <typename T>
int run(int device, const Args<T>& a, bool gated, cudaStream_t stream) {
    if (a.M == 0 || a.N == 0) return ATV_OK;
    return run_on_device(device, [&](int sms) {
        return gated ? launch<T, true>(a, sms, stream) : launch<T, false>(a, sms, stream);
    });
}

int dispatch(int device, const void* x, int64_t ldx, const void* fv, const void* fm, const void* up_fv,
             const void* up_fm, const void* bias, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int dtype,
             bool gated, cudaStream_t stream) {
    const int bad = check_args(x, ldx, fv, fm, up_fv, up_fm, gated, bias, out, ldo, M, N, K, dtype);
    if (bad != ATV_OK) return bad;
    if (dtype == ATV_DTYPE_F16)
        return run(device, make_args<__half>(x, ldx, fv, fm, up_fv, up_fm, bias, out, ldo, M, N, K), gated, stream);
    return run(device, make_args<__nv_bfloat16>(x, ldx, fv, fm, up_fv, up_fm, bias, out, ldo, M, N, K), gated,
               stream);
}

}  // namespace
}  // namespace sp24
}  // namespace atv

extern "C" int atv_sp24_linear(int device, const void* x, int64_t ldx, const void* frag_values,
                               const void* frag_meta, const void* bias, void* out, int64_t ldo, int64_t M,
                               int64_t N, int64_t K, int dtype, cudaStream_t stream) {
    return atv::sp24::dispatch(device, x, ldx, frag_values, frag_meta, nullptr, nullptr, bias, out, ldo, M, N, K,
                               dtype, false, stream);
}

extern "C" int atv_sp24_gated(int device, const void* x, int64_t ldx, const void* gate_frag_values,
                              const void* gate_frag_meta, const void* up_frag_values, const void* up_frag_meta,
                              void* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int dtype,
                              cudaStream_t stream) {
    return atv::sp24::dispatch(device, x, ldx, gate_frag_values, gate_frag_meta, up_frag_values, up_frag_meta,
                               nullptr, out, ldo, M, N, K, dtype, true, stream);
}
