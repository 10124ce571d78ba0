/*
 * nm_common.cuh: the pieces of the N:M decode kernel that do not depend on being on a GPU.
 *
 * Everything here is __host__ __device__: the kernel (nm_decode.cu) runs it per lane, and the host
 * twin (nm_host_ref.cu) runs the very same code serially, so the decode tables, the selection of
 * activations, the chunk indexing and the work partition are tested on machines without a GPU.
 * Only the loads differ: streaming / read-only-cached loads on the device, memcpy on the host.
 *
 * Vocabulary (see nm_decode.cu for the full picture):
 *   chunk     16 consecutive columns of one weight row = 8 kept values = one 16-byte load of
 *             values (4 pairs) + one 2-byte load of bitmask (2 mask bytes);
 *   mask byte 8 columns, exactly 4 kept for 2:4 (2 per nibble) and for 4:8, owning 4 consecutive
 *             values: so one decoder serves both patterns;
 *   selector  per mask byte, two 32-bit words (one per pair of kept values): how to pick the
 *             activations of the kept columns out of the 8 columns' activations with byte
 *             permutes (prmt), in registers;
 *   step      32 consecutive chunks of a row, one per lane of a warp: a warp-wide 512-byte load.
 */
#ifndef ATV_NM_COMMON_CUH
#define ATV_NM_COMMON_CUH

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "atv_sparse_cuda.cuh"

#define ATV_HD __host__ __device__ __forceinline__

#if defined(__CUDA_ARCH__)
#define ATV_UNROLL _Pragma("unroll")
#else
#define ATV_UNROLL
#endif

