"""Run every CUDA kernel variant once on small odd shapes, for compute-sanitizer (GPU machines only).

    compute-sanitizer --tool memcheck  python tests/gpu_cuda_sanitize.py
    compute-sanitizer --tool racecheck python tests/gpu_cuda_sanitize.py
    compute-sanitizer --tool initcheck python tests/gpu_cuda_sanitize.py
    compute-sanitizer --tool synccheck python tests/gpu_cuda_sanitize.py

PyTorch's caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1, set before torch is
imported) so every tensor is its own allocation and a read or write one element past a weight, the
activations or the output is reported instead of landing in a neighbour. Each variant (fp16 / bf16,
2:4 / 4:8, every token tile 1..16, plain, bias, gated; K-split 1 and 4 with partial steps; the
2:4 sparse tensor-core kernel on its load-time layout, rows padded to 16) is also
checked against a float64 reference, so the script exits non-zero on a wrong result too.
Not a pytest module (no test_ prefix): the sanitizer wants one plain process.
"""

from __future__ import annotations

import os
import sys

os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from atv_sparse.formats.bitmask import compress  # noqa: E402
from atv_sparse.kernels.cuda_layouts import sp24_layout  # noqa: E402
from atv_sparse.ops import cuda_lib  # noqa: E402

# (N, K): a few rows with a long K (split over 4 warps, partial last step), many rows with K shorter
# than one step (no split, partial last row group).
SHAPES = ((3, 16 * 300), (133, 48))
TOKENS = (1, 2, 3, 8, 16)


def random_nm(rows: int, k: int, n: int, m: int, dtype: torch.dtype, gen: torch.Generator):
    w = torch.randn(rows, k, generator=gen).to(dtype)
    scores = torch.rand(rows, k // m, m, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, dim=-1).indices, True)
    keep = keep.reshape(rows, k)
    bitmask, values = compress(w, keep, n, m)
    return (w * keep).cuda(), bitmask.cuda(), values.contiguous().cuda()


def check(name: str, out: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor) -> bool:
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (plain.double() - ref).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= bound
    print(f"{'ok  ' if ok else 'FAIL'} {name}: error {err:.3g} (bound {bound:.3g})")
    return ok


def main() -> int:
    why = cuda_lib.cuda_library_status()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.float16, torch.bfloat16):
        for n, m in cuda_lib.SUPPORTED_PATTERNS:
            for rows, k in SHAPES:
                wg, gb, gv = random_nm(rows, k, n, m, dtype, gen)
                wu, ub, uv = random_nm(rows, k, n, m, dtype, gen)
                bias = torch.randn(rows, generator=gen).to(dtype).cuda()
                for tokens in TOKENS:
                    x = torch.randn(tokens, k, generator=gen).to(dtype).cuda()
                    tag = f"{str(dtype)[6:]} {n}:{m} M={tokens} N={rows} K={k}"
                    xd = x.double()
                    out = torch.ops.atv_sparse.nm_linear_cuda(x, gv, gb, n, m)
                    ok &= check(f"linear {tag}", out, xd @ wg.double().T, F.linear(x, wg))
                    out = torch.ops.atv_sparse.nm_linear_cuda(x, gv, gb, n, m, bias)
                    ok &= check(f"bias   {tag}", out, xd @ wg.double().T + bias.double(), F.linear(x, wg, bias))
                    out = torch.ops.atv_sparse.nm_gated_cuda(x, gv, gb, uv, ub, n, m)
                    ref = F.silu(xd @ wg.double().T) * (xd @ wu.double().T)
                    ok &= check(f"gated  {tag}", out, ref, F.silu(F.linear(x, wg)) * F.linear(x, wu))
                    if (n, m) == (2, 4) and k % 32 == 0:  # the sparse tensor-core kernel, its layout
                        (gfv, gfm), (ufv, ufm) = sp24_layout(gv, gb), sp24_layout(uv, ub)
                        out = torch.ops.atv_sparse.sp24_linear_cuda(x, gfv, gfm, rows, bias)
                        ok &= check(f"sp24   {tag}", out, xd @ wg.double().T + bias.double(), F.linear(x, wg, bias))
                        out = torch.ops.atv_sparse.sp24_gated_cuda(x, gfv, gfm, ufv, ufm, rows)
                        ok &= check(f"sp24 g {tag}", out, ref, F.silu(F.linear(x, wg)) * F.linear(x, wu))
    torch.cuda.synchronize()
    print("all variants ok" if ok else "FAILURES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
