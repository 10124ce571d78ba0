/*
 * sp24_common.cuh: 2:4 decode on the sparse tensor cores (mma.sp m16n8k32), the pieces shared by
 * the kernel (sp24_decode.cu) and its host twin (nm_host_ref.cu). The twin runs the same
 * fragment loads, partition and epilogue, and replaces the instruction by emulate_mma_sp below,
 * written from the PTX ISA's description of mma.sp (section 9.7.14.6, "Matrix fragments for
 * sparse mma.m16n8k32 with .f16 / .bf16"), over the very layout bytes the kernel reads.
 *
 * One mma.sp.m16n8k32 computes D (16 x 8, fp32) += A (16 x 32, 2:4 sparse, given as 16 x 16 kept
 * values plus 2-bit indices) * B (32 x 8). Here A is a tile of 16 weight rows times a k-block of
 * 32 columns, B the activations of 8 tokens for those columns (tokens past M repeat token M - 1;
 * their outputs are dropped), so one warp instruction retires 256 kept weights for up to 8 tokens.
 * Lane l = 4g + q (g = groupID = l / 4, q = threadID_in_group = l % 4) holds:
 *
 *     A  a0 = row g,     group q       (two fp16 / bf16: the group's kept values, lower column low)
 *        a1 = row g + 8, group q
 *        a2 = row g,     group q + 4     (group j = columns 4j .. 4j + 3 of the k-block)
 *        a3 = row g + 8, group q + 4
 *     E  sparsity selector 0: lanes 4g and 4g + 1 give the metadata. Lane 4g + h: bits 4j .. 4j + 3
 *        = row g, group 4h + j; bits 16 + 4j .. = row g + 8, group 4h + j (j = 0..3). A nibble is
 *        i0 | i1 << 2, the in-group positions of the two kept values, i0 < i1 (::ordered_metadata).
 *        Lanes 4g + 2, 4g + 3 are not read.
 *     B  b_r = B[2q + 8r, g], B[2q + 8r + 1, g] (r = 0..3): activations of token g, columns
 *        2q + 8r, +1 of the k-block (one 32-bit load each).
 *     D  d0 = D[g, 2q], d1 = D[g, 2q + 1], d2 = D[g + 8, 2q], d3 = D[g + 8, 2q + 1] (fp32).
 *
 * Runtime layout (atv_sparse/kernels/cuda_layouts.py builds it once per layer at load time from
 * the checkpoint's values + bitmask, never per call), T = ceil(N / 16) row tiles, KB = K / 32:
 *     frag_values (T, KB, 32, 8) fp16 / bf16: [t][b][l] = lane l's a0..a3 for row tile t, k-block b
 *                 (a warp's load of one k-block is 512 contiguous bytes);
 *     frag_meta   (T, KB, 16) uint32: [t][b][2g + h] = the metadata word of lane 4g + h (lanes
 *                 4g + 2, 4g + 3 load the same words; selector 0 ignores them).
 * Rows past N are zero values with metadata nibble 0b0100 (positions 0, 1). Bytes per weight:
 * 0.5 x 2 + 16 x 4 / 512 = 1.125, the checkpoint's own.
 *
 * Worked example, row 0 of a tile, k-block 0, group 0 = columns 0..3 kept at 1 and 3, values
 * (v1, v3): lane 0 holds a0 = v1 | v3 << 16, lane 0's metadata word bits 0..3 = 1 | 3 << 2 = 0xD.
 */
#ifndef ATV_SP24_COMMON_CUH
#define ATV_SP24_COMMON_CUH

#include "nm_common.cuh"

namespace atv {
namespace sp24 {

constexpr int kTileRows = 16;     // A rows per mma (m16)
constexpr int kBlockCols = 32;    // columns per mma (k32): one k-block
constexpr int kTokens = 8;        // tokens per mma (n8)
constexpr int kFragHalves = 8;    // kept values per lane per mma (a0..a3)
constexpr int kMetaWords = 16;    // metadata words per mma
constexpr uint32_t kPadNibble = 0x4u;  // positions 0, 1: the metadata of an all-zero group

// Token tiles of 8 (n8 mmas per A fragment): 1 for 1..8 tokens, 2 for 9..16.
inline int token_tiles(int M) { return M <= kTokens ? 1 : 2; }

// k-blocks whose loads a lane issues before its first mma: 4 (4 x 512 B of values per warp in
// flight per stream), 2 when two streams and two token tiles would need too many registers.
template <int S, int NT>
struct Unroll {
    static constexpr int kSteps = S * NT >= 4 ? 2 : 4;
};

template <typename T>
struct Args {
    const T* x;                // (M, K) activations, row stride ldx (even), 4-byte aligned
    const T* fv;               // (T, K / 32, 32, 8) frag_values (the gate's when gated), 16-byte aligned
    const uint32_t* fm;        // (T, K / 32, 16) frag_meta, 4-byte aligned
    const T* up_fv;            // gated only: the up weight's frag_values, else null
    const uint32_t* up_fm;     // gated only
    const T* bias;             // (N,) or null (plain only)
    T* out;                    // (M, N), row stride ldo
    int64_t ldx, ldo;
    int M, N, K;

