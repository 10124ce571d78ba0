"""Importing and loading compressed-tensors checkpoints written by compressed-tensors 0.14.0.1 itself.

The fixtures (tests/fixtures/compressed_tensors, made by its make_fixtures.py: tiny Llama / Qwen2 /
LLaVA models pruned by atv_sparse, compressed by compressed-tensors' own ModelCompressor) are
checked against the dense models they were made from and against what compressed-tensors itself
reads from them (``unpack_bitmasks``, its decompression and dequantization).
ATV_SPARSE_CT_FIXTURES points the tests at freshly generated ones (.ci/compressed_tensors.sh).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import atv_sparse
from atv_sparse import import_ct
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats import compressed_tensors as ctf
from atv_sparse.formats.bitmask import pack_bitmask, unpack_bitmask
from atv_sparse.nn.sparse_linear import SparseLinear

FIXTURES = Path(os.environ.get("ATV_SPARSE_CT_FIXTURES", Path(__file__).parent / "fixtures" / "compressed_tensors"))
# case -> the dense model it was made from
UNQUANTIZED = {"llama_24": "llama", "qwen2_24": "qwen2", "llava_24": "llava", "llama_bitmask_24": "llama",
               "llama_unstructured": "llama_unstructured", "llama_dense_24": "llama"}
QUANTIZED = ("llama_fp8_24", "llama_int8_24")
AUX = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def model_class(path):
    return getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])


def dense_model(name):
    return model_class(FIXTURES / "dense" / name).from_pretrained(FIXTURES / "dense" / name).eval()


def run_import(src, out, *extra):
    return import_ct.main([str(src), "--out", str(out), *extra])


def inputs(path, seed=0):
    """Text ids, and for LLaVA an image too (its image tokens and random pixels)."""
    config = transformers.AutoConfig.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (1, 12), generator=g)
    if not hasattr(config, "vision_config"):
        return {"input_ids": ids}
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    image = torch.full((1, (size // patch) ** 2), config.image_token_index)
    return {"input_ids": torch.cat([ids[:, :2], image, ids[:, 2:]], 1),
            "pixel_values": torch.randn(1, 3, size, size, generator=g)}


def sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """case -> the directory import_ct wrote."""
    base = tmp_path_factory.mktemp("imported")
    out = {}
    for case in (*UNQUANTIZED, *QUANTIZED):
        assert run_import(FIXTURES / "ct" / case, base / case) == 0
        out[case] = base / case
    return out


@pytest.mark.parametrize("case", UNQUANTIZED)
def test_import_and_direct_load_equal_the_dense_model(case, imported):
    dense = dense_model(UNQUANTIZED[case])
    x = inputs(FIXTURES / "ct" / case)
    with torch.no_grad():
        want = dense(**x).logits
        for path in (imported[case], FIXTURES / "ct" / case):  # imported, and the original loaded directly
            model = atv_sparse.load(path, progress=False)
            layers = sparse_layers(model)
            assert len(layers) == 14  # every decoder linear of both blocks, the vision tower stays dense
            torch.testing.assert_close(model(**x).logits, want)  # fp32 rounding
            for name, layer in layers.items():
                torch.testing.assert_close(layer.dense_weight(), dense.get_submodule(name).weight, rtol=0, atol=0)
        greedy = dense.generate(**x, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(**x, max_new_tokens=6, do_sample=False), greedy)


@pytest.mark.parametrize("case", ["llama_24", "llava_24", "llama_unstructured"])
def test_imported_loads_with_from_pretrained(case, imported):
    dense = dense_model(UNQUANTIZED[case])
    model = model_class(imported[case]).from_pretrained(imported[case]).eval()
    assert len(sparse_layers(model)) == 14
    x = inputs(imported[case], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, dense(**x).logits)


@pytest.mark.parametrize("case", UNQUANTIZED)
def test_output_directory(case, imported):
    out = imported[case]
    config = json.loads((out / "config.json").read_text())
    block = config["quantization_config"]
    assert block["quant_method"] == "atv_sparse"
    assert block["pattern"] == ("unstructured" if case == "llama_unstructured" else "2:4")
    assert block["method_settings"]["source_format"] == json.loads(
        (FIXTURES / "ct" / case / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"]
    if "text_config" in config:
        assert config["text_config"]["quantization_config"] == block
    for name in AUX + (("processor_config.json", "chat_template.jinja") if "llava" in case else ()):
        assert (out / name).read_bytes() == (FIXTURES / "ct" / case / name).read_bytes()
    report = json.loads((out / "import_report.json").read_text())
    assert report["layers"] == 14
    if case == "llama_unstructured":
        assert any("dense" in line for line in report["notes"])


@pytest.mark.parametrize("case", [c for c in UNQUANTIZED if c != "llama_dense_24"] + list(QUANTIZED))
def test_bitmask_orientation_and_bit_order_match_compressed_tensors(case, imported):
    """Our unpacking of the imported bitmask equals compressed-tensors' ``unpack_bitmasks`` of its own."""
    ref = load_file(FIXTURES / "reference" / f"{case}.safetensors")
    ours = load_file(imported[case] / "model.safetensors")
    ct = load_file(FIXTURES / "ct" / case / "model.safetensors")
    names = [k[: -len(".keep")] for k in ref if k.endswith(".keep")]
    assert len(names) == 14
    for ct_name in names:
        name = ct_name.replace("language_model.model.", "model.language_model.")  # transformers 5's names
        keep_ct = ref[f"{ct_name}.keep"].bool()
        keep = unpack_bitmask(ours[f"{name}.weight_bitmask"], keep_ct.shape[1])
        if case == "llama_bitmask_24":  # non-zeros only: groups with a zero weight get it back as a kept zero
            assert not (keep_ct & ~keep).any()
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert torch.equal(keep, keep_ct)
            assert torch.equal(ours[f"{name}.weight_bitmask"], ct[f"{ct_name}.bitmask"])  # the same bytes
        assert torch.equal(pack_bitmask(keep_ct), ct[f"{ct_name}.bitmask"])  # our packing of its mask: its bytes


