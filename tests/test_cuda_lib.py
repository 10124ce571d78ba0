"""The cuda backend: csrc/ kernels, their build (atv_sparse.ops.build_cuda) and glue (atv_sparse.ops.cuda_lib).

On a CPU-only machine:
- the library-absent behaviour, ``cuda_applies`` / ``cuda_layer_status`` reasons, the fake
  implementations and the build's skip rules (monkeypatched, nothing compiled);
- where nvcc exists, the library is really built (sm_80 only) and its host twins, which run the
  kernel's own decode, selection and work partition from ``csrc/nm_common.cuh`` serially, are
  checked against a float64 reference of the masked dense matmul, with every K-split.
On a GPU with the library built: the kernels themselves, the same way, plus graphs, opcheck, compile.
Nothing queries the GPU at import time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import compress
from atv_sparse.kernels.cuda_layouts import pack_sp24, split_sp24, sp24_layout
from atv_sparse.ops import runner
from atv_sparse.ops.dispatch import Plan
from atv_sparse.ops import build_cuda, cuda_lib

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
DTYPES = (torch.float16, torch.bfloat16)
PATTERNS = ((2, 4), (4, 8))
CODES = {torch.float16: 0, torch.bfloat16: 1}
ATV_ERR = {"pattern": -1, "dtype": -2, "size": -3, "align": -4, "null": -5, "layout": -6}
# (M, N, K): one token and the tile edges, odd N (partial row groups), K with a partial last step
# (K / 16 not a multiple of 32), K shorter than one step, and many steps.
HOST_SHAPES = ((1, 7, 16), (2, 13, 48), (3, 33, 1040), (5, 9, 528), (8, 3, 2064), (16, 11, 272), (9, 1, 512))


# ------------------------------------------------------------------------------------------------
# Helpers

def random_nm(n_rows: int, k: int, n: int, m: int, dtype: torch.dtype, gen: torch.Generator, device="cpu"):
    """(masked dense W (N, K), bitmask, values) of a random n:m weight."""
    w = torch.randn(n_rows, k, generator=gen).to(dtype)
    scores = torch.rand(n_rows, k // m, m, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, dim=-1).indices, True)
    keep = keep.reshape(n_rows, k)
    bitmask, values = compress(w, keep, n, m)
    return (w * keep).to(device), bitmask.to(device), values.contiguous().to(device)


def seed_of(*parts) -> int:
    """A fixed seed per parameter combination (str hashes change between processes)."""
    return zlib.crc32(repr(parts).encode())


def max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.double() - ref).abs().max().item()


@pytest.fixture
def fresh_cache():
    """Clear the loader's caches around a test that monkeypatches what they read."""
    caches = (cuda_lib._load, cuda_lib._device_reason)  # the originals, even if a test replaces them
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


# ------------------------------------------------------------------------------------------------
# Library absent / unusable

def test_status_names_the_missing_library(monkeypatch, tmp_path, fresh_cache):
    monkeypatch.setattr(cuda_lib, "library_path", lambda: tmp_path / cuda_lib.LIB_NAME)
    why = cuda_lib.cuda_library_status()
    assert why.startswith("libatv_sparse_cuda.so not built") and "build_cuda" in why
    cuda_lib._load.cache_clear()
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda env=None: None)
    assert "nvcc was not found" in cuda_lib.cuda_library_status()


def test_ops_raise_when_library_missing(monkeypatch, tmp_path, fresh_cache):
    monkeypatch.setattr(cuda_lib, "library_path", lambda: tmp_path / cuda_lib.LIB_NAME)
    gen = torch.Generator().manual_seed(0)
    _, bitmask, values = random_nm(6, 32, 2, 4, torch.float16, gen)
    x = torch.randn(2, 32, generator=gen).half()
    with pytest.raises(AtvSparseError, match=r"atv_sparse::nm_linear_cuda: the CUDA backend is unavailable: "
                                             r"libatv_sparse_cuda.so not built"):
        torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, 2, 4)
    with pytest.raises(AtvSparseError, match=r"atv_sparse::nm_gated_cuda: .*not built"):
        torch.ops.atv_sparse.nm_gated_cuda(x, values, bitmask, values, bitmask, 2, 4)


