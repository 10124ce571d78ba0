"""Triton kernels of atv-sparse (``atv_sparse.kernels``).

- ``nm_layout``: the N:M kernel layout (checkpoint values + bitmask read through a position table).
- ``nm_gemv``: the skinny N:M sparse GEMM for decode-sized token counts (and fused gate/up).
- ``nm_gemm``: the N:M GEMM for larger token counts (tiles decompressed in registers, tl.dot).
"""
