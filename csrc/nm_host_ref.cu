/*
 * nm_host_ref.cu: host twins of atv_nm_linear / atv_nm_gated (declared in atv_sparse_cuda.cuh).
 *
 * They run the kernel's own code from nm_common.cuh (argument checks, partition, lane_partials
 * with its unrolled load / decode / select / FMA steps, write_output) over host memory, one lane
 * after another, and replace only what needs a GPU: the selector table is filled on the host, and
 * the warp's shuffle reduction becomes a plain sum over the 32 lanes. So a CPU-only machine tests
 * everything but the shuffles, the shared memory and the launch itself; GPU tests cover those.
 *
 *   for block in grid, warp in block, lane in warp:
 *       lane_partials(...) -> acc[s][t]           (same function the kernel runs)
 *       red[warp][s * MT + t] += acc[s][t]          (the kernel: xor-shuffle sum)
 *   for each row group's first warp, idx < 2 MT:
 *       write_output(...)                          (same function the kernel runs)
 */
#include "nm_common.cuh"

namespace atv {
namespace {

template <typename T, int MT, bool GATED>
void run_host_tile(const NmArgs<T>& a, int ksplit) {
    constexpr int S = Streams<GATED>::kCount;
    uint2 lut[kLutSize];
    for (int i = 0; i < kLutSize; ++i) lut[i] = byte_selectors(static_cast<uint32_t>(i));
    const Partition part(a.K, ksplit, Streams<GATED>::kRows);
    const int blocks = (a.N + part.rows_per_block() - 1) / part.rows_per_block();
    for (int block = 0; block < blocks; ++block) {
        float red[kWarps][S * MT] = {};
        for (int warp = 0; warp < kWarps; ++warp) {
            const int row0 = part.first_row(block, warp);
            for (int lane = 0; lane < kWarpSize; ++lane) {
                float acc[S][MT] = {};
                lane_partials<T, MT, GATED>(a, part, lut, row0, part.slice(warp), lane, acc);
                for (int s = 0; s < S; ++s)
                    for (int t = 0; t < MT; ++t) red[warp][s * MT + t] += acc[s][t];
            }
        }
        for (int warp = 0; warp < kWarps; warp += ksplit)
            for (int idx = 0; idx < S * MT; ++idx)
                write_output<T, MT, GATED>(a, red, warp, ksplit, part.first_row(block, warp), idx);
    }
}

template <typename T, bool GATED>
void run_host(const NmArgs<T>& a, int ksplit) {
    switch (token_tile(a.M)) {
        case 1: run_host_tile<T, 1, GATED>(a, ksplit); break;
        case 2: run_host_tile<T, 2, GATED>(a, ksplit); break;
        case 4: run_host_tile<T, 4, GATED>(a, ksplit); break;
        case 8: run_host_tile<T, 8, GATED>(a, ksplit); break;
        default: run_host_tile<T, 16, GATED>(a, ksplit); break;
    }
}

template <typename T>
void run_host_typed(const void* x, int64_t ldx, const void* values, const void* mask, const void* up_values,
                    const void* up_mask, int64_t ldv, int64_t ldb, const void* bias, void* out, int64_t ldo,
                    int64_t M, int64_t N, int64_t K, bool gated, int ksplit) {
    NmArgs<T> a;
    a.x = static_cast<const T*>(x);
    a.values = static_cast<const T*>(values);
    a.mask = static_cast<const uint8_t*>(mask);
    a.up_values = static_cast<const T*>(up_values);
    a.up_mask = static_cast<const uint8_t*>(up_mask);
    a.bias = static_cast<const T*>(bias);
    a.out = static_cast<T*>(out);
    a.ldx = ldx;
    a.ldv = ldv;
    a.ldb = ldb;
    a.ldo = ldo;
    a.M = static_cast<int>(M);
    a.N = static_cast<int>(N);
    a.K = static_cast<int>(K);
    const int rows = gated ? Streams<true>::kRows : Streams<false>::kRows;
    if (ksplit == 0) ksplit = choose_ksplit(a.N, a.K, rows, 132);
    if (gated)
        run_host<T, true>(a, ksplit);
    else
        run_host<T, false>(a, ksplit);
}

int host_dispatch(const void* x, int64_t ldx, const void* values, const void* mask, const void* up_values,
                  const void* up_mask, int64_t ldv, int64_t ldb, const void* bias, void* out, int64_t ldo,
                  int64_t M, int64_t N, int64_t K, int n, int m, int dtype, bool gated, int ksplit) {
    const int bad = check_args(x, ldx, values, ldv, mask, ldb, up_values, up_mask, gated, bias, out, ldo, M, N,
                               K, n, m, dtype);
    if (bad != ATV_OK) return bad;
    if (ksplit != 0 && ksplit != 1 && ksplit != 2 && ksplit != 4) return ATV_ERR_SIZE;
    if (M == 0 || N == 0) return ATV_OK;
    if (dtype == ATV_DTYPE_F16)
        run_host_typed<__half>(x, ldx, values, mask, up_values, up_mask, ldv, ldb, bias, out, ldo, M, N, K, gated,
                               ksplit);
    else
        run_host_typed<__nv_bfloat16>(x, ldx, values, mask, up_values, up_mask, ldv, ldb, bias, out, ldo, M, N,
                                      K, gated, ksplit);
    return ATV_OK;
}

}  // namespace
}  // namespace atv

extern "C" int atv_nm_linear_host(const void* x, int64_t ldx, const void* values, int64_t ldv,
                                  const void* bitmask, int64_t ldb, const void* bias, void* out, int64_t ldo,
                                  int64_t M, int64_t N, int64_t K, int n, int m, int dtype, int ksplit) {
    return atv::host_dispatch(x, ldx, values, bitmask, nullptr, nullptr, ldv, ldb, bias, out, ldo, M, N, K, n, m,
                              dtype, false, ksplit);
}

extern "C" int atv_nm_gated_host(const void* x, int64_t ldx, const void* gate_values,
                                 const void* gate_bitmask, const void* up_values, const void* up_bitmask,
                                 int64_t ldv, int64_t ldb, void* out, int64_t ldo, int64_t M, int64_t N,
                                 int64_t K, int n, int m, int dtype, int ksplit) {
    return atv::host_dispatch(x, ldx, gate_values, gate_bitmask, up_values, up_bitmask, ldv, ldb, nullptr, out,
                              ldo, M, N, K, n, m, dtype, true, ksplit);
}
