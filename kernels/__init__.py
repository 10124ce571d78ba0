"""Triton kernels of atv-sparse, installed as ``atv_sparse.kernels``.

- ``nm_layout``: the N:M kernel layout (checkpoint values + bitmask read through a position table).
- ``nm_gemv``: the skinny N:M sparse GEMM for decode-sized token counts.
"""