def test_status_without_device(monkeypatch, fresh_cache):
    monkeypatch.setattr(cuda_lib, "_load", lambda: (object(), None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_lib.cuda_library_status() == "no CUDA device (torch.cuda.is_available() is False)"


def test_unloadable_library_reason(monkeypatch, tmp_path, fresh_cache):
    path = tmp_path / cuda_lib.LIB_NAME
    path.write_bytes(b"not an ELF file")
    monkeypatch.setattr(cuda_lib, "library_path", lambda: path)
    why = cuda_lib.cuda_library_status()
    assert why.startswith("libatv_sparse_cuda.so failed to load") and "rebuild" in why


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build a stand-in library")
def test_stale_library_refused(monkeypatch, tmp_path, fresh_cache):
    src = tmp_path / "stale.c"
    src.write_text("int atv_abi_version(void) { return 99; }\nconst char* atv_error_string(int c) { return \"\"; }\n")
    path = tmp_path / cuda_lib.LIB_NAME
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    with pytest.raises(RuntimeError, match="ABI version 99, this package needs 2"):
        cuda_lib.open_library(path)
    monkeypatch.setattr(cuda_lib, "library_path", lambda: path)
    assert "stale build" in cuda_lib.cuda_library_status()


# ------------------------------------------------------------------------------------------------
# Reasons the dispatcher reads

def _applies_case(case: str):
    gen = torch.Generator().manual_seed(1)
    dtype, n, m, tokens, k = torch.float16, 2, 4, 3, 64
    if case == "fp32":
        dtype = torch.float32
    if case == "pattern 1:4":
        n = 1
    if case == "unstructured":
        n = m = None
    if case == "17 tokens":
        tokens = 17
    if case == "K=40":
        k = 40
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    values = torch.randn(5, k // 2, generator=gen).to(dtype)
    if case == "dtype mismatch":
        values = values.bfloat16()
    return x, values, n, m


@pytest.mark.parametrize("case, expected", [
    ("fp32", "float16 / bfloat16, not torch.float32"),
    ("dtype mismatch", "need one dtype"),
    ("pattern 1:4", "2:4 and 4:8, not 1:4"),
    ("unstructured", "not unstructured sparsity"),
    ("17 tokens", "17 tokens (the CUDA kernels take at most 16)"),
    ("K=40", "positive multiple of 16"),
    ("cpu tensors", "x on cpu, values on cpu"),
], ids=str)
def test_cuda_applies_reasons(case, expected):
    assert expected in cuda_lib.cuda_applies(*_applies_case(case))


def test_cuda_layer_status():
    assert cuda_lib.cuda_layer_status(2, 4, torch.float16, 4096, 4096) is None
    assert cuda_lib.cuda_layer_status(4, 8, torch.bfloat16, 7, 16) is None
    assert "not 2:8" in cuda_lib.cuda_layer_status(2, 8, torch.float16, 8, 64)
    assert "not torch.float32" in cuda_lib.cuda_layer_status(2, 4, torch.float32, 8, 64)
    assert "not 72" in cuda_lib.cuda_layer_status(2, 4, torch.float16, 8, 72)


# ------------------------------------------------------------------------------------------------
# Fake implementations (meta tensors, and fake CUDA tensors as torch.compile sees them)

@pytest.mark.parametrize("lead", [(), (1,), (2, 3)], ids=str)
def test_fake_shapes(lead):
    x = torch.empty(*lead, 64, dtype=torch.bfloat16, device="meta")
    values = torch.empty(9, 32, dtype=torch.bfloat16, device="meta")
    bitmask = torch.empty(9, 8, dtype=torch.uint8, device="meta")
    bias = torch.empty(9, dtype=torch.bfloat16, device="meta")
    assert torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, 2, 4, bias).shape == (*lead, 9)
    assert torch.ops.atv_sparse.nm_gated_cuda(x, values, bitmask, values, bitmask, 4, 8).shape == (*lead, 9)


def test_fake_symbolic_shapes():
    """Traced with symbolic sizes (as torch.compile(dynamic=True) does), the checks stay symbolic."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(x, values, bitmask, bias):
        return torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, 2, 4, bias)

    args = (torch.randn(3, 64).half(), torch.randn(5, 32).half(), torch.zeros(5, 8, dtype=torch.uint8),
            torch.randn(5).half())
    graph = make_fx(fn, tracing_mode="symbolic")(*args)
    assert "atv_sparse.nm_linear_cuda" in graph.code


def test_fake_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 1, 128, dtype=torch.float16, device="cuda")
        values = torch.empty(5, 64, dtype=torch.float16, device="cuda")
        bitmask = torch.empty(5, 16, dtype=torch.uint8, device="cuda")
        out = torch.ops.atv_sparse.nm_gated_cuda(x, values, bitmask, values, bitmask, 2, 4)
        assert out.shape == (4, 1, 5) and out.dtype == torch.float16 and out.device.type == "cuda"


@pytest.mark.parametrize("lead", [(), (1,), (2, 3)], ids=str)
def test_sp24_fake_shapes(lead):
    x = torch.empty(*lead, 64, dtype=torch.float16, device="meta")
    fv = torch.empty(2, 2, 32, 8, dtype=torch.float16, device="meta")     # 17..32 rows, K = 64
    fm = torch.empty(2, 2, 16, dtype=torch.int32, device="meta")
    bias = torch.empty(20, dtype=torch.float16, device="meta")
    assert torch.ops.atv_sparse.sp24_linear_cuda(x, fv, fm, 20, bias).shape == (*lead, 20)
    assert torch.ops.atv_sparse.sp24_gated_cuda(x, fv, fm, fv, fm, 20).shape == (*lead, 20)


@pytest.mark.parametrize("case, message", [
    ("K=48", "K=48 input features, need a positive multiple of 32"),
    ("17 tokens", "17 tokens, the CUDA kernels take at most 16"),
    ("tiles", r"weight frag_values \(3, 2, 32, 8\) are not \(2, 2, 32, 8\)"),
    ("meta dtype", "weight frag_meta is torch.int64, expected torch.int32"),
    ("values dtype", "weight frag_values are torch.bfloat16, activations torch.float16"),
], ids=lambda v: v if " " not in v or len(v) < 12 else None)
def test_sp24_rejects(case, message):
    x = torch.zeros(17 if case == "17 tokens" else 2, 48 if case == "K=48" else 64, dtype=torch.float16)
    fv = torch.zeros(3 if case == "tiles" else 2, 2, 32, 8, dtype=torch.bfloat16 if case == "values dtype"
                     else torch.float16)
    fm = torch.zeros(2, 2, 16, dtype=torch.int64 if case == "meta dtype" else torch.int32)
    with pytest.raises(AtvSparseError, match="sp24_linear_cuda: " + message):
        torch.ops.atv_sparse.sp24_linear_cuda(x, fv, fm, 20)


def _bad_call(case: str, device: str):
    k, rows = 64, 6
    x = torch.empty(2, k, dtype=torch.float16, device=device)
    values = torch.empty(rows, k // 2, dtype=torch.float16, device=device)
    bitmask = torch.empty(rows, k // 8, dtype=torch.uint8, device=device)
    bias = None
    if case == "values columns":
        values = torch.empty(rows, k // 2 + 8, dtype=torch.float16, device=device)
    elif case == "bitmask rows":
        bitmask = torch.empty(rows + 1, k // 8, dtype=torch.uint8, device=device)
    elif case == "bitmask dtype":
        bitmask = torch.empty(rows, k // 8, dtype=torch.int8, device=device)
    elif case == "values dtype":
        values = values.to(torch.bfloat16)
    elif case == "x fp32":
        x = x.float()
    elif case == "K=24":
        x = torch.empty(2, 24, dtype=torch.float16, device=device)
    elif case == "17 tokens":
        x = torch.empty(17, k, dtype=torch.float16, device=device)
    elif case == "pattern 2:8":
        return (x, values, bitmask, 2, 8, None)
    elif case == "bias shape":
        bias = torch.empty(rows - 1, dtype=torch.float16, device=device)
    return (x, values, bitmask, 2, 4, bias)


BAD_CASES = {"values columns": "do not hold K\\*2/4", "bitmask rows": "does not match", "bitmask dtype": "uint8",
             "values dtype": "values are torch.bfloat16", "x fp32": "x is torch.float32", "K=24": "K=24",
             "17 tokens": "17 tokens", "pattern 2:8": "pattern 2:8", "bias shape": "bias"}


@pytest.mark.parametrize("case", BAD_CASES, ids=str)
def test_fake_rejects(case):
    with pytest.raises(RuntimeError, match=BAD_CASES[case]):
        torch.ops.atv_sparse.nm_linear_cuda(*_bad_call(case, "meta"))


@pytest.mark.parametrize("case", BAD_CASES, ids=str)
def test_real_rejects_before_touching_the_library(case):
    with pytest.raises(AtvSparseError, match="nm_linear_cuda: .*" + BAD_CASES[case]):
        torch.ops.atv_sparse.nm_linear_cuda(*_bad_call(case, "cpu"))


def test_gated_rejects_mismatched_weights():
    x = torch.empty(1, 64, dtype=torch.float16, device="meta")
    gv, gb = torch.empty(6, 32, dtype=torch.float16, device="meta"), torch.empty(6, 8, dtype=torch.uint8, device="meta")
    uv, ub = torch.empty(5, 32, dtype=torch.float16, device="meta"), torch.empty(5, 8, dtype=torch.uint8, device="meta")
    with pytest.raises(RuntimeError, match="gate .* and up .* differ"):
        torch.ops.atv_sparse.nm_gated_cuda(x, gv, gb, uv, ub, 2, 4)


# ------------------------------------------------------------------------------------------------
# Build rules (nothing compiled)

def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATV_SPARSE_")}
    env.update(extra)
    return env


def test_build_skip_switch(capsys):
    env = _env(ATV_SPARSE_SKIP_CUDA_BUILD="1", ATV_SPARSE_FORCE_CUDA_BUILD="1")
    assert build_cuda.build_cuda_library(CSRC, "/nonexistent", env) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "atv-sparse: not building the CUDA library: ATV_SPARSE_SKIP_CUDA_BUILD=1" in out


def test_build_skips_without_sources(tmp_path, capsys):
    assert build_cuda.build_cuda_library(str(tmp_path), str(tmp_path), _env()) is None
    assert f"no CUDA sources (*.cu) in {tmp_path}" in capsys.readouterr().out


def test_build_skips_without_nvcc(monkeypatch, capsys):
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda env=None: None)
    assert build_cuda.build_cuda_library(CSRC, "/nonexistent", _env()) is None
    assert "nvcc was not found" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="cannot be built: nvcc was not found"):
        build_cuda.build_cuda_library(CSRC, "/nonexistent", _env(ATV_SPARSE_FORCE_CUDA_BUILD="1"))


def test_build_needs_a_gpu_unless_forced(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda env=None: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(build_cuda, "cuda_device_present", lambda: False)
    monkeypatch.setattr(build_cuda, "compile_library", lambda *a, **k: calls.append((a, k)))
    assert build_cuda.build_cuda_library(CSRC, str(tmp_path), _env()) is None
    assert "no CUDA GPU on this machine (set ATV_SPARSE_FORCE_CUDA_BUILD=1" in capsys.readouterr().out
    assert not calls
    forced = _env(ATV_SPARSE_FORCE_CUDA_BUILD="1", ATV_SPARSE_CUDA_ARCHS="90a, 80")
    assert build_cuda.build_cuda_library(CSRC, str(tmp_path), forced) == str(tmp_path / build_cuda.LIB_NAME)
    (nvcc, sources, out_path, archs, _build_dir, _ninja), _ = calls[0]
    assert nvcc == "/opt/cuda/bin/nvcc" and archs == ["90a", "80"] and out_path.endswith(build_cuda.LIB_NAME)
    assert [os.path.basename(s) for s in sources] == sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


def test_build_failure_is_logged_not_fatal(monkeypatch, tmp_path, capsys):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nm_decode.cu(1): error: boom' >&2\nexit 2\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda env=None: str(nvcc))
    monkeypatch.setattr(build_cuda, "find_ninja", lambda env=None: None)
    monkeypatch.setattr(build_cuda, "cuda_device_present", lambda: True)
    out_dir = tmp_path / "pkg"
    assert build_cuda.build_cuda_library(CSRC, str(out_dir), _env(), build_dir=str(tmp_path / "b")) is None
    out = capsys.readouterr().out
    assert "building the CUDA library failed; installing without it" in out and "error: boom" in out
    assert not (out_dir / build_cuda.LIB_NAME).exists()
    with pytest.raises(RuntimeError, match="boom"):
        build_cuda.build_cuda_library(CSRC, str(out_dir), _env(ATV_SPARSE_FORCE_CUDA_BUILD="1"),
                                      build_dir=str(tmp_path / "b"))


def test_arch_list():
    assert build_cuda.parse_archs("80;86, 89 90a") == ["80", "86", "89", "90a"]
    for bad in ("sm_80", "8", "90x", " ; "):
        with pytest.raises(ValueError, match="ATV_SPARSE_CUDA_ARCHS"):
            build_cuda.parse_archs(bad)
    assert build_cuda.gencode_flags(["80", "90a"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=compute_80"]


def test_bad_arch_list_is_a_skip(monkeypatch, capsys):
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda env=None: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(build_cuda, "cuda_device_present", lambda: True)
    assert build_cuda.build_cuda_library(CSRC, "/nonexistent", _env(ATV_SPARSE_CUDA_ARCHS="sm_90")) is None
    assert "'sm_90' is not an architecture" in capsys.readouterr().out


def test_build_module_loads_by_path_without_the_package():
    """setup.py imports build_cuda.py by path, before torch or the package exist."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {build_cuda.__file__!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert 'torch' not in sys.modules and 'atv_sparse' not in sys.modules\n"
            "print(m.LIB_NAME)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == build_cuda.LIB_NAME


# ------------------------------------------------------------------------------------------------
# The real library, built for sm_80 with nvcc where it exists; host twins run the kernel's code.

@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    if build_cuda.find_nvcc() is None:
        pytest.skip("nvcc not found: the host twins of the kernels need the library built")
    out = tmp_path_factory.mktemp("cudalib")
    env = _env(ATV_SPARSE_FORCE_CUDA_BUILD="1", ATV_SPARSE_CUDA_ARCHS="80")
    path = build_cuda.build_cuda_library(CSRC, str(out), env, build_dir=str(out / "build"))
    return cuda_lib.open_library(path)


def host_linear(lib, x, values, bitmask, n, m, bias=None, ksplit=0, out=None):
    M, K = x.shape
    N = values.shape[0]
    out = torch.full((M, N), float("nan"), dtype=x.dtype) if out is None else out
    code = lib.atv_nm_linear_host(x.data_ptr(), x.stride(0), values.data_ptr(), values.stride(0),
                                  bitmask.data_ptr(), bitmask.stride(0),
                                  bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0),
                                  M, N, K, n, m, CODES.get(x.dtype, 7), ksplit)
    return code, out


def host_gated(lib, x, gate, up, n, m, ksplit=0):
    (gv, gb), (uv, ub) = gate, up
    M, K = x.shape
    out = torch.full((M, gv.shape[0]), float("nan"), dtype=x.dtype)
    code = lib.atv_nm_gated_host(x.data_ptr(), x.stride(0), gv.data_ptr(), gb.data_ptr(), uv.data_ptr(),
                                 ub.data_ptr(), gv.stride(0), gb.stride(0), out.data_ptr(), out.stride(0),
                                 M, gv.shape[0], K, n, m, CODES[x.dtype], ksplit)
    return code, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("shape", HOST_SHAPES, ids=lambda s: "M{}xN{}xK{}".format(*s))
@pytest.mark.parametrize("ksplit", [0, 1, 2, 4], ids=lambda k: f"ksplit{k}")
def test_host_twin_linear(host_lib, dtype, pattern, shape, ksplit):
    (M, N, K), (n, m) = shape, pattern
    gen = torch.Generator().manual_seed(seed_of(M, N, K, n, ksplit, dtype))
    w, bitmask, values = random_nm(N, K, n, m, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if ksplit % 2 == 0 else None
    code, out = host_linear(host_lib, x, values, bitmask, n, m, bias, ksplit)
    assert code == 0
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    torch_err = max_err(F.linear(x, w, bias), ref)
    assert not out.isnan().any()
    assert max_err(out, ref) <= 2 * torch_err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("shape", [(1, 5, 16), (4, 17, 1056), (16, 3, 528)], ids=lambda s: "M{}xN{}xK{}".format(*s))
def test_host_twin_gated(host_lib, dtype, pattern, shape):
    (M, N, K), (n, m) = shape, pattern
    gen = torch.Generator().manual_seed(seed_of(M, N, K, n, dtype))
    wg, gb, gv = random_nm(N, K, n, m, dtype, gen)
    wu, ub, uv = random_nm(N, K, n, m, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    code, out = host_gated(host_lib, x, (gv, gb), (uv, ub), n, m)
    assert code == 0
    ref = F.silu(x.double() @ wg.double().T) * (x.double() @ wu.double().T)
    torch_err = max_err(F.silu(F.linear(x, wg)) * F.linear(x, wu), ref)
    assert max_err(out, ref) <= 2 * torch_err


def test_host_twin_strided_rows(host_lib):
    """Row strides larger than the rows (x, values, bitmask, out) are honoured; padding untouched."""
    gen = torch.Generator().manual_seed(3)
    w, bitmask, values = random_nm(7, 64, 2, 4, torch.float16, gen)
    x = torch.randn(3, 64 + 24, generator=gen).half()[:, :64]
    wide_v = torch.zeros(7, 32 + 8, dtype=torch.float16)
    wide_v[:, :32] = values
    wide_b = torch.zeros(7, 8 + 2, dtype=torch.uint8)
    wide_b[:, :8] = bitmask
    out = torch.full((3, 7 + 5), float("nan"), dtype=torch.float16)
    code, _ = host_linear(host_lib, x, wide_v[:, :32], wide_b[:, :8], 2, 4, out=out[:, :7])
    assert code == 0
    assert max_err(out[:, :7], x.double() @ w.double().T) <= 2 * max_err(F.linear(x, w), x.double() @ w.double().T)
    assert out[:, 7:].isnan().all()


def test_host_twin_refusals(host_lib):
    gen = torch.Generator().manual_seed(4)
    _, bitmask, values = random_nm(5, 64, 2, 4, torch.float16, gen)
    x = torch.randn(2, 64, generator=gen).half()
    lib = host_lib

    def call(**over):
        args = dict(x=x.data_ptr(), ldx=64, v=values.data_ptr(), ldv=32, b=bitmask.data_ptr(), ldb=8, M=2, N=5,
                    K=64, n=2, m=4, dtype=0)
        args.update(over)
        out = torch.full((2, 5), float("nan"), dtype=torch.float16)
        code = lib.atv_nm_linear_host(args["x"], args["ldx"], args["v"], args["ldv"], args["b"], args["ldb"], None,
                                      out.data_ptr(), 5, args["M"], args["N"], args["K"], args["n"], args["m"],
                                      args["dtype"], 0)
        assert code == 0 or out.isnan().all(), "a refused call wrote its output"
        return code

    assert call() == 0
    assert call(n=1) == call(m=8) == ATV_ERR["pattern"]
    assert call(dtype=2) == ATV_ERR["dtype"]
    assert call(M=17) == call(K=40) == call(ldx=48) == ATV_ERR["size"]
    assert call(x=x.data_ptr() + 2) == call(v=values.data_ptr() + 8) == call(ldv=36) == ATV_ERR["align"]
    assert call(b=bitmask.data_ptr() + 1) == call(ldb=9) == ATV_ERR["align"]
    assert call(x=None) == ATV_ERR["null"]
    assert call(M=0) == 0
    for name, code in ATV_ERR.items():
        text = lib.atv_error_string(code).decode()
        assert text and "unknown" not in text, name
    assert lib.atv_error_string(0).decode() == "no error"


def test_host_twin_corrupt_mask_stays_finite(host_lib):
    """Mask bytes without four set bits (a corrupt file) give wrong numbers, never a crash or NaN."""
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(9, 128, generator=gen).half()
    bitmask = torch.randint(0, 256, (9, 32), generator=gen, dtype=torch.uint8)
    x = torch.randn(4, 256, generator=gen).half()
    code, out = host_linear(host_lib, x, values, bitmask, 4, 8)
    assert code == 0 and out.isfinite().all()


# ------------------------------------------------------------------------------------------------
# 2:4 on the sparse tensor cores: the load-time layout (kernels/cuda_layouts.py) and the host twins,
# which run the kernel's fragment loads over those very bytes with mma.sp emulated from the PTX ISA.

# (M, N, K): one token tile and two, N not a multiple of 16 (a padded tile), K of 1..4 k-blocks
# (only the one-step tail loop) and K with a tail after the unrolled steps, uneven K-splits.
SP24_SHAPES = ((1, 16, 32), (1, 37, 160), (3, 40, 1056), (8, 5, 96), (9, 17, 256), (16, 33, 4128), (13, 70, 544))


def host_sp24(lib, x, layout, out_features, bias=None, ksplit=0):
    fv, fm = layout
    M, K = x.shape
    out = torch.full((M, out_features), float("nan"), dtype=x.dtype)
    code = lib.atv_sp24_linear_host(x.data_ptr(), x.stride(0), fv.data_ptr(), fm.data_ptr(),
                                    bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0),
                                    M, out_features, K, CODES[x.dtype], ksplit)
    return code, out


def test_sp24_layout_worked_example():
    """The example of kernels/cuda_layouts.py: row 0 keeps columns 1, 3 of group 0, row 8 columns 0, 2."""
    keep = torch.zeros(16, 32, dtype=torch.bool)
    keep[:, 0:32:4] = keep[:, 1:32:4] = True           # every other group and row: columns 0, 1
    keep[0, :4] = torch.tensor([False, True, False, True])
    keep[8, :4] = torch.tensor([True, False, True, False])
    w = torch.arange(1, 16 * 32 + 1, dtype=torch.float32).reshape(16, 32).half()
    bitmask, values = compress(w, keep, 2, 4)
    fv, fm = sp24_layout(values, bitmask)
    assert fv.shape == (1, 1, 32, 8) and fm.shape == (1, 1, 16) and fm.dtype == torch.int32
    assert fv[0, 0, 0, :4].tolist() == [w[0, 1].item(), w[0, 3].item(), w[8, 0].item(), w[8, 2].item()]
    assert fv[0, 0, 0, 4:].tolist() == [w[0, 16].item(), w[0, 17].item(), w[8, 16].item(), w[8, 17].item()]
    word = fm[0, 0, 0].item() & 0xFFFFFFFF
    assert word & 0xF == 0xD and (word >> 16) & 0xF == 0x8
    assert (word >> 4) & 0xFFF == 0x444 and (word >> 20) & 0xFFF == 0x444  # groups 1-3: columns 0, 1
    lane5 = fv[0, 0, 5]                                # g = 1, q = 1: rows 1 and 9, groups 1 and 5
    assert lane5[:2].tolist() == [w[1, 4].item(), w[1, 5].item()] and lane5[2:4].tolist() == [w[9, 4].item(),
                                                                                                 w[9, 5].item()]


def test_sp24_layout_refuses_what_it_cannot_lay_out():
    gen = torch.Generator().manual_seed(6)
    _, bitmask, values = random_nm(5, 64, 2, 4, torch.float16, gen)
    with pytest.raises(AtvSparseError, match="layer.q: in_features 48 is not a multiple of 32"):
        sp24_layout(values[:, :24].contiguous(), bitmask[:, :6].contiguous(), "layer.q")
    _, bitmask48, values48 = random_nm(5, 64, 4, 8, torch.float16, gen)
    with pytest.raises(AtvSparseError, match=r"layer.q: bitmask group \d+ of row \d+ keeps [013] of 4 columns"):
        sp24_layout(values48, bitmask48, "layer.q")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SP24_SHAPES, ids=lambda s: "M{}xN{}xK{}".format(*s))
@pytest.mark.parametrize("ksplit", [0, 1, 2, 4], ids=lambda k: f"ksplit{k}")
def test_sp24_host_twin_linear(host_lib, dtype, shape, ksplit):
    M, N, K = shape
    gen = torch.Generator().manual_seed(seed_of("sp24", M, N, K, ksplit, dtype))
    w, bitmask, values = random_nm(N, K, 2, 4, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if ksplit % 2 == 0 else None
    code, out = host_sp24(host_lib, x, sp24_layout(values, bitmask), N, bias, ksplit)
    assert code == 0
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    assert not out.isnan().any()
    assert max_err(out, ref) <= 2 * max_err(F.linear(x, w, bias), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 32), (4, 17, 1056), (16, 40, 544)], ids=lambda s: "M{}xN{}xK{}".format(*s))
