/*
 * atv_sparse_cuda.cuh: the C ABI of libatv_sparse_cuda.so (docs/design.md 7.3).
 *
 * Every entry point takes device pointers, sizes and strides in elements, a device index and a
 * cudaStream_t, launches on that stream, never synchronises and never allocates, and returns an
 * int: 0 on success, a negative ATV_ERR_* code when the arguments are refused (nothing was
 * launched), or a positive cudaError_t when the CUDA runtime failed (device selection, launch).
 * atv_error_string() turns any of them into text. Python loads the library with ctypes
 * (atv_sparse/ops/cuda_lib.py); nothing here depends on PyTorch.
 *
 * Weight layout: the checkpoint's own (docs/design.md 6), used as stored, no repacking:
 *   values  (N, K / 2) fp16 / bf16, row stride ldv: the kept weights of each row in column order;
 *   bitmask (N, K / 8) uint8, row stride ldb: bit k of byte c is column 8c + k, 1 = kept.
 * Both 2:4 and 4:8 keep exactly four columns of every aligned group of eight, i.e. every mask byte
 * has four bits set and owns four consecutive values: the kernels read the two patterns alike.
 *
 * Computation: out[t, r] = sum_k x[t, k] * W[r, k] (+ bias[r]) in fp32, rounded once to the
 * activation dtype; the gated form returns silu(x Wg^T) * (x Wu^T) for two weights of one shape.
 *
 * Requirements (else ATV_ERR_*): 0 <= M <= 16 tokens; N >= 0; K a positive multiple of 16;
 * (n, m) = (2, 4) or (4, 8); x, values, up values 16-byte aligned with row strides ldx, ldv
 * multiples of 8 elements; bitmasks 2-byte aligned with ldb even; ldx >= K, ldv >= K / 2,
 * ldb >= K / 8, ldo >= N; bias (optional, nullable) and out aligned to their element size.
 */
#ifndef ATV_SPARSE_CUDA_CUH
#define ATV_SPARSE_CUDA_CUH

#include <stdint.h>

#include <cuda_runtime_api.h>

#define ATV_ABI_VERSION 2

/* dtype codes: the activations', weights', bias' and output's element type (all the same). */
#define ATV_DTYPE_F16 0
#define ATV_DTYPE_BF16 1

/* Refusals (negative, nothing launched). Positive return values are cudaError_t. */
#define ATV_OK 0
#define ATV_ERR_PATTERN (-1)   /* (n, m) is not 2:4 or 4:8 */
#define ATV_ERR_DTYPE (-2)     /* dtype code is not ATV_DTYPE_F16 / ATV_DTYPE_BF16 */
#define ATV_ERR_SIZE (-3)      /* M, N or K out of range, or a stride smaller than its row */
#define ATV_ERR_ALIGN (-4)     /* a pointer or stride breaks the 16-byte (or 2-byte) alignment */
#define ATV_ERR_NULL (-5)      /* a required pointer is null */
#define ATV_ERR_LAYOUT (-6)    /* host twins only: a metadata word mma.sp would not accept */

#ifdef __cplusplus
extern "C" {
#endif

/* ATV_ABI_VERSION of the built library: Python refuses a stale build. */
int atv_abi_version(void);

/* Text for any return value of this library (static storage, never null). */
const char* atv_error_string(int code);

/*
 * out (M, N), row stride ldo = x (M, K), row stride ldx  @  W^T (+ bias (N,) when not null),
 * W (N, K) given as values / bitmask of pattern n:m. All tensors on CUDA device `device`.
 */
int atv_nm_linear(int device, const void* x, int64_t ldx, const void* values, int64_t ldv,
                  const void* bitmask, int64_t ldb, const void* bias, void* out, int64_t ldo,
                  int64_t M, int64_t N, int64_t K, int n, int m, int dtype, cudaStream_t stream);

/*
 * out (M, N) = silu(x Wg^T) * (x Wu^T): the gate and up weights share shapes and strides
 * (ldv, ldb), e.g. a LLaMA / Qwen2 MLP's gate_proj and up_proj.
 */
int atv_nm_gated(int device, const void* x, int64_t ldx, const void* gate_values,
                 const void* gate_bitmask, const void* up_values, const void* up_bitmask,
                 int64_t ldv, int64_t ldb, void* out, int64_t ldo, int64_t M, int64_t N,
                 int64_t K, int n, int m, int dtype, cudaStream_t stream);

/*
 * Host twins of the two entry points above: the same argument checks, the same work partition
 * (blocks, warps, lanes, K-split, unrolled steps) and the same per-chunk decode code as the
 * kernel, run serially on host memory. They exist so machines without a GPU can test the
 * decode tables, the selection and the partition; ksplit 0 picks what the launcher would pick
 * on a 132-SM device, 1 / 2 / 4 force a split. Not fast.
 */
int atv_nm_linear_host(const void* x, int64_t ldx, const void* values, int64_t ldv,
                       const void* bitmask, int64_t ldb, const void* bias, void* out, int64_t ldo,
                       int64_t M, int64_t N, int64_t K, int n, int m, int dtype, int ksplit);

int atv_nm_gated_host(const void* x, int64_t ldx, const void* gate_values,
                      const void* gate_bitmask, const void* up_values, const void* up_bitmask,
                      int64_t ldv, int64_t ldb, void* out, int64_t ldo, int64_t M, int64_t N,
                      int64_t K, int n, int m, int dtype, int ksplit);

/*
 * 2:4 on the sparse tensor cores (sp24_decode.cu): the same products from the load-time runtime
 * layout of sp24_common.cuh, built once per layer by atv_sparse/kernels/cuda_layouts.py:
 *   frag_values (ceil(N / 16), K / 32, 32, 8) fp16 / bf16, 16-byte aligned;
 *   frag_meta   (ceil(N / 16), K / 32, 16) uint32, 4-byte aligned.
 * Requirements: 0 <= M <= 16; K a positive multiple of 32; x 4-byte aligned with ldx even,
 * ldx >= K, ldo >= N.
 */
int atv_sp24_linear(int device, const void* x, int64_t ldx, const void* frag_values, const void* frag_meta,
                    const void* bias, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int dtype,
                    cudaStream_t stream);

int atv_sp24_gated(int device, const void* x, int64_t ldx, const void* gate_frag_values,
                   const void* gate_frag_meta, const void* up_frag_values, const void* up_frag_meta, void* out,
                   int64_t ldo, int64_t M, int64_t N, int64_t K, int dtype, cudaStream_t stream);

/* Host twins of the two above: the kernel's fragment loads, partition and epilogue, with mma.sp
 * emulated from the PTX ISA's definition; ATV_ERR_LAYOUT on a metadata word it would not accept. */
int atv_sp24_linear_host(const void* x, int64_t ldx, const void* frag_values, const void* frag_meta,
                         const void* bias, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int dtype,
                         int ksplit);

int atv_sp24_gated_host(const void* x, int64_t ldx, const void* gate_frag_values, const void* gate_frag_meta,
                        const void* up_frag_values, const void* up_frag_meta, void* out, int64_t ldo, int64_t M,
                        int64_t N, int64_t K, int dtype, int ksplit);

#ifdef __cplusplus
}
#endif

#endif /* ATV_SPARSE_CUDA_CUH */
