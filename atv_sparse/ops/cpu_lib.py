"""The ``cpu`` backend: C++ kernels for the packed layout (``atv_sparse/cpu/nm_cpu.cpp``), built on
first use and exposed as the custom op ``atv_sparse::nm_linear_cpu`` (docs/design.md 7.5).

- ``torch.ops.atv_sparse.nm_linear_cpu(x, values, bitmask, n, m, bias=None, gated=False, path="auto")``:
  ``x @ W^T (+ bias)``, or ``silu(x Wg^T) * (x Wu^T)`` when gated (gate rows stacked over up rows).
  x: (..., K) float32 / bfloat16 / float16; values: (N, K n / m) in x's dtype; bitmask: (N, ceil(K / 8))
  uint8; m in (4, 8), 0 < n < m. Returns (..., N), or (..., N / 2) gated.

Up to ``DECODE_MAX_TOKENS`` tokens the decode kernel runs on the packed layout; above, rows are
expanded panel by panel (``PANEL_BYTES`` of dense weight at a time) into torch's dense GEMM.

Build: ``torch.utils.cpp_extension.load`` with ninja, once per source / torch / Python version,
into ``~/.cache/atv_sparse/cpu-<hash>`` (``ATV_SPARSE_CPU_CACHE`` overrides the folder), with one
progress line on stderr. No compiler, no ninja, a processor that is not x86-64, or a failed build:
one ``atv-sparse:`` notice line and the backend reports itself unusable, so plans use ``reference``.
``ATV_SPARSE_CPU_BACKEND=0`` turns the backend off; ``ATV_SPARSE_CPU_PATH`` (``avx512``, ``avx2``,
``portable``) forces the instruction path, as the op's ``path`` argument does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from ..errors import AtvSparseError

SOURCE = Path(__file__).resolve().parent.parent / "cpu" / "nm_cpu.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPS = (4, 8)
DECODE_MAX_TOKENS = int(os.environ.get("ATV_SPARSE_CPU_DECODE_MAX", 32))  # env: for tuning runs only
PANEL_BYTES = int(os.environ.get("ATV_SPARSE_CPU_PANEL_BYTES", 1 << 20))


def build_dir() -> Path:
    """The cache folder of this source, torch and Python (a new source builds afresh)."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + sys.version.encode()).hexdigest()[:12]
    root = Path(os.environ.get("ATV_SPARSE_CPU_CACHE") or Path.home() / ".cache" / "atv_sparse")
    return root / f"cpu-{key}"


def _why_not_buildable() -> str | None:
    if os.environ.get("ATV_SPARSE_CPU_BACKEND") == "0":
        return "turned off by ATV_SPARSE_CPU_BACKEND=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64, this processor is {platform.machine()}"
    from torch.utils import cpp_extension

    if not shutil.which(os.environ.get("CXX", "c++")):
        return "no C++ compiler found (set CXX or install g++)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


@functools.lru_cache(maxsize=None)
def _load():
    """(extension module, None) or (None, why the backend is unusable); builds on first call."""
    why = _why_not_buildable()
    if why is None:
        from torch.utils import cpp_extension

        folder = build_dir()
        name = f"atv_sparse_cpu_{folder.name.removeprefix('cpu-')}"
        fresh = not (folder / f"{name}.so").exists()
        if fresh:
            print(f"atv-sparse: building the CPU kernels once (about a minute) into {folder} ...", file=sys.stderr,
                  flush=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder),
                                        extra_cflags=["-O3", "-std=c++17"], verbose=False)
            if fresh:
                print("atv-sparse: CPU kernels built", file=sys.stderr, flush=True)
            return module, None
        except Exception as exc:  # noqa: BLE001  (any build failure: fall back, never a wrong result)
            lines = [ln for ln in str(exc).splitlines() if "error" in ln.lower()] or str(exc).splitlines() or [""]
            why = f"the build failed ({lines[0].strip()[:200]})"
    print(f"atv-sparse: the cpu backend is unavailable ({why}); sparse layers on the CPU use the reference "
          "backend", file=sys.stderr, flush=True)
    return None, why