def test_sp24_host_twin_gated(host_lib, dtype, shape):
    M, N, K = shape
    gen = torch.Generator().manual_seed(seed_of("sp24 gated", M, N, K, dtype))
    wg, gb, gv = random_nm(N, K, 2, 4, dtype, gen)
    wu, ub, uv = random_nm(N, K, 2, 4, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    (gfv, gfm), (ufv, ufm) = sp24_layout(gv, gb), sp24_layout(uv, ub)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    code = host_lib.atv_sp24_gated_host(x.data_ptr(), x.stride(0), gfv.data_ptr(), gfm.data_ptr(), ufv.data_ptr(),
                                        ufm.data_ptr(), out.data_ptr(), N, M, N, K, CODES[dtype], 0)
    assert code == 0
    ref = F.silu(x.double() @ wg.double().T) * (x.double() @ wu.double().T)
    assert max_err(out, ref) <= 2 * max_err(F.silu(F.linear(x, wg)) * F.linear(x, wu), ref)


def _swap_meta_rows(fv, fm):
    """Rows g and g + 8 swapped in every metadata word (its 16-bit halves)."""
    words = fm.to(torch.int64) & 0xFFFFFFFF
    swapped = ((words & 0xFFFF) << 16) | (words >> 16)
    return fv, torch.where(swapped >= 2**31, swapped - 2**32, swapped).to(torch.int32)


def _swap_meta_lanes(fv, fm):
    """The words of lanes 4g and 4g + 1 exchanged (column halves 0-15 and 16-31 of each k-block)."""
    return fv, fm.reshape(*fm.shape[:2], 8, 2).flip(-1).reshape(fm.shape).contiguous()


def _swap_value_registers(fv, fm):
    """a1 and a2 exchanged (row g + 8 of group q read as row g of group q + 4)."""
    return fv.reshape(*fv.shape[:3], 4, 2)[..., [0, 2, 1, 3], :].reshape(fv.shape).contiguous(), fm


@pytest.mark.parametrize("permute", [_swap_meta_rows, _swap_meta_lanes, _swap_value_registers],
                         ids=lambda f: f.__name__.strip("_"))
def test_sp24_emulation_catches_a_permuted_layout(host_lib, permute):
    """A layout whose metadata (or values) sit in another valid-looking order gives wrong sums: the
    emulation reads the PTX fragment order, not whatever the layout builder happens to write."""
    gen = torch.Generator().manual_seed(7)
    w, bitmask, values = random_nm(32, 256, 2, 4, torch.float16, gen)
    x = torch.randn(2, 256, generator=gen).half()
    ref = x.double() @ w.double().T
    good = sp24_layout(values, bitmask)
    code, out = host_sp24(host_lib, x, good, 32)
    assert code == 0 and max_err(out, ref) <= 2 * max_err(F.linear(x, w), ref)
    code, out = host_sp24(host_lib, x, permute(*good), 32)
    assert code == 0  # every nibble still names two ordered positions: only the sums can tell
    assert max_err(out, ref) > 100 * max_err(F.linear(x, w), ref)


def test_sp24_emulation_refuses_unordered_metadata(host_lib):
    """Nibbles mma.sp::ordered_metadata does not define (i0 >= i1) are an error, not a guess."""
    gen = torch.Generator().manual_seed(8)
    _, bitmask, values = random_nm(16, 64, 2, 4, torch.float16, gen)
    fv, fm = sp24_layout(values, bitmask)
    bad = fm.clone()
    bad[0, 1, 3] = 0x7  # row g = 1, group 4: i0 = 3, i1 = 1
    x = torch.randn(1, 64, generator=gen).half()
    code, out = host_sp24(host_lib, x, (fv, bad), 16)
    assert code == ATV_ERR["layout"] and out.isnan().all()
    assert "metadata" in host_lib.atv_error_string(code).decode()


def test_sp24_host_twin_refusals(host_lib):
    gen = torch.Generator().manual_seed(9)
    _, bitmask, values = random_nm(5, 64, 2, 4, torch.float16, gen)
    fv, fm = sp24_layout(values, bitmask)
    x = torch.randn(2, 64, generator=gen).half()

    def call(**over):
        args = dict(x=x.data_ptr(), ldx=64, fv=fv.data_ptr(), fm=fm.data_ptr(), M=2, N=5, K=64, dtype=0)
        args.update(over)
        out = torch.full((2, 5), float("nan"), dtype=torch.float16)
        code = host_lib.atv_sp24_linear_host(args["x"], args["ldx"], args["fv"], args["fm"], None, out.data_ptr(), 5,
                                             args["M"], args["N"], args["K"], args["dtype"], 0)
        assert code == 0 or out.isnan().all(), "a refused call wrote its output"
        return code

    assert call() == 0
    assert call(dtype=2) == ATV_ERR["dtype"]
    assert call(M=17) == call(K=48) == call(ldx=32) == ATV_ERR["size"]
    assert call(x=x.data_ptr() + 2) == call(fv=fv.data_ptr() + 4) == call(fm=fm.data_ptr() + 2) == ATV_ERR["align"]
    assert call(fm=None) == ATV_ERR["null"]


def test_sp24_packed_layout_and_gated_halves():
    """pack_sp24 / split_sp24 round trip exactly, and a stacked gate / up weight (rows a multiple of
    32) splits into the two halves' own layouts at tile rows / 32."""
    gen = torch.Generator().manual_seed(10)
    _, gb, gv = random_nm(48, 96, 2, 4, torch.bfloat16, gen)
    _, ub, uv = random_nm(48, 96, 2, 4, torch.bfloat16, gen)
    fv, fm = split_sp24(pack_sp24(torch.cat([gv, uv]), torch.cat([gb, ub])), torch.bfloat16, 96, 96)
    (gfv, gfm), (ufv, ufm) = sp24_layout(gv, gb), sp24_layout(uv, ub)
    assert torch.equal(fv[:3], gfv) and torch.equal(fm[:3], gfm) and torch.equal(fv[3:], ufv) and torch.equal(fm[3:], ufm)


def test_sp24_layout_built_once_by_the_runner():
    """A plan that uses cuda_sp24 gets the packed layout from build_layouts (kept when already
    built, dropped when the plan no longer uses it); the table routes 2:4 only, out % 32 == 0."""
    gen = torch.Generator().manual_seed(11)
    _, bitmask, values = random_nm(32, 64, 2, 4, torch.float16, gen)
    plan = Plan(("cuda_sp24",) * 4 + ("triton",) * 7, (-1,) * 11)
    cslt, dense, sp24 = runner.build_layouts(plan, bitmask, values, 64)
    assert cslt is None and dense is None and torch.equal(sp24, pack_sp24(values, bitmask))
    assert runner.build_layouts(plan, bitmask, values, 64, sp24=sp24)[2] is sp24
    assert runner.build_layouts(Plan.uniform("triton"), bitmask, values, 64, sp24=sp24)[2] is None
    from atv_sparse.ops.backends import FACTS

    layer = FACTS["cuda_sp24"].layer
    assert layer(2, 4, torch.float16, 64, 64) is None
    assert "2:4 only" in layer(4, 8, torch.float16, 64, 64)
    assert "multiple of 32" in layer(2, 4, torch.float16, 48, 64) and "multiple of 32" in layer(2, 4, torch.float16,
                                                                                                64, 48)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_autotune_checks_an_unverified_backend_before_timing_it(monkeypatch, capsys, gated):
    """cuda_sp24 is checked against the dense layer once per shape before it is timed; a backend that
    disagrees is left out of the measured plan (here: the reference backend, made wrong on purpose)."""
    from atv_sparse.ops import autotune
    from atv_sparse.ops.backends import FACTS

    shape = autotune.LayerShape(2, 4, torch.float32, 64, 128, gated=gated, bias=not gated)
    c = autotune.random_copy(shape, torch.device("cpu"), 0)
    c.cslt_weight, c.dense_copy, c.sp24 = runner.build_layouts(Plan.uniform("dense"), c.bitmask, c.values, 128)
    assert FACTS["cuda_sp24"].check_before_timing and not FACTS["cuda"].check_before_timing
    assert autotune.agrees_with_dense("reference", c, shape, "layers.0.mlp")
    real = autotune.run_backend
    monkeypatch.setattr(autotune, "run_backend", lambda *a: real(*a) * 1.01)
    assert not autotune.agrees_with_dense("reference", c, shape, "layers.0.mlp")
    assert "layers.0.mlp: backend 'reference' disagrees with the dense layer" in capsys.readouterr().out
    monkeypatch.setitem(FACTS, "reference", dataclasses.replace(FACTS["reference"], check_before_timing=True))
    entry = autotune.measure_entry(shape, "cpu", ["reference"], timer=lambda b, t, fn: 1.0 if b == "dense" else 0.5)
    assert set(entry["choice"]) == {"dense"}  # the wrong backend was never timed


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA or without the built library)

