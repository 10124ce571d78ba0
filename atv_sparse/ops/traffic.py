"""Bytes a sparse (or dense) linear call must move, and the time that takes at a copy bandwidth.

The floor every backend is measured against (``benchmarks/latency.py`` prints achieved time beside
it): a call reads its weight in the backend's layout once, reads the activations once and writes
the output once; anything above that is the kernel's own cost.

    weight  dense:       out * in * b                      (b = bytes per element, 2 for fp16 / bf16)
            triton/cuda: out * in * n/m * b + out * ceil(in / 8)      values + 1-bit mask per weight
            cusparselt:  out * in * n/m * b + out * in * n/m / 4      values + 2-bit index per kept value
            cuda_sp24:   as cusparselt (mma.sp's 2-bit metadata; rows padded to 16 ignored)
            reference:   values + mask, plus the dense weight written and read back (decompress + F.linear)
    activations M * in * b, output M * out' * b (out' = out / 2 for the gated gate/up product)

Time at a copy bandwidth ``copy_gbs`` (bytes read + written per second, as a device-to-device copy
measures it): bytes / copy_gbs. Worked example, Llama-3-8B o_proj (4096 x 4096), 2:4 fp16, M = 1:
values 16 MiB + mask 2 MiB = 18.9 MB against dense 33.6 MB, so 1.78x less time at the same
bandwidth; at 3.0 TB/s, 6.3 us against 11.2 us.
"""

from __future__ import annotations

import math

WEIGHT_LAYOUTS = ("dense", "triton", "cuda", "cuda_sp24", "cusparselt", "reference")


def bytes_moved(out_features: int, in_features: int, tokens: int, backend: str, n: int | None = None,
                m: int | None = None, elem_bytes: int = 2, gated: bool = False) -> dict[str, int]:
    """{"weight", "metadata", "activations", "output", "total"} bytes of one call.

    backend: one of WEIGHT_LAYOUTS ("auto" is whichever backend it picked); n, m: the pattern
    (ignored for dense). gated: the output is the (M, out / 2) gate/up product.
    """
    if backend not in WEIGHT_LAYOUTS:
        raise ValueError(f"bytes_moved: backend {backend!r} is not one of {', '.join(WEIGHT_LAYOUTS)}")
    dense = out_features * in_features * elem_bytes
    if backend == "dense":
        weight, metadata = dense, 0
    else:
        if n is None or m is None:
            raise ValueError(f"bytes_moved: backend {backend!r} needs the N:M pattern (n, m)")
        kept = out_features * in_features * n // m
        weight = kept * elem_bytes
        if backend in ("cusparselt", "cuda_sp24"):
            metadata = math.ceil(kept * 2 / 8)
        else:
            metadata = out_features * math.ceil(in_features / 8)
        if backend == "reference":
            weight += 2 * dense  # the decompressed weight is written, then read by F.linear
    activations = tokens * in_features * elem_bytes
    output = tokens * (out_features // 2 if gated else out_features) * elem_bytes
    return {"weight": weight, "metadata": metadata, "activations": activations, "output": output,
            "total": weight + metadata + activations + output}


def ideal_ms(total_bytes: int, copy_gbs: float) -> float:
    """Milliseconds to move ``total_bytes`` at ``copy_gbs`` GB/s (10^9 bytes per second)."""
    return total_bytes / (copy_gbs * 1e9) * 1e3
