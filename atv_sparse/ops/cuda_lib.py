"""The ``cuda`` backend: ``libatv_sparse_cuda.so`` (csrc/, C ABI) loaded lazily with ctypes and
exposed as ``torch.library`` custom ops (docs/design.md 7.3).

- ``torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, n, m, bias=None)``:
  ``x @ W^T (+ bias)``;
- ``torch.ops.atv_sparse.nm_gated_cuda(x, gate_values, gate_bitmask, up_values, up_bitmask, n, m)``:
  ``silu(x @ Wg^T) * (x @ Wu^T)``.

and, for 2:4 on the sparse tensor cores (``csrc/sp24_decode.cu``), from the runtime layout
``atv_sparse.kernels.cuda_layouts.sp24_layout`` builds once per layer at load time:

- ``torch.ops.atv_sparse.sp24_linear_cuda(x, frag_values, frag_meta, out_features, bias=None)``;
- ``torch.ops.atv_sparse.sp24_gated_cuda(x, gate_frag_values, gate_frag_meta, up_frag_values,
  up_frag_meta, out_features)``.

The first two take the checkpoint's layout as stored (values (N, K / 2), bitmask (N, K / 8) uint8, see
``csrc/README.md``): no CUDA-specific packing. Patterns 2:4 and 4:8 (the kernels read both alike:
every mask byte keeps four columns), fp16 / bf16 with fp32 accumulation, 1..16 tokens, K a multiple
of 16 (one 16-byte load = 8 kept values = 16 columns). Each call allocates only its output, launches
on ``torch.cuda.current_stream()`` and never synchronises, so CUDA graphs can capture it; the fake
implementations repeat the shape checks so ``torch.compile`` traces through.

Nothing here touches the GPU or the library at import time: :func:`cuda_library_status`,
:func:`cuda_layer_status` and :func:`cuda_applies` (what the dispatcher asks) load and probe on
first use.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Iterator

import torch

from ..errors import AtvSparseError
from . import build_cuda

LIB_NAME = build_cuda.LIB_NAME
ABI_VERSION = 2                      # csrc/atv_sparse_cuda.cuh: ATV_ABI_VERSION
SUPPORTED_PATTERNS = ((2, 4), (4, 8))
MAX_TOKENS = 16
K_MULTIPLE = 16                      # columns per 16-byte load of kept values
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_SIGNATURES = {
    # device, x, ldx, values, ldv, bitmask, ldb, bias, out, ldo, M, N, K, n, m, dtype, stream
    "atv_nm_linear": [_INT, _P, _I64, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _P],
    # device, x, ldx, gate values, gate bitmask, up values, up bitmask, ldv, ldb, out, ldo, M, N, K, n, m, dtype, stream
    "atv_nm_gated": [_INT, _P, _I64, _P, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _P],
    # the host twins: same without device and stream, plus ksplit (0 = as the launcher picks)
    "atv_nm_linear_host": [_P, _I64, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _INT],
    "atv_nm_gated_host": [_P, _I64, _P, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _INT],
    # 2:4 on the sparse tensor cores, from the load-time layout (kernels/cuda_layouts.py):
    # device, x, ldx, frag values, frag meta, bias, out, ldo, M, N, K, dtype, stream
    "atv_sp24_linear": [_INT, _P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    # device, x, ldx, gate frag values, gate frag meta, up frag values, up frag meta, out, ldo, M, N, K, dtype, stream
    "atv_sp24_gated": [_INT, _P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "atv_sp24_linear_host": [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT],
    "atv_sp24_gated_host": [_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT],
}
SP24_K_MULTIPLE = 32                 # columns per mma.sp k-block


def library_path() -> Path:
    """Where the build puts the library and the loader looks: inside the package directory."""
    return Path(__file__).resolve().parent.parent / LIB_NAME


def _not_built_reason() -> str:
    rebuild = "then reinstall, or run `python -m atv_sparse.ops.build_cuda` from a source checkout"
    if build_cuda.find_nvcc() is None:
        return (f"{LIB_NAME} not built: nvcc was not found (CUDA_HOME, PATH); install the CUDA toolkit on a "
                f"machine with a GPU, {rebuild}")
    return (f"{LIB_NAME} not built: the install builds it only where nvcc and a CUDA GPU are both present "
            f"(or with {build_cuda.ENV_FORCE}=1), not with {build_cuda.ENV_SKIP}=1, and a failed compile is "
            f"logged and skipped (pip install -v shows it); {rebuild}")


def open_library(path: str | Path) -> ctypes.CDLL:
    """Load a build of the library with every entry point's signature declared.

    Raises OSError when it does not load and RuntimeError when its ABI version is not this package's.
    """
    lib = ctypes.CDLL(str(path))
    lib.atv_abi_version.restype = ctypes.c_int
    lib.atv_error_string.restype = ctypes.c_char_p
    lib.atv_error_string.argtypes = [ctypes.c_int]
    version = lib.atv_abi_version()
    if version != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI version {version}, this package needs {ABI_VERSION}: a stale build; "
                           f"rebuild it with `python -m atv_sparse.ops.build_cuda`")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why not); once per process."""
    path = library_path()
    if not path.exists():
        return None, _not_built_reason()
    try:
        return open_library(path), None
    except OSError as err:
        return None, (f"{LIB_NAME} failed to load ({err}); rebuild it with "
                      f"`python -m atv_sparse.ops.build_cuda` against this machine's CUDA")
    except RuntimeError as err:
        return None, str(err)