namespace atv {

constexpr int kChunkCols = 16;    // columns per chunk
constexpr int kChunkValues = 8;   // kept values per chunk (one 16-byte load of fp16 / bf16)
constexpr int kWarpSize = 32;
constexpr int kWarps = 4;         // warps per block
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxTokens = 16;    // largest M the kernel takes (the token tile MT is 1..16)
constexpr int kLutSize = 256;     // one selector entry (uint4) per mask byte value

// Steps whose loads a lane issues before using any of them: 4 (8 x 16-byte loads in flight per
// lane) while registers allow; 2 for 8 and 16 tokens, whose 2 x MT accumulators need the room
// and whose arithmetic per byte already hides more latency.
template <int MT>
struct Unroll {
    static constexpr int kSteps = MT >= 8 ? 2 : 4;
};

// Rows of output a warp computes at once, and weight rows it streams for them: a plain layer
// streams two rows (two output rows), a gated one the gate and the up row of one output row.
// Both keep two independent weight streams in flight per lane.
template <bool GATED>
struct Streams {
    static constexpr int kRows = GATED ? 1 : 2;
    static constexpr int kCount = 2;
};

// ---------------------------------------------------------------------------------------------
// Arguments as the kernel sees them (strides in elements; ldb in bytes since the mask is uint8).
template <typename T>
struct NmArgs {
    const T* x;                 // (M, K) activations, row stride ldx
    const T* values;            // (N, K / 2) kept weights (the gate's when gated), row stride ldv
    const uint8_t* mask;        // (N, K / 8) bitmask, row stride ldb
    const T* up_values;         // gated only: the up weight, same shape and strides, else null
    const uint8_t* up_mask;     // gated only
    const T* bias;              // (N,) or null (plain only)
    T* out;                     // (M, N) output, row stride ldo
    int64_t ldx, ldv, ldb, ldo;
    int M, N, K;
};

// ---------------------------------------------------------------------------------------------
// Element types: the pair <-> float conversions the decoder needs.
template <typename T>
struct Dtype;

template <>
struct Dtype<__half> {
    // bits: two fp16 in one 32-bit word, the lower column in the low half.
    ATV_HD static float2 pair_to_float2(uint32_t bits) {
        __half2_raw raw;  // the word's bits as they are: two HADD2.F32, no repacking
        memcpy(&raw, &bits, 4);
        return __half22float2(__half2(raw));
    }
    ATV_HD static float to_float(__half v) { return __half2float(v); }
    ATV_HD static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Dtype<__nv_bfloat16> {
    // bf16 is the top half of an fp32: widening is a shift or a mask, exact.
    ATV_HD static float2 pair_to_float2(uint32_t bits) {
        uint32_t lo = bits << 16, hi = bits & 0xFFFF0000u;
        float2 f;
        memcpy(&f.x, &lo, 4);
        memcpy(&f.y, &hi, 4);
        return f;
    }
    ATV_HD static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    ATV_HD static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// ---------------------------------------------------------------------------------------------
// Bit tools.

// Byte permute: byte i of the result is byte (sel >> 4i) & 7 of the 8-byte value {b, a} (a holds
// bytes 0-3). Only the low 16 bits of sel are read. Selectors must keep bit 3 of every nibble
// clear (every table entry does): the device runs prmt.b32 as is, where that bit would mean
// sign replication; __byte_perm would clear it with an extra LOP3 per permute.
ATV_HD uint32_t perm_bytes(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
#else
    const uint64_t src = static_cast<uint64_t>(b) << 32 | a;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) {
        const uint32_t s = (sel >> (4 * i)) & 7u;
        r |= static_cast<uint32_t>((src >> (8 * s)) & 0xFFu) << (8 * i);
    }
    return r;
#endif
}

// Index of the lowest set bit, 0 for 0.
ATV_HD int lowest_set(uint32_t v) {
#if defined(__CUDA_ARCH__)
    return v ? __ffs(static_cast<int>(v)) - 1 : 0;
#else
    return v ? __builtin_ctz(v) : 0;
#endif
}

// ---------------------------------------------------------------------------------------------
// Selectors. The 8 activations of a mask byte's columns sit in 4 words a, b, c, d (columns 0-1,
// 2-3, 4-5, 6-7, 16 bits each, lower column low). For two kept columns pa < pb the wanted word is
// (x[pa], x[pb]), built with three byte permutes driven by two selector words, pick and mix:
//   lo  = perm(a, b, pick)       (x[pa & 3], x[pb & 3])       from columns 0-3
//   hi  = perm(c, d, pick)       (x[4 + (pa & 3)], x[4 + (pb & 3)])  from columns 4-7, same pick
//   out = perm(lo, hi, mix)      each slot from lo when its column is < 4, else from hi
// Example: mask byte 0x69 = columns 0, 3, 5, 6: pairs (0, 3) and (5, 6):
//   (0, 3): pick = bytes 0,1,6,7 = 0x7610, both columns < 4 -> mix 0x3210: out = (x0, x3)
//   (5, 6): pick = bytes 2,3,4,5 = 0x5432, both >= 4 -> mix 0x7654: out = hi = (x5, x6)
// The table holds pick and mix as separate words (not one word and a shift): one 16-byte shared
// load per mask byte gives both pairs' selectors with no instruction to take them apart.
struct PairSelector {
    uint32_t pick, mix;
};

ATV_HD PairSelector pair_selector(int pa, int pb) {
    const uint32_t qa = static_cast<uint32_t>(pa & 3), qb = static_cast<uint32_t>(pb & 3);
    PairSelector p;
    p.pick = (2 * qa) | (2 * qa + 1) << 4 | (2 * qb) << 8 | (2 * qb + 1) << 12;
    p.mix = (pa < 4 ? 0x0010u : 0x0054u) | (pb < 4 ? 0x3200u : 0x7600u);
    return p;
}

// Selector entry of one mask byte: {pick, mix} of pair (p0, p1), then of pair (p2, p3), for its
// set bits p0 < .. < p3. A byte without exactly four set bits (never produced by a valid 2:4 /
// 4:8 mask; the loader validates checkpoints) gets column 0 for missing bits: the selection stays
// in registers, so a corrupt mask gives wrong numbers, never an out-of-bounds access.
ATV_HD uint4 byte_selectors(uint32_t byte) {
    uint32_t rest = byte & 0xFFu;
    const int p0 = lowest_set(rest);
    rest &= rest - 1;
    const int p1 = lowest_set(rest);
    rest &= rest - 1;
    const int p2 = lowest_set(rest);
    rest &= rest - 1;
    const int p3 = lowest_set(rest);
    const PairSelector first = pair_selector(p0, p1), second = pair_selector(p2, p3);
    return make_uint4(first.pick, first.mix, second.pick, second.mix);
}

ATV_HD uint32_t select_pair(uint32_t a, uint32_t b, uint32_t c, uint32_t d, uint32_t pick, uint32_t mix) {
    const uint32_t lo = perm_bytes(a, b, pick);
    const uint32_t hi = perm_bytes(c, d, pick);
    return perm_bytes(lo, hi, mix);
}

// ---------------------------------------------------------------------------------------------
// Loads. Weights and masks are read exactly once per call: on the device they bypass L1
// (L1::no_allocate) so the activations, which every warp of the SM re-reads, stay cached there.
ATV_HD uint4 load_weights16(const void* p) {
    uint4 r;
#if defined(__CUDA_ARCH__)
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
#else
    memcpy(&r, p, 16);
#endif
    return r;
}

ATV_HD uint32_t load_mask16(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
    unsigned short r;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
#else
    return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8;
#endif
}

ATV_HD uint4 load_act16(const void* p) {
#if defined(__CUDA_ARCH__)
    return __ldg(static_cast<const uint4*>(p));
#else
    uint4 r;
    memcpy(&r, p, 16);
    return r;
#endif
}

// ---------------------------------------------------------------------------------------------
// One chunk. Decode once per weight row (fp32 values, 4 pick / mix pairs), then reuse for every token.
struct Chunk {
    float w[kChunkValues];
    uint4 sel[2];  // mask byte 0: pairs (v0, v1), (v2, v3); byte 1: pairs (v4, v5), (v6, v7)
};

template <typename T>
ATV_HD void decode_chunk(uint4 vals, uint32_t mask16, const uint4* lut, Chunk& ch) {
    const uint32_t words[4] = {vals.x, vals.y, vals.z, vals.w};
    ATV_UNROLL
    for (int i = 0; i < 4; ++i) {
        const float2 f = Dtype<T>::pair_to_float2(words[i]);
        ch.w[2 * i] = f.x;
        ch.w[2 * i + 1] = f.y;
    }
    ch.sel[0] = lut[mask16 & 0xFFu];
    ch.sel[1] = lut[(mask16 >> 8) & 0xFFu];
}

// acc + the dot product of one mask byte's 4 kept values w[0..3] with the activations of its
// kept columns, picked from x (the byte's 8 columns, one 16-byte load).
template <typename T>
ATV_HD float byte_dot(const float* w, uint4 sel, uint4 x, float acc) {
    float2 f = Dtype<T>::pair_to_float2(select_pair(x.x, x.y, x.z, x.w, sel.x, sel.y));
    acc = fmaf(f.x, w[0], acc);
    acc = fmaf(f.y, w[1], acc);
    f = Dtype<T>::pair_to_float2(select_pair(x.x, x.y, x.z, x.w, sel.z, sel.w));
    acc = fmaf(f.x, w[2], acc);
    return fmaf(f.y, w[3], acc);
}

// acc + sum over the chunk's 8 kept values of value * x[kept column]; xa = columns 0-7 of the
// chunk, xb = columns 8-15 (16-byte loads of one token's activations). fp32 FMAs: products of
// fp16 / bf16 summed in fp16 lose accuracy over thousands of columns.
template <typename T>
ATV_HD float chunk_dot(const Chunk& ch, uint4 xa, uint4 xb, float acc) {
    return byte_dot<T>(ch.w + 4, ch.sel[1], xb, byte_dot<T>(ch.w, ch.sel[0], xa, acc));
}

// ---------------------------------------------------------------------------------------------
// Work partition (drawn in nm_decode.cu). A block's kWarps warps form kWarps / ksplit row groups
// of ksplit warps; a row group owns Streams::kRows output rows, and its warp `slice` takes the
// contiguous steps [slice * per, (slice + 1) * per) of the row (per = ceil(steps / ksplit)), so
// a warp's consecutive steps are consecutive in memory and the unrolled loads' offsets are
// constants of the load instructions.
struct Partition {
    int ksplit;        // 1, 2 or 4 warps per row group
    int row_groups;    // kWarps / ksplit
    int rows;          // output rows per row group (Streams::kRows)
    int chunks;        // K / 16 chunks per row
    int steps;         // ceil(chunks / 32)
    int per;           // steps per warp of a row group (the last may get fewer)

