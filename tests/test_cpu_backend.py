"""The ``cpu`` backend (``atv_sparse/cpu/nm_cpu.cpp`` through ``ops/cpu_lib.py``).

Every instruction path this processor runs, forced one at a time, against a float64 masked-dense
reference: the error is at most 2x the error of torch's own ``F.linear`` at the same dtype on the
same weights. Odd shapes (K not a multiple of 32 or 64, one row, rows not a multiple of the row
group or the thread count), every n:4 / n:8 pattern, fp32 / bf16 / fp16, bias, the gated gate/up
variant, decode (few tokens) and prefill (panels) sizes, 1 and 2 threads. Then the integration
(SparseLinear, ``atv_sparse.load``, the vLLM plugin's serving path: the cpu plan, only the packed
pair resident) and the fallbacks: turned off, no compiler, a failed build: one notice line and
the reference backend.

conftest.py turns the backend off for the rest of the suite (packed models there must equal their
dense exports bit for bit); this module turns it on for its own tests.
"""

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from atv_sparse import SparseLinear
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import compress
from atv_sparse.ops import cpu_lib
from atv_sparse.ops.dispatch import Plan



def _clear_caches():
    from atv_sparse import ops

    cpu_lib._load.cache_clear()
    cpu_lib.cpu_paths.cache_clear()
    ops._stateless_plan.cache_clear()