@pytest.fixture
def gpu():
    why = cuda_lib.cuda_library_status()
    if why and torch.cuda.is_available() and os.environ.get("ATV_SPARSE_REQUIRE_CUDA_LIB") == "1":
        # set by benchmarks/gpu_suite.py: on a lent GPU a missing library must fail, not skip silently
        pytest.fail(f"ATV_SPARSE_REQUIRE_CUDA_LIB=1 but the CUDA library is unusable: {why}")
    if why:
        pytest.skip(why)
    return torch.device("cuda")


def _gpu_problem(seed, M, N, K, n, m, dtype, lead=()):
    gen = torch.Generator().manual_seed(seed)
    w, bitmask, values = random_nm(N, K, n, m, dtype, gen, "cuda")
    x = torch.randn(*lead, M, K, generator=gen).to(dtype).cuda()
    bias = torch.randn(N, generator=gen).to(dtype).cuda()
    return x, w, bitmask, values, bias


def _poisoned_call(monkeypatch, op, *args):
    """Call the op with its output allocation (torch.empty) filled with NaN, so an element the
    kernel never writes shows."""
    real_empty = torch.empty
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
        return op(*args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 16], ids=lambda v: f"M{v}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gpu_linear(gpu, monkeypatch, dtype, pattern, M, with_bias):
    (n, m) = pattern
    gen = torch.Generator().manual_seed(M * 7 + n)
    N = 2 * int(torch.randint(1, 700, (1,), generator=gen)) + 1          # odd
    K = 16 * int(torch.randint(1, 300, (1,), generator=gen))
    x, w, bitmask, values, bias = _gpu_problem(M + N + K, M, N, K, n, m, dtype)
    bias = bias if with_bias else None
    out = _poisoned_call(monkeypatch, torch.ops.atv_sparse.nm_linear_cuda, x, values, bitmask, n, m, bias)
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    assert not out.isnan().any()
    assert max_err(out, ref) <= 2 * max_err(F.linear(x, w, bias), ref), (N, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("M", [1, 4, 16], ids=lambda v: f"M{v}")
def test_gpu_gated(gpu, monkeypatch, dtype, pattern, M):
    (n, m) = pattern
    N, K = 1001, 16 * 67
    x, wg, gb, gv, _ = _gpu_problem(M, M, N, K, n, m, dtype)
    _, wu, ub, uv, _ = _gpu_problem(M + 1, M, N, K, n, m, dtype)
    out = _poisoned_call(monkeypatch, torch.ops.atv_sparse.nm_gated_cuda, x, gv, gb, uv, ub, n, m)
    ref = F.silu(x.double() @ wg.double().T) * (x.double() @ wu.double().T)
    assert not out.isnan().any()
    assert max_err(out, ref) <= 2 * max_err(F.silu(F.linear(x, wg)) * F.linear(x, wu), ref)


@pytest.mark.parametrize("shape", [(1, 3, 4096 + 48), (3, 5, 14336), (1, 4099, 16), (2, 2053, 48), (16, 1, 4096)],
                         ids=lambda s: "M{}xN{}xK{}".format(*s))
def test_gpu_split_k_and_tails(gpu, shape):
    """Few rows and long K (split over 4 warps), many rows and K below one step (no split)."""
    M, N, K = shape
    x, w, bitmask, values, bias = _gpu_problem(N, M, N, K, 2, 4, torch.float16)
    out = torch.full((M, N + 3), float("nan"), dtype=torch.float16, device="cuda")
    lib = cuda_lib._load()[0]
    code = lib.atv_nm_linear(0, x.data_ptr(), K, values.data_ptr(), values.stride(0), bitmask.data_ptr(),
                             bitmask.stride(0), bias.data_ptr(), out.data_ptr(), out.stride(0), M, N, K, 2, 4, 0,
                             torch.cuda.current_stream().cuda_stream)
    assert code == 0
    ref = x.double() @ w.double().T + bias.double()
    assert max_err(out[:, :N], ref) <= 2 * max_err(F.linear(x, w, bias), ref)
    assert out[:, N:].isnan().all(), "wrote past the last row"


def test_gpu_deterministic_and_strided_x(gpu):
    x, w, bitmask, values, bias = _gpu_problem(0, 6, 513, 1024, 4, 8, torch.bfloat16, lead=(1,))
    first = torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, 4, 8, bias)
    assert torch.equal(first, torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, 4, 8, bias))
    wide = torch.zeros(6, 1024 + 3, dtype=torch.bfloat16, device="cuda")
    wide[:, 3:] = x[0]
    strided = torch.ops.atv_sparse.nm_linear_cuda(wide[:, 3:], values, bitmask, 4, 8, bias)  # misaligned rows
    assert torch.equal(strided, first[0])


