"""The table of backend facts: every backend that can run a sparse linear, one entry each (docs/design.md 7.1).

Each ``Backend`` entry says, for one backend:

- ``choosable``: a user may fix it (``SparseLinear(backend=...)``, ``sparse_linear(backend=...)``);
  ``dense`` is not (a plan keeps a dense copy only where it measured fastest);
- ``kernel``: it is a sparse kernel the dispatcher considers (``usable_backends``, measured tables,
  heuristic plans), in the table's order of preference; ``reference`` and ``dense`` are not;
- ``plan_devices``: device types where an ``auto`` plan may pick it (Triton's CPU interpreter runs
  tests, it does not serve: ``("cuda",)``);
- ``layout``: the per-layer layout it reads besides the checkpoint pair (``"cslt"``: cuSPARSELt's
  compressed buffer; ``"dense"``: a dense copy; ``"sp24"``: the sparse tensor-core fragments of
  ``kernels/cuda_layouts.py``), built once by ``runner.build_layouts``; None when
  it reads bitmask + values as stored (only such backends serve stateless ``sparse_linear`` calls);
- ``token_limit`` / ``over_limit``: the most tokens it runs per call, and the backend a plan's call
  above that goes to (the CUDA decode kernels hand larger M to Triton);
- ``heuristic_tokens``: in a plan nothing was measured for, the largest token count it is
  preferred up to (None: any count; 0: never preferred, only a last resort);
- ``check_before_timing``: its results on real hardware have not been checked yet (``cuda_sp24``:
  tested against a CPU emulation of ``mma.sp``), so ``autotune`` compares it with the dense layer
  once per shape before timing it, and leaves it out of the table where it disagrees;
- ``machine(device)`` / ``layer(n, m, dtype, out_features, in_features)``: None when it can run on
  this device on this machine / a layer of this pattern, weight dtype and shape, else why not;
- ``place(tensor)``: where it wants the checkpoint pair in memory (``cpu``: huge pages), applied
  once by ``runner.place_weights``; None: as it is;
- ``run(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout)``: one call, no checks
  (``layout``: the tensor its ``layout`` names, else None). Returns (..., out), or (..., out / 2)
  when gated (``silu(x Wg^T) * (x Wu^T)``, gate rows stacked over up rows).

Adding a backend is one entry in ``TABLE`` (and its module); ``dispatch``, ``runner``,
``SparseLinear``, ``load`` and the vLLM plugin read everything from here. Modules are imported
inside the functions, so reading the table imports no kernel library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import AtvSparseError

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """Facts about one backend (see the module docstring)."""

    name: str
    machine: Callable[[torch.device], str | None]
    layer: Callable[[int | None, int | None, torch.dtype, int, int], str | None]
    run: Callable[..., torch.Tensor]
    choosable: bool = True
    kernel: bool = True
    plan_devices: tuple[str, ...] = ("cuda",)
    layout: str | None = None
    token_limit: int | None = None
    over_limit: str | None = None
    heuristic_tokens: int | None = None
    check_before_timing: bool = False
    place: Callable[[torch.Tensor], torch.Tensor] | None = None


def _gate(y: torch.Tensor, gated: bool) -> torch.Tensor:
    """``silu(gate) * up`` of a stacked (..., 2 I) output when gated, else y."""
    if not gated:
        return y
    half = y.shape[-1] // 2
    return F.silu(y[..., :half]) * y[..., half:]


def _nm_kernel_layer(name: str, n, m, dtype) -> str | None:
    """The reasons every N:M fp16 / bf16 kernel shares."""
    if m is None:
        return f"backend '{name}' runs N:M patterns, not unstructured sparsity"
    if dtype not in KERNEL_DTYPES:
        return f"backend '{name}' takes float16 / bfloat16 weights, not {dtype}"
    return None


# --- reference and dense -----------------------------------------------------------------------------

def _run_reference(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    from ..formats.bitmask import decompress

    return _gate(F.linear(x, decompress(bitmask, values, in_features), bias), gated)


def _run_dense(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    return _gate(F.linear(x, layout, bias), gated)


# --- triton ------------------------------------------------------------------------------------------

def _triton_machine(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton runs on CUDA (or on the CPU only under TRITON_INTERPRET=1), not {device}"


def _triton_layer(n, m, dtype, out_features, in_features) -> str | None:
    from ..kernels.nm_layout import SUPPORTED_GROUPS

    why = _nm_kernel_layer("triton", n, m, dtype)
    if why is None and m not in SUPPORTED_GROUPS:
        why = f"the Triton kernels handle n:4 and n:8 patterns, not {n}:{m}"
    return why


def _run_triton(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    from . import triton_ops

    if gated:
        return triton_ops.nm_gated(x, values, bitmask, n, m)
    return triton_ops.nm_linear(x, values, bitmask, n, m, bias)


# --- cuda (csrc decode kernels) ----------------------------------------------------------------------

def _cuda_machine(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA kernels need a CUDA device, not {device}"
    from .cuda_lib import cuda_library_status

    return cuda_library_status()


def _cuda_layer(n, m, dtype, out_features, in_features) -> str | None:
    from .cuda_lib import cuda_layer_status

    return _nm_kernel_layer("cuda", n, m, dtype) or cuda_layer_status(n, m, dtype, out_features, in_features)


def _run_cuda(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    from . import cuda_lib

    if gated:
        half = values.shape[0] // 2
        return cuda_lib.nm_gated_cuda(x, values[:half], bitmask[:half], values[half:], bitmask[half:], n, m)
    return cuda_lib.nm_linear_cuda(x, values, bitmask, n, m, bias)


# --- cuda_sp24 (2:4 on the sparse tensor cores, csrc/sp24_decode.cu) ---------------------------------

def _sp24_layer(n, m, dtype, out_features, in_features) -> str | None:
    from .cuda_lib import sp24_layer_status

    why = _nm_kernel_layer("cuda_sp24", n, m, dtype) or sp24_layer_status(n, m, dtype, out_features, in_features)
    if why is None and out_features % 32:
        # gate and up rows stacked: each half must start a 16-row tile of the layout
        why = f"backend 'cuda_sp24' needs out_features to be a multiple of 32 (16-row tiles), not {out_features}"
    return why


def _run_sp24(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    from ..kernels.cuda_layouts import split_sp24
    from . import cuda_lib

    fv, fm = split_sp24(layout, values.dtype, values.shape[0], in_features)
    if gated:
        half = values.shape[0] // 2
        tiles = half // 16
        return cuda_lib.sp24_gated_cuda(x, fv[:tiles], fm[:tiles], fv[tiles:], fm[tiles:], half)
    return cuda_lib.sp24_linear_cuda(x, fv, fm, values.shape[0], bias)


# --- cusparselt --------------------------------------------------------------------------------------

def _cslt_machine(device: torch.device) -> str | None:
    from .cusparselt import cusparselt_status

    return cusparselt_status(device)


def _cslt_layer(n, m, dtype, out_features, in_features) -> str | None:
    from .cusparselt import cusparselt_applies

    return _nm_kernel_layer("cusparselt", n, m, dtype) or cusparselt_applies(n, m, dtype, out_features, in_features)


def _run_cslt(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    from .cusparselt import cslt_linear

    return _gate(cslt_linear(x, layout, bitmask.shape[0], alg_id, bias), gated)


# --- cpu (C++ kernels on the packed layout) ----------------------------------------------------------

def _cpu_machine(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu kernels run on the CPU, not {device}"
    from .cpu_lib import cpu_library_status

    return cpu_library_status()


def _cpu_layer(n, m, dtype, out_features, in_features) -> str | None:
    from .cpu_lib import cpu_layer_status

    return cpu_layer_status(n, m, dtype, out_features, in_features)


def _run_cpu(x, bitmask, values, in_features, n, m, bias, gated, alg_id, layout):
    from .cpu_lib import nm_linear_cpu

    return nm_linear_cpu(x, values, bitmask, n, m, bias, gated)


def _cpu_place(t: torch.Tensor) -> torch.Tensor:
    from .cpu_lib import hugepage_copy

    return hugepage_copy(t)


def _anywhere(*_args) -> str | None:
    return None


# Kernel backends in order of preference; then the plan-only dense copy and the reference.
TABLE: tuple[Backend, ...] = (
    # 2:4 on the sparse tensor cores from a load-time layout: about 1 instruction per kept weight at
    # M = 1 (benchmarks/results/kernel-report.md). Correct on the CPU emulation of mma.sp only until
    # a GPU run has checked it, so the heuristic never picks it (0); a measured table or a fixed
    # backend does.
    Backend("cuda_sp24", _cuda_machine, _sp24_layer, _run_sp24, layout="sp24", token_limit=16, over_limit="triton",
            heuristic_tokens=0, check_before_timing=True),
    # Unmeasured, the CUDA decode kernels are trusted only where they are surely bandwidth-bound (by
    # instruction count they turn compute-bound above ~4 tokens); a measured table overrides this.
    Backend("cuda", _cuda_machine, _cuda_layer, _run_cuda, token_limit=16, over_limit="triton", heuristic_tokens=4),
    Backend("triton", _triton_machine, _triton_layer, _run_triton, heuristic_tokens=64),
    Backend("cusparselt", _cslt_machine, _cslt_layer, _run_cslt, layout="cslt"),
    # decode kernel up to 32 tokens, expanded panels + torch's GEMM above: every token count
    Backend("cpu", _cpu_machine, _cpu_layer, _run_cpu, plan_devices=("cpu",), place=_cpu_place),
    Backend("dense", _anywhere, _anywhere, _run_dense, choosable=False, kernel=False, layout="dense"),
    Backend("reference", _anywhere, _anywhere, _run_reference, kernel=False, plan_devices=()),
)
FACTS: dict[str, Backend] = {b.name: b for b in TABLE}
KERNEL_BACKENDS = tuple(b.name for b in TABLE if b.kernel)
BACKENDS = ("auto", *(b.name for b in TABLE if b.choosable))  # what a user may pass as backend=
LAYOUT_BACKENDS = tuple(b.name for b in TABLE if b.layout is not None)  # never used by a stateless call
TOKEN_LIMITS = {b.name: b.token_limit for b in TABLE if b.token_limit is not None}


def facts(name: str) -> Backend:
    """The entry of backend ``name``; an ``AtvSparseError`` listing the choices for an unknown one."""
    try:
        return FACTS[name]
    except KeyError:
        raise AtvSparseError(f"unknown backend {name!r}; one of {', '.join(BACKENDS[1:])}") from None