@functools.lru_cache(maxsize=None)
def _device_reason() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"


def cuda_library_status() -> str | None:
    """None when the CUDA library is loaded and a CUDA device exists, else the reason in plain words."""
    _, why = _load()
    return why or _device_reason()


def cuda_layer_status(n: int | None, m: int | None, dtype: torch.dtype, out_features: int,
                      in_features: int) -> str | None:
    """None when a layer of this pattern, weight dtype and shape suits the CUDA kernels, else why not."""
    if (n, m) not in SUPPORTED_PATTERNS:
        return (f"the CUDA kernels take 2:4 and 4:8, not {n}:{m}" if m
                else "the CUDA kernels take 2:4 and 4:8, not unstructured sparsity")
    if dtype not in DTYPE_CODES:
        return f"the CUDA kernels take float16 / bfloat16, not {dtype}"
    if in_features <= 0 or in_features % K_MULTIPLE:
        return (f"the CUDA kernels need in_features to be a positive multiple of {K_MULTIPLE} (16-byte loads "
                f"of 8 kept values), not {in_features}")
    if not 0 < out_features < 2**31:
        return f"the CUDA kernels need 1 <= out_features < 2^31, not {out_features}"
    return None


def cuda_applies(x: torch.Tensor, values: torch.Tensor, n: int | None, m: int | None) -> str | None:
    """None when the cuda backend can run ``x @ W^T`` for these tensors, else why not.

    x: (..., K) activations; values: (N, K * n / m) kept weights; (n, m) the pattern (None for
    unstructured).
    """
    k = x.shape[-1] if x.dim() else 0
    why = cuda_layer_status(n, m, values.dtype, values.shape[0] if values.dim() == 2 else 0, k)
    if why:
        return why
    if x.dtype != values.dtype:
        return f"{x.dtype} activations with {values.dtype} weights (the CUDA kernels need one dtype)"
    tokens = x.numel() // k
    if tokens > MAX_TOKENS:
        return f"{tokens} tokens (the CUDA kernels take at most {MAX_TOKENS})"
    if x.device.type != "cuda" or values.device != x.device:
        return f"x on {x.device}, values on {values.device} (the CUDA kernels need both on one CUDA device)"
    if values.stride(-1) != 1 or values.stride(0) % 8 or values.data_ptr() % 16:
        return "values whose rows are not contiguous and 16-byte aligned (use .contiguous() weights)"
    return cuda_library_status()


# ------------------------------------------------------------------------------------------------
# Shape checks, shared by the real and the fake implementations.

