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
 *
 * atv_sp24_*_host do the same for sp24_decode.cu: per warp and k-block, the 32 lanes' fragments
 * come from the kernel's load_frag over the runtime layout, and emulate_mma_sp (sp24_common.cuh,
 * written from the PTX ISA) stands in for mma.sp; store_partials and write_tile_output are shared.
 * A metadata nibble the instruction would not accept returns ATV_ERR_LAYOUT.
 */
#include "nm_common.cuh"
#include "sp24_common.cuh"

namespace atv {
namespace {

template <typename T, int MT, bool GATED>
void run_host_tile(const NmArgs<T>& a, int ksplit) {
    constexpr int S = Streams<GATED>::kCount;
    uint4 lut[kLutSize];
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
    NmArgs<T> a = make_args<T>(x, ldx, values, mask, up_values, up_mask, ldv, ldb, bias, out, ldo, M, N, K);
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

namespace sp24 {
namespace {

template <typename T, int NT, bool GATED>
int run_host_tiles(const Args<T>& a, int ksplit) {
    constexpr int S = GATED ? 2 : 1;
    const TilePartition part(ksplit, a.kblocks());
    const int blocks = (a.tiles() + part.groups - 1) / part.groups;
    for (int block = 0; block < blocks; ++block) {
        float red[kWarps][S][kTileRows][2 * kTokens] = {};
        for (int warp = 0; warp < kWarps; ++warp) {
            const int tile = part.tile(block, warp);
            if (tile >= a.tiles()) continue;
            LaneStreams<T, S, NT> p[kWarpSize];
            for (int lane = 0; lane < kWarpSize; ++lane) p[lane] = lane_streams<T, S, NT>(a, tile, part.first(warp), lane);
            float acc[kWarpSize][S][NT][4] = {};
            for (int left = part.count(warp, a.kblocks()); left > 0; --left) {  // the kernel's k-block order
                Frag<S, NT> f[kWarpSize];
                for (int lane = 0; lane < kWarpSize; ++lane) {
                    load_frag(p[lane], 0, f[lane]);
                    advance(p[lane], 1);
                }
                for (int s = 0; s < S; ++s) {
                    for (int nt = 0; nt < NT; ++nt) {
                        uint32_t ra[kWarpSize][4], rb[kWarpSize][4], re[kWarpSize];
                        float d[kWarpSize][4];
                        for (int lane = 0; lane < kWarpSize; ++lane) {
                            for (int r = 0; r < 4; ++r) {
                                ra[lane][r] = f[lane].a[s][r];
                                rb[lane][r] = f[lane].b[nt][r];
                                d[lane][r] = acc[lane][s][nt][r];
                            }
                            re[lane] = f[lane].e[s];
                        }
                        if (!emulate_mma_sp<T>(ra, rb, re, d)) return ATV_ERR_LAYOUT;
                        for (int lane = 0; lane < kWarpSize; ++lane)
                            for (int r = 0; r < 4; ++r) acc[lane][s][nt][r] = d[lane][r];
                    }
                }
            }
            for (int lane = 0; lane < kWarpSize; ++lane) store_partials<S, NT>(acc[lane], lane, red[warp]);
        }
        for (int warp = 0; warp < kWarps; warp += ksplit) {
            const int tile = part.tile(block, warp);
            if (tile >= a.tiles()) continue;  // the kernel: only the row group's first warp writes
            for (int idx = 0; idx < kTileRows * a.M; ++idx) write_tile_output<T, S>(a, red, warp, ksplit, tile, idx);
        }
    }
    return ATV_OK;
}

template <typename T>
int run_host_typed(const Args<T>& a, bool gated, int ksplit) {
    if (ksplit == 0) ksplit = choose_ksplit_for(a.tiles(), a.kblocks(), 132);
    if (token_tiles(a.M) == 1) return gated ? run_host_tiles<T, 1, true>(a, ksplit) : run_host_tiles<T, 1, false>(a, ksplit);
    return gated ? run_host_tiles<T, 2, true>(a, ksplit) : run_host_tiles<T, 2, false>(a, ksplit);
}

int host_dispatch(const void* x, int64_t ldx, const void* fv, const void* fm, const void* up_fv, const void* up_fm,
                  const void* bias, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int dtype, bool gated,
                  int ksplit) {
    const int bad = check_args(x, ldx, fv, fm, up_fv, up_fm, gated, bias, out, ldo, M, N, K, dtype);
    if (bad != ATV_OK) return bad;
    if (ksplit != 0 && ksplit != 1 && ksplit != 2 && ksplit != 4) return ATV_ERR_SIZE;
    if (M == 0 || N == 0) return ATV_OK;
    if (dtype == ATV_DTYPE_F16)
        return run_host_typed(make_args<__half>(x, ldx, fv, fm, up_fv, up_fm, bias, out, ldo, M, N, K), gated, ksplit);
    return run_host_typed(make_args<__nv_bfloat16>(x, ldx, fv, fm, up_fv, up_fm, bias, out, ldo, M, N, K), gated,
                          ksplit);
}

}  // namespace
}  // namespace sp24
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

extern "C" int atv_sp24_linear_host(const void* x, int64_t ldx, const void* frag_values, const void* frag_meta,
                                    const void* bias, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K,
                                    int dtype, int ksplit) {
    return atv::sp24::host_dispatch(x, ldx, frag_values, frag_meta, nullptr, nullptr, bias, out, ldo, M, N, K, dtype,
                                    false, ksplit);
}

extern "C" int atv_sp24_gated_host(const void* x, int64_t ldx, const void* gate_frag_values,
                                   const void* gate_frag_meta, const void* up_frag_values, const void* up_frag_meta,
                                   void* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int dtype, int ksplit) {
    return atv::sp24::host_dispatch(x, ldx, gate_frag_values, gate_frag_meta, up_frag_values, up_frag_meta, nullptr,
                                    out, ldo, M, N, K, dtype, true, ksplit);
}
