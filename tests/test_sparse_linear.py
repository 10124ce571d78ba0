"""SparseLinear: construction, dispatch plans, the measured table, fused q/k/v and gate/up, bad input,
and torch.compile tracing (CPU; Triton under TRITON_INTERPRET=1)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import atv_sparse
from atv_sparse.errors import AtvSparseError
from atv_sparse.nn.prepare import prepare_model
from atv_sparse.ops.autotune import measure_entry
from atv_sparse.nn.fused import FusedQKV, QKVSlice, SparseMLP
from atv_sparse.nn.sparse_linear import SparseLinear
from atv_sparse.ops import available_backends, sparse_linear
from atv_sparse.ops.dispatch import (BUCKETS, Plan, bucket_index, heuristic_plan, machine_status, plan_from_entry,
                                     read_table, table_key, write_table)
from atv_sparse.patterns import parse_pattern

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def magnitude_keep(w, n, m):
    """Independent reference: per row and group of m, keep the n largest |w| (ties: lower column)."""
    keep = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], m):
            order = sorted(range(m), key=lambda c: (-abs(w[r, g + c].item()), c))
            for c in order[:n]:
                keep[r, g + c] = True
    return keep


def err(y, ref):
    return (y.double() - ref).abs().max().item()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_from_linear_magnitude_and_reference_result(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    lin = nn.Linear(32, 12, bias=True)
    module = SparseLinear.from_linear(lin, pattern, backend="reference")
    keep = magnitude_keep(lin.weight.data, n, m)
    assert torch.equal(module.dense_weight() != 0, keep)
    x = torch.randn(3, 32)
    assert torch.equal(module(x), F.linear(x, lin.weight * keep, lin.bias))
    pruned = SparseLinear.from_linear(lin, parse_pattern("unstructured", 0.25))  # by magnitude: 8 of 32 per row
    least_kept = [sorted(map(abs, row))[8] for row in lin.weight.tolist()]
    assert torch.equal(pruned.dense_weight() != 0, lin.weight.data.abs() >= torch.tensor(least_kept)[:, None])
    custom = torch.rand(12, 32).argsort(-1) < 16  # any mask works for unstructured
    un = SparseLinear.from_linear(lin, parse_pattern("unstructured", 0.5), mask=custom)
    assert torch.equal(un.dense_weight(), lin.weight.data * custom)


def test_from_packed_shares_and_validates():
    lin = nn.Linear(16, 8).half()
    ref = SparseLinear.from_linear(lin, "2:4")
    shared = SparseLinear.from_packed(ref.weight_bitmask, ref.weight_values, 16, "2:4", bias=ref.bias.data)
    assert shared.weight_values.data_ptr() == ref.weight_values.data_ptr()
    bad = ref.weight_bitmask.clone()
    bad[0, 0] = 0xFF  # a 2:4 group with 4 kept
    with pytest.raises(AtvSparseError, match="layer_x"):
        SparseLinear.from_packed(bad, ref.weight_values, 16, "2:4", name="layer_x")


def test_extra_repr_shows_pattern_backend_and_bytes():
    module = SparseLinear.from_linear(nn.Linear(64, 32, bias=False).half(), "2:4", name="blk.q")
    text = repr(module)
    assert "pattern=2:4" in text and "backend=auto" in text
    # values 32*32*2 + bitmask 32*8 bytes
    assert f"bytes={32 * 32 * 2 + 32 * 8} " in text and "dense 0.00MiB" in text


def test_bad_input_errors_name_the_layer():
    lin = nn.Linear(64, 16).float()
    with pytest.raises(AtvSparseError, match="layer_a.*float32"):
        SparseLinear.from_linear(lin, "2:4", backend="triton", name="layer_a").prepare()
    with pytest.raises(AtvSparseError, match="layer_b.*in_features=30"):
        SparseLinear.from_linear(nn.Linear(30, 4), "4:8", name="layer_b")
    with pytest.raises(AtvSparseError, match="not one of"):
        SparseLinear.from_linear(lin, "2:4", backend="fast")
    half = SparseLinear.from_linear(lin.half(), "2:4", backend="cusparselt", name="layer_c")
    if DEVICE == "cpu":
        with pytest.raises(AtvSparseError, match="layer_c.*CUDA.*usable here: .*reference"):
            half.prepare()
    auto = SparseLinear.from_linear(lin.half(), "2:4", name="layer_d")
    with pytest.raises(AtvSparseError, match="layer_d.*float32.*float16"):
        auto(torch.randn(2, 64))
    with pytest.raises(AtvSparseError, match="needs a prepared layout"):
        sparse_linear(torch.randn(2, 64).half(), auto.weight_bitmask, auto.weight_values, 64, backend="cusparselt",
                      n=2, m=4)


def test_auto_on_cpu_runs_the_cpu_kernels_else_reference():
    """``auto`` on a CPU: the cpu backend for every token count where its kernels built (within 2x
    torch's own error), else the reference backend (exactly ``F.linear`` on the decompressed weight)."""
    lin = nn.Linear(64, 16)
    module = SparseLinear.from_linear(lin, "4:8")
    x = torch.randn(5, 64)
    plain = F.linear(x, module.dense_weight(), lin.bias)
    if machine_status("cpu", torch.device("cpu")) is None:
        exact = x.double() @ module.dense_weight().double().T + lin.bias.detach().double()
        assert err(module(x), exact) <= max(2 * err(plain, exact), 1e-6)
        assert module.plan == Plan.uniform("cpu")
    else:
        assert torch.equal(module(x), plain)
        assert module.plan == Plan.uniform("reference")


def test_triton_noncontiguous_and_other_device_inputs_are_made_correct():
    torch.manual_seed(0)
    module = SparseLinear.from_linear(nn.Linear(64, 24).half(), "2:4", backend="triton").to(DEVICE)
    base = torch.randn(64, 6).half()
    x = base.t()  # (6, 64), non-contiguous
    exact = x.double() @ module.dense_weight().cpu().double().T + module.bias.detach().cpu().double()
    plain = F.linear(x, module.dense_weight().cpu(), module.bias.detach().cpu())
    out = module(x.to(DEVICE)).cpu()
    assert err(out, exact) <= 2 * err(plain, exact)
    if DEVICE == "cuda":  # a CPU input to a GPU layer is moved, not refused
        assert torch.equal(module(x).cpu(), out)


def test_available_backends_on_this_machine():
    here = available_backends("cpu")
    assert "reference" in here and "cusparselt" not in here and "cuda" not in here


def test_plan_buckets_and_summary():
    assert bucket_index(1) == 0 and bucket_index(3) == BUCKETS.index(4) and bucket_index(64) == BUCKETS.index(64)
    assert bucket_index(65) == BUCKETS.index(128) and bucket_index(10**6) == len(BUCKETS) - 1
    plan = heuristic_plan(["cuda", "triton", "cusparselt"], dense_fallback=True)
    assert plan.pick(4) == ("cuda", -1) and plan.pick(5)[0] == "triton" and plan.pick(64)[0] == "triton"
    assert plan.pick(65) == ("cusparselt", 0)
    assert plan.summary() == "cuda<=4,triton<=64,cusparselt>64"
    four_eight = heuristic_plan(["triton"], dense_fallback=True)  # no 4:8 tensor-core path
    assert four_eight.pick(4096)[0] == "dense" and heuristic_plan(["triton"], False).pick(4096)[0] == "triton"
    assert heuristic_plan([], True) == Plan.uniform("reference")


def test_measured_entry_picks_fastest_and_dense_only_when_faster(tmp_path):
    module = SparseLinear.from_linear(nn.Linear(32, 16, bias=False).half(), "2:4", name="m")
    calls = []
    fake = {"triton": lambda t: 1.0 + t / 100, "dense": lambda t: 3.0 - t / 1000}

    def timer(backend, tokens, fn):
        if tokens <= 2:  # run a few for real: the closures must execute the backend
            y = fn()
            assert y.shape == (tokens, 16)
            calls.append(backend)
        return fake[backend](tokens)

    usable = ["triton"] if "triton" in available_backends("cpu") else []
    if not usable:
        pytest.skip("needs Triton (interpreter) on this machine")
    entry = measure_entry(module.layer_shape(), "cpu", usable, dense_fallback=True, timer=timer)
    assert set(calls) == {"triton", "dense"}
    expected = ["triton" if 1.0 + t / 100 <= 3.0 - t / 1000 else "dense" for t in BUCKETS]
    assert entry["choice"] == expected and "dense" in expected and "triton" in expected
    no_dense = measure_entry(module.layer_shape(), "cpu", usable, dense_fallback=False, timer=timer)
    assert no_dense["choice"] == ["triton"] * len(BUCKETS)
    # the table round-trips through its file, and stale entries are ignored
    path = tmp_path / "table.json"
    key = table_key(2, 4, torch.float16, 16, 32, False)
    write_table(path, {key: entry}, "cpu")
    again = read_table(path)
    plan = plan_from_entry(again[key], usable)
    assert plan.backends == tuple(expected)
    assert plan_from_entry(again[key], []) is None  # triton no longer usable
    assert plan_from_entry(dict(again[key], buckets=[1, 2]), usable) is None
    path.write_text("{not json")
    with pytest.raises(AtvSparseError, match="table.json"):
        read_table(path)


def test_plan_with_dense_copy_runs_dense(tmp_path):
    module = SparseLinear.from_linear(nn.Linear(32, 16), "2:4", backend="reference")
    plan = Plan(("reference",) * (len(BUCKETS) - 1) + ("dense",), (-1,) * len(BUCKETS))
    module.prepare(plan)
    assert module.dense_weight_copy is not None and "dense" in module.resident_bytes()
    x = torch.randn(BUCKETS[-1] + 1, 32)
    assert torch.equal(module(x), F.linear(x, module.dense_weight(), module.bias))
    module.prepare(Plan.uniform("reference"))
    assert module.dense_weight_copy is None


def write_tiny(tmp_path, arch, fmt="packed", pattern="2:4", dtype="float32"):
    from tests.conftest import write_tiny_model

    src = write_tiny_model(tmp_path / f"{arch}-src", arch)
    out = tmp_path / f"{arch}-{pattern}-{fmt}-{dtype}"
    atv_sparse.convert.run([str(src), "--method", "magnitude", "--pattern", pattern, "--out", str(out),
                            "--format", fmt, "--dtype", dtype, "--quiet", "--device", "cpu"])
    return src, out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_fused_blocks_match_unfused(tmp_path, arch):
    import atv_sparse.convert  # noqa: F401

    _, out = write_tiny(tmp_path, arch)
    plain = atv_sparse.load(out, fuse=False, progress=False)
    fused = atv_sparse.load(out, fuse=True, progress=False)
    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, FusedQKV) and isinstance(layer.self_attn.k_proj, QKVSlice)
    assert isinstance(layer.mlp, SparseMLP) and layer.mlp.gate_up.gated
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        a, b = plain(ids).logits, fused(ids).logits
    # same products, possibly summed in another order by BLAS over the stacked weight
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # a slice called on its own input (out of order) recomputes instead of returning stale rows
    attn = fused.model.layers[0].self_attn
    h1, h2 = torch.randn(1, 3, attn.q_proj.qkv.in_features), torch.randn(1, 3, attn.q_proj.qkv.in_features)
    attn.q_proj(h1)
    k2 = attn.k_proj(h2)
    qkv = plain.model.layers[0].self_attn
    assert torch.allclose(k2, qkv.k_proj(h2), rtol=1e-5, atol=1e-6)


