// N:M sparse linear on the CPU, reading the checkpoint's bitmask + values as stored
// (docs/design.md 7.5; built on first use by atv_sparse/ops/cpu_lib.py).
//
//   y[t, r] = sum_k x[t, k] * W[r, k] (+ bias[r]),   W given as
//   bitmask: (N, ceil(K / 8)) uint8, bit k of byte c = column 8c + k, 1 = kept
//   values:  (N, K * n / m), the kept weights of each row in column order
//
// For n:4 and n:8 every 32 columns of a row keep exactly KEPT = 32 n / m values, so a row is a
// sequence of (32-bit mask word, KEPT values) chunks, and the values pointer advances by KEPT per
// chunk. Decode (up to DECODE_MAX tokens), per group of RR rows and tile of T <= 8 tokens:
//
//   for each chunk c of 32 columns:
//       for each row r of the group:
//           w    = values[r, KEPT c : KEPT (c + 1)]          loaded into a register
//           e[r] = expand(w, mask word)                     the dense 32 columns, zeros where pruned
//       for each token t:
//           xv   = x[t, 32c : 32c + 32]                     one load, shared by the RR rows
//           acc[r][t] += dot(e[r], xv)                      fp32 accumulators, one rounding at the end
//
// So each chunk of weights is expanded once for all T tokens, and from 3 tokens on RR = 2-4 rows share
// each activation load (512-bit loads, not the dot products, bound the loop here). AVX-512 decode is
// blocked like a dense GEMM (rows_avx512: row blocks, K-blocks sized for L1, activations in a
// chunk-major tile); one row at T = 2 is a single stream with a far software prefetch. One token with
// bf16 2:4 / 4:8 weights has its own loop (rows_m1_bf16: 4 rows, two chunks a step, fewest loads).
//
// Three implementations of the chunk step, picked at run time by what the processor has:
//   AVX512: vpexpandw / vexpandps + vdpbf16ps (bf16) or vcvtph2ps / fp32 + vfmadd
//   AVX2:   8 columns at a time, expanded by a 256-entry shuffle table, fp32 FMAs (tiles of 4 tokens)
//   PORTABLE: scalar, bit by bit
// Output rows are split statically over torch's own thread pool (at::parallel_for).
//
// Prefill (many tokens): panels of P rows are expanded into a dense buffer that stays in cache and
// multiplied by torch's own dense GEMM (at::addmm), so the whole dense weight never exists.
//
// Pitfalls measured on this AMD EPYC (/proc/cpuinfo: family 25, model 17, a Zen 4; the shared notes
// ../shared/notes/cpu-kernels.md call it Zen 5 class): a zero-masked expand whose
// destination register was last written by another expand waits for it, so each expand merges
// into a freshly zeroed register (vpxord, hidden from the optimiser); the memory-source expand is
// slow on a cache miss, so the values are loaded first (a register operand of the asm); software
// prefetch (into L2) 32 KiB ahead of a lone row stream, or the next rows in lockstep.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

enum Path : int64_t { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };

// How far ahead of each row stream to prefetch (bytes); ATV_SPARSE_CPU_PREFETCH overrides (tuning).
// 32 KiB: 4 KiB read 59% of a streaming read at 4096 x 4096, M = 1, 16 KiB 62-80%, 32 KiB 67-83%,
// 64 KiB 71% (this shared machine: +-10% between runs). Into L2 (T1), not L1: at K = 14336 the activations (28 KiB in bf16) share L1 with the stream, and
// prefetching into L1 evicted them (down_proj M = 1: 5.6 ms -> 3.7 ms in a development timing).
int64_t prefetch_bytes() {
    static const int64_t bytes = [] {
        const char* env = std::getenv("ATV_SPARSE_CPU_PREFETCH");
        return env ? std::atoll(env) : int64_t(32768);
    }();
    return bytes;
}

// One call's operands. The activations are a padded copy: Kpad = K rounded up to 32, zeros past K,
// so a chunk never multiplies a pruned (zero) weight by whatever memory lies past the row.
struct Problem {
    const uint8_t* mask;    // (N, mask_stride) bytes
    int64_t mask_stride;    // ceil(K / 8)
    const void* values;     // (N, val_stride) elements of the weight dtype
    int64_t val_stride;     // K * n / m
    const void* values_end; // one past the last element of values (loads never pass it)
    int64_t K;
    int kept32;             // kept values per 32 columns: 32 n / m
    const void* x;          // (M, Kpad): bf16 for bf16 weights, else fp32
    int64_t x_stride;       // Kpad
    int64_t M;
    int64_t rows;           // N
};

// Mask word of chunk c (columns 32c .. 32c + 31) of a row, zero past K; never reads past the row.
inline uint32_t mask_word(const uint8_t* row, int64_t c, int64_t mask_stride, int64_t K) {
    int64_t first = 4 * c;
    uint32_t w = 0;
    if (first + 4 <= mask_stride) {
        std::memcpy(&w, row + first, 4);
    } else {
        for (int64_t b = first; b < mask_stride; ++b) w |= uint32_t(row[b]) << (8 * (b - first));
    }
    int64_t cols = K - 32 * c;
    if (cols < 32) w &= (uint32_t(1) << cols) - 1;
    return w;
}

inline float bf16_to_float(uint16_t v) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <typename W>
inline float weight_to_float(const W* p, int64_t i) {
    if constexpr (std::is_same_v<W, float>) {
        return p[i];
    } else if constexpr (std::is_same_v<W, at::BFloat16>) {
        return bf16_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
    } else {
        return static_cast<float>(p[i]);
    }
}

// ----------------------------------------------------------------------------------------------------
// PORTABLE: one row, T tokens, bit by bit.

// f(column, index of its value in the row) for every kept column of a row, in column order.
template <typename F>
inline void for_each_kept(const Problem& p, int64_t row, F&& f) {
    const uint8_t* mk = p.mask + row * p.mask_stride;
    int64_t v = 0;
    for (int64_t byte = 0; byte < p.mask_stride; ++byte) {
        for (uint32_t bits = mk[byte]; bits; bits &= bits - 1) {
            const int64_t col = 8 * byte + __builtin_ctz(bits);
            if (col >= p.K || v >= p.val_stride) return;
            f(col, v++);
        }
    }
}