def _weight_problems(name: str, values, bitmask, k, n, m, dtype) -> Iterator[tuple[object, str]]:
    yield values.dim() == 2 and bitmask.dim() == 2, \
        f"{name}: values and bitmask must be 2-D, got {tuple(values.shape)} and {tuple(bitmask.shape)}"
    yield values.dtype == dtype, f"{name}: values are {values.dtype}, activations {dtype}"
    yield bitmask.dtype == torch.uint8, f"{name}: bitmask is {bitmask.dtype}, expected torch.uint8"
    yield values.shape[1] * m == k * n, \
        f"{name}: values {tuple(values.shape)} do not hold K*{n}/{m} kept weights per row for K={k}"
    yield (bitmask.shape[0] == values.shape[0]) & (bitmask.shape[1] * 8 == k), \
        f"{name}: bitmask {tuple(bitmask.shape)} does not match ({values.shape[0]}, K/8) for K={k}"


def _x_problems(op: str, x, k_multiple: int) -> Iterator[tuple[object, str]]:
    """The activations' (condition, message) pairs, K a positive multiple of ``k_multiple``."""
    yield x.dim() >= 1, f"{op}: x must have a feature dimension, got shape {tuple(x.shape)}"
    k = x.shape[-1]
    yield x.dtype in DTYPE_CODES, f"{op}: x is {x.dtype}, the CUDA kernels take float16 / bfloat16"
    yield (k > 0) & (k % k_multiple == 0), f"{op}: K={k} input features, need a positive multiple of {k_multiple}"
    tokens = x.numel() // k
    yield tokens <= MAX_TOKENS, f"{op}: {tokens} tokens, the CUDA kernels take at most {MAX_TOKENS}"


def _problems(op: str, x, weights, n, m, bias=None) -> Iterator[tuple[object, str]]:
    """(condition, message) pairs in order; conditions may be SymBools (fake tensors)."""
    yield (n, m) in SUPPORTED_PATTERNS, f"{op}: pattern {n}:{m} is not supported (2:4 or 4:8)"
    yield from _x_problems(op, x, K_MULTIPLE)
    k = x.shape[-1]
    for name, (values, bitmask) in weights.items():
        yield from _weight_problems(f"{op}: {name}", values, bitmask, k, n, m, x.dtype)
    if len(weights) == 2:
        (gv, gb), (uv, ub) = weights.values()
        yield (gv.shape == uv.shape) & (gb.shape == ub.shape), \
            f"{op}: gate {tuple(gv.shape)} / {tuple(gb.shape)} and up {tuple(uv.shape)} / {tuple(ub.shape)} differ"
    if bias is not None:
        values = next(iter(weights.values()))[0]
        yield (bias.dim() == 1) & (bias.shape[0] == values.shape[0]) & (bias.dtype == x.dtype), \
            f"{op}: bias {bias.dtype} {tuple(bias.shape)} must be {x.dtype} ({values.shape[0]},)"


def _enforce(problems: Iterator[tuple[object, str]], fake: bool = False) -> None:
    """The first failed condition of ``problems`` raised: an AtvSparseError, or for fake tensors through
    ``torch._check`` (so ``torch.compile`` fails early with the same message)."""
    for ok, message in problems:
        if fake:
            torch._check(ok, lambda message=message: message)
        elif not ok:
            raise AtvSparseError(message)


def _check_device(op: str, x, pairs: dict, bias, what: str) -> None:
    """x, both tensors of every pair (``what``: "weights", "layouts") and ``bias`` on one CUDA device."""
    tensors = [t for pair in pairs.values() for t in pair] + ([bias] if bias is not None else [])
    if x.device.type != "cuda" or any(t.device != x.device for t in tensors):
        raise AtvSparseError(f"{op}: x is on {x.device} and the {what} on "
                             f"{sorted({str(t.device) for t in tensors})}; all must be on one CUDA device")