@pytest.fixture(autouse=True, scope="module")
def kernels_on():
    """The backend on for this module (conftest.py turns it off for the rest of the suite)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ATV_SPARSE_CPU_BACKEND", "1")
    _clear_caches()
    yield
    patch.undo()
    _clear_caches()


def available() -> bool:
    return cpu_lib.cpu_library_status() is None


@pytest.fixture
def kernels():
    if not available():
        pytest.skip(f"cpu kernels unavailable: {cpu_lib.cpu_library_status()}")

PATHS = ("avx512", "avx2", "portable")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATTERNS = [(n, 4) for n in (1, 2, 3)] + [(n, 8) for n in range(1, 8)]
# (rows, K, tokens): K = 72 / 200 / 1000 / 3208 are not multiples of 32 (a partial last chunk); one
# row; 13, 37 and 70 rows are not multiples of the row groups (2-4), the row blocks (24) or 2 threads;
# up to 32 tokens the decode kernel runs (11 = a tile of 8 + one of 3, 17 = 8 + 8 + 1; K = 3208 spans
# several K-blocks), 33 tokens take the prefill path (expanded panels).
SHAPES = ((1, 8, 1), (13, 72, 3), (37, 200, 5), (8, 64, 4), (70, 3208, 11), (29, 1000, 16), (64, 96, 17),
          (40, 1000, 33))


def random_layer(rows, k, n, m, dtype, seed=0):
    """A random weight pruned to n:m at random positions -> (dense pruned weight, bitmask, values)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, k, generator=gen)
    groups = torch.rand(rows, k // m, m, generator=gen)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    keep = keep.reshape(rows, k)
    weight = (weight * keep).to(dtype)
    bitmask, values = compress(weight, keep, n, m)
    return weight, bitmask, values


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def check_close(got, torch_result, ref, dtype):
    """got's error <= 2x torch's own error (RMS over outputs), or within one rounding of ref where
    torch happens to be exact."""
    floor = torch.finfo(dtype).eps * ref.abs().max().item()
    assert rms(got, ref) <= max(2 * rms(torch_result, ref), floor), (rms(got, ref), rms(torch_result, ref))


def path_or_skip(path):
    if not available() or path not in cpu_lib.cpu_paths():
        pytest.skip(f"this processor does not run the {path} path")


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
def test_linear_matches_float64_reference(path, dtype, pattern, threads):
    path_or_skip(path)
    n, m = pattern
    for seed, (rows, k, tokens) in enumerate(SHAPES):
        if k % m:
            continue
        weight, bitmask, values = random_layer(rows, k, n, m, dtype, seed)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
        bias = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)
        ref = x.double() @ weight.double().T + bias.double()
        got = cpu_lib.nm_linear_cpu(x, values, bitmask, n, m, bias, False, path)
        assert got.shape == (tokens, rows) and got.dtype == dtype
        check_close(got, F.linear(x, weight, bias), ref, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (3, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_gated_matches_float64_reference(path, dtype, pattern, threads):
    path_or_skip(path)
    n, m = pattern
    for seed, (half, k, tokens) in enumerate(((1, 8, 1), (7, 200, 2), (33, 1000, 3), (20, 96, 16), (12, 72, 40))):
        weight, bitmask, values = random_layer(2 * half, k, n, m, dtype, seed)
        x = torch.randn(3, tokens, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
        full = x.double() @ weight.double().T
        ref = F.silu(full[..., :half]) * full[..., half:]
        lin = F.linear(x, weight)
        got = cpu_lib.nm_linear_cpu(x, values, bitmask, n, m, None, True, path)
        assert got.shape == (3, tokens, half)
        check_close(got, F.silu(lin[..., :half]) * lin[..., half:], ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4), (5, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_one_token_matches_float64_reference(dtype, pattern, threads):
    """One token, the decode step of a generate loop: bf16 2:4 / 4:8 take their own kernel (groups of 4
    rows, two chunks a step), so the shapes cover an even and an odd count of full 32-column chunks, with
    and without a partial last chunk, and row counts that leave 1-3 rows past the groups of 4."""
    path_or_skip("avx512")
    n, m = pattern
    for seed, (rows, k) in enumerate(((70, 3208), (37, 1000), (9, 96), (8, 128), (6, 4160), (3, 40), (1, 64))):
        weight, bitmask, values = random_layer(rows, k, n, m, dtype, seed)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
        ref = x.double() @ weight.double().T
        got = cpu_lib.nm_linear_cpu(x, values, bitmask, n, m)
        check_close(got, F.linear(x, weight), ref, dtype)
        if rows % 2 == 0:
            half = rows // 2
            ref = F.silu(ref[:, :half]) * ref[:, half:]
            lin = F.linear(x, weight)
            got = cpu_lib.nm_linear_cpu(x, values, bitmask, n, m, None, True)
            check_close(got, F.silu(lin[:, :half]) * lin[:, half:], ref, dtype)


def test_eager_call_and_custom_op_agree(kernels):
    """The eager fast path (no op dispatch) and the registered op: both within the float64 reference's
    bound, with equal bits (the same kernel), for a 3-D x (leading dimensions kept)."""
    weight, bitmask, values = random_layer(40, 1000, 2, 4, torch.bfloat16)
    x = torch.randn(2, 3, 1000).bfloat16()
    ref = x.double() @ weight.double().T
    eager = cpu_lib.nm_linear_cpu(x, values, bitmask, 2, 4)
    op = torch.ops.atv_sparse.nm_linear_cpu(x, values, bitmask, 2, 4)
    assert eager.shape == op.shape == (2, 3, 40)
    check_close(eager, F.linear(x, weight), ref, torch.bfloat16)
    assert torch.equal(eager, op)
    with pytest.raises(AtvSparseError, match="x is torch.float32"):
        torch.ops.atv_sparse.nm_linear_cpu(x.float(), values, bitmask, 2, 4)


def test_paths_and_forcing(kernels, monkeypatch):
    paths = cpu_lib.cpu_paths()
    assert paths[-1] == "portable"
    if platform.machine() == "x86_64":
        flags = open("/proc/cpuinfo").read()
        assert ("avx512" in paths) == all(f in flags for f in ("avx512_vbmi2", "avx512_bf16", "avx512bw"))
    monkeypatch.setenv("ATV_SPARSE_CPU_PATH", "portable")
    assert cpu_lib.default_path() == "portable"
    monkeypatch.setenv("ATV_SPARSE_CPU_PATH", "sse9")
    with pytest.raises(AtvSparseError, match="'sse9' is not one this processor runs"):
        cpu_lib.default_path()


def test_refusals_name_the_problem(kernels):
    _, bitmask, values = random_layer(4, 16, 2, 4, torch.bfloat16)
    with pytest.raises(AtvSparseError, match="x is torch.float32, values torch.bfloat16"):
        cpu_lib.nm_linear_cpu(torch.randn(1, 16), values, bitmask, 2, 4)
    with pytest.raises(AtvSparseError, match="not the 2:4 layout"):
        cpu_lib.nm_linear_cpu(torch.randn(1, 24).bfloat16(), values, bitmask, 2, 4)
    with pytest.raises(AtvSparseError, match="n:4 and n:8 patterns, not 2:16"):
        cpu_lib.nm_linear_cpu(torch.randn(1, 16).bfloat16(), values, bitmask, 2, 16)
    assert "unstructured" in cpu_lib.cpu_layer_status(None, None, torch.float32, 4, 16)


def test_opcheck(kernels):
    _, bitmask, values = random_layer(6, 40, 2, 4, torch.float32)
    for x, gated in ((torch.randn(2, 40), False), (torch.randn(20, 40), True)):
        torch.library.opcheck(torch.ops.atv_sparse.nm_linear_cpu, (x, values, bitmask, 2, 4, None, gated, "auto"))


def test_sparse_linear_auto_plans_cpu_and_keeps_only_the_pair(kernels):
    layer = torch.nn.Linear(4096, 512, bias=True).to(torch.bfloat16)
    module = SparseLinear.from_linear(layer, "2:4").prepare()
    assert module.plan == Plan.uniform("cpu")
    assert set(module.resident_bytes()) == {"values", "bitmask", "bias"}  # no dense copy, no other layout
    x = torch.randn(2, 4096).to(torch.bfloat16)
    ref = x.double() @ module.dense_weight().double().T + module.bias.double()
    check_close(module(x), F.linear(x, module.dense_weight(), module.bias), ref, torch.bfloat16)


def test_builds_where_a_compiler_exists():
    """On x86-64 with a C++ compiler and ninja the kernels must build: a silent fallback here would
    hide a broken source."""
    from torch.utils import cpp_extension

    if platform.machine() != "x86_64" or not shutil.which("c++") or not cpp_extension.is_ninja_available():
        pytest.skip("no x86-64 compiler toolchain here")
    assert cpu_lib.cpu_library_status() is None


FALLBACK_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from atv_sparse import SparseLinear
    from atv_sparse.ops import cpu_lib
    SOURCE_OVERRIDE
    layer = torch.nn.Linear(64, 8)
    module = SparseLinear.from_linear(layer, "2:4").prepare()
    x = torch.randn(3, 64)
    assert torch.equal(module(x), F.linear(x, module.dense_weight(), module.bias))
    print("PLAN", module.plan.summary())
""")


@pytest.mark.parametrize("case", ["off", "no_compiler", "failed_build"])
def test_fallback_is_one_notice_and_the_reference_backend(case, tmp_path):
    env = dict(os.environ, ATV_SPARSE_CPU_CACHE=str(tmp_path / "cache"), ATV_SPARSE_CPU_BACKEND="1")
    override = ""
    if case == "off":
        env["ATV_SPARSE_CPU_BACKEND"] = "0"
    elif case == "no_compiler":
        env["CXX"] = str(tmp_path / "no-such-compiler")
    else:
        bad = tmp_path / "nm_cpu.cpp"
        bad.write_text("#error deliberately broken\n")
        override = f"cpu_lib.SOURCE = __import__('pathlib').Path({str(bad)!r})"
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT.replace("SOURCE_OVERRIDE", override)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "PLAN reference" in done.stdout
    notices = [ln for ln in done.stderr.splitlines() if ln.startswith("atv-sparse: the cpu backend is unavailable")]
    assert len(notices) == 1, done.stderr
    expect = {"off": "ATV_SPARSE_CPU_BACKEND=0", "no_compiler": "no C++ compiler", "failed_build": "build failed"}
    assert expect[case] in notices[0]


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_load_on_cpu_keeps_only_the_packed_pair(kernels, tiny_llama, calib_txt, tmp_path, fuse):
    """``atv_sparse.load(device="cpu")`` of a bf16 2:4 checkpoint: every sparse layer planned on the
    cpu backend (the gated gate/up layer too when fused), no other layout resident (linears at most
    0.6x their dense bytes), logits within 2x torch's own bf16 error of the float64 dense export."""
    import atv_sparse
    from atv_sparse.convert import run
    from transformers import AutoModelForCausalLM

    for fmt in ("packed", "dense"):
        run([str(tiny_llama), "--out", str(tmp_path / fmt), "--calib", str(calib_txt), "--nsamples", "4",
             "--seqlen", "32", "--quiet", "--device", "cpu", "--method", "magnitude", "--format", fmt])
    model = atv_sparse.load(tmp_path / "packed", device="cpu", dtype=torch.bfloat16, fuse=fuse, progress=False)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.plan == Plan.uniform("cpu") for m in layers)
    assert any(m.gated for m in layers) == fuse
    resident = sum(sum(m.resident_bytes().values()) for m in layers)
    dense = sum(m.out_features * m.in_features * 2 for m in layers)
    assert all(set(m.resident_bytes()) <= {"values", "bitmask", "bias"} for m in layers)
    assert resident <= 0.6 * dense
    dense_model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float64)
    bf16_model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = dense_model(ids).logits
        assert rms(model(ids).logits, exact) <= 2 * rms(bf16_model(ids).logits, exact)
        one = model(ids[:, :1]).logits  # decode-sized call: the kernel, not the panels
        assert rms(one, dense_model(ids[:, :1]).logits) <= 2 * rms(bf16_model(ids[:, :1]).logits,
                                                                   dense_model(ids[:, :1]).logits)


def test_vllm_serving_path_plans_cpu_without_a_dense_copy(kernels):
    """The vLLM plugin's layer preparation (``vllm_plugin.serving``, no vLLM needed): the cpu plan,
    no cuSPARSELt buffer and no dense copy, and its op's results within bounds."""
    from torch import nn

    from atv_sparse.patterns import parse_pattern
    from atv_sparse.vllm_plugin import serving

    weight, bitmask, values = random_layer(24, 64, 2, 4, torch.bfloat16, seed=5)
    layer = nn.Module()
    layer.weight_bitmask = nn.Parameter(bitmask, requires_grad=False)
    layer.weight_values = nn.Parameter(values, requires_grad=False)
    serving.prepare_layer(layer, 64, parse_pattern("2:4"), "model.layers.0.self_attn.o_proj")
    assert set(layer.atv_plan.backends()) == {"cpu"}
    assert layer.atv_cslt_weight is None and layer.atv_dense_copy is None
    for tokens in (1, 5, 40):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
        ref = x.double() @ weight.double().T
        check_close(serving.forward(layer, x), F.linear(x, weight), ref, torch.bfloat16)


def test_latency_cpu_dry_run_writes_its_results(kernels, tmp_path):
    """``benchmarks/latency.py --cpu`` on tiny shapes: every row, the end-to-end table and the plot."""
    import json
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    env = dict(os.environ, ATV_SPARSE_CPU_BACKEND="1")
    done = subprocess.run([sys.executable, str(bench / "latency.py"), "--cpu", "--shapes", "tiny", "--pattern", "2:4",
                           "--m", "1,9", "--rounds", "1", "--reps", "2", "--cpu-e2e", "--e2e-shape", "tiny",
                           "--e2e-tokens", "3", "--e2e-repeats", "1", "--tag", "dry", "--out-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    written = {p.suffix for p in tmp_path.glob("cpu-*-dry.*")}
    assert written == {".md", ".json", ".png"}
    result = json.loads(next(tmp_path.glob("cpu-*-dry.json")).read_text())
    assert len(result["layers"]) == 4 * 2 and all(r["cpu_ms"] > 0 and r["speedup_vs_torch_bf16"] > 0
                                                  for r in result["layers"])
    e2e = result["e2e"][0]
    assert e2e["sparse_plans"] == ["cpu"] and e2e["linear_bytes_ratio"] < 0.6