template <typename W>
void dot_portable(const Problem& p, int64_t row0, int R, int64_t t0, int T, float* out) {
    const float* x = static_cast<const float*>(p.x);
    for (int r = 0; r < R; ++r) {
        const W* vp = static_cast<const W*>(p.values) + (row0 + r) * p.val_stride;
        std::vector<double> acc(T, 0.0);  // double: a serial sum in fp32 would lose ~K ulps
        for_each_kept(p, row0 + r, [&](int64_t col, int64_t v) {
            const double wv = weight_to_float(vp, v);
            for (int t = 0; t < T; ++t) acc[t] += wv * x[(t0 + t) * p.x_stride + col];
        });
        for (int t = 0; t < T; ++t) out[r * T + t] = float(acc[t]);
    }
}

// ----------------------------------------------------------------------------------------------------
// AVX-512: 32 columns per chunk.

#define ATV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,avx512dq")))
#define ATV_AVX2 __attribute__((target("avx2,fma,f16c")))

// Expands into a destination zeroed by its own vpxord in the same asm block (pitfall 1: the
// compiler otherwise merges into a copy of one shared zero register, or reuses the last
// expand's register, and the expand then waits for that register's previous writer).
ATV_AVX512 __attribute__((always_inline)) inline __m512i expand16(__m512i v, uint32_t w) {
    __m512i e;
    __mmask32 k = __mmask32(w);
    asm("vpxord %0, %0, %0\n\tvpexpandw %1, %0%{%2%}%{z%}" : "=&v"(e) : "v"(v), "Yk"(k));
    return e;
}

ATV_AVX512 __attribute__((always_inline)) inline __m512 expand32(__m512 v, uint32_t w) {
    __m512 e;
    __mmask16 k = __mmask16(w);
    asm("vpxord %0, %0, %0\n\tvexpandps %1, %0%{%2%}%{z%}" : "=&v"(e) : "v"(v), "Yk"(k));
    return e;
}

// One chunk of one row as dense lanes: bf16 weights stay 32 bf16 lanes (e) for vdpbf16ps; fp16 and fp32
// weights become two registers of 16 fp32 lanes (lo: columns 0-15, hi: 16-31).
struct Expanded {
    __m512i e;
    __m512 lo, hi;
};

// Expand the values at vp by mask word w (n_here kept). FULL16: exactly 16 kept values (2:4, 4:8), one
// plain 32-byte load; else a masked load that never reads past the row.
template <typename W, bool FULL16>
ATV_AVX512 __attribute__((always_inline)) inline Expanded expand_chunk(const W* vp, uint32_t w, int n_here) {
    Expanded x;
    if constexpr (std::is_same_v<W, float>) {
        const uint32_t wlo = w & 0xffff, whi = w >> 16;
        const int nlo = __builtin_popcount(wlo);
        const int nhi = n_here - nlo;
        __m512 vlo = _mm512_maskz_loadu_ps(__mmask16((1u << nlo) - 1), vp);
        __m512 vhi = _mm512_maskz_loadu_ps(__mmask16((1u << nhi) - 1), vp + nlo);
        x.lo = expand32(vlo, wlo);  // register sources (pitfall 2)
        x.hi = expand32(vhi, whi);
    } else {
        __m512i v;
        if constexpr (FULL16) {
            v = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp)));
        } else {
            const __mmask32 lanes = n_here >= 32 ? __mmask32(~0u) : __mmask32((1u << n_here) - 1);
            v = _mm512_maskz_loadu_epi16(lanes, vp);
        }
        __m512i e = expand16(v, w);  // a register source: the load stays a separate instruction (pitfall 2)
        if constexpr (std::is_same_v<W, at::BFloat16>) {
            x.e = e;
        } else {  // fp16 weights: widen to fp32
            x.lo = _mm512_cvtph_ps(_mm512_castsi512_si256(e));
            x.hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e, 1));
        }
    }
    return x;
}

// acc[r][t] += row r's expanded chunk . token t's 32 activations, for RR rows and T tokens. xc: the
// chunk in the tile layout (T rows of 32 lanes: bf16 for bf16 weights, else fp32), so every operand is a
// constant offset from one pointer; each token's activations are loaded once for the RR rows (one
// 64-byte load per vdpbf16ps measured 0.55 ns a pair on this core, two rows sharing it 0.29 ns).
template <typename W, int T, int RR>
ATV_AVX512 __attribute__((always_inline)) inline void accumulate(const Expanded* ex, const char* xc,
                                                                  __m512 (*acc)[T]) {
    for (int t = 0; t < T; ++t) {
        if constexpr (std::is_same_v<W, at::BFloat16>) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xc + 64 * t);
            for (int r = 0; r < RR; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)ex[r].e, xv);
        } else {
            const __m512 xl = _mm512_loadu_ps(reinterpret_cast<const float*>(xc) + 32 * t);
            const __m512 xh = _mm512_loadu_ps(reinterpret_cast<const float*>(xc) + 32 * t + 16);
            for (int r = 0; r < RR; ++r) {
                acc[r][t] = _mm512_fmadd_ps(ex[r].lo, xl, acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(ex[r].hi, xh, acc[r][t]);
            }
        }
    }
}

// Bytes of one token's 32 activation lanes in the tile layout.
template <typename W>
constexpr int xbytes() {
    return std::is_same_v<W, at::BFloat16> ? 64 : 128;
}

// Chunks of one K-block: the T tokens' activations of a block (T * xbytes per chunk) take at most 24 KiB
// of the 48 KiB L1, beside the weights streaming through; blocks of equal size (a multiple of U).
// Down_proj at M = 1 (K = 14336: 28 KiB of bf16 activations) ran at 39% of a streaming read as one
// block and 66% in two (one-row stream prefetch for one block, lockstep for several).
template <typename W, int T, int U>
int64_t block_chunks(int64_t chunks) {
    const int64_t most = std::max<int64_t>(U, (24 << 10) / (T * xbytes<W>()) / U * U);
    const int64_t blocks = (chunks + most - 1) / most;
    if (blocks <= 1) return std::max<int64_t>(chunks, 1);
    return ((chunks + blocks - 1) / blocks + U - 1) / U * U;
}