def test_fused_gate_up_triton_within_bound():
    torch.manual_seed(3)
    for pattern in ("2:4", "4:8"):
        gate = SparseLinear.from_linear(nn.Linear(64, 24, bias=False).half(), pattern)
        up = SparseLinear.from_linear(nn.Linear(64, 24, bias=False).half(), pattern)
        from atv_sparse.nn.fused import stack_rows

        fused = stack_rows([gate, up], gated=True)
        fused.backend = "triton"
        for tokens in (1, 3, 70):
            x = torch.randn(tokens, 64).half()
            wg, wu = gate.dense_weight().double(), up.dense_weight().double()
            exact = F.silu(x.double() @ wg.T) * (x.double() @ wu.T)
            plain = F.silu(F.linear(x, gate.dense_weight())) * F.linear(x, up.dense_weight())
            out = fused.to(DEVICE)(x.to(DEVICE)).cpu()
            assert out.shape == (tokens, 24) and err(out, exact) <= 2 * err(plain, exact)


def test_prepare_model_names_layers_and_refuses_unusable_backend(tmp_path):
    import atv_sparse.convert  # noqa: F401

    _, out = write_tiny(tmp_path, "llama")
    model = atv_sparse.load(out, progress=False)
    names = {m.name for m in model.modules() if isinstance(m, SparseLinear)}
    assert "model.layers.0.self_attn.q_proj" in names
    with pytest.raises(AtvSparseError, match=r"model\.layers\.0\..*backend 'triton'.*float32"):
        prepare_model(model, backend="triton", progress=False)
    with pytest.raises(AtvSparseError, match="not one of"):
        atv_sparse.load(out, backend="turbo")