def _check_memory(op: str, x, weights, bias) -> None:
    """Devices and strides the C ABI needs (real tensors only)."""
    _check_device(op, x, weights, bias, "weights")
    for name, (values, bitmask) in weights.items():
        if values.stride(1) != 1 or values.stride(0) % 8 or values.data_ptr() % 16:
            raise AtvSparseError(f"{op}: {name} values (strides {values.stride()}) need contiguous rows, 16-byte "
                                 f"aligned: pass .contiguous() weights")
        if bitmask.stride(1) != 1 or bitmask.stride(0) % 2 or bitmask.data_ptr() % 2:
            raise AtvSparseError(f"{op}: {name} bitmask (strides {bitmask.stride()}) needs contiguous rows, "
                                 f"2-byte aligned: pass a .contiguous() bitmask")
    if len(weights) == 2:
        (gv, gb), (uv, ub) = weights.values()
        if gv.stride() != uv.stride() or gb.stride() != ub.stride():
            raise AtvSparseError(f"{op}: gate and up weights must share strides, got {gv.stride()} / {uv.stride()} "
                                 f"and {gb.stride()} / {ub.stride()}")


def _library(op: str) -> ctypes.CDLL:
    lib, why = _load()
    why = why or _device_reason()
    if why:
        raise AtvSparseError(f"atv_sparse::{op}: the CUDA backend is unavailable: {why}; use another backend "
                             "(backend='auto' picks one this machine has)")
    return lib


def _rows(x: torch.Tensor, align: int = 16) -> torch.Tensor:
    """x as (M, K) with unit column stride and ``align``-byte aligned rows (a copy only when it is not)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(1) != 1 or rows.stride(0) % (align // 2) or rows.data_ptr() % align:
        rows = rows.clone(memory_format=torch.contiguous_format)
    return rows


def _raise_on_error(lib: ctypes.CDLL, op: str, entry: str, code: int) -> None:
    if code != 0:
        text = lib.atv_error_string(code).decode(errors="replace")
        raise RuntimeError(f"atv_sparse::{op}: {entry} failed with code {code}: {text}")


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


# ------------------------------------------------------------------------------------------------
# The custom ops.

@torch.library.custom_op("atv_sparse::nm_linear_cuda", mutates_args=())
def nm_linear_cuda(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., K) fp16 / bf16 on CUDA, at most 16 tokens, K % 16 == 0; values: (N, K * n / m) same
    dtype; bitmask: (N, K / 8) uint8; bias: (N,) or None. Returns (..., N) = x @ W^T (+ bias)."""
    op, weights = "nm_linear_cuda", {"weight": (values, bitmask)}
    _enforce(_problems(op, x, weights, n, m, bias))
    lib = _library(op)
    _check_memory(op, x, weights, bias)
    rows = _rows(x)
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(*x.shape[:-1], values.shape[0], dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    code = lib.atv_nm_linear(
        x.device.index, rows.data_ptr(), rows.stride(0), values.data_ptr(), values.stride(0),
        bitmask.data_ptr(), bitmask.stride(0), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), out.shape[-1], rows.shape[0], values.shape[0], rows.shape[1], n, m,
        DTYPE_CODES[x.dtype], _stream(x))
    _raise_on_error(lib, op, "atv_nm_linear", code)
    return out


@nm_linear_cuda.register_fake
def _(x, values, bitmask, n, m, bias=None):
    _enforce(_problems("nm_linear_cuda", x, {"weight": (values, bitmask)}, n, m, bias), fake=True)
    return x.new_empty(*x.shape[:-1], values.shape[0])