// Chunks [c0, c1) of rows row .. row + RR - 1 against the tile at xt, added to part (RR x T vectors of
// 16 fp32 lanes; zeros when first). U chunks per step, each with its own RR x T accumulators, so U RR T
// >= 8 independent chains hide vdpbf16ps's latency (~6 cycles at one per cycle). last: c1 is the rows'
// last full chunk, and the partial chunk past it (K % 32 columns) is added too.
template <typename W, int T, int U, int RR>
ATV_AVX512 __attribute__((always_inline)) inline void row_span(const Problem& p, int64_t row, const char* xt,
                                                                 int64_t c0, int64_t c1, bool last, bool first,
                                                                 __m512* part) {
    constexpr int XC = T * xbytes<W>();  // tile bytes per chunk
    const int kept = p.kept32;
    const uint8_t* mk[RR];
    const W* vp[RR];
    for (int r = 0; r < RR; ++r) {
        mk[r] = p.mask + (row + r) * p.mask_stride;
        vp[r] = static_cast<const W*>(p.values) + (row + r) * p.val_stride + c0 * kept;
    }
    __m512 acc[U][RR][T];
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < RR; ++r)
            for (int t = 0; t < T; ++t)
                acc[u][r][t] = (u == 0 && !first) ? part[r * T + t] : _mm512_setzero_ps();
    // Prefetch (pitfall 3). One row and one K-block (T <= 2): the row is a stream to run `ahead` bytes
    // ahead of. Several rows at once or K-blocks: the rows are separate streams the hardware prefetcher
    // loses, so each row prefetches the row RR below it (the next group's) at the same columns, one group
    // of rows ahead in lockstep.
    const bool lockstep = RR > 1 || c1 - c0 < p.K / 32;  // several rows, or one K-block of several
    const int64_t ahead = lockstep ? 0 : prefetch_bytes();
    const char* next_v[RR];
    const char* next_m[RR];
    for (int r = 0; r < RR; ++r) {
        const int64_t next = std::min(row + RR + r, p.rows - 1);
        next_v[r] = reinterpret_cast<const char*>(static_cast<const W*>(p.values) + next * p.val_stride + c0 * kept);
        next_m[r] = reinterpret_cast<const char*>(p.mask + next * p.mask_stride);
    }
    int64_t c = c0;
    Expanded ex[RR];
    if (kept == 16) {
        for (; c + U <= c1; c += U) {
            if (lockstep) {
                constexpr int STEP = U * 16 * int(sizeof(W));  // bytes of a row per step
                const int64_t at = (c - c0) * 16 * int64_t(sizeof(W));
                for (int r = 0; r < RR; ++r) {
                    if (STEP >= 64 || at % 64 == 0) {
#pragma GCC unroll 8
                        for (int off = 0; off < STEP; off += 64) _mm_prefetch(next_v[r] + at + off, _MM_HINT_T1);
                    }
                    if ((c & 15) == 0) _mm_prefetch(next_m[r] + 4 * c, _MM_HINT_T1);
                }
            } else {
                if ((c & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(mk[0] + 4 * c) + ahead / 8, _MM_HINT_T1);
#pragma GCC unroll 8
                for (int off = 0; off < U * 16 * int(sizeof(W)); off += 64)
                    _mm_prefetch(reinterpret_cast<const char*>(vp[0]) + ahead + off, _MM_HINT_T1);
            }
#pragma GCC unroll 8
            for (int u = 0; u < U; ++u) {
                for (int r = 0; r < RR; ++r)
                    ex[r] = expand_chunk<W, true>(vp[r] + 16 * u, *reinterpret_cast<const uint32_t*>(mk[r] + 4 * (c + u)), 16);
                accumulate<W, T, RR>(ex, xt + (c + u) * XC, acc[u]);
            }
            for (int r = 0; r < RR; ++r) vp[r] += U * 16;
        }
    }
    for (; c < c1; ++c) {
        if (ahead && (c & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(vp[0]) + ahead, _MM_HINT_T1);
        for (int r = 0; r < RR; ++r) {
            ex[r] = expand_chunk<W, false>(vp[r], *reinterpret_cast<const uint32_t*>(mk[r] + 4 * c), kept);
            vp[r] += kept;
        }
        accumulate<W, T, RR>(ex, xt + c * XC, acc[0]);
    }
    if (last && c1 * 32 < p.K) {  // the partial chunk: its mask word is assembled byte by byte
        for (int r = 0; r < RR; ++r) {
            const uint32_t w = mask_word(mk[r], c1, p.mask_stride, p.K);
            ex[r] = expand_chunk<W, false>(vp[r], w, __builtin_popcount(w));
        }
        accumulate<W, T, RR>(ex, xt + c1 * XC, acc[0]);
    }
    for (int u = 1; u < U; ++u)
        for (int r = 0; r < RR; ++r)
            for (int t = 0; t < T; ++t) acc[0][r][t] = _mm512_add_ps(acc[0][r][t], acc[u][r][t]);
    for (int r = 0; r < RR; ++r)
        for (int t = 0; t < T; ++t) part[r * T + t] = acc[0][r][t];
}

// One token, bf16 weights, 16 kept per 32 columns (2:4, 4:8): rows row .. row + RR - 1 over the whole K
// -> out (RR,) fp32. The M = 1 loop is bounded by its loads, not its arithmetic (Zen 4 splits a 512-bit
// load in two), so each step takes two chunks with fewer of them: one 64-bit mask word and one 64-byte
// load of values per row (the second chunk's 16 values moved down by a shuffle), and one activation load
// per chunk shared by the RR rows. Each row prefetches the row RR below it (the next group's) at the same
// columns, so the RR streams run in lockstep one group ahead. No K-blocks: with 4 rows sharing every
// activation load, activations served from L2 (K = 14336: 28 KiB) cost little. In a standalone
// comparison (interleaved, own copies, 30 rounds) this read 91% (4096 x 4096) and 97% (4096 x 14336) of a
// streaming read by median, against 82% and 43% for one row with a far prefetch.
// `after`: the first row the caller runs after this group, whose columns the group prefetches.
template <int RR>
ATV_AVX512 void rows_m1_bf16(const Problem& p, const char* xt, int64_t row, int64_t after, float* out) {
    using W = at::BFloat16;
    const int64_t full = p.K / 32, pairs = full / 2;
    const uint8_t* mk[RR];
    const W* vp[RR];
    const char* next_v[RR];
    const char* next_m[RR];
    for (int r = 0; r < RR; ++r) {
        mk[r] = p.mask + (row + r) * p.mask_stride;
        vp[r] = static_cast<const W*>(p.values) + (row + r) * p.val_stride;
        const int64_t next = std::min(after + r, p.rows - 1);
        next_v[r] = reinterpret_cast<const char*>(static_cast<const W*>(p.values) + next * p.val_stride);
        next_m[r] = reinterpret_cast<const char*>(p.mask + next * p.mask_stride);
    }
    __m512 acc[2][RR];
    for (int r = 0; r < RR; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    for (int64_t q = 0; q < pairs; ++q) {  // chunks 2q and 2q + 1: 64 bytes of values per row
        for (int r = 0; r < RR; ++r) {
            _mm_prefetch(next_v[r] + 64 * q, _MM_HINT_T1);
            if ((q & 7) == 0) _mm_prefetch(next_m[r] + 8 * q, _MM_HINT_T1);
        }
        __m512i e0[RR], e1[RR];
        for (int r = 0; r < RR; ++r) {
            const __m512i v = _mm512_loadu_si512(vp[r] + 32 * q);
            uint64_t w;
            std::memcpy(&w, mk[r] + 8 * q, 8);
            e0[r] = expand16(v, uint32_t(w));
            e1[r] = expand16(_mm512_shuffle_i64x2(v, v, 0xEE), uint32_t(w >> 32));
        }
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xt + 128 * q);
        const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xt + 128 * q + 64);
        for (int r = 0; r < RR; ++r) {
            acc[0][r] = _mm512_dpbf16_ps(acc[0][r], (__m512bh)e0[r], x0);
            acc[1][r] = _mm512_dpbf16_ps(acc[1][r], (__m512bh)e1[r], x1);
        }
    }
    // an odd last full chunk, then the partial chunk past it (K % 32 columns, mask assembled bytewise)
    for (int64_t c = 2 * pairs; c <= full && 32 * c < p.K; ++c) {
        Expanded ex[RR];
        for (int r = 0; r < RR; ++r) {
            const uint32_t w = mask_word(mk[r], c, p.mask_stride, p.K);
            ex[r] = expand_chunk<W, false>(vp[r] + 16 * c, w, __builtin_popcount(w));
        }
        __m512 (*a)[1] = reinterpret_cast<__m512 (*)[1]>(acc[0]);
        accumulate<W, 1, RR>(ex, xt + 64 * c, a);
    }
    for (int r = 0; r < RR; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
}

// Chunks per step for RR rows x T tokens: enough independent accumulator chains (>= 8).
constexpr int unroll_for(int rows, int tokens) {
    return rows * tokens >= 8 ? 1 : (rows * tokens + 7) / (rows * tokens);
}

// Rows r0 .. r0 + R - 1 x the T tokens of tile xt -> out (R, T) fp32. Blocked like a dense GEMM: RB rows
// at a time and, inside, K-blocks (block_chunks) so the tile's K-block stays in L1 while the RB rows
// stream past; each chunk of weights is expanded once for all T tokens, and from 3 tokens on RR rows
// share every activation load. A row's partial sums live in part between K-blocks.
// `after`: the first row the caller runs next (prefetched by the one-token kernel's last group).
template <typename W, int T>
ATV_AVX512 void rows_avx512(const Problem& p, const char* xt, int64_t r0, int R, int64_t after, float* out) {
    // Rows sharing each activation load: at T <= 2 one (one sequential stream with a far prefetch read
    // 0.83-0.89 ms at 4096 x 4096, M = 1, against 0.90 for two rows in lockstep); bf16 3-4 (up to 24
    // accumulators + the expanded rows + one activation register of the 32); fp16 / fp32 2 (each
    // expanded row takes two registers).
    constexpr int RR = T <= 2 ? 1 : !std::is_same_v<W, at::BFloat16> ? 2 : T <= 4 ? 4 : 3;
    constexpr int U = unroll_for(RR, T), U1 = unroll_for(1, T);
    if constexpr (T == 1 && std::is_same_v<W, at::BFloat16>) {
        if (p.kept32 == 16) {  // 2:4 and 4:8 at one token: groups of 4 rows (rows_m1_bf16), then single rows
            int r = 0;
            for (; r + 4 <= R; r += 4) rows_m1_bf16<4>(p, xt, r0 + r, r + 4 < R ? r0 + r + 4 : after, out + r);
            for (; r < R; ++r) rows_m1_bf16<1>(p, xt, r0 + r, r + 1 < R ? r0 + r + 1 : after, out + r);
            return;
        }
    }
    constexpr int RB = 24;
    const int64_t full = p.K / 32;
    const int64_t kbc = block_chunks<W, T, U>(full);
    alignas(64) __m512 part[RB * T];
    for (int rb = 0; rb < R; rb += RB) {
        const int rn = std::min(RB, R - rb);
        for (int64_t c0 = 0; c0 < std::max<int64_t>(full, 1); c0 += kbc) {
            const int64_t c1 = std::min(full, c0 + kbc);
            int r = 0;
            for (; r + RR <= rn; r += RR)
                row_span<W, T, U, RR>(p, r0 + rb + r, xt, c0, c1, c1 == full, c0 == 0, part + r * T);
            for (; r < rn; ++r)  // the rows left over from the groups of RR
                row_span<W, T, U1, 1>(p, r0 + rb + r, xt, c0, c1, c1 == full, c0 == 0, part + r * T);
        }
        for (int r = 0; r < rn; ++r)
            for (int t = 0; t < T; ++t) out[(rb + r) * T + t] = _mm512_reduce_add_ps(part[r * T + t]);
    }
}

// ----------------------------------------------------------------------------------------------------
// AVX2: 8 columns per step; a mask byte selects a row of a shuffle table that places the kept values.

struct Avx2Tables {
    alignas(16) uint8_t shuf16[256][16];  // pshufb control: 16-bit value j -> lane i, 0x80 = zero
    alignas(32) int32_t perm32[256][8];   // vpermps index: 32-bit value j -> lane i
    alignas(32) int32_t keep32[256][8];   // -1 where lane i is kept
    Avx2Tables() {
        for (int b = 0; b < 256; ++b) {
            int j = 0;
            for (int i = 0; i < 8; ++i) {
                if (b >> i & 1) {
                    shuf16[b][2 * i] = uint8_t(2 * j);
                    shuf16[b][2 * i + 1] = uint8_t(2 * j + 1);
                    perm32[b][i] = j;
                    keep32[b][i] = -1;
                    ++j;
                } else {
                    shuf16[b][2 * i] = shuf16[b][2 * i + 1] = 0x80;
                    perm32[b][i] = 0;
                    keep32[b][i] = 0;
                }
            }
        }
    }
};
const Avx2Tables& avx2_tables() {
    static const Avx2Tables tables;
    return tables;
}

// 8 weights at w (only the first `count` are this row's), loaded without reading past `end`.
template <typename W>
inline const W* safe8(const W* w, const void* end, W* scratch, int count) {
    if (reinterpret_cast<const char*>(w + 8) <= static_cast<const char*>(end)) return w;
    std::memset(scratch, 0, 8 * sizeof(W));
    std::memcpy(scratch, w, count * sizeof(W));
    return scratch;
}

template <typename W, int R, int T>
ATV_AVX2 void dot_avx2(const Problem& p, int64_t row0, int64_t t0, float* out) {
    const Avx2Tables& tab = avx2_tables();
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    const uint8_t* mk[R];
    const W* vp[R];
    for (int r = 0; r < R; ++r) {
        mk[r] = p.mask + (row0 + r) * p.mask_stride;
        vp[r] = static_cast<const W*>(p.values) + (row0 + r) * p.val_stride;
    }
    const float* x = static_cast<const float*>(p.x);
    const int64_t steps = (p.K + 7) / 8;
    W scratch[8];
    for (int64_t s = 0; s < steps; ++s) {
        __m256 xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + (t0 + t) * p.x_stride + 8 * s);
        for (int r = 0; r < R; ++r) {
            uint32_t b = mk[r][s];
            if (p.K - 8 * s < 8) b &= (1u << (p.K - 8 * s)) - 1;
            const int count = __builtin_popcount(b);
            if ((s & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(vp[r]) + prefetch_bytes(), _MM_HINT_T1);
            const W* src = safe8(vp[r], p.values_end, scratch, count);
            __m256 e;
            if constexpr (std::is_same_v<W, float>) {
                __m256 v = _mm256_loadu_ps(src);
                __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.perm32[b]));
                __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tab.keep32[b])));
                e = _mm256_and_ps(_mm256_permutevar8x32_ps(v, idx), keep);
            } else {
                __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
                __m128i h = _mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(tab.shuf16[b])));
                if constexpr (std::is_same_v<W, at::BFloat16>) {
                    e = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                } else {
                    e = _mm256_cvtph_ps(h);
                }
            }
            for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(e, xv[t], acc[r][t]);
            vp[r] += count;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
            s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
            out[r * T + t] = _mm_cvtss_f32(s4);
        }
}