    ATV_HD int tiles() const { return (N + kTileRows - 1) / kTileRows; }
    ATV_HD int kblocks() const { return K / kBlockCols; }
};

// One lane's registers for one k-block: A and E per weight stream s, B per token tile nt.
template <int S, int NT>
struct Frag {
    uint32_t a[S][4];
    uint32_t e[S];
    uint32_t b[NT][4];
};

// A lane's read pointers at its current k-block (advance() moves them on).
template <typename T, int S, int NT>
struct LaneStreams {
    const T* v[S];
    const uint32_t* m[S];
    const T* x[NT];
};

ATV_HD uint32_t load_meta4(const uint32_t* p) {
#if defined(__CUDA_ARCH__)
    uint32_t r;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
#else
    return *p;
#endif
}

ATV_HD uint32_t load_act4(const void* p) {
#if defined(__CUDA_ARCH__)
    return __ldg(static_cast<const unsigned int*>(p));
#else
    uint32_t r;
    memcpy(&r, p, 4);
    return r;
#endif
}

// Lane `lane`'s pointers at k-block kb of row tile `tile`.
template <typename T, int S, int NT>
ATV_HD LaneStreams<T, S, NT> lane_streams(const Args<T>& a, int tile, int kb, int lane) {
    const int g = lane >> 2, q = lane & 3;
    const int64_t block = static_cast<int64_t>(tile) * a.kblocks() + kb;  // (tile, kb) in the layout
    LaneStreams<T, S, NT> p;
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        p.v[s] = (s ? a.up_fv : a.fv) + (block * kWarpSize + lane) * kFragHalves;
        p.m[s] = (s ? a.up_fm : a.fm) + block * kMetaWords + 2 * g + (q & 1);
    }
    ATV_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
        const int token = nt * kTokens + g < a.M ? nt * kTokens + g : a.M - 1;
        p.x[nt] = a.x + token * a.ldx + kb * kBlockCols + 2 * q;
    }
    return p;
}

// The fragments of k-block `u` past the pointers (u a constant after unrolling: the offsets are
// immediates of the load instructions, no address arithmetic per load).
template <typename T, int S, int NT>
ATV_HD void load_frag(const LaneStreams<T, S, NT>& p, int u, Frag<S, NT>& f) {
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        const uint4 w = load_weights16(p.v[s] + u * kWarpSize * kFragHalves);
        f.a[s][0] = w.x;
        f.a[s][1] = w.y;
        f.a[s][2] = w.z;
        f.a[s][3] = w.w;
        f.e[s] = load_meta4(p.m[s] + u * kMetaWords);
    }
    ATV_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
        ATV_UNROLL
        for (int r = 0; r < 4; ++r) f.b[nt][r] = load_act4(p.x[nt] + u * kBlockCols + 8 * r);
    }
}

template <typename T, int S, int NT>
ATV_HD void advance(LaneStreams<T, S, NT>& p, int blocks) {
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        p.v[s] += blocks * kWarpSize * kFragHalves;
        p.m[s] += blocks * kMetaWords;
    }
    ATV_UNROLL
    for (int nt = 0; nt < NT; ++nt) p.x[nt] += blocks * kBlockCols;
}

// D (16 x 8) += A * B for one warp, from its 32 lanes' registers, as mma.sp.m16n8k32 with
// ::ordered_metadata and sparsity selector 0 defines it (see the top of this file). Returns false,
// leaving d unchanged, when a metadata nibble is not an ordered pair of positions (undefined
// behaviour on the GPU). Products of fp16 / bf16 are exact in fp32; sums in column order.
template <typename T>
bool emulate_mma_sp(const uint32_t (&a)[kWarpSize][4], const uint32_t (&b)[kWarpSize][4],
                    const uint32_t (&e)[kWarpSize], float (&d)[kWarpSize][4]) {
    float A[kTileRows][kBlockCols] = {};
    float B[kBlockCols][kTokens];
    for (int lane = 0; lane < kWarpSize; ++lane) {
        const int g = lane >> 2, q = lane & 3;
        for (int reg = 0; reg < 4; ++reg) {
            const int row = g + 8 * (reg & 1), group = q + 4 * (reg >> 1);
            const uint32_t word = e[4 * g + group / 4];  // lane 4g + h holds groups 4h .. 4h + 3
            const uint32_t nibble = (word >> (16 * (reg & 1) + 4 * (group % 4))) & 0xFu;
            const int i0 = nibble & 3, i1 = nibble >> 2;
            if (i0 >= i1) return false;
            const float2 kept = Dtype<T>::pair_to_float2(a[lane][reg]);
            A[row][4 * group + i0] = kept.x;
            A[row][4 * group + i1] = kept.y;
        }
        for (int r = 0; r < 4; ++r) {
            const float2 pair = Dtype<T>::pair_to_float2(b[lane][r]);
            B[2 * q + 8 * r][g] = pair.x;
            B[2 * q + 8 * r + 1][g] = pair.y;
        }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
        const int g = lane >> 2, q = lane & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
            float sum = d[lane][i];
            for (int k = 0; k < kBlockCols; ++k) sum = fmaf(A[row][k], B[k][col], sum);
            d[lane][i] = sum;
        }
    }
    return true;
}

