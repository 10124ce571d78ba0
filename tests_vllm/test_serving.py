"""vLLM with the plugin on packed checkpoints vs vLLM and transformers on the dense export of the same run.

Greedy tokens must be identical (and per-token logprobs equal to float32 round-off) at tensor
parallel size 1 and 2, eager and compiled; and once loaded, every pruned linear holds only its
bitmask and values (plus bias), sliced for its rank.
"""

import math

import pytest

from conftest import MAX_TOKENS, PROMPTS

# Same computation on the same weights (zeros where pruned), summed in another order.
LOGPROB_ATOL = 1e-3

# (packed job, dense vLLM job it must match, dense export transformers runs)
TP1_CASES = [
    ("llama-2:4@tp1", "llama-2:4-dense@tp1", "llama-2:4-dense"),
    ("llama-4:8@tp1", "llama-4:8-dense@tp1", "llama-4:8-dense"),
    ("qwen2-2:4@tp1", "qwen2-2:4-dense@tp1", "qwen2-2:4-dense"),
    ("qwen2-unstructured@tp1", "qwen2-unstructured-dense@tp1", "qwen2-unstructured-dense"),
    ("llama-2:4-compiled@tp1", "llama-2:4-dense@tp1", "llama-2:4-dense"),  # torch.compile, vllm serve's default
]
TP2_CASES = [
    ("llama-2:4@tp2", "llama-2:4-dense@tp2", "llama-2:4-dense"),
    ("qwen2-4:8@tp2", "qwen2-4:8-dense@tp2", "qwen2-4:8-dense"),  # 1 KV head: k / v replicated on both ranks
    # the dense export of this run is served at TP=1 only, to save a 30 s engine start
    ("qwen2-unstructured@tp2", "qwen2-unstructured-dense@tp1", "qwen2-unstructured-dense"),
]
SPARSE_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
IGNORED = {"llama-4:8": {"model.layers.1.mlp.down_proj"}}  # conftest converts it with --ignore


def ok(results: dict, name: str) -> dict:
    result = results[name]
    assert "error" not in result, f"{name} failed:\n{result.get('traceback')}"
    return result


def check_matches_dense(results, other_results, hf_greedy, sparse_name, dense_name, hf_name):
    sparse, dense = ok(results, sparse_name), ok(other_results, dense_name)
    assert len(sparse["tokens"]) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in sparse["tokens"])
    assert sparse["tokens"] == dense["tokens"], f"{sparse_name} vs {dense_name}"
    assert dense["tokens"] == hf_greedy(hf_name), f"{dense_name} vs transformers"
    for a, b in zip(sparse["logprobs"], dense["logprobs"], strict=True):
        assert all(math.isclose(x, y, abs_tol=LOGPROB_ATOL) for x, y in zip(a, b, strict=True)), (a, b)


@pytest.mark.parametrize("sparse_name,dense_name,hf_name", TP1_CASES, ids=[c[0] for c in TP1_CASES])
def test_tp1_greedy_matches_dense_export(tp1, hf_greedy, sparse_name, dense_name, hf_name):
    check_matches_dense(tp1[0], tp1[0], hf_greedy, sparse_name, dense_name, hf_name)


@pytest.mark.parametrize("sparse_name,dense_name,hf_name", TP2_CASES, ids=[c[0] for c in TP2_CASES])
def test_tp2_greedy_matches_dense_export(tp1, tp2, hf_greedy, sparse_name, dense_name, hf_name):
    check_matches_dense(tp2[0], (tp2 if dense_name.endswith("@tp2") else tp1)[0], hf_greedy, sparse_name,
                        dense_name, hf_name)


def _check_layers(name: str, ranks: list[dict], pattern: str, tp: int) -> None:
    """Every pruned linear on every rank: only compressed tensors, shaped for the rank's slice."""
    ignored = IGNORED.get(name.split("@")[0].removesuffix("-compiled"), set())
    kept_by_layer = {}
    for rank, layers in enumerate(ranks):
        sparse = {n for n, r in layers.items() if r["method"] == "AtvSparseLinearMethod"}
        want = {f"model.layers.{i}.{s}" for i in range(2) for s in SPARSE_LINEARS} - ignored
        assert sparse == want, f"{name} rank {rank}: sparse layers {sorted(sparse)}"
        for layer in ignored:
            assert layers[layer]["method"] == "UnquantizedLinearMethod", (name, layer)
        for layer_name in sparse:
            report = layers[layer_name]
            tensors = report["tensors"]
            assert not report["has_weight_attr"], f"{name}: {layer_name} kept a dense weight"
            assert set(tensors) - {"bias"} == {"weight_bitmask", "weight_values"}, (layer_name, tensors)
            rows, cols = report["output_size_per_partition"], report["input_size_per_partition"]
            (mask_shape, mask_dtype), (values_shape, values_dtype) = tensors["weight_bitmask"], tensors["weight_values"]
            assert mask_dtype == "uint8" and mask_shape == [rows, -(-cols // 8)], (layer_name, mask_shape)
            assert values_dtype == "float32"
            if pattern == "unstructured":
                assert len(values_shape) == 1, (layer_name, values_shape)
                kept_by_layer.setdefault(layer_name, []).append((values_shape[0], rows, cols))
            else:
                n, m = map(int, pattern.split(":"))
                assert values_shape == [rows, cols * n // m], (layer_name, values_shape)
    for layer_name, per_rank in kept_by_layer.items():
        # --sparsity 0.5 keeps half of every row: the ranks' slices hold exactly half of what they cover
        for kept, rows, cols in per_rank:
            if layer_name.endswith(("o_proj", "down_proj")) and tp > 1:
                continue  # a column slice of a row holds any share of its kept weights; the sum is checked below
            assert kept == rows * cols // 2, (layer_name, kept, rows, cols)
        if layer_name.endswith(("o_proj", "down_proj")):
            assert sum(k for k, _, _ in per_rank) == per_rank[0][1] * per_rank[0][2] * tp // 2, (layer_name, per_rank)


@pytest.mark.parametrize("name", [c[0] for c in TP1_CASES + TP2_CASES])
def test_pruned_linears_keep_only_compressed_tensors(tp1, tp2, name):
    results = (tp2 if name.endswith("@tp2") else tp1)[0]
    ranks = ok(results, name)["layers"]
    tp = int(name.rsplit("@tp", 1)[1])
    assert len(ranks) == tp
    pattern = name.split("@")[0].removesuffix("-compiled").split("-", 1)[1]
    _check_layers(name, ranks, pattern, tp)


@pytest.mark.parametrize("name", ["llama-2:4-dense@tp1", "qwen2-4:8-dense@tp2"])
def test_dense_export_stays_vllms_own(tp1, tp2, name):
    results = (tp2 if name.endswith("@tp2") else tp1)[0]
    for layers in ok(results, name)["layers"]:
        assert {r["method"] for r in layers.values()} == {"UnquantizedLinearMethod"}


def test_register_is_idempotent(tp1):
    assert tp1[0]["_meta"]["quantization_methods_atv_sparse"] == 1


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    points = [e for e in entry_points(group="vllm.general_plugins") if e.name == "atv_sparse"]
    assert [e.value for e in points] == ["atv_sparse.vllm_plugin:register"]