// ----------------------------------------------------------------------------------------------------
// Dispatch of one row group x token tile, and the decode driver.

constexpr int ROWS = 4;    // rows per group (independent accumulator chains at M = 1)
constexpr int TILE = 4;    // tokens per tile (AVX-512: 16 zmm accumulators)

template <typename W, int T>
void dot_tile(Path path, const Problem& p, int64_t row0, int R, int64_t t0, float* out) {
    if (path == AVX2) {
        // 16 ymm registers: ROWS x 2 accumulators, so tiles of up to 2 tokens
        constexpr int T1 = T < 2 ? T : 2, T2 = T - T1;
        float head[ROWS * T1], rest[ROWS * (T2 > 0 ? T2 : 1)];
        for (int r0 = 0; r0 < R; r0 += (R == ROWS ? ROWS : 1)) {
            const int rr = R == ROWS ? ROWS : 1;
            if (rr == ROWS) dot_avx2<W, ROWS, T1>(p, row0, t0, head);
            else dot_avx2<W, 1, T1>(p, row0 + r0, t0, head);
            if constexpr (T2 > 0) {
                if (rr == ROWS) dot_avx2<W, ROWS, T2>(p, row0, t0 + T1, rest);
                else dot_avx2<W, 1, T2>(p, row0 + r0, t0 + T1, rest);
            }
            for (int r = 0; r < rr; ++r) {
                for (int t = 0; t < T1; ++t) out[(r0 + r) * T + t] = head[r * T1 + t];
                for (int t = 0; t < T2; ++t) out[(r0 + r) * T + T1 + t] = rest[r * (T2 > 0 ? T2 : 1) + t];
            }
        }
    } else {
        dot_portable<W>(p, row0, R, t0, T, out);
    }
}