@pytest.mark.parametrize("case", QUANTIZED)
def test_quantized_values_dequantized_as_compressed_tensors_does(case, imported, capsys):
    ref = load_file(FIXTURES / "reference" / f"{case}.safetensors")
    for path in (imported[case], FIXTURES / "ct" / case):
        model = atv_sparse.load(path, progress=False)
        layers = sparse_layers(model)
        assert len(layers) == 14
        for name, layer in layers.items():
            assert layer.weight_values.dtype == torch.float32
            assert torch.equal(layer.dense_weight(), ref[f"{name}.weight"]), name
    report = json.loads((imported[case] / "import_report.json").read_text())
    assert "dequantized" in " ".join(report["notes"]) and report["dequantized"]
    assert report["bytes_after"] > report["bytes_before"]  # 1-byte values became 4-byte ones
    assert not any(k.endswith("weight_scale") for k in load_file(imported[case] / "model.safetensors"))


# --- bad input: one named error, exit code 2, nothing written --------------------------------------

def corrupt(tmp_path, case, edit_tensors=None, edit_config=None):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "ct" / case, src)
    if edit_tensors is not None:
        tensors = load_file(src / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((src / "config.json").read_text())
        edit_config(config)
        (src / "config.json").write_text(json.dumps(config))
    return src


def assert_refused(tmp_path, src, *names, capsys):
    out = tmp_path / "out"
    assert run_import(src, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for name in names:
        assert name in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial directory either
    with pytest.raises(AtvSparseError) as info:
        atv_sparse.load(src, progress=False)
    for name in names:
        assert name in str(info.value)


Q = "model.layers.0.self_attn.q_proj"


def set_extra_bit(t, key):
    mask = t[key].clone()
    row = mask[0]
    zero_bit = next(b for b in range(8) if not (int(row[0]) >> b) & 1)
    mask[0, 0] = int(row[0]) | (1 << zero_bit)
    t[key] = mask


def test_popcount_disagreeing_with_compressed(tmp_path, capsys):
    src = corrupt(tmp_path, "llama_unstructured", lambda t: set_extra_bit(t, f"{Q}.bitmask"))
    assert_refused(tmp_path, src, f"{Q}.bitmask", f"{Q}.compressed", capsys=capsys)


def test_popcount_disagreeing_with_compressed_2_4(tmp_path, capsys):
    src = corrupt(tmp_path, "llama_24", lambda t: set_extra_bit(t, f"{Q}.bitmask"))
    assert_refused(tmp_path, src, f"{Q}.bitmask", capsys=capsys)


def test_wrong_shape(tmp_path, capsys):
    k = "model.layers.0.mlp.down_proj"  # (32, 64): swapped, the shape differs

    def swap(t):
        t[f"{k}.shape"] = t[f"{k}.shape"].flip(0).contiguous()
    assert_refused(tmp_path, corrupt(tmp_path, "llama_24", swap), f"{k}.shape", capsys=capsys)


def test_missing_row_offsets(tmp_path, capsys):
    src = corrupt(tmp_path, "llama_unstructured", lambda t: t.pop(f"{Q}.row_offsets"))
    assert_refused(tmp_path, src, f"{Q}.row_offsets", capsys=capsys)


def test_wrong_row_offsets(tmp_path, capsys):
    def shift(t):
        t[f"{Q}.row_offsets"] = t[f"{Q}.row_offsets"] + 1
    assert_refused(tmp_path, corrupt(tmp_path, "llama_unstructured", shift), f"{Q}.row_offsets", capsys=capsys)


def test_bitmask_that_is_not_2_4(tmp_path, capsys):
    """The popcount stays right, but one group of 4 keeps 3 and the next keeps 1."""
    def move_bit(t):
        keep = unpack_bitmask(t[f"{Q}.bitmask"], 32)
        on, off = keep[0, 4:8].nonzero()[0, 0] + 4, (~keep[0, :4]).nonzero()[0, 0]
        keep[0, on], keep[0, off] = False, True
        t[f"{Q}.bitmask"] = pack_bitmask(keep)
    assert_refused(tmp_path, corrupt(tmp_path, "llama_24", move_bit), f"{Q}.bitmask", "2:4", capsys=capsys)


def test_dense_weights_that_are_not_2_4(tmp_path, capsys):
    def fill(t):
        w = t[f"{Q}.weight"].clone()
        w[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
        t[f"{Q}.weight"] = w
    src = corrupt(tmp_path, "llama_dense_24", fill)
    assert_refused(tmp_path, src, f"{Q}.weight", "row 3, columns 8..11", capsys=capsys)


@pytest.mark.parametrize("structure", ["unstructured", "4:8"])
def test_declared_structure_that_is_not_2_4(tmp_path, structure, capsys):
    def declare(config):
        config["quantization_config"]["sparsity_config"]["sparsity_structure"] = structure
    assert_refused(tmp_path, corrupt(tmp_path, "llama_24", edit_config=declare), "sparsity_structure", capsys=capsys)


@pytest.mark.parametrize("scheme", ["pack-quantized", "marlin-24", "nvfp4-pack-quantized"])
def test_unsupported_quantization_scheme(tmp_path, scheme, capsys):
    def declare(config):
        config["quantization_config"]["config_groups"]["group_0"]["format"] = scheme
    src = corrupt(tmp_path, "llama_fp8_24", edit_config=declare)
    assert_refused(tmp_path, src, scheme, "config_groups.group_0", capsys=capsys)


def test_not_a_compressed_tensors_checkpoint(tmp_path, capsys):
    assert run_import(FIXTURES / "dense" / "llama", tmp_path / "out") == 2
    assert "compressed-tensors" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_existing_out_is_not_replaced(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert run_import(FIXTURES / "ct" / "llama_24", tmp_path / "out") == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    assert run_import(FIXTURES / "ct" / "llama_24", tmp_path / "out", "--overwrite") == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_shards_follow_max_shard_size(tmp_path):
    assert run_import(FIXTURES / "ct" / "qwen2_24", tmp_path / "out", "--max-shard-size", "40KB") == 0
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    model = atv_sparse.load(tmp_path / "out", progress=False)
    x = inputs(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, dense_model("qwen2")(**x).logits)


def test_memory_benchmark_script_on_a_tiny_shape(tmp_path):
    """benchmarks/import_ct_memory.py end to end on its smoke shape: its synthetic checkpoint imports."""
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "import_ct_memory.py"
    subprocess.run([sys.executable, str(script), "--work", str(tmp_path / "w"), "--shape", "smoke", "--results",
                    str(tmp_path / "r")], check=True, capture_output=True)
    result = json.loads((tmp_path / "r" / "import_ct_memory.json").read_text())
    assert result["layers"] == 14 and result["output_validated"] and result["peak_rss_bytes"] > 0


# --- the pure parts on fresh random data, against literal loops -----------------------------------

def fill_reference(keep):
    keep = keep.clone()
    for r in range(keep.shape[0]):
        for g in range(0, keep.shape[1], 4):
            for c in range(g, g + 4):
                if int(keep[r, g:g + 4].sum()) >= 2:
                    break
                if not keep[r, c]:
                    keep[r, c] = True
    return keep


def test_fill_2_4_against_a_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(13, 44, generator=g)
    keep = scores > 0.6
    keep = keep & (torch.cumsum(keep.reshape(13, 11, 4), -1) <= 2).reshape(13, 44)  # at most 2 per group
    assert torch.equal(ctf._fill_2_4(keep, "w", strict=False), fill_reference(keep))
    with pytest.raises(AtvSparseError, match="w: row"):
        ctf._fill_2_4(keep, "w", strict=True)


@pytest.mark.parametrize("scale_shape,zero_point", [((1,), False), ((12, 1), False), ((12, 4), True), ((3, 2), False)],
                         ids=str)
def test_dequantize_against_a_loop(scale_shape, zero_point):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (12, 40), generator=g).to(torch.int8)
    scale = torch.rand(scale_shape, generator=g) + 0.1
    zp = torch.randint(-3, 4, scale_shape, generator=g).to(torch.int8) if zero_point else None
    layer = ctf.CtLayer("w", "dense", 12, 40, {}, 0)
    got = ctf._dequantize(q, scale, zp, layer)
    s2 = scale.reshape(1, 1) if scale.numel() == 1 else scale
    want = torch.empty(12, 40)
    for r in range(12):
        for c in range(40):
            i, j = r // (12 // s2.shape[0]), c // (40 // s2.shape[1])
            z = float(zp.reshape(s2.shape)[i, j]) if zp is not None else 0.0
            want[r, c] = (float(q[r, c]) - z) * float(s2[i, j])
    torch.testing.assert_close(got, want)


def test_match_targets_as_compressed_tensors():
    modules = {"model.layers.0.mlp.up_proj": ["Linear", "Module"], "lm_head": ["Linear", "Module"],
               "model.vision_tower.fc1": ["Linear", "Module"], "model.norm": ["LlamaRMSNorm", "Module"]}
    assert ctf.match_targets(modules, ["Linear"], ["lm_head", "re:.*vision_tower.*"]) == {"model.layers.0.mlp.up_proj"}
    assert ctf.match_targets(modules, ["re:model.layers"], []) == {"model.layers.0.mlp.up_proj"}
    assert ctf.match_targets(modules, ["lm_head"], None) == {"lm_head"}