def test_torch_compile_traces_sparse_model_fullgraph(tmp_path):
    import atv_sparse.convert  # noqa: F401

    _, out = write_tiny(tmp_path, "llama", dtype="float16")
    model = atv_sparse.load(out, fuse=True, backend="triton" if DEVICE == "cpu" else "auto", progress=False)
    model.to(DEVICE)
    ids = torch.randint(0, 300, (1, 5), device=DEVICE)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        traced = compiled(ids, use_cache=False).logits
    assert torch.equal(eager, traced)


def test_table_file_is_json_with_buckets(tmp_path):
    path = tmp_path / "t.json"
    write_table(path, {}, "GPU X")
    data = json.loads(path.read_text())
    assert data["buckets"] == list(BUCKETS) and data["device"] == "GPU X"


def test_kernel_autotune_buckets_are_the_dispatch_buckets():
    from atv_sparse.kernels.nm_common import M_BUCKETS, m_bucket

    assert M_BUCKETS == BUCKETS
    assert all(m_bucket(t) == BUCKETS[bucket_index(t)] for t in (1, 3, 9, 64, 65, 600, 9000))


def test_loaded_model_holds_only_packed_weights(tmp_path):
    import atv_sparse.convert  # noqa: F401

    _, out = write_tiny(tmp_path, "llama", dtype="float16")
    model = atv_sparse.load(out, fuse=True, progress=False)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert sparse and all(set(m.resident_bytes()) <= {"values", "bitmask", "bias"} for m in sparse)
    names = set(model.state_dict())
    # the fused groups replaced their parts: no per-projection copy of q/k/v or gate/up is left
    assert not any(n.endswith(("q_proj.weight_values", "gate_proj.weight_values")) for n in names)
    packed = sum(sum(m.resident_bytes().values()) for m in sparse)
    dense = sum(m.in_features * m.out_features * 2 for m in sparse)
    assert packed < 0.6 * dense  # 2:4 fp16: 1.125 of 2 bytes per weight


def test_ops_import_nothing_from_nn():
    """ops sits below nn (SparseLinear and the vLLM plugin both call ops.runner): no module of ops imports nn."""
    import ast
    from pathlib import Path

    import atv_sparse.ops

    for path in sorted(Path(atv_sparse.ops.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith(("..nn", "atv_sparse.nn")) for n in names), f"{path.name} imports {names}"
