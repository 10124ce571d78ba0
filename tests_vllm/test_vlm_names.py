"""A vision-language checkpoint: the config block from ``text_config`` and vLLM's renaming of modules.

vLLM's vision-language model classes import torchvision, which has no CPU build for this torch
on PyPI, so no VLM engine starts here. This test runs the plugin's side of it on vLLM's real
classes instead: the config from a tiny LLaVA-1.5 checkpoint pruned by ``atv_sparse.convert``,
the model's ``hf_to_vllm_mapper`` rules (copied from vllm/model_executor/models/llava.py,
0.32), and a real ``QKVParallelLinear`` loading the checkpoint's q / k / v parts.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import convert

# LlavaForConditionalGeneration.hf_to_vllm_mapper in vLLM 0.32 (checkpoints saved by transformers >= 4.52)
LLAVA_PREFIXES = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                  "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
IGNORED = "model.language_model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from atv_sparse.tinybench.families import write_tiny_vlm

    root = tmp_path_factory.mktemp("llava")
    src = write_tiny_vlm(root / "llava", "llava")
    packed = convert(src, root / "packed", "--pattern", "2:4", "--ignore", IGNORED)
    dense = convert(src, root / "dense", "--pattern", "2:4", "--ignore", IGNORED, "--format", "dense")
    return packed, dense


@pytest.mark.parametrize("source", ["local directory", "hub id"])
def test_llava_language_linears_sparse_and_vision_dense(llava, source, monkeypatch):
    from vllm.model_executor.layers.linear import QKVParallelLinear, UnquantizedLinearMethod
    from vllm.model_executor.models.utils import WeightsMapper

    from atv_sparse.vllm_plugin import register
    from atv_sparse.vllm_plugin.config import AtvSparseVllmConfig
    from atv_sparse.vllm_plugin.linear import AtvSparseLinearMethod

    register()
    packed, dense = llava
    block = json.loads((packed / "config.json").read_text())["text_config"]["quantization_config"]
    config = AtvSparseVllmConfig.from_config(block)
    # a hub id has no local files yet: the plugin then decides from targets / ignore
    config.maybe_update_config(str(packed) if source == "local directory" else "someone/tiny-llava-2of4")
    assert (config.checkpoint_pruned is None) == (source == "hub id")
    config.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix=LLAVA_PREFIXES))
    config.packed_modules_mapping = PACKED

    # text config: hidden 64, 4 heads of 16, 2 KV heads (atv_sparse/tinybench/families.py)
    qkv = QKVParallelLinear(64, 16, 4, 2, bias=False, quant_config=config,
                            prefix="language_model.model.layers.0.self_attn.qkv_proj", disable_tp=True)
    assert isinstance(qkv.quant_method, AtvSparseLinearMethod)
    for prefix, sparse in [("language_model.model.layers.0.mlp.down_proj", True),
                           ("language_model.model.layers.1.mlp.down_proj", False),  # --ignore
                           ("language_model.model.layers.1.mlp.gate_up_proj", True),
                           ("vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj", False),
                           ("vision_tower.vision_model.encoder.layers.0.mlp.fc1", False),
                           ("multi_modal_projector.linear_1", False)]:
        method = config.get_quant_method(qkv, prefix)
        assert isinstance(method, AtvSparseLinearMethod if sparse else UnquantizedLinearMethod), prefix

    tensors = load_file(packed / "model.safetensors")
    params = dict(qkv.named_parameters())
    for part in "qkv":
        for name in ("weight_bitmask", "weight_values"):
            param = params[name]
            param.weight_loader(param, tensors[f"model.language_model.layers.0.self_attn.{part}_proj.{name}"], part)
    qkv.quant_method.process_weights_after_loading(qkv)
    assert set(dict(qkv.named_parameters())) == {"weight_bitmask", "weight_values"}

    # vLLM's forward (apply) runs on what process_weights_after_loading prepared: no module, no plan per call
    from atv_sparse.nn.sparse_linear import SparseLinear
    from atv_sparse.ops import autotune
    from atv_sparse.vllm_plugin import serving

    calls = []
    for owner, name in ((SparseLinear, "__init__"), (autotune.PlanTable, "plan"), (autotune, "default_plan"),
                        (serving, "build_layouts")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    dense_tensors = load_file(dense / "model.safetensors")
    weight = torch.cat([dense_tensors[f"model.language_model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    for tokens in (5, 1, 70):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
        torch.testing.assert_close(qkv(x)[0], x @ weight.T, rtol=1e-5, atol=1e-5)
    assert calls == []
