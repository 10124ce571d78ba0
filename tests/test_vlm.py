"""Vision-language models end to end: every family x method x pattern, ATV's limiting cases, M-RoPE
positions as the model computes them, and the multimodal bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

import atv_sparse
from atv_sparse.calib.multimodal import build_sample
from atv_sparse.tinybench.tasks import calibration_conversations
from atv_sparse.convert import main, run
from atv_sparse.models import adapter_for, read_config
from atv_sparse.models.processors import load_processor
from atv_sparse.nn import SparseLinear
from atv_sparse.prune.driver import prune_blocks
from atv_sparse.prune.selectors import MixedTokens
from atv_sparse.tinybench.families import ARCHITECTURES, FAMILIES, write_tiny_vlm

QUICK = ["--nsamples", "3", "--quiet"]


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("vlm")
    return {fam: write_tiny_vlm(base / fam, fam) for fam in FAMILIES}


def image_sample(ckpt):
    processor = load_processor(ckpt)
    token_id = AutoConfig.from_pretrained(ckpt).image_token_id
    return build_sample(processor, calibration_conversations(1, seed=7, size=96)[0], token_id)


def dense_state(out):
    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
@pytest.mark.parametrize("method", ["atv", "wanda", "sparsegpt", "tamp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_method_pattern(vlm_dirs, family, method, pattern, tmp_path):
    ckpt = vlm_dirs[family]
    args = [str(ckpt), "--method", method, "--pattern", pattern, *QUICK]
    summary = run([*args, "--out", str(tmp_path / "packed")])
    run([*args, "--out", str(tmp_path / "dense"), "--format", "dense"])
    assert summary["modules_pruned"] == 14 and summary["architecture"] == ARCHITECTURES[family]
    sparse, dense = atv_sparse.load(tmp_path / "packed"), atv_sparse.load(tmp_path / "dense")
    sample = image_sample(ckpt)
    with torch.no_grad():
        assert torch.equal(sparse(**sample).logits, dense(**sample).logits)
    layers = sparse.get_decoder().layers
    assert all(isinstance(getattr(layers[0].mlp, p), SparseLinear) for p in ("gate_proj", "up_proj", "down_proj"))
    # The vision tower, projector, embeddings and lm_head stay dense and unchanged.
    adapter = adapter_for(read_config(ckpt), ckpt)
    src, out = adapter.load(ckpt).state_dict(), adapter.load(tmp_path / "dense").state_dict()
    untouched = [k for k in src if not k.startswith(adapter.layers_prefix(sparse) + ".") or not k.endswith("proj.weight")]
    assert any("vision" in k or "visual" in k for k in untouched) and "lm_head.weight" in untouched
    assert all(torch.equal(src[k], out[k]) for k in untouched)
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert cfg["text_config"]["quantization_config"]["pattern"] == summary["pattern"]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_generate_with_image_after_load(vlm_dirs, family, tmp_path):
    run([str(vlm_dirs[family]), "--method", "atv", "--pattern", "4:8", "--out", str(tmp_path / "o"), *QUICK])
    model = atv_sparse.load(tmp_path / "o")
    sample = image_sample(vlm_dirs[family])
    out = model.generate(**sample, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == sample["input_ids"].shape[1] + 4


@pytest.mark.parametrize("family,method", [("llava", "wanda"), ("qwen2_5_vl", "wanda"), ("llava_next", "sparsegpt")])
def test_alpha_zero_is_text_only_calibration(vlm_dirs, family, method, tmp_path):
    ckpt = vlm_dirs[family]
    run([str(ckpt), "--method", method, "--calib-tokens", "atv", "--alpha", "0", "--out", str(tmp_path / "atv"),
         "--format", "dense", *QUICK])
    run([str(ckpt), "--method", method, "--calib-tokens", "text", "--out", str(tmp_path / "text"),
         "--format", "dense", *QUICK])
    run([str(ckpt), "--method", method, "--out", str(tmp_path / "mixed"), "--format", "dense", *QUICK])
    atv, text, mixed = (dense_state(tmp_path / n) for n in ("atv", "text", "mixed"))
    assert all(torch.equal(atv[k], text[k]) for k in atv)
    assert not all(torch.equal(atv[k], mixed[k]) for k in atv)  # the visual tokens do matter here


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_full_budget_is_mixed_calibration(vlm_dirs, family, tmp_path):
    ckpt = vlm_dirs[family]
    run([str(ckpt), "--method", "atv", "--budget-rule", "paper", "--alpha", "1e9", "--out", str(tmp_path / "atv"),
         "--format", "dense", *QUICK])
    run([str(ckpt), "--method", "wanda", "--calib-tokens", "mixed", "--out", str(tmp_path / "mixed"),
         "--format", "dense", *QUICK])
    report = json.loads((tmp_path / "atv" / "prune_report.json").read_text())
    assert all(b["visual_tokens"] > 0 and b["k_min"] > 0 for b in report["blocks"])
    mixed_report = json.loads((tmp_path / "mixed" / "prune_report.json").read_text())
    for ours, theirs in zip(report["blocks"], mixed_report["blocks"], strict=True):
        assert ours["visual_tokens_used"] == theirs["visual_tokens_used"] > 0
        assert ours["text_tokens_used"] == theirs["text_tokens_used"] == ours["text_tokens"]
    atv, mixed = dense_state(tmp_path / "atv"), dense_state(tmp_path / "mixed")
    assert all(torch.equal(atv[k], mixed[k]) for k in atv)


class _Spy(MixedTokens):
    def __init__(self):
        super().__init__()
        self.seen = []

    def begin_block(self, block_index, runner, num_samples):
        self.seen.append([runner.kwargs[j]["position_embeddings"] for j in range(num_samples)])
        return {}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_blocks_get_the_models_own_mrope_positions(vlm_dirs, family):
    ckpt = vlm_dirs[family]
    adapter = adapter_for(read_config(ckpt), ckpt)
    samples = [image_sample(ckpt), build_sample(load_processor(ckpt), calibration_conversations(2, seed=1, size=96)[1],
                                                AutoConfig.from_pretrained(ckpt).image_token_id)]
    # What the unmodified model gives each of its layers.
    model = adapter.load(ckpt)
    expected = [[] for _ in samples]
    layers = adapter.decoder_layers(model)
    for j, sample in enumerate(samples):
        hooks = [layer.register_forward_pre_hook(
            lambda mod, args, kwargs, j=j: expected[j].append(kwargs["position_embeddings"]), with_kwargs=True)
            for layer in layers]
        with torch.no_grad():
            model(**sample, use_cache=False)
        for h in hooks:
            h.remove()
    spy = _Spy()
    targets = {f"{adapter.layers_prefix(model)}.{b}.mlp.up_proj": layers[b].mlp.up_proj for b in range(len(layers))}
    prune_blocks(model, layers, adapter.layers_prefix(model), targets, "wanda", atv_sparse.parse_pattern("2:4"),
                 samples, torch.device("cpu"), selector=spy, progress=False)
    assert len(spy.seen) == len(layers)
    for b in range(len(layers)):
        for j in range(len(samples)):
            cos, sin = spy.seen[b][j]
            cos_ref, sin_ref = expected[j][b]
            assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    # Real M-RoPE: positions after the image are not 0..T-1 (a 1-D rebuild would give those).
    ids, thw = samples[0]["input_ids"], samples[0]["image_grid_thw"]
    pos, _ = model.model.get_rope_index(ids, image_grid_thw=thw, mm_token_type_ids=samples[0]["mm_token_type_ids"])
    assert not torch.equal(pos[0, 0], torch.arange(ids.shape[1]))


def write_calib(tmp_path, records, name="data.json"):
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    (tmp_path / name).write_text(json.dumps(records))
    return tmp_path / name


def test_sharegpt_file_with_a_text_only_sample(vlm_dirs, tmp_path):
    calib = write_calib(tmp_path, [
        {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                               {"from": "gpt", "value": "It is red."}]},
        {"conversations": [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
    ])
    run([str(vlm_dirs["llava"]), "--method", "atv", "--calib", str(calib), "--out", str(tmp_path / "o"), *QUICK])
    report = json.loads((tmp_path / "o" / "prune_report.json").read_text())
    assert report["blocks"][0]["samples_without_image"] == 1 and report["blocks"][0]["k"][1] == 0


def snapshot(root):
    return sorted(str(p) for p in root.rglob("*"))


@pytest.mark.parametrize("records,needle", [
    ([{"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}], "missing.png"),
    ([{"image": "red.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nHi"}]}], "sample 0"),
    ([{"conversations": [{"from": "human", "value": "<image>\nHi"}]}], "sample 0"),
], ids=["missing-image", "two-placeholders", "placeholder-without-image"])
def test_multimodal_bad_input(vlm_dirs, tmp_path, capsys, records, needle):
    calib = write_calib(tmp_path, records)
    before = snapshot(tmp_path)
    assert main([str(vlm_dirs["qwen2_vl"]), "--method", "atv", "--calib", str(calib), "--out", str(tmp_path / "o"),
                 *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert snapshot(tmp_path) == before


def test_negative_alpha_and_missing_image_token(vlm_dirs, tmp_path, capsys):
    import shutil

    assert main([str(vlm_dirs["llava"]), "--method", "atv", "--alpha", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "--alpha" in capsys.readouterr().err
    ckpt = tmp_path / "noimg"
    shutil.copytree(vlm_dirs["llava"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("image_token_id", None)
    cfg.pop("image_token_index", None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    # transformers may fill in a default id (LLaVA: 32000), which is not this tokenizer's image token.
    assert main([str(ckpt), "--method", "atv", "--out", str(tmp_path / "o"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "image_token_id" in err and "config.json" in err
    assert not (tmp_path / "o").exists()


def test_plot(vlm_dirs, tmp_path):
    run([str(vlm_dirs["llava_next"]), "--method", "atv", "--plot", "--out", str(tmp_path / "o"), *QUICK])
    png = tmp_path / "o" / "prune_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(vlm_dirs["llava_next"]), "--method", "wanda", "--plot", "--out", str(tmp_path / "o2"),
                 *QUICK]) == 2


def test_tamp_das_layerwise_sparsity(vlm_dirs, tmp_path):
    ckpt = vlm_dirs["llava_onevision"]
    run([str(ckpt), "--method", "tamp", "--pattern", "unstructured", "--sparsity", "0.6", "--das",
         "--out", str(tmp_path / "o"), *QUICK])
    modules = json.loads((tmp_path / "o" / "sparsity.json").read_text())["modules"]
    got = {n: e["sparsity"] for n, e in modules.items()}
    sizes = {n: e["shape"][0] * e["shape"][1] for n, e in modules.items()}
    assert len(set(round(v, 3) for v in got.values())) > 1  # layer-wise, not uniform
    assert all(v <= 0.7 + 1e-9 for v in got.values())  # s_max = s + 0.1
    mean = sum(got[n] * sizes[n] for n in got) / sum(sizes.values())
    assert abs(mean - 0.6) < 0.02  # per-row truncation moves it slightly
    report = json.loads((tmp_path / "o" / "prune_report.json").read_text())
    assert report["settings"]["das"] and report["blocks"][0]["tamp_selected"]
    assert main([str(ckpt), "--method", "tamp", "--pattern", "2:4", "--das", "--out", str(tmp_path / "x")]) == 2


def test_tamp_needs_images(tiny_llama, tmp_path, capsys):
    assert main([str(tiny_llama), "--method", "tamp", "--out", str(tmp_path / "o"), *QUICK]) == 2
    assert "vision-language" in capsys.readouterr().err


@pytest.mark.parametrize("family,vision", [("llava", "re:model[.](vision_tower|multi_modal_projector)[.].*"),
                                           ("qwen2_vl", "re:model[.]visual[.].*")])
def test_vision_tower_targeted_explicitly(vlm_dirs, family, vision, tmp_path):
    ckpt = vlm_dirs[family]
    args = [str(ckpt), "--method", "wanda", "--targets", vision, "re:model[.]language_model[.]layers[.]0[.]mlp[.].*",
            *QUICK]
    summary = run([*args, "--out", str(tmp_path / "packed")])
    run([*args, "--out", str(tmp_path / "dense"), "--format", "dense"])
    sparse, dense = atv_sparse.load(tmp_path / "packed"), atv_sparse.load(tmp_path / "dense")
    names = [n for n, m in sparse.named_modules() if isinstance(m, SparseLinear)]
    assert len(names) == summary["modules_pruned"] and sum(".language_model.layers.0.mlp." in n for n in names) == 3
    assert any("vision" in n or "visual" in n for n in names)
    sample = image_sample(ckpt)
    with torch.no_grad():
        assert torch.equal(sparse(**sample).logits, dense(**sample).logits)