@torch.library.custom_op("atv_sparse::nm_gated_cuda", mutates_args=())
def nm_gated_cuda(x: torch.Tensor, gate_values: torch.Tensor, gate_bitmask: torch.Tensor,
                  up_values: torch.Tensor, up_bitmask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """x: (..., K) as for nm_linear_cuda; gate and up: two (values, bitmask) pairs of one shape
    (N, K * n / m) / (N, K / 8). Returns (..., N) = silu(x @ Wg^T) * (x @ Wu^T), fused."""
    op, weights = "nm_gated_cuda", {"gate": (gate_values, gate_bitmask), "up": (up_values, up_bitmask)}
    _enforce(_problems(op, x, weights, n, m))
    lib = _library(op)
    _check_memory(op, x, weights, None)
    rows = _rows(x)
    out = torch.empty(*x.shape[:-1], gate_values.shape[0], dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    code = lib.atv_nm_gated(
        x.device.index, rows.data_ptr(), rows.stride(0), gate_values.data_ptr(), gate_bitmask.data_ptr(),
        up_values.data_ptr(), up_bitmask.data_ptr(), gate_values.stride(0), gate_bitmask.stride(0),
        out.data_ptr(), out.shape[-1], rows.shape[0], gate_values.shape[0], rows.shape[1], n, m,
        DTYPE_CODES[x.dtype], _stream(x))
    _raise_on_error(lib, op, "atv_nm_gated", code)
    return out


@nm_gated_cuda.register_fake
def _(x, gate_values, gate_bitmask, up_values, up_bitmask, n, m):
    weights = {"gate": (gate_values, gate_bitmask), "up": (up_values, up_bitmask)}
    _enforce(_problems("nm_gated_cuda", x, weights, n, m), fake=True)
    return x.new_empty(*x.shape[:-1], gate_values.shape[0])


# ------------------------------------------------------------------------------------------------
# 2:4 on the sparse tensor cores, from the load-time layout of kernels/cuda_layouts.py.

def sp24_layer_status(n: int | None, m: int | None, dtype: torch.dtype, out_features: int,
                      in_features: int) -> str | None:
    """None when a layer can use the sparse tensor-core kernel (2:4, fp16 / bf16, in % 32 == 0)."""
    if (n, m) != (2, 4):
        return f"the sparse tensor-core kernel takes 2:4 only, not {n}:{m}" if m else \
            "the sparse tensor-core kernel takes 2:4 only, not unstructured sparsity"
    if dtype not in DTYPE_CODES:
        return f"the sparse tensor-core kernel takes float16 / bfloat16, not {dtype}"
    if in_features <= 0 or in_features % SP24_K_MULTIPLE:
        return (f"the sparse tensor-core kernel needs in_features to be a positive multiple of {SP24_K_MULTIPLE} "
                f"(one mma.sp k-block), not {in_features}")
    if not 0 < out_features < 2**31 - 16:
        return f"the sparse tensor-core kernel needs 1 <= out_features < 2^31 - 16, not {out_features}"
    return None


def _sp24_problems(op: str, x, layouts, out_features, bias=None) -> Iterator[tuple[object, str]]:
    """(condition, message) pairs; conditions may be SymBools (fake tensors)."""
    yield from _x_problems(op, x, SP24_K_MULTIPLE)
    k = x.shape[-1]
    tiles = (out_features + 15) // 16
    for name, (fv, fm) in layouts.items():
        yield fv.dtype == x.dtype, f"{op}: {name} frag_values are {fv.dtype}, activations {x.dtype}"
        yield fm.dtype == torch.int32, f"{op}: {name} frag_meta is {fm.dtype}, expected torch.int32"
        yield (fv.dim() == 4) & (fm.dim() == 3), \
            f"{op}: {name} frag_values / frag_meta must be 4-D / 3-D, got {tuple(fv.shape)} / {tuple(fm.shape)}"
        if fv.dim() == 4 and fm.dim() == 3:
            yield ((fv.shape[0] == tiles) & (fv.shape[1] * SP24_K_MULTIPLE == k) & (fv.shape[2] == 32)
                   & (fv.shape[3] == 8)), \
                f"{op}: {name} frag_values {tuple(fv.shape)} are not ({tiles}, {k // SP24_K_MULTIPLE}, 32, 8)"
            yield (fm.shape[0] == tiles) & (fm.shape[1] * SP24_K_MULTIPLE == k) & (fm.shape[2] == 16), \
                f"{op}: {name} frag_meta {tuple(fm.shape)} is not ({tiles}, {k // SP24_K_MULTIPLE}, 16)"
    if bias is not None:
        yield (bias.dim() == 1) & (bias.shape[0] == out_features) & (bias.dtype == x.dtype), \
            f"{op}: bias {bias.dtype} {tuple(bias.shape)} must be {x.dtype} ({out_features},)"


def _sp24_memory(op: str, x, layouts, bias) -> None:
    _check_device(op, x, layouts, bias, "layouts")
    for name, (fv, fm) in layouts.items():
        if not fv.is_contiguous() or not fm.is_contiguous() or fv.data_ptr() % 16 or fm.data_ptr() % 4:
            raise AtvSparseError(f"{op}: {name} frag_values / frag_meta must be contiguous and aligned as "
                                 f"sp24_layout returns them")


@torch.library.custom_op("atv_sparse::sp24_linear_cuda", mutates_args=())
def sp24_linear_cuda(x: torch.Tensor, frag_values: torch.Tensor, frag_meta: torch.Tensor, out_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., K) fp16 / bf16 on CUDA, at most 16 tokens, K % 32 == 0; frag_values / frag_meta:
    ``sp24_layout`` of a 2:4 weight (out_features, K); bias: (out_features,) or None.
    Returns (..., out_features) = x @ W^T (+ bias) on the sparse tensor cores."""
    op, layouts = "sp24_linear_cuda", {"weight": (frag_values, frag_meta)}
    _enforce(_sp24_problems(op, x, layouts, out_features, bias))
    lib = _library(op)
    _sp24_memory(op, x, layouts, bias)
    rows = _rows(x, align=4)  # 32-bit activation loads
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    code = lib.atv_sp24_linear(
        x.device.index, rows.data_ptr(), rows.stride(0), frag_values.data_ptr(), frag_meta.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), out_features, rows.shape[0], out_features,
        rows.shape[1], DTYPE_CODES[x.dtype], _stream(x))
    _raise_on_error(lib, op, "atv_sp24_linear", code)
    return out


@sp24_linear_cuda.register_fake
def _(x, frag_values, frag_meta, out_features, bias=None):
    _enforce(_sp24_problems("sp24_linear_cuda", x, {"weight": (frag_values, frag_meta)}, out_features, bias),
             fake=True)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("atv_sparse::sp24_gated_cuda", mutates_args=())
def sp24_gated_cuda(x: torch.Tensor, gate_frag_values: torch.Tensor, gate_frag_meta: torch.Tensor,
                    up_frag_values: torch.Tensor, up_frag_meta: torch.Tensor, out_features: int) -> torch.Tensor:
    """x as for sp24_linear_cuda; gate and up: ``sp24_layout`` of two 2:4 weights (out_features, K).
    Returns (..., out_features) = silu(x @ Wg^T) * (x @ Wu^T), fused."""
    op = "sp24_gated_cuda"
    layouts = {"gate": (gate_frag_values, gate_frag_meta), "up": (up_frag_values, up_frag_meta)}
    _enforce(_sp24_problems(op, x, layouts, out_features))
    lib = _library(op)
    _sp24_memory(op, x, layouts, None)
    rows = _rows(x, align=4)  # 32-bit activation loads
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    code = lib.atv_sp24_gated(
        x.device.index, rows.data_ptr(), rows.stride(0), gate_frag_values.data_ptr(), gate_frag_meta.data_ptr(),
        up_frag_values.data_ptr(), up_frag_meta.data_ptr(), out.data_ptr(), out_features, rows.shape[0],
        out_features, rows.shape[1], DTYPE_CODES[x.dtype], _stream(x))
    _raise_on_error(lib, op, "atv_sp24_gated", code)
    return out


@sp24_gated_cuda.register_fake
def _(x, gate_frag_values, gate_frag_meta, up_frag_values, up_frag_meta, out_features):
    layouts = {"gate": (gate_frag_values, gate_frag_meta), "up": (up_frag_values, up_frag_meta)}
    _enforce(_sp24_problems("sp24_gated_cuda", x, layouts, out_features), fake=True)
    return x.new_empty(*x.shape[:-1], out_features)
