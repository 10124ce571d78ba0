"""The MoT probe: bit-identical when unpruned, routing by the image-token mask in calibration, evaluation and
decoding, one pathway pruned with Wanda statistics over the chosen rows while the other stays untouched."""

import inspect

import pytest
import torch
from torch import nn
from transformers import AutoConfig

from atv_sparse.analysis.mot import MoTLinear, attach_mot, mot_prune
from atv_sparse.calib.multimodal import build_sample
from atv_sparse.tinybench.tasks import calibration_conversations
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import unpack_bitmask
from atv_sparse.models import adapter_for, read_config
from atv_sparse.models.processors import load_processor
from atv_sparse.patterns import parse_pattern
from reference_pruners import ref_nm_keep, ref_unstructured_keep
from atv_sparse.tinybench.families import write_tiny_vlm

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
NSAMPLES = 3


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """family -> (checkpoint dir, calibration samples with images)."""
    base = tmp_path_factory.mktemp("mot")
    out = {}
    for fam in ("llava", "qwen2_vl"):
        ckpt = write_tiny_vlm(base / fam, fam, seed=4)
        token_id = AutoConfig.from_pretrained(ckpt).image_token_id
        processor = load_processor(ckpt)
        convs = calibration_conversations(NSAMPLES, seed=9, size=96)
        out[fam] = ckpt, [build_sample(processor, conv, token_id) for conv in convs]
    return out


def load(ckpt):
    return adapter_for(read_config(ckpt), ckpt).load(ckpt)


def logits(model, sample):
    with torch.no_grad():
        return model(**sample).logits


@pytest.mark.parametrize("shared_o", [False, True])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_unpruned_probe_is_bit_identical(vlms, family, shared_o):
    ckpt, samples = vlms[family]
    model = load(ckpt)
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = [logits(model, s) for s in samples]
    with torch.no_grad():
        generated = model.generate(**samples[0], max_new_tokens=4, do_sample=False)
    probe = attach_mot(model, shared_o=shared_o)
    assert len(probe.linears) == (12 if shared_o else 14) and len(probe.shared) == (2 if shared_o else 0)
    assert all(isinstance(model.get_submodule(n), MoTLinear) for n in probe.linears)
    assert all(torch.equal(logits(model, s), b) for s, b in zip(samples, before, strict=True))
    with torch.no_grad():
        assert torch.equal(model.generate(**samples[0], max_new_tokens=4, do_sample=False), generated)
    probe.detach()
    assert all(model.get_submodule(n) is m for n, m in originals.items())  # the original objects are back
    assert torch.equal(logits(model, samples[0]), before[0])


