"""convert end to end on tiny Llama and Qwen2 checkpoints: every method x pattern, both formats."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import atv_sparse
from atv_sparse.convert import main, run
from atv_sparse.formats.bitmask import unpack_bitmask
from atv_sparse.nn import SparseLinear

METHODS = ["magnitude", "wanda", "sparsegpt"]
PATTERNS = ["2:4", "4:8", "unstructured"]
CALIB = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


def convert(ckpt, out, *extra):
    # --device cpu: compared against CPU references; on a GPU machine the driver would default to
    # cuda, whose other summation order can flip near-tie masks
    return run([str(ckpt), "--out", str(out), *CALIB, "--device", "cpu", *extra])


def source_state(ckpt):
    return load_file(ckpt / "model.safetensors")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_ckpt(request, tiny_llama, tiny_qwen2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_convert_packed_equals_dense_export(family_ckpt, method, pattern, calib_txt, tmp_path):
    args = ["--method", method, "--pattern", pattern, "--calib", str(calib_txt)]
    packed = convert(family_ckpt, tmp_path / "packed", *args)
    convert(family_ckpt, tmp_path / "dense", *args, "--format", "dense")
    assert packed["modules_pruned"] == 14  # 7 linears x 2 blocks

    sparse_model = atv_sparse.load(tmp_path / "packed")
    dense_cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in dense_cfg
    dense_model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sparse_model(ids).logits, dense_model(ids).logits)

    src = source_state(family_ckpt)
    sparse_modules = {n: m for n, m in sparse_model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse_modules) == 14
    for name, mod in sparse_modules.items():
        keep = unpack_bitmask(mod.weight_bitmask, mod.in_features)
        dense_w = dense_model.get_submodule(name).weight
        assert torch.equal(mod.dense_weight(), dense_w)
        original = src[name + ".weight"]
        out_f, in_f = original.shape
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert (keep.reshape(out_f, -1, m).sum(-1) == n).all()
        elif method == "wanda":
            assert (keep.logical_not().sum(1) == int(in_f * 0.5)).all()
        elif method == "magnitude":  # one threshold per matrix: int(numel * s) + 1 plus ties
            assert keep.logical_not().sum() >= int(original.numel() * 0.5) + 1
        else:  # SparseGPT: int(numel * s) + 1 per block of 128 columns
            assert keep.logical_not().sum() >= out_f * int(in_f * 0.5) + 1
        if method != "sparsegpt":  # survivors bit-unchanged
            assert torch.equal(dense_w[keep], original[keep])
    # Everything that is not a pruned weight is copied unchanged (embeddings, lm_head, norms, biases).
    dense_state = load_file(tmp_path / "dense" / "model.safetensors")
    for key, value in src.items():
        if key.removesuffix(".weight") not in sparse_modules:
            assert torch.equal(dense_state[key], value), key


def test_outputs_beside_weights(tiny_llama, calib_txt, tmp_path):
    convert(tiny_llama, tmp_path / "out", "--method", "wanda", "--calib", str(calib_txt))
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "sparsity.json", "prune_report.json"} <= names
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "atv_sparse" and qc["pattern"] == "2:4" and qc["method"] == "wanda"
    assert qc["format_version"] == 1 and qc["method_settings"]["nsamples"] == 4
    sparsity = json.loads((out / "sparsity.json").read_text())["modules"]
    assert len(sparsity) == 14 and all(e["pattern_check"] == "ok" and e["sparsity"] == 0.5 for e in sparsity.values())
    report = json.loads((out / "prune_report.json").read_text())
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    assert report["blocks"][0]["tokens"] == 4 * 32 and "write" in report["timings_s"]
    keys = load_file(out / "model.safetensors").keys()
    assert "model.layers.0.mlp.down_proj.weight_bitmask" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_from_pretrained_after_import_matches_load(tiny_qwen2, calib_txt, tmp_path):
    convert(tiny_qwen2, tmp_path / "out", "--method", "sparsegpt", "--pattern", "4:8", "--calib", str(calib_txt))
    via_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    via_load = atv_sparse.load(tmp_path / "out")
    assert sum(isinstance(m, SparseLinear) for m in via_hf.modules()) == 14
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        assert torch.equal(via_hf(ids).logits, via_load(ids).logits)
    bf16 = atv_sparse.load(tmp_path / "out", dtype=torch.bfloat16)
    sparse = next(m for m in bf16.modules() if isinstance(m, SparseLinear))
    assert sparse.weight_values.dtype == torch.bfloat16 and sparse.weight_bitmask.dtype == torch.uint8
    assert bf16.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 19)


def test_sharded_output_loads(tiny_llama, calib_txt, tmp_path):
    convert(tiny_llama, tmp_path / "out", "--method", "magnitude", "--pattern", "unstructured",
            "--sparsity", "0.6", "--max-shard-size", "40KB")
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    model = atv_sparse.load(out)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and all(m.weight_values.dim() == 1 for m in sparse)


def test_dry_run_writes_nothing(tiny_llama, tmp_path, capsys):
    before = sorted(p.name for p in tiny_llama.iterdir())
    summary = run([str(tiny_llama), "--pattern", "4:8", "--out", str(tmp_path / "out"), "--dry-run"])
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "estimated output" in printed and "peak memory" in printed
    assert len(summary["targets"]) == 14 and summary["output_bytes"] < summary["input_bytes"]
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in tiny_llama.iterdir()) == before


def test_targets_and_ignore(tiny_llama, tmp_path):
    summary = run([str(tiny_llama), "--dry-run", "--ignore", "re:.*mlp.*", "q_proj"])
    assert sorted({t.rsplit(".", 1)[1] for t in summary["targets"]}) == ["k_proj", "o_proj", "v_proj"]
    summary = run([str(tiny_llama), "--dry-run", "--targets", "model.layers.1.mlp.up_proj"])
    assert summary["targets"] == ["model.layers.1.mlp.up_proj"]
    assert run([str(tiny_llama), "--dry-run", "--targets", "lm_head"])["targets"] == ["lm_head"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_lm_head_targeted_explicitly(tiny_llama, calib_txt, tmp_path, method):
    args = ["--method", method, "--calib", str(calib_txt), "--targets", "re:.*mlp.*", "lm_head"]
    summary = convert(tiny_llama, tmp_path / "packed", *args)
    convert(tiny_llama, tmp_path / "dense", *args, "--format", "dense")
    assert summary["modules_pruned"] == 7
    sparse_model = atv_sparse.load(tmp_path / "packed")
    assert isinstance(sparse_model.lm_head, SparseLinear) and isinstance(sparse_model.model.layers[0].mlp.up_proj,
                                                                           SparseLinear)
    keep = unpack_bitmask(sparse_model.lm_head.weight_bitmask, 64)
    assert (keep.reshape(-1, 16, 4).sum(-1) == 2).all()
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        assert torch.equal(sparse_model(ids).logits,
                           AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(ids).logits)


def test_tied_lm_head_is_refused(tmp_path, capsys):
    from conftest import write_tiny_model

    ckpt = write_tiny_model(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    capsys.readouterr()
    assert main([str(ckpt), "--dry-run", "--targets", "lm_head"]) == 2
    assert "tied to the input embeddings" in capsys.readouterr().err


def test_embedded_default_runs(tmp_path, capsys):
    """No CKPT: the bundled tiny VLM, its calibration split, and dense vs pruned accuracy."""
    summary = run(["--method", "atv", "--out", str(tmp_path / "demo"), "--nsamples", "2", "--eval-per-task", "2",
                   "--quiet"])
    assert summary["source"] == "bundled tiny VLM" and summary["architecture"] == "LlavaForConditionalGeneration"
    assert summary["modules_pruned"] == 42 and summary["bytes_after"] < summary["bytes_before"]
    out = capsys.readouterr().out
    assert "sparsity" in out and "retention" in out and "compose_count" in out
    acc = summary["accuracy"]
    assert acc["per_task"] == 2 and set(acc["tasks"]) >= {"attribute", "facts"} and 0 <= acc["pruned"] <= 1
    model = atv_sparse.load(tmp_path / "demo")
    assert isinstance(model.get_decoder().layers[0].mlp.up_proj, SparseLinear)
    report = json.loads((tmp_path / "demo" / "prune_report.json").read_text())
    assert report["settings"]["calibration"] == "<synthetic tasks, calibration split>"
    assert all(b["visual_tokens_used"] < b["text_tokens_used"] for b in report["blocks"])  # ATV: mostly text


def test_eval_per_task_needs_a_vision_language_model(tiny_llama, tmp_path, capsys):
    assert main([str(tiny_llama), "--out", str(tmp_path / "o"), "--eval-per-task", "3"]) == 2
    assert "text-only model" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_checkpoint(dtype, calib_txt, tmp_path):
    from conftest import write_tiny_model

    ckpt = write_tiny_model(tmp_path / "half", "llama", dtype=dtype)
    convert(ckpt, tmp_path / "packed", "--method", "wanda", "--calib", str(calib_txt))
    convert(ckpt, tmp_path / "dense", "--method", "wanda", "--calib", str(calib_txt), "--format", "dense")
    values = load_file(tmp_path / "packed" / "model.safetensors")["model.layers.0.mlp.up_proj.weight_values"]
    assert values.dtype == dtype and values.shape == (128, 32)
    sparse_model, dense_model = atv_sparse.load(tmp_path / "packed"), AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense_model.dtype == dtype
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        assert torch.equal(sparse_model(ids).logits, dense_model(ids).logits)