def cpu_library_status() -> str | None:
    """None when the kernels are built and loaded (building them now if needed), else why not."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def cpu_paths() -> tuple[str, ...]:
    """The instruction paths this processor runs, fastest first (``portable`` always)."""
    module, why = _load()
    if module is None:
        raise AtvSparseError(f"the cpu backend is unavailable: {why}")
    return tuple(module.paths())


def default_path() -> str:
    """``ATV_SPARSE_CPU_PATH`` if set (checked), else the fastest path of this processor."""
    forced = os.environ.get("ATV_SPARSE_CPU_PATH")
    if forced:
        return check_path(forced)
    return cpu_paths()[0]


def check_path(path: str) -> str:
    if path not in cpu_paths():
        raise AtvSparseError(f"cpu backend: instruction path {path!r} is not one this processor runs "
                             f"({', '.join(cpu_paths())})")
    return path


def cpu_layer_status(n: int | None, m: int | None, dtype: torch.dtype, out_features: int,
                     in_features: int) -> str | None:
    """None when a layer of this pattern, dtype and shape suits the cpu kernels, else why not."""
    if m is None:
        return "the cpu kernels run N:M patterns, not unstructured sparsity"
    if m not in GROUPS or not 0 < n < m:
        return f"the cpu kernels take n:4 and n:8 patterns, not {n}:{m}"
    if dtype not in DTYPES:
        return f"the cpu kernels take float32 / bfloat16 / float16, not {dtype}"
    if in_features <= 0 or in_features % m:
        return f"the cpu kernels need in_features a positive multiple of {m}, not {in_features}"
    return None


def nm_linear_cpu(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int,
                  bias: torch.Tensor | None = None, gated: bool = False, path: str = "auto") -> torch.Tensor:
    """x: (..., K); values: (N, K n / m); bitmask: (N, ceil(K / 8)) uint8 -> (..., N), or (..., N / 2) gated.

    The custom op ``atv_sparse::nm_linear_cpu`` under torch.compile and for tensor subclasses (fake,
    functional) or inputs that require grad; otherwise the same kernel called directly. Each Python
    step between two layers runs with cold caches once a layer's weights have streamed through them:
    the op's dispatch then cost 60-80 us a call and the checks in Python ~30 us, against a kernel of
    ~0.7 ms at 4096 x 4096, M = 1; so the eager call checks its operands in C++
    (``nm_linear_checked`` in nm_cpu.cpp) and words a refusal here, after it.
    """
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.requires_grad:
        return torch.ops.atv_sparse.nm_linear_cpu(x, values, bitmask, n, m, bias, gated, path)
    return _nm_linear(x, values, bitmask, n, m, bias, gated, path)


def _nm_linear(x, values, bitmask, n, m, bias, gated, path):
    module, why = _load()
    if module is None:
        raise AtvSparseError(f"atv_sparse::nm_linear_cpu: the cpu backend is unavailable: {why}")
    try:
        return module.nm_linear(x, bitmask, values, n, m, bias, gated, path, DECODE_MAX_TOKENS, PANEL_BYTES)
    except RuntimeError as exc:
        if module.INVALID not in str(exc):
            raise
        _check(x, values, bitmask, n, m, bias, gated)  # raises, naming the problem
        if path != "auto":
            check_path(path)
        default_path()
        raise AtvSparseError(f"atv_sparse::nm_linear_cpu: operands the kernels refuse: x {tuple(x.shape)} "
                             f"{x.dtype}, values {tuple(values.shape)}, bitmask {tuple(bitmask.shape)}") from None


@torch.library.custom_op("atv_sparse::nm_linear_cpu", mutates_args=())
def _nm_linear_op(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, n: int, m: int,
                  bias: torch.Tensor | None = None, gated: bool = False, path: str = "auto") -> torch.Tensor:
    return _nm_linear(x, values, bitmask, n, m, bias, gated, path)


def _check(x, values, bitmask, n, m, bias, gated) -> None:
    k = x.shape[-1]
    why = cpu_layer_status(n, m, values.dtype, bitmask.shape[0], k)
    if why is None and x.dtype != values.dtype:
        why = f"x is {x.dtype}, values {values.dtype}"
    if why is None and (values.dim() != 2 or values.shape[1] * m != k * n or values.shape[0] != bitmask.shape[0]
                        or bitmask.dim() != 2 or bitmask.shape[1] != -(-k // 8) or bitmask.dtype != torch.uint8):
        why = (f"x has K={k}, values {tuple(values.shape)} and bitmask {tuple(bitmask.shape)} {bitmask.dtype} are "
               f"not the {n}:{m} layout of that K")
    if why is None and gated and (bitmask.shape[0] % 2 or bias is not None):
        why = "a gated call stacks gate and up rows (an even row count) and takes no bias"
    if why is None and bias is not None and bias.shape != (bitmask.shape[0],):
        why = f"bias {tuple(bias.shape)} does not match {bitmask.shape[0]} rows"
    if why is None and x.device.type != "cpu":
        why = f"tensors are on {x.device}, not the CPU"
    if why is not None:
        raise AtvSparseError(f"atv_sparse::nm_linear_cpu: {why}")


@_nm_linear_op.register_fake
def _(x, values, bitmask, n, m, bias=None, gated=False, path="auto"):
    torch._check(x.shape[-1] * n == values.shape[1] * m,
                 lambda: f"nm_linear_cpu: x has K={x.shape[-1]} but values {tuple(values.shape)} hold K*{n}/{m}")
    torch._check(x.dtype == values.dtype, lambda: f"nm_linear_cpu: x is {x.dtype}, values {values.dtype}")
    rows = bitmask.shape[0] // 2 if gated else bitmask.shape[0]
    return x.new_empty(*x.shape[:-1], rows)


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor ``t`` in 2 MiB-aligned memory advised for transparent huge pages (t itself
    where the kernels are unavailable or t is small: under 2 MiB a huge page cannot help)."""
    module, _ = _load()
    if module is None or t.device.type != "cpu" or t.numel() * t.element_size() < (2 << 20):
        return t
    return module.hugepage_copy(t)


def stream_read(t: torch.Tensor) -> int:
    """Read every byte of CPU tensor ``t`` once over torch's threads (the bandwidth the benchmarks
    compare the kernels with); returns a checksum."""
    module, why = _load()
    if module is None:
        raise AtvSparseError(f"the cpu backend is unavailable: {why}")
    return module.stream_read(t)
