"""Triton kernels of atv-sparse, installed as ``atv_sparse.kernels``.

Empty until the sparse-execution work lands: ``SparseLinear`` runs on the reference backend
(decompress + ``F.linear``) meanwhile.
"""