def masks_seen(probe, run):
    """The routing mask each forward of the first block's q_proj saw while ``run()`` ran."""
    seen = []
    first = next(iter(probe.linears.values()))
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(probe.router.current.clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_routing_in_prefill_and_decoding(vlms, family):
    ckpt, samples = vlms[family]
    model = load(ckpt)
    probe = attach_mot(model)
    sample, token_id = samples[0], probe.image_token_id
    with torch.no_grad():
        seen = masks_seen(probe, lambda: model.generate(**sample, max_new_tokens=3, do_sample=False))
    assert len(seen) == 3
    assert torch.equal(seen[0], sample["input_ids"] == token_id) and seen[0].sum() > 0
    assert all(m.shape == (1, 1) and not m.any() for m in seen[1:])  # decoding steps: new tokens are text

    # A decoding step whose new token is the image token id is still text: it carries no image features.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # < 5.24
    with torch.no_grad():
        prefill = model(**sample, use_cache=True)
        step = {"input_ids": torch.tensor([[token_id]]), cache_arg: getattr(prefill, cache_arg)}
        seen = masks_seen(probe, lambda: model(**step))
    assert len(seen) == 1 and seen[0].shape == (1, 1) and not seen[0].any()
    assert probe.router.current is None  # cleared after each forward


def block0_reference_masks(ckpt, samples, calib, pattern, token_id):
    """Independent Wanda masks of block 0: the original model's block-0 inputs caught with a pre-hook, the
    dense block run on them, r accumulated literally over the chosen rows (one sample = one sequence)."""
    model = load(ckpt)
    block = model.get_decoder().layers[0]
    caught = []

    class Caught(Exception):
        pass

    def catch(module, args, kwargs):
        caught.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise Caught

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    for s in samples:
        try:
            model(**s, use_cache=False)
        except Caught:
            pass
    handle.remove()
    r = {rel: torch.zeros(block.get_submodule(rel).in_features) for rel in LINEARS}
    current = {}
    handles = [block.get_submodule(rel).register_forward_hook(
        lambda m, a, o, rel=rel: current.__setitem__(rel, a[0][0].clone())) for rel in LINEARS]
    for n, (s, (hidden, kwargs)) in enumerate(zip(samples, caught, strict=True)):
        with torch.no_grad():
            block(hidden, **kwargs)
        visual = s["input_ids"][0] == token_id
        rows = {"text": ~visual, "visual": visual, "all": torch.ones_like(visual)}[calib]
        for rel in LINEARS:
            x = current[rel][rows].float()
            r[rel] = r[rel] * n / (n + 1) + (x ** 2).sum(0) / (n + 1)
    for h in handles:
        h.remove()
    masks = {}
    for rel in LINEARS:
        score = block.get_submodule(rel).weight.abs() * torch.sqrt(r[rel])
        masks[rel] = ref_nm_keep(score, pattern.n, pattern.m) if pattern.is_nm else \
            ref_unstructured_keep(score, pattern.sparsity)
    return masks


CASES = [("llava", "visual", "visual", "unstructured", 0.5), ("llava", "text", "text", "unstructured", 0.6),
         ("qwen2_vl", "visual", "all", "unstructured", 0.6), ("qwen2_vl", "text", "visual", "2:4", None),
         ("llava", "visual", "text", "4:8", None)]


@pytest.mark.parametrize("family,pathway,calib,pattern,sparsity", CASES, ids=str)
def test_prune_one_pathway(vlms, family, pathway, calib, pattern, sparsity):
    ckpt, samples = vlms[family]
    model = load(ckpt)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    probe = attach_mot(model)
    report = mot_prune(probe, samples, pathway=pathway, calib=calib, pattern=pattern, sparsity=sparsity, device="cpu")
    p = parse_pattern(pattern, sparsity)
    other = "text" if pathway == "visual" else "visual"
    assert len(report.bitmasks) == 14 and report.shared == []

    for full, mot in probe.linears.items():
        w0 = original[full + ".weight"]
        assert torch.equal(getattr(mot, other).weight, w0)  # the other pathway is untouched
        pruned = getattr(mot, pathway).weight
        keep = unpack_bitmask(report.bitmasks[f"{full}.{pathway}"], mot.in_features)
        assert torch.equal(pruned, torch.where(keep, w0, torch.zeros_like(w0)))  # Wanda: survivors unchanged
        if p.is_nm:
            assert (keep.reshape(keep.shape[0], -1, p.m).sum(-1) == p.n).all()
        else:
            assert ((~keep).sum(1) == int(mot.in_features * p.sparsity)).all()  # exactly int(in * s) per row
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items() if k in state)  # norms, vision, lm_head

    # Block 0: the masks equal Wanda masks from an independent computation over the chosen rows.
    prefix = probe.layers_prefix + ".0."
    expected = block0_reference_masks(ckpt, samples, calib, p, probe.image_token_id)
    for rel, keep in expected.items():
        assert torch.equal(unpack_bitmask(report.bitmasks[f"{prefix}{rel}.{pathway}"], keep.shape[1]), keep), rel

    # Block 1 was calibrated on inputs propagated through the pruned, routed block 0: the probed model's own
    # forward (routed by its hook, as in evaluation) gives the same block-1 inputs, hence the same q/k/v masks.
    block1, caught = probe.layers[1], []
    handle = block1.register_forward_pre_hook(lambda m, a, kw: caught.append(a[0] if a else kw["hidden_states"]),
                                              with_kwargs=True)
    for s in samples:
        logits(model, s)
    handle.remove()
    r, n = torch.zeros(block1.input_layernorm.weight.shape[0]), 0
    for s, hidden in zip(samples, caught, strict=True):
        visual = s["input_ids"][0] == probe.image_token_id
        rows = {"text": ~visual, "visual": visual, "all": torch.ones_like(visual)}[calib]
        with torch.no_grad():
            x = block1.input_layernorm(hidden)[0][rows].float()
        r, n = r * n / (n + 1) + (x ** 2).sum(0) / (n + 1), n + 1
    for rel in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        full = f"{probe.layers_prefix}.1.{rel}"
        score = original[full + ".weight"].abs() * torch.sqrt(r)
        keep = ref_nm_keep(score, p.n, p.m) if p.is_nm else ref_unstructured_keep(score, p.sparsity)
        assert torch.equal(unpack_bitmask(report.bitmasks[f"{full}.{pathway}"], keep.shape[1]), keep), rel

    # A text-only forward runs the text pathway alone: the original model's when the visual one was pruned.
    ids = samples[0]["input_ids"]
    text_only = {"input_ids": ids[ids != probe.image_token_id][None, :12]}
    same = torch.equal(logits(model, text_only), logits(load(ckpt), text_only))
    assert same if pathway == "visual" else not same