def test_gpu_cuda_graph(gpu):
    x, w, bitmask, values, bias = _gpu_problem(1, 1, 4096, 4096, 2, 4, torch.float16)
    eager = torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, 2, 4, bias)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.ops.atv_sparse.nm_linear_cuda(static_x, values, bitmask, 2, 4, bias)  # warm up on the side stream
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.atv_sparse.nm_linear_cuda(static_x, values, bitmask, 2, 4, bias)
    static_x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, torch.ops.atv_sparse.nm_linear_cuda(x * 2, values, bitmask, 2, 4, bias))
    assert not torch.equal(captured, eager)


def test_gpu_opcheck_and_compile(gpu):
    x, w, bitmask, values, bias = _gpu_problem(2, 3, 257, 512, 2, 4, torch.float16, lead=(2,))
    torch.library.opcheck(torch.ops.atv_sparse.nm_linear_cuda.default, (x, values, bitmask, 2, 4, bias))
    torch.library.opcheck(torch.ops.atv_sparse.nm_gated_cuda.default, (x, values, bitmask, values, bitmask, 2, 4))
    fn = torch.compile(lambda t: torch.ops.atv_sparse.nm_linear_cuda(t, values, bitmask, 2, 4, bias) * 2,
                       fullgraph=True)
    assert torch.equal(fn(x), torch.ops.atv_sparse.nm_linear_cuda(x, values, bitmask, 2, 4, bias) * 2)


