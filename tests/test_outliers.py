"""The outlier-channel transform: the model's function is unchanged, magnitude's masks change, Wanda's and
SparseGPT's do not (SparseGPT's only through its dampening), and the CLI writes a loadable directory."""

import copy
import json
import shutil

import pytest
import torch
from torch import nn

from atv_sparse.analysis.outliers import add_outlier_channels, choose_channels, main
from atv_sparse.calib.multimodal import build_sample
from atv_sparse.tinybench.tasks import calibration_conversations
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import unpack_bitmask
from atv_sparse.models import adapter_for, read_config
from atv_sparse.models.processors import load_processor
from atv_sparse.patterns import parse_pattern
from atv_sparse.prune.driver import prune_blocks
from atv_sparse.prune.magnitude import magnitude_mask
from atv_sparse.prune.recipe import METHODS
from atv_sparse.tinybench.families import write_tiny_vlm

FAMILIES = ["llama", "qwen2", "llava", "qwen2_vl"]


@pytest.fixture(scope="module")
def ckpts(tiny_llama, tiny_qwen2, tmp_path_factory):
    base = tmp_path_factory.mktemp("outlier-vlm")
    return {"llama": tiny_llama, "qwen2": tiny_qwen2,
            **{fam: write_tiny_vlm(base / fam, fam, seed=2) for fam in ("llava", "qwen2_vl")}}


def load(ckpt):
    return adapter_for(read_config(ckpt), ckpt).load(ckpt)


def samples_for(ckpt, model, n, seed=0):
    """n model inputs: synthetic image conversations for a VLM, random token windows for a text model."""
    if getattr(model.config, "image_token_id", None) is not None:
        processor = load_processor(ckpt)
        return [build_sample(processor, conv, model.config.image_token_id)
                for conv in calibration_conversations(n, seed=seed, size=96)]
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, model.config.vocab_size, (1, 32), generator=g)} for _ in range(n)]


def logits(model, sample):
    with torch.no_grad():
        return model(**sample).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_power_of_two_scale_keeps_logits_bit_identical(ckpts, family):
    model = load(ckpts[family])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sample = samples_for(ckpts[family], model, 1, seed=5)[0]
    before = logits(model, sample)
    report = add_outlier_channels(model, channels=4, scale=32, seed=1)
    # c = 2^5: w * c and W / c are exact, every product in the consumers is the same number.
    assert torch.equal(logits(model, sample), before)

    layers = model.get_decoder().layers
    assert len(report.channels) == 4 and report.channels == sorted(set(report.channels))
    assert len(report.norms) == 2 * len(layers) and len(report.linears) == 5 * len(layers)
    ch = torch.tensor(report.channels)
    others = torch.ones(model.config.get_text_config().hidden_size, dtype=torch.bool)
    others[ch] = False
    changed = set()
    for norm in report.norms:
        w, w0 = model.get_submodule(norm).weight, original[norm + ".weight"]
        assert torch.equal(w[ch], w0[ch] * 32) and torch.equal(w[others], w0[others])
        changed.add(norm + ".weight")
    for lin in report.linears:
        w, w0 = model.get_submodule(lin).weight, original[lin + ".weight"]
        assert torch.equal(w[:, ch], w0[:, ch] / 32) and torch.equal(w[:, others], w0[:, others])
        changed.add(lin + ".weight")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items() if k not in changed)  # vision, lm_head, ...


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_other_scale_within_fp32_rounding(ckpts, family):
    # A non-power-of-two c adds one rounding (2^-24 relative) per scaled weight, the size of those the fp32
    # forward already makes: against a float64 run of the original, the transformed model's error stays
    # within 2x the original fp32 model's own error (measured ratio 0.93-1.07 for c in 20..50).
    model = load(ckpts[family])
    sample = samples_for(ckpts[family], model, 1, seed=6)[0]
    sample64 = {k: v.double() if v.is_floating_point() else v for k, v in sample.items()}
    exact = logits(copy.deepcopy(model).double(), sample64)
    error_original = (logits(model, sample).double() - exact).abs().max()
    add_outlier_channels(model, channels=4, scale=20, seed=0)
    transformed = logits(model, sample)
    assert (transformed.double() - exact).abs().max() <= 2 * error_original
    assert error_original > 0  # the bound is not vacuous