def test_shared_o_stays_dense(vlms):
    ckpt, samples = vlms["qwen2_vl"]
    model = load(ckpt)
    probe = attach_mot(model, shared_o=True)
    o_before = {n: model.get_submodule(n).weight.clone() for n in probe.shared}
    report = mot_prune(probe, samples, pathway="visual", calib="visual", pattern="unstructured", sparsity=0.5)
    assert len(report.bitmasks) == 12 and report.shared == probe.shared
    assert not any("o_proj" in n for n in report.bitmasks)
    assert all(type(model.get_submodule(n)) is nn.Linear and torch.equal(model.get_submodule(n).weight, w)
               for n, w in o_before.items())
    visual = {n: mot.visual for n, mot in probe.linears.items()}
    probe.detach(keep="visual")  # the pruned visual pathway for every token, as a plain model
    assert all(model.get_submodule(n) is lin for n, lin in visual.items())
    assert not any(isinstance(m, MoTLinear) for m in model.modules())
    logits(model, samples[0])


def test_linear_without_a_mask_fails_loudly(vlms):
    ckpt, samples = vlms["llava"]
    model = load(ckpt)
    probe = attach_mot(model)
    x = torch.randn(1, 5, model.config.text_config.hidden_size)
    mot = next(iter(probe.linears.values()))
    with pytest.raises(AtvSparseError, match="without an image-token mask"):
        mot(x)
    with probe.routing(torch.zeros(1, 4, dtype=torch.bool)), pytest.raises(AtvSparseError, match=r"mask is \(1, 4\)"):
        mot(x)
    with probe.routing(torch.zeros(1, 5, dtype=torch.bool)):
        assert torch.equal(mot(x), mot.text(x))
        logits(model, {"input_ids": samples[0]["input_ids"][:, :4]})  # a model forward inside keeps the scope's mask
        assert probe.router.current.shape == (1, 5)
    assert probe.router.current is None
    embeds = model.get_input_embeddings()(samples[0]["input_ids"][:, :6])
    with pytest.raises(AtvSparseError, match="without input_ids"):
        model(inputs_embeds=embeds)


def test_bad_input(vlms, tiny_llama):
    ckpt, samples = vlms["llava"]
    with pytest.raises(AtvSparseError, match="no image_token_id"):
        attach_mot(load(tiny_llama))
    model = load(ckpt)
    probe = attach_mot(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AtvSparseError, match="already has a MoT probe"):
        attach_mot(model)
    with pytest.raises(AtvSparseError, match="pathway 'image'"):
        mot_prune(probe, samples, pathway="image")
    with pytest.raises(AtvSparseError, match="rows 'mixed'"):
        mot_prune(probe, samples, calib="mixed")
    with pytest.raises(AtvSparseError, match=r"in_features=64 is not a multiple of M=7"):
        mot_prune(probe, samples, pattern="3:7")
    text_only = [{"input_ids": s["input_ids"][:, :8]} for s in samples]
    with pytest.raises(AtvSparseError, match="none of the 3 samples"):
        mot_prune(probe, text_only, calib="visual")
    batched = [{"input_ids": torch.cat([samples[0]["input_ids"]] * 2)}]
    with pytest.raises(AtvSparseError, match=r"sample 0: expected .* \(1, T\)"):
        mot_prune(probe, batched)
    with pytest.raises(AtvSparseError, match="at least one"):
        mot_prune(probe, [])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # nothing was pruned