    ATV_HD Partition(int K, int ksplit_, int rows_)
        : ksplit(ksplit_), row_groups(kWarps / ksplit_), rows(rows_), chunks(K / kChunkCols),
          steps((K / kChunkCols + kWarpSize - 1) / kWarpSize), per((steps + ksplit_ - 1) / ksplit_) {}

    ATV_HD int rows_per_block() const { return row_groups * rows; }
    ATV_HD int first_row(int block, int warp) const { return (block * row_groups + warp / ksplit) * rows; }
    ATV_HD int slice(int warp) const { return warp % ksplit; }
    ATV_HD int full_steps() const { return chunks / kWarpSize; }  // steps whose 32 chunks all exist
};

// One step's use of its loaded chunks (one per stream): decode, then every token's dot products.
// xc: this lane's chunk's columns in token 0's activations.
template <typename T, int MT, bool GATED>
ATV_HD void use_step(const NmArgs<T>& a, const uint4* lut, const T* xc, const uint4 (&v)[Streams<GATED>::kCount],
                     const uint32_t (&mk)[Streams<GATED>::kCount], float (&acc)[Streams<GATED>::kCount][MT]) {
    constexpr int S = Streams<GATED>::kCount;
    Chunk ch[S];
    ATV_UNROLL
    for (int s = 0; s < S; ++s) decode_chunk<T>(v[s], mk[s], lut, ch[s]);
    ATV_UNROLL
    for (int t = 0; t < MT; ++t) {
        if (t >= a.M) break;
        const uint4 xa = load_act16(xc + t * a.ldx);
        const uint4 xb = load_act16(xc + t * a.ldx + 8);
        ATV_UNROLL
        for (int s = 0; s < S; ++s) acc[s][t] = chunk_dot<T>(ch[s], xa, xb, acc[s][t]);
    }
}

// The lane's share of a warp's work: acc[s][t] += its chunks' dot products for weight stream s
// (output row first_row + s, or gate / up when gated) and token t. The main loop takes U whole
// steps at a time and first issues all their loads (U x 2 streams x (16 B values + 2 B mask)),
// then uses them: the loads are independent, so the memory system overlaps them; no bounds
// checks there (a stream past N reads row 0, whose sums write_output drops). A tail loop takes
// the remaining steps one by one, the row's last, partial step with a per-lane check.
template <typename T, int MT, bool GATED>
ATV_HD void lane_partials(const NmArgs<T>& a, const Partition& part, const uint4* lut, int row0,
                          int slice, int lane, float (&acc)[Streams<GATED>::kCount][MT]) {
    constexpr int S = Streams<GATED>::kCount;
    constexpr int U = Unroll<MT>::kSteps;
    constexpr int kStepValues = kWarpSize * kChunkValues, kStepMask = kWarpSize * 2, kStepCols = kWarpSize * kChunkCols;
    const int first = slice * part.per;
    const int end = first + part.per < part.steps ? first + part.per : part.steps;
    const int full_end = end < part.full_steps() ? end : part.full_steps();
    const int64_t c0 = static_cast<int64_t>(first) * kWarpSize + lane;  // this lane's first chunk
    const T* vp[S];
    const uint8_t* mp[S];
    ATV_UNROLL
    for (int s = 0; s < S; ++s) {
        const int row = GATED ? row0 : row0 + s;
        const int64_t r = row < a.N ? row : 0;
        vp[s] = (GATED && s == 1 ? a.up_values : a.values) + r * a.ldv + c0 * kChunkValues;
        mp[s] = (GATED && s == 1 ? a.up_mask : a.mask) + r * a.ldb + c0 * 2;
    }
    const T* xp = a.x + c0 * kChunkCols;
    int j = first;
    for (; j + U <= full_end; j += U) {
        uint4 v[U][S];
        uint32_t mk[U][S];
        ATV_UNROLL
        for (int u = 0; u < U; ++u) {
            ATV_UNROLL
            for (int s = 0; s < S; ++s) {
                v[u][s] = load_weights16(vp[s] + u * kStepValues);
                mk[u][s] = load_mask16(mp[s] + u * kStepMask);
            }
        }
        ATV_UNROLL
        for (int u = 0; u < U; ++u) use_step<T, MT, GATED>(a, lut, xp + u * kStepCols, v[u], mk[u], acc);
        ATV_UNROLL
        for (int s = 0; s < S; ++s) {
            vp[s] += U * kStepValues;
            mp[s] += U * kStepMask;
        }
        xp += U * kStepCols;
    }
    for (; j < end; ++j) {
        if (j * kWarpSize + lane < part.chunks) {  // past the row's end: its activations do not exist
            uint4 v[S];
            uint32_t mk[S];
            ATV_UNROLL
            for (int s = 0; s < S; ++s) {
                v[s] = load_weights16(vp[s]);
                mk[s] = load_mask16(mp[s]);
            }
            use_step<T, MT, GATED>(a, lut, xp, v, mk, acc);
        }
        ATV_UNROLL
        for (int s = 0; s < S; ++s) {
            vp[s] += kStepValues;
            mp[s] += kStepMask;
        }
        xp += kStepCols;
    }
}

// silu(g) * u in fp32.
ATV_HD float silu_mul(float g, float u) {
#if defined(__CUDA_ARCH__)
    return g / (1.0f + __expf(-g)) * u;
#else
    return g / (1.0f + expf(-g)) * u;
#endif
}

// Output element `idx` of a row group (idx = s * MT + t for plain layers, t when gated), from the
// per-warp sums red[w][s * MT + t] of the group's ksplit warps (w = base .. base + ksplit - 1),
// summed in warp order so the result does not depend on scheduling.
template <typename T, int MT, bool GATED>
ATV_HD void write_output(const NmArgs<T>& a, const float (*red)[Streams<GATED>::kCount * MT], int base,
                         int ksplit, int row0, int idx) {
    if (GATED) {
        const int t = idx, row = row0;
        if (t >= MT || t >= a.M || row >= a.N) return;
        float g = 0.f, u = 0.f;
        for (int k = 0; k < ksplit; ++k) {
            g += red[base + k][t];
            u += red[base + k][MT + t];
        }
        a.out[t * a.ldo + row] = Dtype<T>::from_float(silu_mul(g, u));
    } else {
        const int s = idx / MT, t = idx % MT, row = row0 + s;
        if (s >= Streams<GATED>::kRows || t >= a.M || row >= a.N) return;
        float y = 0.f;
        for (int k = 0; k < ksplit; ++k) y += red[base + k][idx];
        if (a.bias != nullptr) y += Dtype<T>::to_float(a.bias[row]);
        a.out[t * a.ldo + row] = Dtype<T>::from_float(y);
    }
}

// ---------------------------------------------------------------------------------------------
// Host-side planning and argument checks, shared by the launcher and the host twin.

// Warps per row group: split K when there are too few row groups to keep every SM busy (about
// eight warps of 2 x 4 16-byte loads in flight per SM cover HBM latency), while each warp
// still gets a step of its own.
inline int choose_ksplit_for(int64_t row_groups, int steps, int sm_count) {
    int ksplit = 1;
    while (ksplit < kWarps && row_groups * ksplit < 8LL * sm_count && 2 * ksplit <= steps) ksplit *= 2;
    return ksplit;
}

inline int choose_ksplit(int N, int K, int rows, int sm_count) {
    const int64_t row_groups = (static_cast<int64_t>(N) + rows - 1) / rows;
    return choose_ksplit_for(row_groups, (K / kChunkCols + kWarpSize - 1) / kWarpSize, sm_count);
}

// Token tile: the smallest instantiated MT >= M.
inline int token_tile(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16; }

// The fields every kernel's arguments share (NmArgs, sp24::Args): activations, bias, output, their
// strides and the sizes (no checks: check_args comes first).
template <typename T, typename Args>
void set_io_args(Args& a, const void* x, int64_t ldx, const void* bias, void* out, int64_t ldo, int64_t M,
                 int64_t N, int64_t K) {
    a.x = static_cast<const T*>(x);
    a.bias = static_cast<const T*>(bias);
    a.out = static_cast<T*>(out);
    a.ldx = ldx;
    a.ldo = ldo;
    a.M = static_cast<int>(M);
    a.N = static_cast<int>(N);
    a.K = static_cast<int>(K);
}

// The kernel's view of one call's arguments (no checks: check_args comes first).
template <typename T>
NmArgs<T> make_args(const void* x, int64_t ldx, const void* values, const void* mask, const void* up_values,
                    const void* up_mask, int64_t ldv, int64_t ldb, const void* bias, void* out, int64_t ldo,
                    int64_t M, int64_t N, int64_t K) {
    NmArgs<T> a;
    set_io_args<T>(a, x, ldx, bias, out, ldo, M, N, K);
    a.values = static_cast<const T*>(values);
    a.mask = static_cast<const uint8_t*>(mask);
    a.up_values = static_cast<const T*>(up_values);
    a.up_mask = static_cast<const uint8_t*>(up_mask);
    a.ldv = ldv;
    a.ldb = ldb;
    return a;
}

inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 0 or the ATV_ERR_* refusing these arguments. up_* are null for a plain layer; elem = 2 bytes.
inline int check_args(const void* x, int64_t ldx, const void* values, int64_t ldv, const void* mask,
                      int64_t ldb, const void* up_values, const void* up_mask, bool gated,
                      const void* bias, const void* out, int64_t ldo, int64_t M, int64_t N, int64_t K,
                      int n, int m, int dtype) {
    if (!((n == 2 && m == 4) || (n == 4 && m == 8))) return ATV_ERR_PATTERN;
    if (dtype != ATV_DTYPE_F16 && dtype != ATV_DTYPE_BF16) return ATV_ERR_DTYPE;
    if (M < 0 || M > kMaxTokens || N < 0 || N > INT32_MAX || K <= 0 || K % kChunkCols || K > INT32_MAX)
        return ATV_ERR_SIZE;
    if (ldx < K || ldv < K / 2 || ldb < K / 8 || ldo < N) return ATV_ERR_SIZE;
    if (M == 0 || N == 0) return ATV_OK;  // nothing to compute: pointers unused
    if (!x || !values || !mask || !out || (gated && (!up_values || !up_mask))) return ATV_ERR_NULL;
    if (!aligned(x, 16) || !aligned(values, 16) || ldx % 8 || ldv % 8) return ATV_ERR_ALIGN;
    if (!aligned(mask, 2) || ldb % 2 || !aligned(out, 2) || (bias && !aligned(bias, 2))) return ATV_ERR_ALIGN;
    if (gated && (!aligned(up_values, 16) || !aligned(up_mask, 2))) return ATV_ERR_ALIGN;
    return ATV_OK;
}

}  // namespace atv

#endif  // ATV_NM_COMMON_CUH
