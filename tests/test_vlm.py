"""Vision-language models end to end: every family x method x pattern, ATV's limiting cases, M-RoPE
positions as the model computes them, and the multimodal bad inputs.

The pruning behaviour is tested through the library (``PruneRecipe``, ``load_calibration``,
``prune_model``, ``write_checkpoint``); a few tests at the end run the CLI for its argument handling."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

import atv_sparse
from atv_sparse import __version__
from atv_sparse.calib import is_text_file, load_calibration
from atv_sparse.calib.multimodal import build_sample
from atv_sparse.tinybench.tasks import calibration_conversations
from atv_sparse.convert import main, run
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import unpack_bitmask
from atv_sparse.formats.checkpoint import write_checkpoint
from atv_sparse.formats.spec import build_quantization_config
from atv_sparse.models import adapter_for, read_config
from atv_sparse.models.processors import load_processor
from atv_sparse.nn import SparseLinear
from atv_sparse.patterns import parse_pattern
from atv_sparse.convert.preflight import check_processor
from atv_sparse.prune.driver import prune_blocks
from atv_sparse.prune.wanda import Wanda
from atv_sparse.prune.pipeline import prune_model
from atv_sparse.prune.recipe import PruneRecipe
from atv_sparse.prune.selectors import MixedTokens
from atv_sparse.prune.targets import resolve_targets
from atv_sparse.convert.reports import method_settings
from atv_sparse.tinybench.families import ARCHITECTURES, FAMILIES, write_tiny_vlm

QUICK = ["--nsamples", "3", "--quiet"]
NSAMPLES, SEQLEN = 3, 2048  # the CLI's QUICK: 3 samples, the default window for text calibration
CPU = torch.device("cpu")


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


def prune(ckpt, method, pattern="2:4", *, calib=None, targets=None, **settings):
    """The checkpoint's model pruned in memory as ``convert`` would: (model, adapter, recipe, result)."""
    adapter = adapter_for(read_config(ckpt), ckpt)
    model = adapter.load(ckpt)
    recipe = PruneRecipe.build(method, pattern if not isinstance(pattern, str) else parse_pattern(pattern), **settings)
    calibration = None
    if recipe.tokens is not None:
        processor = check_processor(ckpt) if adapter.multimodal and not is_text_file(calib) else None
        calibration = load_calibration(ckpt, adapter, path=calib, nsamples=NSAMPLES, seqlen=SEQLEN,
                                       seed=recipe.seed, processor=processor,
                                       default_conversations=calibration_conversations)
    prefix = adapter.layers_prefix(model)
    plan = resolve_targets(model, prefix, recipe.pattern, targets)
    result = prune_model(model, adapter.decoder_layers(model), prefix,
                         {name: model.get_submodule(name) for name in plan.targets}, recipe, calibration, CPU,
                         progress=False)
    return model, adapter, recipe, result


def write(model, adapter, recipe, result, ckpt, out, packed=True, targets=None):
    """``model`` (pruned in memory) written packed (with its quantization_config) or dense."""
    targets = targets or [f"re:{adapter.layers_prefix(model).replace('.', '[.]')}[.][0-9]+[.].*"]
    qconfig = build_quantization_config(recipe.pattern, recipe.method, {}, targets, [], __version__)
    write_checkpoint(model, out, source_dir=ckpt, bitmasks=result.bitmasks,
                     patterns={name: recipe.pattern for name in result.bitmasks}, packed=packed,
                     quantization_config=qconfig if packed else None, extra_json={}, max_shard_size=5 * 10**9,
                     overwrite=False)
    return out