template <typename W>
void dot_any(Path path, const Problem& p, int64_t row0, int R, int64_t t0, int T, float* out) {
    switch (T) {
        case 1: return dot_tile<W, 1>(path, p, row0, R, t0, out);
        case 2: return dot_tile<W, 2>(path, p, row0, R, t0, out);
        case 3: return dot_tile<W, 3>(path, p, row0, R, t0, out);
        default: return dot_tile<W, 4>(path, p, row0, R, t0, out);
    }
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// Token tiles of up to `widest` tokens: (first token, tile size) pairs.
inline std::vector<std::pair<int64_t, int>> token_tiles(int64_t M, int widest) {
    std::vector<std::pair<int64_t, int>> tiles;
    for (int64_t t0 = 0; t0 < M; t0 += widest) tiles.emplace_back(t0, int(std::min<int64_t>(widest, M - t0)));
    return tiles;
}

// The decode driver of every path: y (M, out_cols) in the weights' dtype W. Plain: out column j =
// weight row j (+ bias). Gated: out column j = silu(row j) * row (I + j), I = out_cols. Output columns
// are split statically over torch's threads, `step` at a time through every token tile, so the rows of
// those columns come from memory once and from cache for the later tiles. rows(tile index, first
// weight row, R, out) writes the tile's fp32 sums (R, T); one rounding into y.
template <typename W, typename Rows>
void decode(const Problem& p, const std::vector<std::pair<int64_t, int>>& tiles, int step, const float* bias,
            bool gated, int64_t out_cols, W* y, Rows&& rows) {
    int widest = 1;
    for (const auto& tile : tiles) widest = std::max(widest, tile.second);
    at::parallel_for(0, out_cols, step, [&](int64_t a, int64_t b) {
        std::vector<float> sums(2 * step * widest);
        float* up = sums.data() + step * widest;
        for (int64_t j0 = a; j0 < b; j0 += step) {
            const int R = int(std::min<int64_t>(step, b - j0));
            for (size_t i = 0; i < tiles.size(); ++i) {
                const auto [t0, T] = tiles[i];
                rows(i, j0, R, sums.data());
                if (gated) rows(i, j0 + out_cols, R, up);
                for (int r = 0; r < R; ++r) {
                    for (int t = 0; t < T; ++t) {
                        float v = sums[r * T + t];
                        if (gated) {
                            v = silu(v) * up[r * T + t];
                        } else if (bias) {
                            v += bias[j0 + r];
                        }
                        y[(t0 + t) * out_cols + j0 + r] = static_cast<W>(v);
                    }
                }
            }
        }
    });
}

template <typename W>
void rows_any(int T, const Problem& p, const char* xt, int64_t r0, int R, int64_t after, float* out) {
    switch (T) {
        case 1: return rows_avx512<W, 1>(p, xt, r0, R, after, out);
        case 2: return rows_avx512<W, 2>(p, xt, r0, R, after, out);
        case 3: return rows_avx512<W, 3>(p, xt, r0, R, after, out);
        case 4: return rows_avx512<W, 4>(p, xt, r0, R, after, out);
        case 5: return rows_avx512<W, 5>(p, xt, r0, R, after, out);
        case 6: return rows_avx512<W, 6>(p, xt, r0, R, after, out);
        case 7: return rows_avx512<W, 7>(p, xt, r0, R, after, out);
        case 8: return rows_avx512<W, 8>(p, xt, r0, R, after, out);
        default: TORCH_CHECK(false, "atv_sparse cpu: no AVX-512 tile of ", T, " tokens");
    }
}

// AVX-512 decode: token tiles of up to 8 (3 rows x 8 tokens = 24 accumulators beside the expanded
// chunks and one activation register), 64 output columns a step. xpad: (M, Kpad) padded activations,
// copied once per tile into the chunk-major layout rows_avx512 reads.
template <typename W>
void decode_avx512(const Problem& p, const at::Tensor& xpad, const float* bias, bool gated, int64_t out_cols, W* y) {
    const int64_t chunks = xpad.size(1) / 32;
    const auto tiles = token_tiles(p.M, 8);
    std::vector<at::Tensor> tile_x;  // (chunks, T, 32) each: one pointer + constant offsets per chunk
    std::vector<const char*> tile_p;
    for (const auto& [t0, T] : tiles) {
        if (T == 1) {  // one token: its padded row is that layout already (no ATen call: see nm_linear_checked)
            tile_p.push_back(static_cast<const char*>(xpad.data_ptr()) + t0 * xpad.stride(0) * xpad.element_size());
        } else {
            tile_x.push_back(xpad.narrow(0, t0, T).view({T, chunks, 32}).transpose(0, 1).contiguous());
            tile_p.push_back(static_cast<const char*>(tile_x.back().data_ptr()));
        }
    }
    decode<W>(p, tiles, 64, bias, gated, out_cols, y, [&](size_t i, int64_t r0, int R, float* out) {
        // gate and up rows alternate in blocks of `step`: the gate block's successor is its up block
        const int64_t after = !gated ? r0 + R : r0 < out_cols ? r0 + out_cols : r0 - out_cols + R;
        rows_any<W>(tiles[i].second, p, tile_p[i], r0, R, after, out);
    });
}

// ----------------------------------------------------------------------------------------------------
// Expanding rows into a dense panel (prefill).

template <typename W>
void expand_row(const Problem& p, int64_t row, W* dense) {
    const W* vp = static_cast<const W*>(p.values) + row * p.val_stride;
    std::memset(dense, 0, p.K * sizeof(W));
    for_each_kept(p, row, [&](int64_t col, int64_t v) { dense[col] = vp[v]; });
}

template <typename W>
ATV_AVX512 void expand_row_avx512(const Problem& p, int64_t row, W* dense) {
    const uint8_t* mk = p.mask + row * p.mask_stride;
    const W* vp = static_cast<const W*>(p.values) + row * p.val_stride;
    const int64_t full = p.K / 32;
    for (int64_t c = 0; c < full; ++c) {
        uint32_t w = *reinterpret_cast<const uint32_t*>(mk + 4 * c);
        const int n_here = p.kept32;
        if constexpr (std::is_same_v<W, float>) {
            const int nlo = n_here / 2;
            __m512 lo = _mm512_maskz_expandloadu_ps(__mmask16(w & 0xffff), vp);
            __m512 hi = _mm512_maskz_expandloadu_ps(__mmask16(w >> 16), vp + nlo);
            _mm512_storeu_ps(dense + 32 * c, lo);
            _mm512_storeu_ps(dense + 32 * c + 16, hi);
        } else {
            __m512i e = _mm512_maskz_expandloadu_epi16(__mmask32(w), vp);
            _mm512_storeu_si512(dense + 32 * c, e);
        }
        vp += n_here;
    }
    for (int64_t col = 32 * full; col < p.K; ++col) dense[col] = W(0);
    if (full * 32 < p.K) {
        uint32_t w = mask_word(mk, full, p.mask_stride, p.K);
        for (int64_t col = 32 * full; w; w &= w - 1) dense[col + __builtin_ctz(w)] = *vp++;
    }
}

template <typename W>
at::Tensor prefill(Path path, const Problem& p, const at::Tensor& x2d, const at::Tensor& bias, bool gated,
                   int64_t out_cols, int64_t panel_rows) {
    auto y = at::empty({p.M, out_cols}, x2d.options());
    const int per = gated ? 2 : 1;
    // Panels split over the threads in one parallel region, each thread expanding its own panels into its
    // own buffer and multiplying them single-threaded: one region per call. With a region per panel
    // (parallel expand, then torch's parallel GEMM) two threads on this shared 2-core machine paid a
    // scheduler time slice at every barrier: 244 ms against 7.7 ms for one thread at 4096 x 4096, M = 32.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t step = std::max<int64_t>(1, std::min(panel_rows / per, (out_cols + threads - 1) / threads));
    const int64_t panels = (out_cols + step - 1) / step;
    at::parallel_for(0, panels, 1, [&](int64_t a, int64_t b) {
        auto panel = at::empty({per * step, p.K}, x2d.options());
        W* pd = panel.data_ptr<W>();
        for (int64_t pi = a; pi < b; ++pi) {
            const int64_t j0 = pi * step, cols = std::min(step, out_cols - j0);
            for (int64_t i = 0; i < per * cols; ++i) {
                const int64_t row = j0 + i % cols + (i / cols) * out_cols;
                if (path == AVX512) {
                    expand_row_avx512<W>(p, row, pd + i * p.K);
                } else {
                    expand_row<W>(p, row, pd + i * p.K);
                }
            }
            auto w = panel.narrow(0, 0, per * cols);
            if (gated) {
                auto gu = at::mm(x2d, w.t());
                y.narrow(1, j0, cols).copy_(at::silu(gu.narrow(1, 0, cols)) * gu.narrow(1, cols, cols));
            } else if (bias.defined()) {
                y.narrow(1, j0, cols).copy_(at::addmm(bias.narrow(0, j0, cols), x2d, w.t()));
            } else {
                y.narrow(1, j0, cols).copy_(at::mm(x2d, w.t()));
            }
        }
    });
    return y;
}

// ----------------------------------------------------------------------------------------------------
// Entry points.

bool has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16");
}

bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

std::vector<std::string> paths() {
    std::vector<std::string> out;
    if (has_avx512()) out.push_back("avx512");
    if (has_avx2()) out.push_back("avx2");
    out.push_back("portable");
    return out;
}

// The activations as the kernels read them: (M, Kpad), zeros past K; bf16 for bf16 weights, else fp32.
at::Tensor padded_activations(const at::Tensor& x2d, Path path, int64_t K) {
    const int64_t kpad = (K + 31) / 32 * 32;
    const bool bf16 = x2d.scalar_type() == at::kBFloat16 && path == AVX512;
    if (kpad == K && x2d.scalar_type() == (bf16 ? at::kBFloat16 : at::kFloat)) return x2d;  // already that layout
    auto xp = at::zeros({x2d.size(0), kpad}, x2d.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    xp.narrow(1, 0, K).copy_(x2d);
    return xp;
}

// x: (M, K); bitmask: (N, ceil(K / 8)) uint8; values: (N, K n / m), in x's dtype; bias: (N,) or undefined.
// Returns (M, N), or (M, N / 2) when gated. path: 0 portable, 1 AVX2, 2 AVX-512. Every operand (2-D x, contiguous
// tensors, the n:m layout, the path) is checked by the one entry point, nm_linear_checked.
at::Tensor nm_linear(const at::Tensor& x2d, const at::Tensor& bitmask, const at::Tensor& values, int64_t n, int64_t m,
                     const c10::optional<at::Tensor>& bias_opt, bool gated, int64_t path_code, int64_t decode_max,
                     int64_t panel_bytes) {
    const Path path = Path(path_code);
    const int64_t K = x2d.size(1), N = bitmask.size(0);
    const int64_t out_cols = gated ? N / 2 : N;
    at::Tensor bias = bias_opt.has_value() ? bias_opt->contiguous() : at::Tensor();
    Problem p;
    p.mask = bitmask.data_ptr<uint8_t>();
    p.mask_stride = bitmask.size(1);
    p.values = values.data_ptr();
    p.val_stride = values.size(1);
    p.values_end = static_cast<const char*>(values.data_ptr()) + values.numel() * values.element_size();
    p.K = K;
    p.kept32 = int(32 * n / m);
    p.M = x2d.size(0);
    p.rows = N;
    auto dispatch = [&](auto tag) -> at::Tensor {
        using W = decltype(tag);
        if (p.M > decode_max) {
            // at least 128 rows: narrower panels starved the GEMM (down_proj, K = 14336: 36 rows a panel ran
            // at 0.55x torch dense at M = 128); 128 rows of K = 14336 are 3.5 MiB, still L3-resident
            const int64_t rows = std::max<int64_t>(128, panel_bytes / std::max<int64_t>(1, K * values.element_size()));
            return prefill<W>(path, p, x2d, bias, gated, out_cols, rows);
        }
        at::Tensor xp = padded_activations(x2d, path, K);
        p.x = xp.data_ptr();
        p.x_stride = xp.size(1);
        at::Tensor bias_f = bias.defined() ? bias.to(at::kFloat) : at::Tensor();
        auto y = at::empty({p.M, out_cols}, x2d.options());
        const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
        if (path == AVX512) {
            decode_avx512<W>(p, xp, bias_p, gated, out_cols, y.data_ptr<W>());
        } else {
            const auto tiles = token_tiles(p.M, TILE);
            decode<W>(p, tiles, ROWS, bias_p, gated, out_cols, y.data_ptr<W>(),
                      [&](size_t i, int64_t r0, int R, float* out) {
                          dot_any<W>(path, p, r0, R, tiles[i].first, tiles[i].second, out);
                      });
        }
        return y;
    };
    switch (values.scalar_type()) {
        case at::kBFloat16: return dispatch(at::BFloat16());
        case at::kHalf: return dispatch(at::Half());
        case at::kFloat: return dispatch(float());
        default: TORCH_CHECK(false, "atv_sparse cpu: float32 / bfloat16 / float16 weights only, got ", values.scalar_type());
    }
}

// The instruction path to run: `name` ("auto": ATV_SPARSE_CPU_PATH if set, else the fastest this
// processor has), or -1 when the name is unknown or this processor lacks it.
int64_t path_code(const std::string& name) {
    const char* forced = std::getenv("ATV_SPARSE_CPU_PATH");
    const std::string want = name != "auto" ? name : forced && *forced ? forced : paths().front();
    const auto have = paths();
    if (std::find(have.begin(), have.end(), want) == have.end()) return -1;
    return want == "avx512" ? AVX512 : want == "avx2" ? AVX2 : PORTABLE;
}

// nm_linear for x of any leading shape, every operand checked first: a call that fails a check raises
// an error holding INVALID, and the Python wrapper (ops/cpu_lib.py) then words the reason. The checks
// are the wrapper's own (_check, check_path) done here, because in Python they cost more than the
// kernel's whole overhead once a layer's weights have streamed through the caches (~30 us a call).
constexpr const char* INVALID = "atv_sparse_cpu_invalid_call";
at::Tensor nm_linear_checked(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values, int64_t n,
                             int64_t m, const c10::optional<at::Tensor>& bias, bool gated, const std::string& path,
                             int64_t decode_max, int64_t panel_bytes) {
    const auto dt = values.scalar_type();
    const int64_t K = x.dim() >= 1 ? x.size(-1) : 0, N = bitmask.dim() == 2 ? bitmask.size(0) : -1;
    const bool ok =
        (m == 4 || m == 8) && 0 < n && n < m && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf) &&
        K > 0 && K % m == 0 && x.scalar_type() == dt && values.dim() == 2 && values.size(1) * m == K * n &&
        values.size(0) == N && bitmask.size(1) == (K + 7) / 8 && bitmask.scalar_type() == at::kByte &&
        (!gated || (N % 2 == 0 && !bias.has_value())) &&
        (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N)) && x.device().is_cpu() &&
        values.device().is_cpu() && bitmask.device().is_cpu() && (!bias.has_value() || bias->device().is_cpu());
    TORCH_CHECK(ok, INVALID);
    const int64_t code = path_code(path);
    TORCH_CHECK(code >= 0, INVALID);
    // every ATen call costs microseconds with cold caches: none where x is already (M, K) and contiguous
    const bool flat = x.dim() == 2 && x.is_contiguous();
    auto y = nm_linear(flat ? x : x.reshape({-1, K}).contiguous(), bitmask.is_contiguous() ? bitmask : bitmask.contiguous(),
                       values.is_contiguous() ? values : values.contiguous(), n, m, bias, gated, code, decode_max,
                       panel_bytes);
    if (x.dim() == 2) return y;
    auto shape = x.sizes().vec();
    shape.back() = y.size(1);
    return y.view(shape);
}