def prune_masks(model, samples, method, pattern, **settings):
    """Every decoder linear's keep-mask after pruning a copy of ``model`` with the block driver
    (``method``'s rule with ``settings``)."""
    model = copy.deepcopy(model)
    layers = model.get_decoder().layers
    prefix = next(name for name, m in model.named_modules() if m is layers)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")}
    result = prune_blocks(model, layers, prefix, targets, METHODS[method].rule(**settings), pattern, samples,
                          torch.device("cpu"), progress=False)
    return {n: unpack_bitmask(b, targets[n].in_features) for n, b in result.bitmasks.items()}


def test_magnitude_masks_change(ckpts):
    model = load(ckpts["llama"])
    transformed = copy.deepcopy(model)
    report = add_outlier_channels(transformed, channels=4, scale=32)
    for lin in report.linears:
        before = magnitude_mask(model.get_submodule(lin).weight, parse_pattern("unstructured", 0.5))
        after = magnitude_mask(transformed.get_submodule(lin).weight, parse_pattern("unstructured", 0.5))
        assert not torch.equal(before, after)
        assert not after[:, report.channels].any()  # |W| / 32 falls far below the median: all pruned
    for nm in ("2:4", "4:8"):
        p = parse_pattern(nm)
        lin = report.linears[0]
        assert not torch.equal(magnitude_mask(model.get_submodule(lin).weight, p),
                               magnitude_mask(transformed.get_submodule(lin).weight, p))