def write_both(ckpt, tmp_path, method, pattern="2:4", targets=None):
    model, adapter, recipe, result = prune(ckpt, method, pattern, targets=targets)
    for packed in (True, False):
        write(model, adapter, recipe, result, ckpt, tmp_path / ("packed" if packed else "dense"), packed, targets)
    return adapter, result


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
@pytest.mark.parametrize("method", ["atv", "wanda", "sparsegpt", "tamp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_method_pattern(vlm_dirs, family, method, pattern, tmp_path):
    ckpt = vlm_dirs[family]
    adapter, result = write_both(ckpt, tmp_path, method, pattern)
    assert len(result.bitmasks) == 14 and adapter.architecture == ARCHITECTURES[family]
    sparse, dense = atv_sparse.load(tmp_path / "packed"), atv_sparse.load(tmp_path / "dense")
    sample = image_sample(ckpt)
    with torch.no_grad():
        assert torch.equal(sparse(**sample).logits, dense(**sample).logits)
    layers = sparse.get_decoder().layers
    assert all(isinstance(getattr(layers[0].mlp, p), SparseLinear) for p in ("gate_proj", "up_proj", "down_proj"))
    # The vision tower, projector, embeddings and lm_head stay dense and unchanged.
    src, out = adapter.load(ckpt).state_dict(), adapter.load(tmp_path / "dense").state_dict()
    untouched = [k for k in src if not k.startswith(adapter.layers_prefix(sparse) + ".") or not k.endswith("proj.weight")]
    assert any("vision" in k or "visual" in k for k in untouched) and "lm_head.weight" in untouched
    assert all(torch.equal(src[k], out[k]) for k in untouched)
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert cfg["text_config"]["quantization_config"]["pattern"] == str(parse_pattern(pattern))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_generate_with_image_after_load(vlm_dirs, family, tmp_path):
    model, adapter, recipe, result = prune(vlm_dirs[family], "atv", "4:8")
    model = atv_sparse.load(write(model, adapter, recipe, result, vlm_dirs[family], tmp_path / "o"))
    sample = image_sample(vlm_dirs[family])
    out = model.generate(**sample, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == sample["input_ids"].shape[1] + 4


@pytest.mark.parametrize("family,method", [("llava", "wanda"), ("qwen2_5_vl", "wanda"), ("llava_next", "sparsegpt")])
def test_alpha_zero_is_text_only_calibration(vlm_dirs, family, method):
    ckpt = vlm_dirs[family]
    atv = prune(ckpt, method, calib_tokens="atv", alpha=0.0)[0].state_dict()
    text = prune(ckpt, method, calib_tokens="text")[0].state_dict()
    mixed = prune(ckpt, method)[0].state_dict()
    assert all(torch.equal(atv[k], text[k]) for k in atv)
    assert not all(torch.equal(atv[k], mixed[k]) for k in atv)  # the visual tokens do matter here


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_full_budget_is_mixed_calibration(vlm_dirs, family):
    ckpt = vlm_dirs[family]
    atv_model, _, _, report = prune(ckpt, "atv", budget_rule="paper", alpha=1e9)
    mixed_model, _, _, mixed_report = prune(ckpt, "wanda", calib_tokens="mixed")
    assert all(b["visual_tokens"] > 0 and b["k_min"] > 0 for b in report.blocks)
    for ours, theirs in zip(report.blocks, mixed_report.blocks, strict=True):
        assert ours["visual_tokens_used"] == theirs["visual_tokens_used"] > 0
        assert ours["text_tokens_used"] == theirs["text_tokens_used"] == ours["text_tokens"]
    atv, mixed = atv_model.state_dict(), mixed_model.state_dict()
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
    prune_blocks(model, layers, adapter.layers_prefix(model), targets, Wanda(), atv_sparse.parse_pattern("2:4"),
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
    _, _, _, report = prune(vlm_dirs["llava"], "atv", calib=calib)
    assert report.blocks[0]["samples_without_image"] == 1 and report.blocks[0]["k"][1] == 0


def test_tamp_das_layerwise_sparsity(vlm_dirs):
    ckpt = vlm_dirs["llava_onevision"]
    model, _, recipe, result = prune(ckpt, "tamp", parse_pattern("unstructured", 0.6), das=True)
    got = {n: 1 - unpack_bitmask(b, model.get_submodule(n).in_features).float().mean().item()
           for n, b in result.bitmasks.items()}
    sizes = {n: model.get_submodule(n).weight.numel() for n in result.bitmasks}
    assert len(set(round(v, 3) for v in got.values())) > 1  # layer-wise, not uniform
    assert all(v <= 0.7 + 1e-9 for v in got.values())  # s_max = s + 0.1
    mean = sum(got[n] * sizes[n] for n in got) / sum(sizes.values())
    assert abs(mean - 0.6) < 0.02  # per-row truncation moves it slightly
    settings = method_settings(recipe, nsamples=NSAMPLES, seqlen=SEQLEN, calibration="-", dtype="float32", device="cpu",
                               budget=result.budget)
    assert settings["das"] and result.blocks[0]["tamp_selected"] and "DAS pre-pass" in result.timings
    with pytest.raises(AtvSparseError, match="`das` applies to `method` tamp with `pattern` unstructured only"):
        PruneRecipe.build("tamp", parse_pattern("2:4"), das=True)


def test_tamp_needs_images(tiny_llama):
    with pytest.raises(AtvSparseError, match="vision-language"):
        prune(tiny_llama, "tamp")


@pytest.mark.parametrize("family,vision", [("llava", "re:model[.](vision_tower|multi_modal_projector)[.].*"),
                                           ("qwen2_vl", "re:model[.]visual[.].*")])
def test_vision_tower_targeted_explicitly(vlm_dirs, family, vision, tmp_path):
    ckpt = vlm_dirs[family]
    targets = [vision, "re:model[.]language_model[.]layers[.]0[.]mlp[.].*"]
    _, result = write_both(ckpt, tmp_path, "wanda", targets=targets)
    sparse, dense = atv_sparse.load(tmp_path / "packed"), atv_sparse.load(tmp_path / "dense")
    names = [n for n, m in sparse.named_modules() if isinstance(m, SparseLinear)]
    assert len(names) == len(result.bitmasks) and sum(".language_model.layers.0.mlp." in n for n in names) == 3
    assert any("vision" in n or "visual" in n for n in names)
    sample = image_sample(ckpt)
    with torch.no_grad():
        assert torch.equal(sparse(**sample).logits, dense(**sample).logits)


# ---------------------------------------------------------------------------------------------
# The CLI on vision-language checkpoints: its flags reach the library, and its errors are one line.
# ---------------------------------------------------------------------------------------------


def test_cli_writes_what_the_library_prunes(vlm_dirs, tmp_path):
    ckpt = vlm_dirs["qwen2_5_vl"]
    summary = run([str(ckpt), "--method", "atv", "--pattern", "4:8", "--out", str(tmp_path / "cli"), "--format",
                   "dense", *QUICK])
    assert summary["modules_pruned"] == 14 and summary["architecture"] == ARCHITECTURES["qwen2_5_vl"]
    model, *_ = prune(ckpt, "atv", "4:8")
    cli, lib = dense_state(tmp_path / "cli"), model.state_dict()
    assert set(cli) <= set(lib) and all(torch.equal(cli[k], lib[k]) for k in cli)
    report = json.loads((tmp_path / "cli" / "prune_report.json").read_text())
    assert report["settings"]["calib_tokens"] == "atv" and report["settings"]["nsamples"] == 3


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


def test_plot_das_and_tamp_flags(vlm_dirs, tiny_llama, tmp_path, capsys):
    run([str(vlm_dirs["llava_next"]), "--method", "atv", "--plot", "--out", str(tmp_path / "o"), *QUICK])
    png = tmp_path / "o" / "prune_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(vlm_dirs["llava_next"]), "--method", "wanda", "--plot", "--out", str(tmp_path / "o2"),
                 *QUICK]) == 2
    capsys.readouterr()
    ckpt = vlm_dirs["llava_onevision"]
    assert main([str(ckpt), "--method", "tamp", "--pattern", "2:4", "--das", "--out", str(tmp_path / "x")]) == 2
    assert "--das applies to --method tamp with --pattern unstructured only" in capsys.readouterr().err
    assert main([str(tiny_llama), "--method", "tamp", "--out", str(tmp_path / "t"), *QUICK]) == 2
    assert "vision-language" in capsys.readouterr().err