def test_gpu_refusals(gpu):
    x, w, bitmask, values, bias = _gpu_problem(3, 2, 64, 256, 2, 4, torch.float16)
    wide = torch.zeros(64, 128 + 4, dtype=torch.float16, device="cuda")
    with pytest.raises(AtvSparseError, match="values .* 16-byte aligned"):
        torch.ops.atv_sparse.nm_linear_cuda(x, wide[:, 4:], bitmask, 2, 4)
    assert "16-byte aligned" in cuda_lib.cuda_applies(x, wide[:, 4:], 2, 4)
    assert cuda_lib.cuda_applies(x, values, 2, 4) is None
    lib = cuda_lib._load()[0]
    out = torch.full((2, 64), float("nan"), dtype=torch.float16, device="cuda")
    code = lib.atv_nm_linear(0, x.data_ptr(), 256, values.data_ptr() + 2, 128, bitmask.data_ptr(), 32, None,
                             out.data_ptr(), 64, 2, 64, 256, 2, 4, 0, ctypes.c_void_p(None))
    assert code == ATV_ERR["align"] and out.isnan().all()


# ------------------------------------------------------------------------------------------------
# GPU: the sparse tensor-core kernels (first checked on hardware by the first GPU run)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 16], ids=lambda v: f"M{v}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gpu_sp24_linear(gpu, monkeypatch, dtype, M, with_bias):
    x, w, bitmask, values, bias = _gpu_problem(seed_of("sp24", M, dtype), M, 301, 4096 + 96, 2, 4, dtype)
    bias = bias if with_bias else None
    fv, fm = sp24_layout(values, bitmask)
    y = _poisoned_call(monkeypatch, torch.ops.atv_sparse.sp24_linear_cuda, x, fv, fm, 301, bias)
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    assert max_err(y, ref) <= 2 * max_err(F.linear(x, w, bias), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 4, 16], ids=lambda v: f"M{v}")
def test_gpu_sp24_gated(gpu, monkeypatch, dtype, M):
    x, wg, gb, gv, _ = _gpu_problem(seed_of("sp24 gated", M, dtype), M, 160, 2048, 2, 4, dtype)
    _, wu, ub, uv, _ = _gpu_problem(seed_of("sp24 up", M, dtype), M, 160, 2048, 2, 4, dtype)
    (gfv, gfm), (ufv, ufm) = sp24_layout(gv, gb), sp24_layout(uv, ub)
    y = _poisoned_call(monkeypatch, torch.ops.atv_sparse.sp24_gated_cuda, x, gfv, gfm, ufv, ufm, 160)
    ref = F.silu(x.double() @ wg.double().T) * (x.double() @ wu.double().T)
    assert max_err(y, ref) <= 2 * max_err(F.silu(F.linear(x, wg)) * F.linear(x, wu), ref)


def test_gpu_sp24_graph_and_opcheck(gpu):
    x, w, bitmask, values, bias = _gpu_problem(12, 1, 4096, 4096, 2, 4, torch.float16)
    fv, fm = sp24_layout(values, bitmask)
    torch.library.opcheck(torch.ops.atv_sparse.sp24_linear_cuda.default, (x, fv, fm, 4096, bias))
    static_x = x.clone()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.ops.atv_sparse.sp24_linear_cuda(static_x, fv, fm, 4096, bias)
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.atv_sparse.sp24_linear_cuda(static_x, fv, fm, 4096, bias)
    static_x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, torch.ops.atv_sparse.sp24_linear_cuda(x * 2, fv, fm, 4096, bias))
