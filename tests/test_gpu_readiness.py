"""Defects that only a GPU would show (issue 21), each reproduced on the CPU where it can be:
do_bench's return type, per-call work in the stateless op, host-to-device copies that CUDA-graph
capture forbids, negative cuSPARSELt algorithm ids, the error order on a GPU machine, the
one-config switch, and the position decode without a table."""

import pytest
import torch
import torch.nn.functional as F
from script_modules import load_script
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import atv_sparse.ops as ops
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import compress, decompress, pack_bitmask, unpack_bitmask
from atv_sparse.nn import sparse_linear as sl_module
from atv_sparse.nn.sparse_linear import SparseLinear
from atv_sparse.ops.dispatch import BUCKETS, Plan, plan_from_entry


def nm_pair(out_f, in_f, n, m, seed, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(out_f, in_f // m, m, generator=gen).argsort(-1)[..., :n]
    keep = torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    return compress(w, keep, n, m)


def load_benchmark(name):
    return load_script(f"benchmarks/{name}.py")


# --- a. triton.testing.do_bench with one quantile returns a float ------------------------------------

def test_median_timers_take_do_bench_single_quantile_float(monkeypatch):
    import triton.testing

    times = [3.0, 1.0, 2.0, 4.0, 5.0]
    # the real summary do_bench ends with: one quantile -> a bare float (triton 3.6 and 3.9)
    assert isinstance(triton.testing._summarize_statistics(times, [0.5], "mean"), float)

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        fn()
        return triton.testing._summarize_statistics(times, quantiles, return_mode)

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    from atv_sparse.ops.autotune import bench_median_ms, first_quantile

    assert bench_median_ms("triton", 1, lambda: None) == 3.0
    assert first_quantile([2.5, 9.0]) == 2.5
    latency = load_benchmark("latency")
    assert latency.median_ms(lambda: None, graph=False, calls=3) == 1.0


# --- b. the stateless op prepares nothing per call and copies nothing host-to-device ------------------

def test_stateless_sparse_linear_builds_no_sparse_linear(monkeypatch):
    bitmask, values = nm_pair(24, 64, 2, 4, seed=0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).half()
    expected = F.linear(x, decompress(bitmask, values, 64))

    def refuse(*args, **kwargs):
        raise AssertionError("a SparseLinear was built for a stateless call")

    monkeypatch.setattr(SparseLinear, "__init__", refuse)
    assert torch.equal(ops.sparse_linear(x, bitmask, values, 64, n=2, m=4), expected)
    assert torch.equal(ops.sparse_linear(x, bitmask, values, 64, backend="reference", n=2, m=4), expected)
    assert ops.sparse_linear(x, bitmask, values, 64, backend="triton", n=2, m=4).shape == (3, 24)


def test_stateless_auto_never_picks_a_backend_that_needs_a_layout(monkeypatch):
    """With every kernel usable (a GPU machine), auto picks cuda / triton, never cusparselt or dense;
    off a GPU, the reference backend."""
    monkeypatch.setattr(ops, "usable_backends", lambda *a: ["cuda", "triton", "cusparselt"])
    ops._stateless_plan.cache_clear()
    try:
        picked = [ops.stateless_backend(torch.device("cuda", 0), 2, 4, torch.float16, 16, 64, tokens)
                  for tokens in (1, 16, 64, 65, 4096)]
        on_cpu = ops.stateless_backend(torch.device("cpu"), 2, 4, torch.float16, 16, 64, 1)
    finally:
        ops._stateless_plan.cache_clear()
    assert picked == ["cuda", "triton", "triton", "triton", "triton"] and on_cpu == "reference"
    bitmask, values = nm_pair(16, 64, 2, 4, seed=2)
    with pytest.raises(AtvSparseError, match="'cusparselt' needs a prepared layout"):
        ops.sparse_linear(torch.zeros(1, 64).half(), bitmask, values, 64, backend="cusparselt", n=2, m=4)


class DeviceSpy(TorchDispatchMode):
    """Records the device of every tensor any aten op touches."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.devices |= {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def test_bitmask_pack_unpack_touch_only_the_inputs_device():
    """On the meta device any CPU constant copied over per call (a host-to-device copy on a GPU,
    forbidden under CUDA-graph capture) shows up as a CPU tensor."""
    keep = torch.zeros(4, 20, dtype=torch.bool, device="meta")
    bitmask = torch.zeros(4, 3, dtype=torch.uint8, device="meta")
    values = torch.zeros(40, dtype=torch.float16, device="meta")
    with DeviceSpy() as spy:
        pack_bitmask(keep)
        unpack_bitmask(bitmask, 20)
        decompress(bitmask, values, 20)
    assert spy.devices == {"meta"}


def test_bitmask_round_trip_after_the_shift_rewrite():
    gen = torch.Generator().manual_seed(5)
    keep = torch.rand(7, 21, generator=gen) < 0.4
    packed = pack_bitmask(keep)
    assert torch.equal(unpack_bitmask(packed, 21), keep)
    assert packed[0, 0].item() == sum(1 << c for c in range(8) if keep[0, c])  # bit c = column c


# --- c. no negative algorithm id reaches cuSPARSELt ----------------------------------------------------

def test_cusparselt_plans_hold_valid_alg_ids():
    assert set(Plan.uniform("cusparselt").alg_ids) == {0}
    with pytest.raises(ValueError, match="algorithm id >= 0"):
        Plan(("cusparselt",) * len(BUCKETS), (-1,) * len(BUCKETS))
    entry = {"buckets": list(BUCKETS), "choice": ["cusparselt"] * len(BUCKETS), "alg_ids": [-1] * len(BUCKETS)}
    assert set(plan_from_entry(entry, ["cusparselt"]).alg_ids) == {0}
    from atv_sparse.ops.cusparselt import cslt_linear

    with pytest.raises(AtvSparseError, match="algorithm id -1"):
        cslt_linear(torch.zeros(2, 16).half(), torch.zeros(8).half(), 16, -1)


def test_fixed_cusparselt_backend_passes_a_valid_alg_id(monkeypatch):
    """The whole fixed-backend path with cuSPARSELt faked: the id it receives is >= 0."""
    import atv_sparse.ops.cusparselt as cslt

    seen = []

    def fake_linear(x, packed, out_features, alg_id, bias=None):
        seen.append(alg_id)
        return F.linear(x, packed, bias)

    monkeypatch.setattr(sl_module, "machine_status", lambda backend, device: None)
    monkeypatch.setattr(cslt, "cslt_pack", lambda dense: dense)
    monkeypatch.setattr(cslt, "cslt_linear", fake_linear)
    lin = nn.Linear(64, 16, bias=True).half()
    module = SparseLinear.from_linear(lin, "2:4", backend="cusparselt").prepare()
    x = torch.randn(5, 64).half()
    assert torch.equal(module(x), F.linear(x, module.dense_weight(), module.bias))
    assert seen == [0]


# --- d. the errors a GPU machine gives for CPU tensors: the layer's reason first -----------------------

@pytest.mark.parametrize("interpret", ["1", None], ids=["interpreter", "gpu-machine"])
def test_errors_name_dtype_and_pattern_with_or_without_interpreter(monkeypatch, interpret):
    """TRITON_INTERPRET unset is what a GPU machine runs the suite with: Triton then refuses CPU
    tensors, and the message must still name the float32 / unstructured problem."""
    from atv_sparse.nn.prepare import prepare_model

    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    bitmask, values = nm_pair(24, 64, 2, 4, seed=3)
    x = torch.randn(2, 64).half()
    with pytest.raises(AtvSparseError, match="float32"):
        ops.sparse_linear(x.float(), bitmask, values.float(), 64, backend="triton", n=2, m=4)
    with pytest.raises(AtvSparseError, match="unstructured"):
        ops.sparse_linear(x, bitmask, values.reshape(-1), 64, backend="triton")
    with pytest.raises(AtvSparseError, match="layer_a.*float32"):
        SparseLinear.from_linear(nn.Linear(64, 16), "2:4", backend="triton", name="layer_a").prepare()
    model = nn.ModuleList([SparseLinear.from_linear(nn.Linear(64, 16), "2:4")])
    with pytest.raises(AtvSparseError, match=r"0.*backend 'triton'.*float32"):
        prepare_model(model, backend="triton", progress=False)


# --- e. no position table (no first-call host-to-device copy) -----------------------------------------

def test_decode_kernel_takes_no_position_table():
    from atv_sparse.kernels.nm_gemv import _nm_gemv_kernel

    assert not any("lut" in name for name in _nm_gemv_kernel.fn.arg_names)


# --- g. one config for tests -------------------------------------------------------------------------

class FakeAutotuned:
    """Stands for an @triton.autotune kernel: records which launch path ran."""

    def __init__(self):
        self.calls = []
        outer = self

        class Fn:
            def __getitem__(self, grid):
                return lambda *args, **kw: outer.calls.append(("one", grid, kw))

        self.fn = Fn()

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(("autotune", grid, kw))


@pytest.mark.parametrize("env,expected", [({"ATV_SPARSE_TRITON_ONE_CONFIG": "1"}, "one"),
                                          ({"TRITON_INTERPRET": "1"}, "one"), ({}, "autotune")])
def test_one_config_switch(monkeypatch, env, expected):
    import triton

    from atv_sparse.kernels.nm_common import launch

    for name in ("ATV_SPARSE_TRITON_ONE_CONFIG", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kernel = FakeAutotuned()
    config = triton.Config({"BLOCK_N": 16, "BLOCK_V": 64}, num_warps=4)
    launch(kernel, config, lambda meta: (100 // meta["BLOCK_N"],), 1, 2, GROUP=4)
    (path, grid, kwargs), = kernel.calls
    assert path == expected
    if expected == "one":
        assert grid == (6,) and kwargs["BLOCK_V"] == 64 and kwargs["num_warps"] == 4 and kwargs["GROUP"] == 4
