"""The block driver against a literal copy of the reference's sequential loop (wanda's prune_wanda /
prune_sparsegpt): block-0 inputs caught with a pre-hook, one sample per forward, statistics over the
dense block, prune, then the *pruned* block's outputs feed the next block."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from atv_sparse.calib import read_calibration_text, text_windows
from atv_sparse.convert import run
from reference_pruners import (RefHessianStats, RefWandaStats, ref_magnitude_keep, ref_nm_keep,
                               ref_sparsegpt_prune, ref_unstructured_keep, ref_wanda_score)


class _Caught(Exception):
    pass


@torch.no_grad()
def reference_sequential(model, samples, method, n=None, m=None, sparsity=None):
    layers = model.model.layers
    inps, kws = [], []

    def catch(module, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        kws.append(kwargs)
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for ids in samples:
        try:
            model(input_ids=ids, use_cache=False)
        except _Caught:
            pass
    handle.remove()

    def forward(layer, j):
        out = layer(inps[j], **kws[j])
        return out[0] if isinstance(out, tuple) else out

    for layer in layers:
        subset = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        stats = {name: (RefWandaStats if method == "wanda" else RefHessianStats)(mod.in_features)
                 for name, mod in subset.items()}
        handles = [mod.register_forward_hook(lambda mod, inp, out, st=stats[name]: st.add_batch(inp[0].data))
                   for name, mod in subset.items()]
        for j in range(len(inps)):
            forward(layer, j)
        for h in handles:
            h.remove()
        for name, mod in subset.items():
            W = mod.weight.data
            if method == "wanda":
                score = ref_wanda_score(W, stats[name].scaler_row)
                keep = ref_nm_keep(score, n, m) if m else ref_unstructured_keep(score, sparsity)
                W[~keep] = 0
            else:
                pruned, _ = ref_sparsegpt_prune(W, stats[name].H, sparsity=sparsity, n=n, m=m)
                mod.weight.data = pruned.to(W.dtype)
        for j in range(len(inps)):
            inps[j] = forward(layer, j)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("wanda", "unstructured"), ("sparsegpt", "4:8"),
                                            ("sparsegpt", "unstructured")])
def test_driver_matches_sequential_reference(family, method, pattern, tiny_llama, tiny_qwen2, calib_txt, tmp_path):
    ckpt = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    run([str(ckpt), "--method", method, "--pattern", pattern, "--calib", str(calib_txt), "--nsamples", "5",
         "--seqlen", "24", "--seed", "3", "--format", "dense", "--out", str(tmp_path / "out"), "--quiet",
         "--device", "cpu"])  # the reference runs on the CPU: a cuda driver could flip near-tie masks
    ours = load_file(tmp_path / "out" / "model.safetensors")

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    samples = text_windows(AutoTokenizer.from_pretrained(ckpt), read_calibration_text(calib_txt), 5, 24, 3)
    nm = dict(n=int(pattern[0]), m=int(pattern[2])) if pattern != "unstructured" else dict(sparsity=0.5)
    reference_sequential(model, samples, method, **nm)
    for name, value in model.state_dict().items():
        if method == "wanda":
            assert torch.equal(ours[name], value), name
        else:
            assert torch.equal(ours[name] == 0, value == 0), name
            torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5)


def test_magnitude_needs_no_calibration(tiny_llama, tmp_path):
    run([str(tiny_llama), "--method", "magnitude", "--pattern", "unstructured", "--sparsity", "0.6",
         "--format", "dense", "--out", str(tmp_path / "out"), "--calib", str(tmp_path / "absent.txt"), "--quiet"])
    ours = load_file(tmp_path / "out" / "model.safetensors")
    src = load_file(tiny_llama / "model.safetensors")
    for name, value in src.items():
        if ".layers." in name and name.endswith("proj.weight"):
            keep = ref_magnitude_keep(value, sparsity=0.6)
            assert torch.equal(ours[name], torch.where(keep, value, torch.zeros(()))), name
        else:
            assert torch.equal(ours[name], value), name
