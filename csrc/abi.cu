/*
 * abi.cu: the library's version and error text (atv_sparse_cuda.cuh). No kernels here.
 */
#include "atv_sparse_cuda.cuh"

extern "C" int atv_abi_version(void) { return ATV_ABI_VERSION; }

extern "C" const char* atv_error_string(int code) {
    switch (code) {
        case ATV_OK: return "no error";
        case ATV_ERR_PATTERN: return "unsupported sparsity pattern (the CUDA kernels take 2:4 and 4:8)";
        case ATV_ERR_DTYPE: return "unsupported dtype code (0 = float16, 1 = bfloat16)";
        case ATV_ERR_SIZE:
            return "sizes out of range (0 <= M <= 16, K a positive multiple of 16, strides at least a row)";
        case ATV_ERR_ALIGN:
            return "misaligned argument (x and values 16-byte aligned with row strides a multiple of 8 "
                   "elements, bitmask 2-byte aligned with an even row stride)";
        case ATV_ERR_NULL: return "a required pointer is null";
        case ATV_ERR_LAYOUT:
            return "a metadata word of the sparse tensor-core layout is not an ordered pair of positions (a corrupt "
                   "or wrongly built frag_meta)";
        default: break;
    }
    if (code > 0) return cudaGetErrorString(static_cast<cudaError_t>(code));
    return "unknown atv_sparse error code";
}
