"""The vLLM plugin's load-time checks and shard slicing, without vLLM (pure functions).

The serving tests themselves (vLLM generating from packed checkpoints) are in tests_vllm/, run by
.ci/vllm_tests.sh in a virtualenv of their own.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from atv_sparse.convert import run
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import compress, pack_bitmask
from atv_sparse.formats.spec import FORMAT_VERSION
from atv_sparse.patterns import parse_pattern
from atv_sparse.vllm_plugin import slicing
from atv_sparse.vllm_plugin.checks import (check_block, check_row_split, layer_is_sparse, matches,
                                           pruned_modules_in_checkpoint, row_split_unit, selected_by_config)

# (out, in) with odd row counts and input sizes that are and are not multiples of 8
SHAPES = [(13, 67), (7, 64), (33, 136), (1, 9)]


def random_keep(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(out_features, in_features, generator=generator) < 0.45


def random_nm_keep(out_features: int, in_features: int, n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    scores = torch.rand(out_features, in_features // m, m, generator=generator)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(n, dim=-1).indices, True)
    return keep.reshape(out_features, in_features)


def block(**changes) -> dict:
    base = {"quant_method": "atv_sparse", "format": "bitmask", "format_version": FORMAT_VERSION, "pattern": "2:4",
            "sparsity": 0.5, "targets": ["re:model[.]layers[.][0-9]+[.].*"], "ignore": []}
    return {**base, **changes}


# --- the config block --------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["2:4", "4:8", "3:7"])
def test_block_gives_its_pattern(pattern):
    assert check_block(block(pattern=pattern, sparsity=parse_pattern(pattern).sparsity)) == parse_pattern(pattern)


def test_block_unstructured_reads_sparsity():
    assert check_block(block(pattern="unstructured", sparsity=0.7)).sparsity == 0.7


@pytest.mark.parametrize("changes,message", [
    ({"format_version": FORMAT_VERSION + 1}, f"format version {FORMAT_VERSION + 1} is not supported"),
    ({"format_version": None}, "format version None is not supported"),
    ({"format": "blocked-ell"}, "unknown atv_sparse format 'blocked-ell'"),
    ({"pattern": "2:4:8"}, "pattern '2:4:8' is not N:M"),
    ({"pattern": "4:2"}, "N:M needs 0 < N < M"),
    ({"quant_method": "compressed-tensors"}, "quant_method is 'compressed-tensors'"),
])
def test_block_refuses_what_the_plugin_does_not_know(changes, message):
    with pytest.raises(AtvSparseError, match=message.replace("(", r"\(")) as e:
        check_block(block(**changes), "ckpt/config.json")
    assert "ckpt/config.json" in str(e.value)


def test_block_must_be_an_object():
    with pytest.raises(AtvSparseError, match="not a JSON object"):
        check_block(["atv_sparse"])


# --- which linears are sparse ------------------------------------------------------------------

QKV = ["q_proj", "k_proj", "v_proj"]


def test_fused_group_all_or_nothing():
    prefix = "model.layers.3.self_attn.qkv_proj"
    assert layer_is_sparse(prefix, QKV, lambda n: n.startswith("model.layers.3.self_attn."))
    assert not layer_is_sparse(prefix, QKV, lambda n: False)
    assert layer_is_sparse("model.layers.3.mlp.down_proj", [], lambda n: n == "model.layers.3.mlp.down_proj")


@pytest.mark.parametrize("dense_parts", [["k_proj"], ["q_proj", "v_proj"]])
def test_fused_group_pruned_in_part_is_refused(dense_parts):
    pruned = {f"model.layers.3.self_attn.{p}" for p in QKV if p not in dense_parts}
    with pytest.raises(AtvSparseError) as e:
        layer_is_sparse("model.layers.3.self_attn.qkv_proj", QKV, pruned.__contains__)
    assert "layer model.layers.3.self_attn.qkv_proj" in str(e.value)
    assert f"leaves {', '.join(dense_parts)} dense" in str(e.value)


@pytest.mark.parametrize("name,pattern,hit", [
    ("model.layers.0.mlp.down_proj", "down_proj", True),
    ("model.layers.0.mlp.down_proj", "mlp.down_proj", True),
    ("model.layers.0.mlp.down_proj", "own_proj", False),
    ("model.layers.0.mlp.down_proj", "re:model[.]layers[.][0-9]+[.].*", True),
    ("lm_head", "re:model[.]layers[.][0-9]+[.].*", False),
    ("lm_head", "Linear", True),  # a class name: every linear of vLLM's model
])
def test_targets_match_like_convert(name, pattern, hit):
    assert matches(name, pattern) is hit


def test_ignore_beats_targets():
    targets, ignore = ["re:model[.]layers[.].*"], ["model.layers.1.mlp.down_proj"]
    assert selected_by_config(["model.layers.0.mlp.down_proj"], targets, ignore)
    assert not selected_by_config(["model.layers.1.mlp.down_proj"], targets, ignore)
    assert not selected_by_config(["lm_head"], targets, ignore)


def test_any_name_of_a_renamed_module_matches():
    """A VLM's linear: vLLM's name and its checkpoint name; targets / ignore use the checkpoint's."""
    names = ["language_model.model.layers.0.mlp.up_proj", "model.language_model.layers.0.mlp.up_proj"]
    targets = ["re:model[.]language_model[.]layers[.][0-9]+[.].*"]
    assert selected_by_config(names, targets, [])
    assert not selected_by_config(names[:1], targets, [])
    assert not selected_by_config(names, targets, ["model.language_model.layers.0.mlp.up_proj"])