// A copy of t in memory advised for transparent huge pages (2 MiB aligned): the weight streams of
// decode then take no TLB misses (../shared/notes/cpu-kernels.md: 2.0 ms -> 0.60 ms at M = 4).
at::Tensor hugepage_copy(const at::Tensor& t) {
    const size_t huge = size_t(2) << 20;
    const size_t bytes = t.numel() * t.element_size();
    const size_t total = (bytes + huge - 1) / huge * huge + huge;
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "atv_sparse cpu: mmap of ", total, " bytes failed");
    char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + huge - 1) / huge * huge);
    madvise(aligned, total - (aligned - static_cast<char*>(base)), MADV_HUGEPAGE);
    auto src = t.contiguous();
    std::memcpy(aligned, src.data_ptr(), bytes);
    return torch::from_blob(aligned, t.sizes(), [base, total](void*) { munmap(base, total); },
                            t.options());
}

ATV_AVX512 uint64_t read_avx512(const char* p, int64_t bytes) {
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 128 <= bytes; i += 128) {
        a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
        b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 64));
    }
    a = _mm512_xor_si512(a, b);
    uint64_t lanes[8];
    _mm512_storeu_si512(lanes, a);
    uint64_t h = 0;
    for (int l = 0; l < 8; ++l) h ^= lanes[l];
    for (; i < bytes; ++i) h ^= uint8_t(p[i]);
    return h;
}