@pytest.mark.parametrize("family", ["llama", "llava"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_wanda_masks_unchanged(ckpts, family, pattern):
    # |W_ij / c| * ||c X_j|| = |W_ij| * ||X_j||, and with c = 32 every step of Wanda's statistics is an exact
    # power-of-two scaling, so the masks are equal exactly (ties included), block after block.
    model = load(ckpts[family])
    samples = samples_for(ckpts[family], model, 4, seed=1)
    transformed = copy.deepcopy(model)
    add_outlier_channels(transformed, channels=4, scale=32, seed=3)
    before = prune_masks(model, samples, "wanda", parse_pattern(pattern))
    after = prune_masks(transformed, samples, "wanda", parse_pattern(pattern))
    assert before.keys() == after.keys() and len(before) == 14
    assert all(torch.equal(before[n], after[n]) for n in before)
    # ... while magnitude's change.
    magnitude = [prune_masks(m, None, "magnitude", parse_pattern(pattern)) for m in (model, transformed)]
    assert all(not torch.equal(magnitude[0][n], magnitude[1][n]) for n in magnitude[0] if "o_proj" not in n
               and "down_proj" not in n)


def test_sparsegpt_masks_unchanged_but_for_dampening(ckpts):
    model = load(ckpts["llama"])
    samples = samples_for(ckpts["llama"], model, 8, seed=2)  # 256 tokens: H (128 x 128) is positive definite
    transformed = copy.deepcopy(model)
    add_outlier_channels(transformed, channels=4, scale=32)
    # H -> D H D with D = diag(1, ..., c, ...): Cholesky, its inverse and the saliency W^2 / [H^-1]_jj^2 are
    # exactly equivariant for a power-of-two c. The dampening percdamp * mean(diag H) * I is not (the c^2
    # entries raise the mean), so the masks are equal exactly without it ...
    for pattern in ("2:4", "unstructured"):
        before = prune_masks(model, samples, "sparsegpt", parse_pattern(pattern), percdamp=0.0)
        after = prune_masks(transformed, samples, "sparsegpt", parse_pattern(pattern), percdamp=0.0)
        assert all(torch.equal(before[n], after[n]) for n in before)
    # ... and nearly equal with the default 1% (measured: 94.6% of the 2:4 mask entries agree, 98.1% unstructured,
    # against 95.5% for magnitude's masks, which only change in the 4 of 64 scaled columns).
    before = prune_masks(model, samples, "sparsegpt", parse_pattern("unstructured"))
    after = prune_masks(transformed, samples, "sparsegpt", parse_pattern("unstructured"))
    agreement = sum((before[n] == after[n]).sum().item() for n in before) / sum(m.numel() for m in before.values())
    assert agreement > 0.95


def test_channels_are_deterministic_from_the_seed():
    assert choose_channels(64, 4, seed=0) == choose_channels(64, 4, seed=0)
    drawn = {tuple(choose_channels(64, 4, seed=s)) for s in range(5)}
    assert len(drawn) == 5
    assert all(len(set(c)) == 4 and all(0 <= i < 64 for i in c) for c in drawn)


@pytest.mark.parametrize("kwargs,match", [({"scale": 0}, "^`scale` must"), ({"scale": float("nan")}, "^`scale` must"),
                                          ({"channels": 0}, "^`channels` must"), ({"channels": 64}, "^`channels` must")])
def test_bad_arguments(ckpts, kwargs, match):
    with pytest.raises(AtvSparseError, match=match):
        add_outlier_channels(load(ckpts["llama"]), **kwargs)


def test_refuses_a_model_without_llama_blocks(ckpts):
    with pytest.raises(AtvSparseError, match="no decoder blocks"):
        add_outlier_channels(nn.Linear(4, 4))
    model = load(ckpts["qwen2"])
    model.model.layers[1].mlp.up_proj = nn.Identity()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AtvSparseError, match=r"model\.layers\.1\.mlp\.up_proj"):
        add_outlier_channels(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # checked before any change


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_cli_writes_a_loadable_transformed_checkpoint(ckpts, family, tmp_path, capsys):
    out = tmp_path / "outliers"
    assert main([str(ckpts[family]), "--out", str(out), "--channels", "3", "--scale", "32", "--seed", "4"]) == 0
    info = json.loads((out / "outliers.json").read_text())
    assert len(info["channels"]) == 3 and info["scale"] == 32 and info["seed"] == 4
    assert not list(tmp_path.glob(".*partial*"))
    original, written = load(ckpts[family]), load(out)
    expected = copy.deepcopy(original)
    add_outlier_channels(expected, channels=3, scale=32, seed=4)
    assert all(torch.equal(v, written.state_dict()[k]) for k, v in expected.state_dict().items())
    sample = samples_for(out, written, 1)[0]  # the copied tokenizer / processor files build the inputs
    assert torch.equal(logits(written, sample), logits(original, sample))
    if family == "qwen2_vl":
        assert (out / "chat_template.jinja").is_file()
    for name in (p.name for p in ckpts[family].iterdir() if p.suffix != ".safetensors"):
        assert (out / name).exists(), name

    assert main([str(ckpts[family]), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(ckpts[family]), "--out", str(out), "--overwrite", "--scale", "16"]) == 0
    assert json.loads((out / "outliers.json").read_text())["scale"] == 16


def test_cli_bad_input(ckpts, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    packed = tmp_path / "packed"
    shutil.copytree(ckpts["llama"], packed)
    config = json.loads((packed / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "atv_sparse"}}))
    assert main([str(packed), "--out", str(tmp_path / "o")]) == 2
    assert "compressed checkpoint" in capsys.readouterr().err
    assert main([str(ckpts["llama"]), "--out", str(tmp_path / "o"), "--channels", "999"]) == 2
    assert "--channels" in capsys.readouterr().err and not (tmp_path / "o").exists()