def test_pruned_modules_read_from_a_converted_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "packed"
    run([str(tiny_llama), "--out", str(out), "--method", "magnitude", "--pattern", "2:4", "--ignore", "o_proj",
         "--quiet"])
    expected = {f"model.layers.{i}.{s}" for i in range(2)
                for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                          "mlp.up_proj", "mlp.down_proj")}
    assert pruned_modules_in_checkpoint(out) == expected
    assert pruned_modules_in_checkpoint(tmp_path / "no-such-dir") is None
    assert pruned_modules_in_checkpoint("org/some-hub-model") is None


def test_checkpoint_with_half_a_pair_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": block()}))
    save_file({"model.layers.0.mlp.up_proj.weight_bitmask": torch.zeros(4, 1, dtype=torch.uint8)},
              tmp_path / "model.safetensors")
    with pytest.raises(AtvSparseError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_values is missing"):
        pruned_modules_in_checkpoint(tmp_path)


# --- row-parallel splits -----------------------------------------------------------------------

@pytest.mark.parametrize("pattern,in_features,tp", [("2:4", 64, 2), ("4:8", 128, 4), ("2:4", 136, 1),
                                                    ("4:8", 48, 2), ("8:16", 96, 3)])
def test_whole_group_split_narrows_to_the_slices_own_compression(pattern, in_features, tp):
    """What vLLM's row-parallel loader does to both tensors equals compressing the column slice itself."""
    p = parse_pattern(pattern)
    shard = in_features // tp
    check_row_split("layer", in_features, shard, p)  # accepted
    g = torch.Generator().manual_seed(in_features * tp)
    weight = torch.randn(11, in_features, generator=g)
    keep = random_nm_keep(11, in_features, p.n, p.m, g)
    bitmask, values = compress(weight * keep, keep, p.n, p.m)
    for rank in range(tp):
        cols = slice(rank * shard, (rank + 1) * shard)
        want_mask, want_values = compress(weight[:, cols] * keep[:, cols], keep[:, cols], p.n, p.m)
        assert torch.equal(bitmask.narrow(1, rank * (-(-shard // 8)), -(-shard // 8)), want_mask)
        assert torch.equal(values.narrow(1, rank * shard * p.n // p.m, shard * p.n // p.m), want_values)


@pytest.mark.parametrize("pattern,in_features,tp", [("2:4", 136, 2), ("4:8", 96, 8), ("2:4", 60, 3),
                                                    ("8:16", 80, 2)])
def test_split_inside_a_group_or_byte_is_refused(pattern, in_features, tp):
    p = parse_pattern(pattern)
    shard = in_features // tp
    with pytest.raises(AtvSparseError) as e:
        check_row_split("model.layers.0.mlp.down_proj", in_features, shard, p)
    assert f"layer model.layers.0.mlp.down_proj: tensor parallel size {tp} splits its {in_features}" in str(e.value)
    assert f"not a multiple of {row_split_unit(p)}" in str(e.value)


def test_unstructured_and_unsplit_layers_take_any_width():
    check_row_split("l", 67, 67, parse_pattern("2:4"))
    check_row_split("l", 134, 67, parse_pattern("unstructured"))


# --- unstructured shards -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows_per_chunk", [1024, 3])
def test_slice_equals_compressing_the_sub_matrix(shape, rows_per_chunk, monkeypatch):
    monkeypatch.setattr(slicing, "ROWS_PER_CHUNK", rows_per_chunk)
    out_features, in_features = shape
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=g)
    keep = random_keep(out_features, in_features, g)
    bitmask, values = compress(weight, keep)
    for trial in range(4):
        rows, cols = torch.rand(out_features, generator=g) < 0.6, torch.rand(in_features, generator=g) < 0.6
        rows[-1] = cols[-1] = True  # never empty
        rows, cols = rows.nonzero()[:, 0], cols.nonzero()[:, 0]
        if trial == 0:  # a contiguous column block, as a row-parallel rank holds
            rows, cols = torch.arange(out_features), torch.arange(in_features // 2, in_features)
        got_mask, got_values = slicing.slice_compressed(bitmask, values, in_features, rows, cols)
        sub_keep = keep[rows][:, cols]
        assert torch.equal(got_mask, pack_bitmask(sub_keep))
        assert torch.equal(got_values, weight[rows][:, cols][sub_keep])


def test_slice_of_nothing():
    bitmask, values = compress(torch.randn(4, 16), torch.rand(4, 16) < 0.5)
    mask, vals = slicing.slice_compressed(bitmask, values, 16, torch.arange(0), torch.arange(8))
    assert mask.shape == (0, 1) and vals.numel() == 0


def test_plugin_package_does_not_import_vllm():
    code = ("import sys, atv_sparse.vllm_plugin, atv_sparse.vllm_plugin.checks, atv_sparse.vllm_plugin.slicing, "
            "atv_sparse.vllm_plugin.serving; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- serving: state prepared once after loading, nothing built or planned per call --------------

def _serving_layer(out_features: int, in_features: int, pattern: str, bias: bool, seed: int):
    """A stand-in for vLLM's layer: the parameters ``AtvSparseLinearMethod.create_weights`` makes, loaded."""
    from torch import nn

    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    keep = (random_nm_keep(out_features, in_features, p.n, p.m, gen) if p.is_nm
            else random_keep(out_features, in_features, gen))
    bitmask, values = compress(weight, keep, p.n, p.m)
    layer = nn.Module()
    layer.weight_bitmask = nn.Parameter(bitmask, requires_grad=False)
    layer.weight_values = nn.Parameter(values, requires_grad=False)
    layer.bias = nn.Parameter(torch.randn(out_features, generator=gen), requires_grad=False) if bias else None
    return layer, p, weight * keep


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_serving_forward_builds_no_module_and_plans_nothing_per_call(pattern, monkeypatch):
    from atv_sparse.nn.sparse_linear import SparseLinear
    from atv_sparse.ops import autotune, dispatch, runner
    from atv_sparse.vllm_plugin import serving

    counts = {"SparseLinear": 0, "Plan": 0, "plan_for_layer": 0, "default_plan": 0, "heuristic_plan": 0,
              "build_layouts": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(SparseLinear, "__init__", counting("SparseLinear", SparseLinear.__init__))
    monkeypatch.setattr(dispatch.Plan, "__init__", counting("Plan", dispatch.Plan.__init__))
    monkeypatch.setattr(autotune.PlanTable, "plan", counting("plan_for_layer", autotune.PlanTable.plan))
    monkeypatch.setattr(autotune, "default_plan", counting("default_plan", runner.default_plan))
    monkeypatch.setattr(runner, "heuristic_plan", counting("heuristic_plan", runner.heuristic_plan))
    monkeypatch.setattr(serving, "build_layouts", counting("build_layouts", serving.build_layouts))

    layer, p, dense = _serving_layer(24, 64, pattern, bias=True, seed=3)
    serving.prepare_layer(layer, 64, p, "model.layers.0.mlp.down_proj")
    prepared = dict(counts)
    assert prepared["plan_for_layer"] == 1 and prepared["build_layouts"] == 1 and prepared["SparseLinear"] == 0
    # a CPU: the cpu kernels for N:M where they built, else (and for unstructured) the reference backend
    on_cpu = "cpu" if p.is_nm and dispatch.machine_status("cpu", torch.device("cpu")) is None else "reference"
    assert layer.atv_plan.backends() == (on_cpu,) * len(dispatch.BUCKETS)
    for tokens in (1, 3, 17, 65, 600):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
        torch.testing.assert_close(serving.forward(layer, x, layer.bias), x @ dense.T + layer.bias)
    assert counts == prepared, "the forward built a module or planned"


def test_serving_uses_the_table_plan_and_its_layouts(monkeypatch):
    """The plan comes from the measured table (as atv_sparse.load's), and a dense bucket's copy is built once."""
    from atv_sparse.ops import autotune, dispatch
    from atv_sparse.vllm_plugin import serving

    half = len(dispatch.BUCKETS) // 2
    measured = dispatch.Plan(("reference",) * half + ("dense",) * (len(dispatch.BUCKETS) - half),
                             (-1,) * len(dispatch.BUCKETS))
    asked = []
    monkeypatch.setattr(autotune.PlanTable, "plan", lambda self, shape, device, name: asked.append(shape) or measured)
    layer, p, dense = _serving_layer(16, 64, "4:8", bias=False, seed=4)
    serving.prepare_layer(layer, 64, p, "layer")
    assert asked == [autotune.LayerShape(4, 8, torch.float32, 16, 64, gated=False, bias=False)]
    assert layer.atv_plan.backends() == measured.backends
    assert torch.equal(layer.atv_dense_copy, dense) and layer.atv_cslt_weight is None
    assert set(dict(layer.named_buffers(recurse=False))) == {"atv_dense_copy"}  # not persistent: no checkpoint key
    assert "atv_dense_copy" not in layer.state_dict()
    for tokens in (1, dispatch.BUCKETS[-1]):  # a reference bucket, then a dense one
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
        torch.testing.assert_close(serving.forward(layer, x), x @ dense.T)


def test_serving_refuses_a_corrupt_pair_at_load():
    from atv_sparse.vllm_plugin import serving

    layer, p, _ = _serving_layer(8, 64, "2:4", bias=False, seed=5)
    layer.weight_bitmask.data[2, 0] = 0xFF  # 8 kept in one byte: two 2:4 groups keep 4 each
    with pytest.raises(AtvSparseError, match=r"layer\.weight_bitmask: row 2, columns 0\.\.3 keep 4 weights"):
        serving.prepare_layer(layer, 64, p, "layer")
