"""cuSPARSELt backend: 2:4 fp16 / bf16 on CUDA through torch's ``_cslt_compress`` / ``_cslt_sparse_mm``.

Layout: ``cslt_pack`` compresses the dense 2:4 weight (out, in) into cuSPARSELt's opaque buffer
(kept values + 2-bit indices, reordered for the sparse tensor cores) once at load time; the
dense copy is dropped as soon as the buffer exists. At run time ``atv_sparse::cslt_linear``
computes ``x @ W^T + bias`` as ``(W @ x^T)^T`` with the transpose fused into the matmul
(``transpose_result=True``), so the output comes back row-major (tokens, out).

Algorithm ids: cuSPARSELt ships several kernels per shape and some ids are known to give wrong
results, so ``search_alg_id`` asks ``_cslt_sparse_mm_search`` for the fastest id on a sample
input, then checks its result against dense cuBLAS (error at most 2x cuBLAS's own, both measured
against an fp32 reference) and falls back to id 0 (checked the same way) before anything is
cached. The dense operand needs a multiple of 8 rows: other token counts are zero-padded (an
extra allocation, only for such M; decode sizes use the Triton / CUDA kernels instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError

DTYPES = (torch.float16, torch.bfloat16)
SHAPE_MULTIPLE = 16  # cuSPARSELt's fp16 / bf16 minimum: both weight dimensions multiples of 16
ROW_MULTIPLE = 8     # rows of the dense operand (tokens)


def cusparselt_status(device: torch.device) -> str | None:
    """None when cuSPARSELt can run on ``device``, else why not."""
    if device.type != "cuda":
        return f"cuSPARSELt needs a CUDA device, not {device}"
    if not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    return None


def cusparselt_applies(n: int | None, m: int | None, dtype: torch.dtype, out_features: int,
                       in_features: int) -> str | None:
    """None when a layer of this pattern, dtype and shape can use cuSPARSELt, else why not."""
    if (n, m) != (2, 4):
        return "cuSPARSELt runs only the 2:4 pattern"
    if dtype not in DTYPES:
        return f"cuSPARSELt takes float16 / bfloat16, not {dtype}"
    if out_features % SHAPE_MULTIPLE or in_features % SHAPE_MULTIPLE:
        return (f"cuSPARSELt needs both weight dimensions to be multiples of {SHAPE_MULTIPLE}, "
                f"got ({out_features} x {in_features})")
    return None


def cslt_pack(dense_weight: torch.Tensor) -> torch.Tensor:
    """dense_weight: (out, in) fp16 / bf16 on CUDA, 2:4 along in -> cuSPARSELt's compressed buffer."""
    return torch._cslt_compress(dense_weight.contiguous())


@torch.library.custom_op("atv_sparse::cslt_linear", mutates_args=())
def cslt_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, alg_id: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., in) fp16 / bf16 CUDA; packed: ``cslt_pack``'s buffer; bias: (out,) or None -> (..., out).

    alg_id >= 0: torch hands it to cuSPARSELt unconditionally, whose ids start at 0."""
    if alg_id < 0:
        raise AtvSparseError(f"cslt_linear: cuSPARSELt algorithm id {alg_id} is not valid (ids start at 0; "
                             "search_alg_id finds one)")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    tokens = rows.shape[0]
    pad = -tokens % ROW_MULTIPLE
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    y = torch._cslt_sparse_mm(packed, rows.t(), bias=bias, transpose_result=True, alg_id=alg_id)
    if pad:
        y = y[:tokens]
    return y.reshape(*x.shape[:-1], out_features)


@cslt_linear.register_fake
def _(x, packed, out_features, alg_id, bias=None):
    torch._check(x.dtype == packed.dtype, lambda: f"cslt_linear: x is {x.dtype}, the weight {packed.dtype}")
    return x.new_empty(*x.shape[:-1], out_features)


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.float() - ref).abs().max().item()


def search_alg_id(packed: torch.Tensor, dense_weight: torch.Tensor, tokens: int,
                  bias: torch.Tensor | None = None, name: str = "layer") -> int:
    """The fastest cuSPARSELt algorithm id for ``tokens`` rows whose result matches dense cuBLAS.

    dense_weight: (out, in), the same 2:4 weight as ``packed`` (used only for the check).
    """
    gen = torch.Generator(device=dense_weight.device).manual_seed(0)
    x = torch.randn(tokens, dense_weight.shape[1], generator=gen, device=dense_weight.device,
                    dtype=dense_weight.dtype)
    ref = F.linear(x.float(), dense_weight.float(), None if bias is None else bias.float())
    budget = 2 * _error(F.linear(x, dense_weight, bias), ref) + 1e-3 * ref.abs().max().item()
    rows = F.pad(x, (0, 0, 0, -tokens % ROW_MULTIPLE))
    best = int(torch._cslt_sparse_mm_search(packed, rows.t(), bias=bias, transpose_result=True))
    for alg_id in dict.fromkeys((best, 0)):
        y = cslt_linear(x, packed, dense_weight.shape[0], alg_id, bias)
        if torch.isfinite(y).all() and _error(y, ref) <= budget:
            return alg_id
    raise AtvSparseError(f"{name}: no cuSPARSELt algorithm id reproduces the dense result for "
                         f"{tuple(dense_weight.shape)} x {tokens} tokens; use backend='triton' for this layer")