// Reads every byte of t once, split over torch's threads as the kernels split rows: the streaming-read
// bandwidth the benchmarks compare the kernels against. Returns a checksum so the reads stay.
int64_t stream_read(const at::Tensor& t) {
    const char* base = static_cast<const char*>(t.data_ptr());
    const int64_t bytes = t.numel() * t.element_size();
    const bool wide = has_avx512();
    std::atomic<uint64_t> h{0};
    at::parallel_for(0, (bytes + 4095) / 4096, 1, [&](int64_t a, int64_t b) {
        const int64_t lo = a * 4096, hi = std::min(bytes, b * 4096);
        uint64_t v = 0;
        if (wide) {
            v = read_avx512(base + lo, hi - lo);
        } else {
            for (int64_t i = lo; i + 8 <= hi; i += 8) {
                uint64_t w;
                std::memcpy(&w, base + i, 8);
                v ^= w;
            }
        }
        h ^= v;
    });
    return int64_t(h.load());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("paths", &paths, "ISA paths this processor runs, fastest first");
    mod.def("nm_linear", &nm_linear_checked, "N:M sparse linear on the packed layout, every operand checked");
    mod.attr("INVALID") = INVALID;
    mod.def("stream_read", &stream_read, "read every byte of a tensor once (bandwidth reference)");
    mod.def("hugepage_copy", &hugepage_copy, "copy of a tensor in THP-advised memory");
}
