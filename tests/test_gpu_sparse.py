"""GPU-only checks of the execution path (skipped without CUDA): cuSPARSELt against a float64
reference, the measured dispatch table, torch.compile (inductor) and CUDA-graph capture of a tiny
Llama whose linears are SparseLinear. The Triton kernel tests in test_kernels.py run on CUDA too."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(48, 160), (272, 208)]  # multiples of 16, not of the usual tiles


def err(y, ref):
    return (y.double() - ref).abs().max().item()


@pytest.mark.parametrize("tokens", [1, 3, 16, 33, 256], ids=lambda t: f"M{t}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_cusparselt_error_bound(tokens, dtype, bias):
    from atv_sparse.nn.sparse_linear import SparseLinear
    from atv_sparse.ops.cusparselt import cusparselt_status

    if cusparselt_status(torch.device("cuda")):
        pytest.skip(cusparselt_status(torch.device("cuda")))
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    for out_f, in_f in SHAPES:
        lin = nn.Linear(in_f, out_f, bias=bias, device="cuda", dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=gen, device="cuda"))
        module = SparseLinear.from_linear(lin, "2:4", backend="cusparselt").prepare()
        x = torch.randn(tokens, in_f, generator=gen, device="cuda", dtype=dtype)
        w = module.dense_weight()
        ref = x.double() @ w.double().T + (lin.bias.double() if bias else 0)
        plain = F.linear(x, w, lin.bias)
        out = module(x)
        assert torch.isfinite(out).all() and err(out, ref) <= 2 * err(plain, ref) + 1e-6


def test_alg_id_search_is_validated():
    from atv_sparse.ops.cusparselt import cslt_pack, cusparselt_status, search_alg_id

    if cusparselt_status(torch.device("cuda")):
        pytest.skip(cusparselt_status(torch.device("cuda")))
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    w = w * (w.abs().reshape(256, -1, 4).argsort(-1).argsort(-1) >= 2).reshape(256, 512)
    alg = search_alg_id(cslt_pack(w), w, 64)
    assert isinstance(alg, int) and alg >= 0


def test_measured_table_is_written_and_reused(tmp_path, monkeypatch):
    from atv_sparse.nn.prepare import prepare_model
    from atv_sparse.nn.sparse_linear import SparseLinear

    monkeypatch.setenv("ATV_SPARSE_DISPATCH_TABLE", str(tmp_path / "table.json"))
    lin = nn.Linear(256, 128, bias=False, device="cuda", dtype=torch.float16)
    model = nn.ModuleList([SparseLinear.from_linear(lin, "2:4"), SparseLinear.from_linear(lin, "4:8")])
    summary = prepare_model(model, progress=False)
    assert (tmp_path / "table.json").exists() and len(summary) == 2
    x = torch.randn(5, 256, device="cuda", dtype=torch.float16)
    for module in model:
        exact = x.double() @ module.dense_weight().double().T
        plain = F.linear(x, module.dense_weight())
        assert err(module(x), exact) <= 2 * err(plain, exact) + 1e-6


def tiny_sparse_llama(tmp_path, pattern):
    import atv_sparse
    import atv_sparse.convert
    from tests.conftest import write_tiny_model

    src = write_tiny_model(tmp_path / "src", "llama")
    out = tmp_path / "out"
    atv_sparse.convert.run([str(src), "--method", "magnitude", "--pattern", pattern, "--out", str(out),
                            "--dtype", "float16", "--quiet", "--device", "cpu"])
    return atv_sparse.load(out, device="cuda", progress=False)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_torch_compile_and_cuda_graph_replay(tmp_path, pattern):
    model = tiny_sparse_llama(tmp_path, pattern)
    ids = torch.randint(0, 300, (1, 8), device="cuda")
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        compiled = torch.compile(model)(ids, use_cache=False).logits
        assert torch.allclose(compiled, eager, rtol=1e-2, atol=1e-2)
        static = ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static, use_cache=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static, use_cache=False).logits
        fresh = torch.randint(0, 300, (1, 8), device="cuda")
        static.copy_(fresh)
        graph.replay()
        assert torch.equal(captured, model(fresh, use_cache=False).logits)