// Partition: a block's kWarps warps form kWarps / ksplit row groups of ksplit warps; a row group
// owns one row tile (16 rows) and its warp `slice` takes the contiguous k-blocks
// [slice * per, (slice + 1) * per) (per = ceil(K / 32 / ksplit)), so consecutive steps of a warp
// are consecutive in memory.
struct TilePartition {
    int ksplit, groups, per;
    ATV_HD TilePartition(int ksplit_, int kblocks)
        : ksplit(ksplit_), groups(kWarps / ksplit_), per((kblocks + ksplit_ - 1) / ksplit_) {}
    ATV_HD int tile(int block, int warp) const { return block * groups + warp / ksplit; }
    ATV_HD int slice(int warp) const { return warp % ksplit; }
    ATV_HD int first(int warp) const { return slice(warp) * per; }
    ATV_HD int count(int warp, int kblocks) const {
        const int left = kblocks - first(warp);
        return left < 0 ? 0 : left < per ? left : per;
    }
};

// Partial sums of one warp, red[s][row in tile][token], from a lane's accumulators.
template <int S, int NT>
ATV_HD void store_partials(const float (&acc)[S][NT][4], int lane, float (*red)[kTileRows][2 * kTokens]) {
    const int g = lane >> 2, q = lane & 3;
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        ATV_UNROLL
        for (int nt = 0; nt < NT; ++nt) {
            ATV_UNROLL
            for (int i = 0; i < 4; ++i) red[s][g + 8 * (i >> 1)][nt * kTokens + 2 * q + (i & 1)] = acc[s][nt][i];
        }
    }
}

// Output element idx = token * 16 + row-in-tile of a row group, summed over its ksplit warps'
// partials red[base .. base + ksplit - 1] in warp order (deterministic), then bias or silu * up.
template <typename T, int S>
ATV_HD void write_tile_output(const Args<T>& a, const float (*red)[S][kTileRows][2 * kTokens], int base,
                              int ksplit, int tile, int idx) {
    const int token = idx / kTileRows, r = idx % kTileRows, row = tile * kTileRows + r;
    if (token >= a.M || row >= a.N) return;
    float y[S];
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        y[s] = 0.f;
        for (int k = 0; k < ksplit; ++k) y[s] += red[base + k][s][r][token];
    }
    float v = y[0];
    if (S == 2) v = silu_mul(y[0], y[S - 1]);
    else if (a.bias != nullptr) v += Dtype<T>::to_float(a.bias[row]);
    a.out[static_cast<int64_t>(token) * a.ldo + row] = Dtype<T>::from_float(v);
}

template <typename T>
Args<T> make_args(const void* x, int64_t ldx, const void* fv, const void* fm, const void* up_fv, const void* up_fm,
                  const void* bias, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K) {
    Args<T> a;
    set_io_args<T>(a, x, ldx, bias, out, ldo, M, N, K);
    a.fv = static_cast<const T*>(fv);
    a.fm = static_cast<const uint32_t*>(fm);
    a.up_fv = static_cast<const T*>(up_fv);
    a.up_fm = static_cast<const uint32_t*>(up_fm);
    return a;
}

// 0 or the ATV_ERR_* refusing these arguments (up_* null for a plain layer).
inline int check_args(const void* x, int64_t ldx, const void* fv, const void* fm, const void* up_fv,
                      const void* up_fm, bool gated, const void* bias, const void* out, int64_t ldo, int64_t M,
                      int64_t N, int64_t K, int dtype) {
    if (dtype != ATV_DTYPE_F16 && dtype != ATV_DTYPE_BF16) return ATV_ERR_DTYPE;
    if (M < 0 || M > kMaxTokens || N < 0 || N > INT32_MAX - kTileRows || K <= 0 || K % kBlockCols ||
        K > INT32_MAX)
        return ATV_ERR_SIZE;
    if (ldx < K || ldo < N) return ATV_ERR_SIZE;
    if (M == 0 || N == 0) return ATV_OK;
    if (!x || !fv || !fm || !out || (gated && (!up_fv || !up_fm))) return ATV_ERR_NULL;
    if (!aligned(x, 4) || ldx % 2 || !aligned(fv, 16) || !aligned(fm, 4)) return ATV_ERR_ALIGN;
    if (!aligned(out, 2) || (bias && !aligned(bias, 2))) return ATV_ERR_ALIGN;
    if (gated && (!aligned(up_fv, 16) || !aligned(up_fm, 4))) return ATV_ERR_ALIGN;
    return ATV_OK;
}

}  // namespace sp24
}  // namespace atv

#endif  // ATV_SP24_COMMON_CUH
